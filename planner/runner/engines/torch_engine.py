"""The torch engine: distplan's own PyTorch-native runner (`train(plan, opts, dist) -> RankResult`).

It builds the plan's model from the zoo definitions (planner.build.modeling) on the meta device, cuts this
rank's pipeline stage(s) from it with the plan's (uneven) layer split, and applies the plan with
PyTorch's own parallelism, in torchtitan's order (planner/build/parallelize.py):

    device mesh (pp, dp, tp), Megatron rank order  -> DTensor TP (+ SP) -> activation checkpointing
    -> DDP (ZeRO-0) or FSDP2 fully_shard (ZeRO-1/2/3, see parallelize.ZERO_MAPPING) over the dp dim
    -> weights allocated and initialised by name -> torch.distributed.pipelining schedule
       (Schedule1F1B, ScheduleGPipe or ScheduleInterleaved1F1B over vpp chunks, loss = lm_loss)

Precision (the cost model's 16 bytes per parameter, ZeRO's 2 + 2 + 12, Micikevicius et al. 2018): with
bf16 every layout computes with bf16 weights and bf16 activations, and keeps fp32 master weights and AdamW
states in the optimizer; the engine uses no torch.autocast (the single-process numerics reference,
planner/runner/numerics.py, still does: fp32 weights under autocast, compared within the bf16 tolerance).
- FSDP2 (ZeRO-1/2/3, and replicate() for ZeRO-0 with tp > 1): MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=bf16): fp32 sharded parameters (the masters), bf16 unsharded copies for compute, weights
  all-gathered and gradients reduce-scattered as bf16 (the cost model's bytes). Per GPU 2 + 16/dp bytes/param
  for ZeRO-1/2 (bf16 weights kept from forward to backward), 16/dp + one unsharded bf16 block for ZeRO-3,
  against the cost model's 2 + 14/dp and 16/dp.
- Without FSDP (DDP ZeRO-0, pipeline-only, dp = 1): the stage is cast to bf16 after initialisation
  (parallelize.to_bf16_with_masters) and parallelize.MasterWeightsOptimizer holds the fp32 masters and
  runs AdamW on them: 2 (bf16 weight) + 2 (bf16 gradient, all-reduced as bf16 by DDP) + 4 + 8 = 16
  bytes/param, the cost model's 16. (These layouts first kept fp32 weights under torch.autocast,
  which caches a bf16 copy of every weight during forward and leaves norms / residual adds in fp32:
  +16% to +38% peak memory on 2x H200, benchmarks/results/run_2xh200.md, miss 2.)
With fp32 everything is fp32 (4 + 4 + 8). On CPU the launcher picks fp32 (CPU bf16 matmuls are slow);
--dtype bf16 runs the bf16 arithmetic above on CPU too (gloo reduces bf16). The report states the dtype.

Gradient accumulation: pp = 1 runs the m micro-batches one after another (DDP no_sync / FSDP
set_requires_gradient_sync(False) until the last) with loss / m; pp > 1 hands them to the schedule,
which scales gradients by 1/m. A tied embedding split across the first and last pipeline stage keeps
two copies whose gradients are summed between the two stages before each optimizer step (Megatron).

Checkpoints (--checkpoint-dir, planner/runner/checkpoint.py): after optimizer step k (counted from the start of
training, warm-up included) every rank saves its shards with DCP; --resume loads them after the build and trains
this invocation's warm-up + steps as global steps k, k+1, ... (the same batches the uninterrupted run drew).

Not supported (clear error, exit 2): context parallel (cp > 1), expert parallel (ep > 1), fewer micro-batches
than torch.distributed.pipelining's schedule needs (planner.cost.engines.ENGINES["torch"].limits), and tp larger
than the number of KV heads.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import nullcontext

import torch

from planner.core.errors import require
from planner.cost.engines import engine_model, torch_engine_fsdp
from planner.build.modeling import lm_loss
from planner.core.plan import Plan
from planner.runner import memory_peak, trace
from planner.runner.checkpoint import Checkpointer
from planner.runner.data import DataSource, local_batch
from planner.runner.engine_api import DistInfo, RankResult, RunOptions, mark_step
from planner.build.parallelize import (ZERO_MAPPING, MasterWeightsOptimizer, local_shard, apply_ac, apply_ddp,
                                       apply_fsdp, apply_replicate, apply_tp, build_stage, make_optimizer, materialise,
                                       pipeline_schedule, stage_layers, tied, to_bf16_with_masters)


def check_supported(plan: Plan, device: str) -> None:
    """Raise DistplanError if the torch engine cannot run `plan` (called by the launcher before spawning)."""
    cfg, spec = plan.parallel, plan.model
    engine_model("torch").check(cfg, device)  # what it runs: cp, ep, the pipelining runtime's micro-batches
    # what it runs of this model (the table knows configurations, not models)
    require(spec.num_kv_heads % cfg.tp == 0,
            f"tp={cfg.tp} exceeds or does not divide the {spec.num_kv_heads} KV heads of {spec.name}: the torch engine "
            f"shards K/V projections by head; use tp <= {spec.num_kv_heads}")
    require(not (spec.is_vit and cfg.sequence_parallel), "sequence parallel is not supported for ViT by the torch engine")


def train(plan: Plan, opts: RunOptions, dist: DistInfo) -> RankResult:
    import torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh

    check_supported(plan, dist.device.split(":")[0])
    cfg, spec = plan.parallel, plan.model
    device = torch.device(dist.device)
    bf16 = opts.dtype == "bf16"
    mesh = init_device_mesh(device.type, (cfg.pp, cfg.dp, cfg.tp), mesh_dim_names=("pp", "dp", "tp"))
    pp_rank, dp_rank = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
    fsdp = torch_engine_fsdp(cfg)  # FSDP2 machinery: fully_shard, or replicate for tp > 1
    chunks, modules, masters = _build(plan, opts, mesh, device, pp_rank, fsdp, bf16)
    if masters:  # bf16 weights without FSDP: AdamW on fp32 master copies (see Precision above)
        optimizer = MasterWeightsOptimizer(masters, opts.lr)
    else:  # fp32 parameters: FSDP2's sharded masters, or an fp32 run
        optimizer = make_optimizer((p for m in modules for p in m.parameters()), opts.lr,
                                   offloaded=_offload(cfg, device) is not None and fsdp)
    # DDP (gradient_as_bucket_view): keep the gradients as views of its buckets from step to step (zeroed, not
    # freed). Freed, the no_sync micro-batches of gradient accumulation would build fresh gradient tensors
    # beside the buckets: 2 more bytes per parameter until the last micro-batch (llama-3-8b, DDP, 4 micro-batches
    # on 2xH200 ran out of memory with 15 GiB of them: benchmarks/results/campaign_2xh200.md).
    ddp_views = not fsdp and cfg.dp > 1
    tied_group = _tied_embedding_group(mesh, cfg) if tied(spec) and cfg.pp > 1 else None
    tied_params = [p for _, _, _, s in chunks for p in _tied_copy(s)] if tied_group is not None else []

    # ---- pipeline schedule ----
    schedule, m, n_virtual = None, cfg.num_microbatches, cfg.pp * cfg.vpp
    if cfg.pp > 1:
        from torch.distributed import pipelining

        stages = [pipelining.PipelineStage(mod, v, n_virtual, device, group=mesh["pp"].get_group())
                  for (v, *_), mod in zip(chunks, modules)]
        cls = pipeline_schedule(cfg.schedule)
        schedule = cls(stages if cfg.schedule == "interleaved" else stages[0], m, loss_fn=lm_loss)
    # pipelines: chunk compute per step (the schedule's own cost = step - chunks - optimizer)
    chunk_clock = _ChunkClock(stages, device) if cfg.pp > 1 else None
    chunk_times: list[dict] = []
    chunk_host: list[dict] = []
    is_first = any(v == 0 for v, *_ in chunks)
    is_last = any(v == n_virtual - 1 for v, *_ in chunks)

    data = DataSource(spec, cfg.seq_len, cfg.global_batch_size, seed=opts.seed, path=opts.data_path, dtype=opts.data_dtype)
    dp_group = mesh["dp"].get_group()
    step_times, losses, optimizer_times, microbatch_times = [], [], [], []
    # one more step each, not measured: DISTPLAN_TRACE=1 profiled (planner/runner/trace.py), DISTPLAN_MEMORY_PEAK=1
    # with the allocator's history recorded (planner/runner/memory_peak.py; CUDA only)
    extras = (["trace"] if trace.enabled() else []) + (["memory"] if memory_peak.enabled() and device.type == "cuda" else [])
    trace_summary, peak_summary = None, None
    # checkpoints (planner/runner/checkpoint.py): a resumed run continues at global step `start`, whose batch is the
    # one the uninterrupted run drew there (data are a pure function of (seed, step)); saving is not timed
    ckpt = Checkpointer(plan, opts, dist.rank, modules, optimizer) if opts.checkpoint_dir else None
    start = ckpt.resume() if ckpt is not None and opts.resume else 0
    last = start + opts.warmup + opts.steps
    for step in range(opts.warmup + opts.steps + len(extras)):
        extra = extras[step - opts.warmup - opts.steps] if step >= opts.warmup + opts.steps else None
        measured = opts.warmup <= step and not extra
        recorder = trace.traced(device) if extra == "trace" else memory_peak.recorded(device) if extra else nullcontext()
        with recorder as recorded:  # the trace's kernels, or the memory record's summary
            mark_step(step)
            inputs, targets = local_batch(*data.global_batch(start + step), dp_rank, cfg.dp, cfg.micro_batch_size, m)
            inputs, targets = inputs.to(device), targets.to(device)
            _sync(device)
            t0 = time.perf_counter()
            mb_timers: list = []
            if schedule is None:
                loss = _accumulate(modules[0], inputs, targets, m, fsdp, mb_timers)
            else:
                loss = _pipeline_step(schedule, inputs, targets, is_first, is_last, device)
            if tied_group is not None:
                for p in tied_params:  # sum the two stages' gradients of the tied embedding / LM head
                    tdist.all_reduce(local_shard(p.grad), group=tied_group)
            opt_timer = _PhaseTimer(device)  # the optimizer step alone (CUDA events: no extra synchronisation)
            optimizer.step()
            optimizer.zero_grad(set_to_none=not ddp_views)
            opt_timer.stop()
            _sync(device)
            step_wall = time.perf_counter() - t0
            if measured:
                step_times.append(step_wall)
                optimizer_times.append(opt_timer.seconds())
                microbatch_times.append([t.seconds() for t in mb_timers])
            if chunk_clock is not None:
                spans, host = chunk_clock.take()
                if measured:
                    chunk_times.append(spans)
                    chunk_host.append(host)
            if loss is not None and cfg.dp > 1:  # mean over the global batch (every rank of the last stage agrees)
                tdist.all_reduce(loss, op=tdist.ReduceOp.SUM, group=dp_group)
                loss = loss / cfg.dp
            if not extra:
                losses.append(float(loss) if loss is not None else math.nan)
            if ckpt is not None and not extra and ckpt.due(start + step + 1, last):
                ckpt.save(start + step + 1)
        if extra == "trace":
            trace_summary = trace.summarize(recorded, step_wall)
        elif extra == "memory":
            peak_summary = dict(recorded)

    peak_alloc = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    peak_res = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
    local_params = sum(local_shard(p).numel() for mod in modules for p in mod.parameters())
    return RankResult(
        rank=dist.rank, pp_rank=pp_rank, step_times_s=tuple(step_times), losses=tuple(losses),
        peak_allocated_bytes=int(peak_alloc), peak_reserved_bytes=int(peak_res), device=dist.device, dtype=opts.dtype,
        notes=tuple(_notes(cfg, device, fsdp, opts.dtype)),
        extra={"dp_rank": dp_rank, "tp_rank": mesh.get_local_rank("tp"), "has_loss": is_last,
               "chunks": [[v, first, end] for v, first, end, _ in chunks], "local_params": local_params,
               "schedule": type(schedule).__name__ if schedule is not None else "none (pp=1)",
               "optimizer_s": statistics.median(optimizer_times) if optimizer_times else None,
               # pp = 1: each micro-batch's forward + backward (median over the measured steps), and how often
               # the caching allocator freed its cache to retry an allocation (slow: it synchronises)
               "microbatch_s": [statistics.median(ts) for ts in zip(*microbatch_times)] if microbatch_times else None,
               "alloc_retries": torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if device.type == "cuda" else None,
               # pp > 1: this rank's chunk compute per step (median), forward and backward
               "chunk_compute_s": {k: statistics.median(t[k] for t in chunk_times) for k in ("fwd", "bwd")}
               if chunk_times else None,
               # pp > 1: the host's seconds inside the same chunk calls (median per step)
               "chunk_host_s": {k: statistics.median(t[k] for t in chunk_host) for k in ("fwd", "bwd")}
               if chunk_host else None,
               "trace": trace_summary, "memory_peak": peak_summary,
               "checkpoint": ckpt.summary() if ckpt is not None else None},
    )


def _build(plan: Plan, opts: RunOptions, mesh, device: torch.device, pp_rank: int, fsdp: bool, bf16: bool):
    """This rank's (virtual) stages: built on meta, TP, AC, data parallel, then allocated and initialised.

    Returns [(virtual stage, first layer, end layer, StageModule)], the modules to run (DDP-wrapped or not)
    and, for bf16 without FSDP, the (bf16 parameter, fp32 master) pairs for MasterWeightsOptimizer (else []).
    """
    cfg, spec = plan.parallel, plan.model
    chunks, modules, masters = [], [], []
    n_virtual = cfg.pp * cfg.vpp
    for c, (first, end) in enumerate(stage_layers(cfg, spec.num_layers)[pp_rank]):
        v = c * cfg.pp + pp_rank
        stage = build_stage(spec, first, end, has_embed=v == 0, has_head=v == n_virtual - 1)
        if cfg.tp > 1:
            apply_tp(stage, mesh["tp"], spec, cfg.sequence_parallel)
        apply_ac(stage, cfg.recompute, cfg.flash_attention)
        module = stage
        if fsdp and cfg.zero_stage == 0:
            apply_replicate(stage, mesh["dp"], _mp_policy(bf16))
            materialise(stage, device, spec, opts.seed)
        elif fsdp:
            offload = _offload(cfg, device)
            apply_fsdp(stage, mesh["dp"], cfg.zero_stage, _mp_policy(bf16), offload)
            materialise(stage, torch.device("cpu") if offload else device, spec, opts.seed, draw_on=device)  # offloaded shards live on the host
        else:
            materialise(stage, device, spec, opts.seed)
            if bf16:  # bf16 weights, fp32 masters in the optimizer; cast before DDP sizes its (bf16) buckets
                masters.extend(to_bf16_with_masters(stage))
            if cfg.dp > 1:
                module = apply_ddp(stage, mesh["dp"].get_group(), device)
        chunks.append((v, first, end, stage))
        modules.append(module)
    return chunks, modules, masters


def _notes(cfg, device: torch.device, fsdp: bool, dtype: str) -> list[str]:
    """How the plan mapped onto PyTorch, for the report."""
    if dtype != "bf16":
        precision = f"compute dtype {dtype}; parameters, gradients and AdamW states {dtype}"
    elif fsdp:
        precision = ("compute dtype bf16; FSDP2 MixedPrecisionPolicy: bf16 weights and gradient reduction, "
                     "fp32 sharded master weights and AdamW states")
    else:
        precision = ("compute dtype bf16; bf16 weights and gradients, fp32 master weights and AdamW states "
                     "in the optimizer (MasterWeightsOptimizer)")
    notes = [precision,
             ZERO_MAPPING[cfg.zero_stage] if cfg.dp > 1 else f"dp=1: no data parallelism (ZeRO-{cfg.zero_stage} has nothing to shard)"]
    if cfg.recompute == "selective":
        notes.append("selective recompute with flash attention: nothing extra (the fused kernel recomputes the scores)"
                     if cfg.flash_attention else "selective recompute: attention core checkpointed")
    if not cfg.flash_attention:
        notes.append("flash_attention false: the run still uses torch SDPA (fused where available); the plan's memory "
                     "assumes stored seq x seq scores")
    if cfg.offload_optimizer:
        notes.append(("offload_optimizer: FSDP2 CPUOffloadPolicy (parameters, gradients and optimizer states on the host)"
                      if device.type == "cuda" else "offload_optimizer: FSDP2 without CPUOffloadPolicy on the CPU "
                      "(the states are on the host already)") if fsdp else "offload_optimizer ignored (needs FSDP2)")
    if device.type != "cuda":
        notes.append("CPU: peak memory is not measured (no caching allocator statistics)")
    return notes


def _accumulate(model, inputs, targets, m: int, fsdp: bool, timers: list | None = None) -> torch.Tensor:
    """pp = 1: m micro-batches, gradients synchronised on the last one only; returns the mean loss. `timers`
    gets one _PhaseTimer per micro-batch (forward + backward)."""
    mb = inputs.shape[0] // m
    total = torch.zeros((), device=inputs.device)
    for j in range(m):
        if timers is not None:
            if timers:
                timers[-1].stop()
            timers.append(_PhaseTimer(inputs.device))
        last = j == m - 1
        if fsdp:
            model.set_requires_gradient_sync(last)
            ctx = nullcontext()
        else:
            ctx = model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext()
        with ctx:
            loss = lm_loss(model(inputs[j * mb:(j + 1) * mb]), targets[j * mb:(j + 1) * mb]) / m
            loss.backward()
        total += loss.detach().float()
    if timers:
        timers[-1].stop()
    return total


def _pipeline_step(schedule, inputs, targets, is_first: bool, is_last: bool, device) -> torch.Tensor | None:
    losses: list = []
    kwargs = {"target": targets, "losses": losses} if is_last else {}
    if _KEEPS_OUTPUTS_OPTIONAL:
        # by default the last stage keeps every micro-batch's output (the logits) until the step ends to merge
        # them: 16 x 1.6 GB for gpt2-xl at micro-batch 16 on 2xH200 (+25 GiB over the plan); the loss is all we use
        kwargs["return_outputs"] = False
    if is_first:
        schedule.step(inputs, **kwargs)
    else:
        schedule.step(**kwargs)
    if not is_last:
        return None
    return torch.stack([l.detach().float() for l in losses]).mean().to(device)


def _keeps_outputs_optional() -> bool:
    import inspect

    from torch.distributed.pipelining import schedules

    return "return_outputs" in inspect.signature(schedules.PipelineScheduleSingle.step).parameters


# whether this torch's schedule.step takes return_outputs (to not keep the outputs)
_KEEPS_OUTPUTS_OPTIONAL = _keeps_outputs_optional()


def _tied_embedding_group(mesh, cfg):
    """Groups of {first-stage rank, last-stage rank} with the same (dp, tp) coordinate; returns this rank's."""
    import torch.distributed as tdist

    ranks = mesh.mesh  # [pp, dp, tp] -> global rank
    mine = None
    me = tdist.get_rank()
    for d in range(cfg.dp):
        for t in range(cfg.tp):
            pair = [int(ranks[0, d, t]), int(ranks[cfg.pp - 1, d, t])]
            group = tdist.new_group(pair)  # every rank creates every group, in the same order
            if me in pair:
                mine = group
    return mine


