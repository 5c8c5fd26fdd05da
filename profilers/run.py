"""`distplan profile`: measure one node (ceilings, collectives, per-layer compute) and fit a Profile.

Order: communication (its own processes, spawned here; or the torchrun ranks this process is one
of), then device facts and ceilings (matmul sweep, copy), then compute (this process, its GPU; on a
CPU one thread), then fits. CPU runs use one thread per 'device', as each gloo rank does.
Pure with respect to the caller: progress goes through the `progress(label, done, total)` callback
and the result is a `planner.core.profile.Profile`; the CLI renders and writes it.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from planner.core.errors import require
from planner.core.job import MAX_GLOBAL_BATCH, MAX_SEQ_LEN
from planner.core.model import load_model
from planner.core.profile import CollectiveFit, ComputeFit, Profile, compute_points
from planner.core.model import describe_shape, model_shape
from profilers import comm, compute, facts, fit, megatron_layer
from profilers.pipeline import fit_pipeline
from profilers.sharding import GPU_STACK, STACK, ShardingSettings, fit_sharding

ProgressFn = Callable[[str, int, int], None]
DEFAULT_CPU_DEVICES = 2  # gloo processes standing in for GPUs on a machine without any
MAX_GPUS_PER_NODE = 1024  # beyond any node built (GB200 NVL72: 72 GPUs in one NVLink domain); on CPUs, processes
MAX_STACK_BLOCKS = 256  # the sharding stacks hold this many blocks at most (default 8; each is a layer's weights)


@dataclass(frozen=True)
class ProfileRequest:
    model: str
    seq_len: int | None = None
    dtype: str = "auto"  # auto: bf16 on GPUs, fp32 on CPUs (what `distplan run --dtype auto` trains in there)
    gpus_per_node: int | None = None  # default: the GPUs present (CPU: 2 processes)
    quick: bool = False
    device: str = "auto"  # auto | cuda | cpu
    micro_batches: tuple[int, ...] | None = None
    # measure one phase only ("communication": collectives, sharding, pipelining and TP stacks; "compute": layers,
    # device ceilings, megatron-core's layer) and take the other's raw points from `base`, an earlier profile of the
    # same model, sequence length, dtype and machine; every fit is then made again from the merged points
    only: str | None = None
    base: str | None = None
    # blocks in the sharding profiler's larger stack (profilers/sharding.py): the per-block figure is the difference
    # to one block over stack - 1, so a longer stack measures it with more signal (and takes longer); None: GPU_STACK
    # on GPUs (held to what fits), STACK on CPUs
    stack_blocks: int | None = None


@dataclass(frozen=True)
class Plan:
    """What one profile run measures (derived from the request and the machine)."""

    cuda: bool
    quick: bool
    devices: int  # processes for communication (GPUs present, or CPU processes)
    tps: tuple[int, ...]
    seq_len: int
    dtype: str  # bf16, fp16 or fp32: the request's, "auto" resolved for the device
    compute: compute.ComputeSettings
    comm: comm.CommSettings
    kinds: int = 3  # profiled kinds (compute.profiled_kinds)
    megatron: bool = False  # also megatron-core's own layer at tp = 1 (profilers/megatron_layer.py)

    @property
    def steps(self) -> int:
        comm_points = sum(len(self.comm.sizes_bytes) * sum(1 for op in self.comm.ops if op != "p2p" or n == 2)
                          for n in self.comm.group_sizes)
        ceilings = len(facts.matmul_sizes(self.cuda, self.quick)) + 2  # + copy, optimizer
        sharding_points = 4 * len(self.comm.group_sizes)  # 2 stacks x 2 modes
        if self.comm.sharding is not None and self.comm.sharding.ddp:
            sharding_points += 2 * len(self.comm.group_sizes)  # DDP, 2 stacks
        if self.comm.sharding is not None and self.comm.sharding.deepspeed:
            sharding_points += 2 * len(self.comm.sharding.deepspeed_stages)  # DeepSpeed, 2 stacks per ZeRO stage, at the largest group
        if self.comm.sharding is not None and self.comm.sharding.pipeline and 2 in self.comm.group_sizes:
            sharding_points += len(self.comm.sharding.pipeline_schedules) * len(self.comm.sharding.micro_batches)
        if self.comm.sharding is not None and self.comm.sharding.tensor_parallel:
            sharding_points += 4 * len(self.comm.group_sizes)  # DTensor TP without and with SP, 2 stacks each
            if self.devices >= 4:  # FSDP2 x TP on the whole node: 2 stacks x 2 modes per tp degree leaving dp >= 2
                sharding_points += 4 * sum(1 for g in self.comm.group_sizes
                                           if 2 <= g <= self.devices // 2 and self.devices % g == 0)
        layers = self.kinds * len(self.tps) * len(self.compute.micro_batches)
        if self.megatron:
            layers += 2 * len(megatron_settings(self).micro_batches)  # its layer, then its last stage
        return ceilings + comm_points + sharding_points + layers + 1  # + fits


# a full profile on GPUs times micro-batches up to at least this many tokens: above its largest point the cost model
# scales time in proportion to tokens (LayerFit.time_s), which misses what larger kernels gain. gpt2-xl's DDP plan
# at 32 x 4 (1024-token sequences) ran 3.05 s and at 16 x 8 3.14-3.15 s where both were predicted 3.152 s from
# points up to micro-batch 16, and the solver picked the slower one (2xH200, call 21)
FULL_PROFILE_TOKENS = 32768
QUICK_SHARDING_TOKENS = 16384  # --quick on GPUs: tokens of the largest micro-batch the sharding stacks run


def megatron_settings(plan: Plan) -> compute.ComputeSettings:
    """The megatron layer's settings: the compute ones; --quick measures its smallest and largest micro-batch only
    (its time is linear in tokens from micro-batch 1 on: 9.8, 19.3, 38.7, 76.5 ms forward for llama-3-8b at 4096
    tokens on H200), the points between are interpolated."""
    mbs = plan.compute.micro_batches
    return replace(plan.compute, micro_batches=(mbs[0], mbs[-1])) if plan.quick and len(mbs) > 2 else plan.compute


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def plan_profile(req: ProfileRequest) -> Plan:
    """Validate the request and choose sizes: few micro-batches and message sizes, so that one model
    on one 8-GPU node takes under 3 minutes (--quick: under 1) and the CPU path stays CI-sized."""
    spec = load_model(req.model)
    require(req.dtype == "auto" or req.dtype in compute.DTYPES,
            f"--dtype '{req.dtype}' is unknown; valid: auto, {', '.join(compute.DTYPES)}")
    require(req.device in ("auto", "cuda", "cpu"), f"--device '{req.device}' is unknown; valid: auto, cuda, cpu")
    cuda = req.device == "cuda" or (req.device == "auto" and torch.cuda.is_available())
    require(not cuda or torch.cuda.is_available(), "--device cuda: no CUDA device is visible to torch")
    dtype = req.dtype if req.dtype != "auto" else "bf16" if cuda else "fp32"
    require(req.seq_len is None or 1 <= req.seq_len <= MAX_SEQ_LEN,
            f"--seq-len must be a positive integer of at most {MAX_SEQ_LEN}, got {req.seq_len}")
    require(req.gpus_per_node is None or 1 <= req.gpus_per_node <= MAX_GPUS_PER_NODE,
            f"--gpus-per-node must be >= 1 and at most {MAX_GPUS_PER_NODE}, got {req.gpus_per_node}")
    require(req.stack_blocks is None or 2 <= req.stack_blocks <= MAX_STACK_BLOCKS,
            f"--stack-blocks {req.stack_blocks}: must be at least 2 (the per-block figure is the difference between "
            f"the stack and one block) and at most {MAX_STACK_BLOCKS}")
    require(not req.micro_batches or all(1 <= m <= MAX_GLOBAL_BATCH for m in req.micro_batches),
            f"micro-batches must be >= 1 and at most {MAX_GLOBAL_BATCH}, got {req.micro_batches}")
    seq_len = compute.layer_seq_len(spec, spec.seq_len if req.seq_len is None else req.seq_len)
    require(not spec.learned_positions or spec.is_vit or seq_len <= spec.max_seq_len,
            f"--seq-len {seq_len} exceeds the {spec.max_seq_len} learned positions of '{spec.name}'")
    present = torch.cuda.device_count() if cuda else (req.gpus_per_node or DEFAULT_CPU_DEVICES)
    gpn = req.gpus_per_node or present
    devices = min(present, gpn)
    tps = tuple(compute.tp_degrees(spec, gpn))
    q = req.quick
    if cuda:
        mbs = (1, 2, 4, 8) if q else (1, 2, 4, 8, 16)  # up to where large layers are compute-bound
        stacks_top = mbs[-1]  # the sharding stacks' largest micro-batch (below)
        while not q and mbs[-1] * 2 * seq_len <= FULL_PROFILE_TOKENS:
            mbs += (mbs[-1] * 2,)
        cs = compute.ComputeSettings(micro_batches=mbs, warmup=2 if q else 3, repeats=3 if q else 5,
                                     point_budget_s=2.0, recompute=not q)
        sizes = (64 * comm.KIB, comm.MIB, 16 * comm.MIB, 256 * comm.MIB, comm.GIB) if q else \
            comm.sizes_between(64 * comm.KIB, comm.GIB, 4)
        ms = comm.CommSettings(sizes_bytes=sizes, group_sizes=comm.power_of_two_groups(devices), dtype=dtype,
                               trials=3 if q else 5)
    else:
        mbs = (1,) if q else (1, 2)
        stacks_top = mbs[-1]
        cap = 0.5 * facts.host_memory_gib() * 2**30
        cs = compute.ComputeSettings(micro_batches=mbs, warmup=1, repeats=2 if q else 3, point_budget_s=3.0,
                                     recompute=not q, memory_cap_bytes=cap)
        sizes = (64 * comm.KIB, comm.MIB, 16 * comm.MIB) if q else comm.sizes_between(64 * comm.KIB, 16 * comm.MIB, 4)
        ms = comm.CommSettings(sizes_bytes=sizes, group_sizes=comm.power_of_two_groups(devices), dtype=dtype,
                               warmup=1, trials=2 if q else 3, target_loop_s=0.01, max_iters=10)
    if req.micro_batches:
        cs = replace(cs, micro_batches=tuple(sorted(req.micro_batches)))
        stacks_top = max(req.micro_batches)  # the user's range: the stacks measure its ends
    # FSDP2 per-block overhead (profilers/sharding.py) at the smallest and the largest micro-batch: a line in
    # tokens whose ends are both measured (plans run at micro-batches far above the smallest two). The overhead falls
    # steeply with tokens and then flattens, so a line to micro-batch 32 (gpt2-xl's 32768 tokens) put 3.4 ms per
    # block at 16384 tokens where the stacks measure 1.0 (2xH200, calls 21-22): the stacks stop at micro-batch 16
    # (FULL_PROFILE_TOKENS' extra micro-batches are for the layers' compute)
    top = max([m for m in cs.micro_batches if m <= stacks_top] or [cs.micro_batches[0]])
    ends = tuple(sorted({cs.micro_batches[0], top}))
    if q and cuda:
        # --quick: the larger end at most QUICK_SHARDING_TOKENS (each stack runs fwd+bwd per point and per
        # mode: llama-2-13b's quick profile at 4096 tokens took 66.5 s on 2xH200 with micro-batch 8, 29 s of
        # it DeepSpeed's and FSDP2's stacks)
        small = [m for m in cs.micro_batches if m * seq_len <= QUICK_SHARDING_TOKENS] or [cs.micro_batches[0]]
        ends = tuple(sorted({cs.micro_batches[0], small[-1]}))
    # DeepSpeed ZeRO-2's own overhead too where DeepSpeed is installed (on GPUs: the deepspeed engine's numbers)
    stack = req.stack_blocks if req.stack_blocks is not None else GPU_STACK if cuda else STACK
    require(stack >= 2, f"--stack-blocks {stack}: must be at least 2 (the per-block figure is "
            f"the difference between the stack and one block)")
    ms = replace(ms, sharding=ShardingSettings(model=req.model, seq_len=seq_len, micro_batches=ends,
                                                stack=stack,
                                                warmup=1 if not cuda or q else 2, trials=2 if q else cs.repeats,
                                                deepspeed=cuda and _installed("deepspeed"), ddp=not q,
                                                deepspeed_stages=(2,) if q else (2, 3),
                                                # --quick on GPUs: 1F1B's operations measured 0-0.3 ms on 2xH200 (the
                                                # p2p bandwidth's 0.1-0.2 ms), interleaved's 0.2-1.4 ms; each schedule
                                                # took 6-8 s of the 58-65 s quick profiles (session 6)
                                                pipeline_schedules=("interleaved",) if q and cuda else ("1f1b", "interleaved")))
    if devices == 1:
        # one device: no collective to time, but the stacks still say what a model's blocks cost beside a lone
        # block (Profile.stack_factor), and DeepSpeed runs its ZeRO machinery on a world of one (the deepspeed
        # engine's single-GPU runs): a world of one process. gpt2-xl on one H200 ran 6.7% over a profile without
        # them, DeepSpeed ZeRO-2 21.9% (campaign_1xh200, call 1)
        ms = replace(ms, group_sizes=(1,), ops=(), overlap=False,
                     sharding=replace(ms.sharding, ddp=False, pipeline=False, tensor_parallel=False,
                                      deepspeed_stages=(2,)))
    megatron = cuda and megatron_layer.available(spec, torch.device("cuda")) is None
    if q and megatron:
        # --quick: megatron-core's own layer replaces the stand-in unfused attention core for the megatron engine;
        # only torch-engine plans with flash attention off would use the stand-in (they fall back to the model)
        cs = replace(cs, skip_kinds=(compute.UNFUSED_ATTENTION,))
    return Plan(cuda=cuda, quick=q, devices=devices, tps=tps, seq_len=seq_len, dtype=dtype, compute=cs, comm=ms,
                kinds=len([k for k in compute.profiled_kinds(spec) if k not in cs.skip_kinds]), megatron=megatron)


# ---- fits ----------------------------------------------------------------------------------------


def fit_compute(results: list[dict]) -> tuple[list[ComputeFit], dict]:
    """ComputeFit per (kind, tp) with points, and the largest relative error of each fit."""
    fits, errors = [], {}
    for r in results:
        pts = r["points"]
        if not pts:
            continue
        x = [p["tokens"] for p in pts]
        f_fwd = fit.linear_fit(x, [p["fwd_s"] for p in pts])
        f_bwd = fit.linear_fit(x, [p["bwd_s"] for p in pts])
        f_rec = None
        if all("recompute_s" in p for p in pts) and any(p["recompute_s"] > 0 for p in pts):
            f_rec = fit.linear_fit(x, [max(p["recompute_s"], 1e-9) for p in pts])
        act = max(p.get("activation_bytes", 0) / p["tokens"] for p in pts)
        fits.append(ComputeFit(kind=r["kind"], tp=r["tp"], fwd=f_fwd, bwd=f_bwd, peak_activation_bytes_per_token=act,
                               recompute=f_rec, oom_micro_batch=r.get("oom_micro_batch", 0),
                               points=compute_points(pts)))
        errors[f"{r['kind']}.tp{r['tp']}"] = {
            "fwd": fit.max_relative_error(f_fwd, x, [p["fwd_s"] for p in pts]),
            "bwd": fit.max_relative_error(f_bwd, x, [p["bwd_s"] for p in pts])}
    return fits, errors


def fit_comm(raw: dict) -> tuple[list[CollectiveFit], CollectiveFit | None, dict]:
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for p in raw["points"]:
        groups[(p["op"], p["group_size"])].append(p)
    fits, errors = [], {}
    for (op, n), pts in sorted(groups.items()):
        xs, ys = [p["bytes"] for p in pts], [p["time_s"] for p in pts]
        c = fit.collective_fit(op, n, xs, ys)
        fits.append(c)
        errors[f"{op}.n{n}"] = max(abs(fit.collective_time_s(c, x) - y) / y for x, y in zip(xs, ys))
    inter = None
    if raw.get("inter_node") and raw["inter_node"]["p2p"]:
        pts = raw["inter_node"]["p2p"]
        inter = fit.collective_fit("p2p", 2, [p["bytes"] for p in pts], [p["time_s"] for p in pts])
    return fits, inter, errors


# ---- the run -------------------------------------------------------------------------------------


def run_profile(req: ProfileRequest, progress: ProgressFn | None = None) -> Profile | None:
    """Measure and fit. Under torchrun every rank measures communication; rank 0 alone goes on to
    compute and returns the Profile, the other ranks return None."""
    spec = load_model(req.model)
    plan = plan_profile(req)
    total, done = plan.steps, 0
    started = time.perf_counter()

    def tick(label: str) -> None:
        nonlocal done
        done = min(done + 1, total)
        if progress:
            progress(label, done, total)

    threads = torch.get_num_threads()
    if not plan.cuda:
        torch.set_num_threads(1)  # a CPU 'device' is one core, like each gloo rank (timing.Clock)
    try:
        return _measure(req, spec, plan, tick, started)
    finally:
        torch.set_num_threads(threads)


ONLY = ("communication", "compute")


def _base_raw(req: ProfileRequest, spec, plan: Plan) -> dict | None:
    """The raw points of `req.base` where `req.only` asks for one phase (None otherwise); DistplanError naming the
    value and what is valid where the request or the base does not fit."""
    if req.only is None and req.base is None:
        return None
    require(req.only is not None, f"--base {req.base} needs --only: one of {', '.join(ONLY)} (the phase to measure)")
    require(req.only in ONLY, f"--only {req.only!r}: one of {', '.join(ONLY)} (with --base PROFILE)")
    require(req.base is not None, f"--only {req.only} needs --base PROFILE: the earlier profile that gives the other phase")
    from planner.core.profile import load_profile

    base = load_profile(req.base)
    want = {"model": spec.name, "seq_len": plan.seq_len, "dtype": plan.dtype, "device": "cuda" if plan.cuda else "cpu",
            "device_count": plan.devices}
    have = {"model": base.model, "seq_len": base.seq_len, "dtype": base.dtype, "device": base.device,
            "device_count": base.device_count}
    diff = [f"{k} {have[k]} (here {want[k]})" for k in want if have[k] != want[k]]
    if base.model_shape and base.model_shape != model_shape(spec):
        diff.append(f"model shape {describe_shape(base.model, base.model_shape, base.seq_len)} (here "
                    f"{describe_shape(spec.name, model_shape(spec), plan.seq_len)})")
    require(not diff, f"--base {req.base} was measured for another setting: {', '.join(diff)}")
    raw = base.raw or {}
    need = "compute" if req.only == "communication" else "communication"
    require(isinstance(raw.get(need), (list, dict)) and (need != "compute" or raw.get("ceilings")),
            f"--base {req.base} has no raw {need} points to reuse (profiles keep them under raw.{need})")
    return {"compute": raw.get("compute"), "ceilings": raw.get("ceilings"), "communication": raw.get("communication"),
            "settings": raw.get("settings") or {}, "path": str(req.base), "date_utc": base.facts.get("date_utc"),
            "gpu_name": base.gpu_name}


def _measure(req: ProfileRequest, spec, plan: Plan, tick: Callable[[str], None], started: float) -> Profile | None:
    dtype = compute.DTYPES[plan.dtype]
    phases: dict[str, float] = {}
    base = _base_raw(req, spec, plan)
    reuse_comm = base is not None and req.only == "compute"  # communication's raw points from the base
    reuse_compute = base is not None and req.only == "communication"  # compute's and the ceilings' from the base
    require(base is None or not comm.launched(), "--only runs on one node (not under torchrun)")
    preload = None
    if plan.megatron and not comm.launched() and plan.devices >= 2 and not reuse_compute and not reuse_comm:
        # megatron-core's import took 14 of the 16 s its layer cost a llama-3-8b --quick profile on 2xH200; this
        # process only waits while the spawned ranks measure the collectives, so import it meanwhile
        preload = threading.Thread(target=megatron_layer.preload, daemon=True, name="megatron-import")
        preload.start()
    # 1. communication first: under torchrun the other ranks are waiting for rank 0 to join
    t0 = time.perf_counter()
    if reuse_comm:
        raw_comm = base["communication"]
    elif comm.launched():
        import torch.distributed as dist

        rank, raw_comm = comm.measure_launched(plan.comm, tick)  # binds this rank to its LOCAL_RANK GPU
        dist.destroy_process_group()
        if rank != 0:
            return None
    else:  # spawned local ranks; on one device a world of one, for the stacks alone (plan_profile)
        raw_comm = comm.measure_spawned(plan.devices, plan.cuda, plan.comm, tick)
        if plan.devices == 1:
            raw_comm["unmeasured"]["all"] = "one device: no collective to measure"
    phases["communication_s"] = time.perf_counter() - t0
    # this process touches its GPU only now: spawned ranks got theirs first, torchrun bound it above
    device = torch.device("cuda", torch.cuda.current_device()) if plan.cuda else torch.device("cpu")

    # 2. device facts and ceilings, once the import is done: beside it (it holds the GIL) the optimizer step's timed
    # host work ran 8x slow, 1.15e-10 s per parameter against 1.37e-11 (gpt2-xl --only compute on 2xH200, session
    # 11, where no collectives ran first to overlap the import)
    if preload is not None:
        t0 = time.perf_counter()
        preload.join()
        phases["megatron_import_wait_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = facts.device_facts(device)
    if base is not None:
        here = info.get("gpu_name") or info["cpu"]
        require(base["gpu_name"] == here, f"--base {base['path']} was measured on {base['gpu_name']!r}, this machine has "
                                          f"{here!r}: reuse a profile of the same GPU")
        info["reused"] = {"phase": "compute" if reuse_compute else "communication", "from": base["path"],
                          "measured_utc": base["date_utc"]}
    ceilings = base["ceilings"] if reuse_compute else facts.measure_ceilings(device, dtype, req.quick, tick)
    phases["ceilings_s"] = time.perf_counter() - t0

    # 3. compute, layer by layer
    t0 = time.perf_counter()
    results = (list(base["compute"]) if reuse_compute else
               compute.profile_compute(spec, plan.seq_len, list(plan.tps), device, dtype, plan.compute, tick))
    megatron = None
    parts = dict(raw_comm.get("seconds") or {}) if not reuse_comm else {}
    parts["ceilings"] = round(phases["ceilings_s"], 3)
    if plan.cuda and not reuse_compute:  # megatron-core's own layer, where installed; its points become a compute kind
        t1 = time.perf_counter()
        megatron = megatron_layer.profile(spec, plan.seq_len, device, dtype, megatron_settings(plan), tick)
        parts["megatron_layer_with_setup"] = round(time.perf_counter() - t1, 3)
        if megatron["points"]:
            results.append(megatron)
            # and its last stage (the layer + megatron's head and loss), where the layer was measured
            t1 = time.perf_counter()
            head = megatron_layer.profile_head(spec, plan.seq_len, device, dtype, megatron_settings(plan), tick)
            parts["megatron_head"] = round(time.perf_counter() - t1, 3)
            if head["points"]:
                results.append(head)
            else:
                megatron = {**megatron, "head_error": head.get("error")}
    phases["compute_s"] = time.perf_counter() - t0

    compute_fits, compute_err = fit_compute(results)
    coll_fits, inter, comm_err = fit_comm(raw_comm)
    wall = time.perf_counter() - started
    tick("fits")

    gpu_name = info.get("gpu_name") or info["cpu"]
    memory_gib = info["gpu_memory_gib"] if plan.cuda else info["host_memory_gib"] / max(plan.devices, 1)
    sweep = ceilings["matmul"]
    info.update({
        "wall_time_s": round(wall, 2),
        "phase_seconds": {k: round(v, 2) for k, v in phases.items()},
        "part_seconds": {**parts, **({} if reuse_compute else {f"{r['kind']}.tp{r['tp']}": r.get("wall_s") for r in results})},
        "quick": req.quick,
        "gpus_per_node": req.gpus_per_node or plan.devices,
        "devices_measured": plan.devices,
        "tp_degrees": list(plan.tps),
        "micro_batches": list(plan.compute.micro_batches),
        "message_sizes_bytes": list(plan.comm.sizes_bytes),
        "backend": "nccl" if plan.cuda else "gloo",
        "timer": "cuda events" if plan.cuda else "time.thread_time, one thread (one core per device)",
        "activation_memory": ("torch.cuda.memory_allocated after forward minus before (held for backward)"
                              if plan.cuda else "bytes of tensors saved for backward (saved-tensor hooks)"),
        "inter_node": (f"measured: p2p between nodes over {raw_comm['inter_node']['nodes']} nodes" if inter else
                       "not measured (one node): the cluster preset's inter_node link is used"),
        "unmeasured_collectives": raw_comm.get("unmeasured", {}),
        "infeasible": {f"{r['kind']}.tp{r['tp']}": r["error"] for r in results if r.get("error")},
        "skipped_kinds": {k: "--quick: megatron-core's own layer measured instead" for k in plan.compute.skip_kinds},
        "megatron_layer": ("reused with the compute points (facts.reused)" if reuse_compute else
                           "measured (megatron-core's local-spec layer, tp 1)" if megatron and megatron["points"] else
                           megatron["error"] if megatron else "not measured: megatron-core trains on CUDA only"),
        **({"megatron_head": ("measured (megatron-core's last stage with one layer, tp 1)" if not megatron.get("head_error")
                              else megatron["head_error"])} if megatron and megatron["points"] else {}),
    })
    raw = {"compute": results, "communication": raw_comm, "ceilings": ceilings,
           "fit_max_relative_error": {"compute": compute_err, "collectives": comm_err},
           "settings": {"compute": base["settings"].get("compute") if reuse_compute else asdict(plan.compute),
                        "communication": base["settings"].get("communication") if reuse_comm else asdict(plan.comm)}}
    overlap = raw_comm.get("overlap")
    return Profile(
        gpu_name=gpu_name, device=device.type, model=spec.name, seq_len=plan.seq_len, dtype=plan.dtype,
        model_shape=model_shape(spec), compute=tuple(compute_fits), collectives=tuple(coll_fits),
        matmul_tflops=max(p["tflops"] for p in sweep), hbm_bandwidth_gb_s=ceilings["copy_gb_s"],
        matmul_tflops_by_gflop=tuple((p["gflop"], p["tflops"]) for p in sweep),
        host_bandwidth_gb_s=ceilings.get("host_to_device_gb_s", 0.0),
        optimizer_s_per_param=ceilings.get("optimizer_s_per_param", 0.0),
        host_optimizer_s_per_param=ceilings.get("host_optimizer_s_per_param", 0.0),
        overlap_slowdown=overlap["slowdown"] if overlap else None,
        device_count=plan.devices, memory_gib=round(memory_gib, 2), inter_node=inter,
        sharding=fit_sharding(raw_comm.get("sharding") or [], ceilings.get("optimizer_s_per_param", 0.0)),
        pipeline=fit_pipeline(raw_comm.get("pipeline") or []),
        facts=yaml_plain(info), raw=yaml_plain(raw),
    )


def yaml_plain(obj):
    """YAML-safe copy: tuples to lists, numpy/torch scalars to floats."""
    if isinstance(obj, dict):
        return {str(k): yaml_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [yaml_plain(v) for v in obj]
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, str):
        return str(obj)  # e.g. torch.__version__, a str subclass YAML cannot represent
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    try:
        return float(obj)
    except (TypeError, ValueError):
        return str(obj)