def _tied_copy(stage) -> list:
    """The tied embedding/head weight this stage holds alone (the first or last stage, pp > 1)."""
    if stage.embed is not None and stage.head is None:
        return [stage.embed.tok.weight]
    if stage.head is not None and stage.embed is None:
        return [stage.head.weight]
    return []


def _mp_policy(bf16: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16) if bf16 else MixedPrecisionPolicy()


def _offload(cfg, device):
    if cfg.offload_optimizer and device.type == "cuda":
        from torch.distributed.fsdp import CPUOffloadPolicy

        return CPUOffloadPolicy()
    return None


class _ChunkClock:
    """Compute time of this rank's pipeline chunks in one step, forward and backward: events (CUDA; CPU: wall
    clock) around each PipelineStage's forward_one_chunk, backward_one_chunk and backward_weight_one_chunk, the
    calls the schedule makes once the chunk's inputs have arrived. The step minus these and the optimizer is what
    the schedule itself cost (waiting for other ranks, transfers, bubbles). The last stage's loss forward is the
    schedule's (outside), its backward is inside backward_one_chunk."""

    METHODS = (("forward_one_chunk", "fwd"), ("backward_one_chunk", "bwd"), ("backward_weight_one_chunk", "bwd"))

    def __init__(self, stages: list, device: torch.device):
        self.device = device
        self.spans: list[tuple[str, _PhaseTimer]] = []
        self.host: list[tuple[str, float]] = []
        for stage in stages:
            for name, kind in self.METHODS:
                fn = getattr(stage, name, None)
                if fn is not None:
                    setattr(stage, name, self._timed(fn, kind))

    def _timed(self, fn, kind: str):
        def call(*args, **kwargs):
            timer = _PhaseTimer(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.host.append((kind, time.perf_counter() - t0))
            timer.stop()
            self.spans.append((kind, timer))
            return out
        return call

    def take(self) -> tuple[dict[str, float], dict[str, float]]:
        """Seconds of forward and backward chunk compute since the last take (after the step's sync), and the host's
        seconds inside the same calls (launching their kernels: on a GPU, host >= GPU means the chunks were
        host-bound, which a pipeline of small chunks exposes whenever the GPU waits for a receive)."""
        out, host = {"fwd": 0.0, "bwd": 0.0}, {"fwd": 0.0, "bwd": 0.0}
        for kind, timer in self.spans:
            out[kind] += timer.seconds()
        for kind, seconds in self.host:
            host[kind] += seconds
        self.spans, self.host = [], []
        return out, host


class _PhaseTimer:
    """Seconds of GPU work between construction and stop(), from CUDA events (read after the step's sync);
    on CPU, wall-clock (the work is synchronous there)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.end.record()
        else:
            self.t1 = time.perf_counter()

    def seconds(self) -> float:
        return self.start.elapsed_time(self.end) / 1e3 if self.cuda else self.t1 - self.t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
