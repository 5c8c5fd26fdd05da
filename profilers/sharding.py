"""Per-layer overhead of sharded data parallelism (FSDP2 `fully_shard`), measured on stacks of blocks.

Why: on 2x H200, FSDP2 ZeRO-1/3 and DeepSpeed ZeRO-2 steps took 2.0-2.3x the prediction
(benchmarks/results/run_2xh200.md, miss 1). The bandwidth model charged 2-5 ms for the weight
all-gathers and gradient reduce-scatters; the runs lost about 150 ms per micro-batch over 48 layers:
per-layer collective launches, copy-in/copy-out of the flat buffers and the bf16 <-> fp32 casts of
every layer's parameters and gradients, none of which a bandwidth fit sees.

What: inside the communication profiler's processes (NCCL on GPUs, gloo between CPU processes), over
the group of ranks 0..n-1, a stack of 1 and of GPU_STACK transformer blocks on GPUs, STACK on CPUs
(stack_blocks; profilers.compute.build_layer, tp = 1, the profile's dtype) runs forward + backward
  - plain (the blocks in the compute dtype, what the profile's compute fit times), and
  - wrapped as the torch engine wraps them (planner/build/parallelize.apply_fsdp): fp32 parameters
    sharded by `fully_shard` per block with MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype),
    under a parameter-less FSDP root so each block's own `reshard_after_forward` holds (FSDP2 never
    reshards a root after forward), once with reshard_after_forward=True (ZeRO-3) and once with False.
Each (stack, micro-batch, mode) point is the median of `trials` wall-clock runs after `warmup` runs, the
slowest rank's value; overhead = wrapped - plain per micro-batch (gradient reduce-scatter every
micro-batch, as ZeRO-2/3 do; the torch engine skips it for all but the last micro-batch of a step, so for
its ZeRO-1/2 this is an upper bound).

DDP (`_measure_ddp`, full profiles): the same stacks wrapped as the torch engine wraps ZeRO-0
(parallelize.apply_ddp), gradients zeroed between runs as the engine keeps them: what the bucketed all-reduce
beside the backward adds to a synchronising micro-batch (the cost model's measured replacement for
slowdown x all-reduce; a gpt2-xl DDP micro-batch ran 9-12% over its layers' times on 2xH200).

DeepSpeed ZeRO-2 (`measure_deepspeed`, where DeepSpeed is installed; CUDA by default): the same stacks
through `deepspeed.initialize` with the config `distplan emit` writes (stage 2, overlap_comm,
contiguous gradients, reduce-scatter, buckets of planner.cost.memory.BUCKET_ELEMENTS) and the engine's
AdamW, gradient accumulation 2, timing the first micro-batch (fwd + engine.backward + engine.step, no
optimizer step) and the second (the accumulation boundary: gradient reduction, optimizer step on the
fp32 partition, all-gather of the updated weights). Why: DeepSpeed ZeRO-2 ran 17% over a prediction that
charged FSDP2's measured overhead (gpt2-xl, 2xH200, benchmarks/results/campaign_2xh200.md): its
per-parameter hooks copy gradients into buckets and it reduces and all-gathers bucket by bucket.
fit_sharding turns the first into per-block + edge lines as for FSDP2 and the second, less the plain
AdamW step of the rank's partition (the profile's optimizer_s_per_param), into a per-parameter rate +
a constant once per optimizer step. DeepSpeed's data-parallel group is the whole world (no mpu is
passed), so it is measured only at the group size of all ranks.

Why two stacks: a lone block cannot hide its all-gather behind a neighbour's compute, so one block alone
overstated the cost inside a model: 3.2-3.9 ms per gpt2-xl block on 2xH200 where the 48-block model lost
about 0.5 ms per block (benchmarks/results/profile_2xh200.md). In a stack FSDP2 prefetches the next block's weights
during the current block's compute, as in the model. The fit (fit_sharding) splits the overhead into a
per-block part (the difference between the stacks) and an edge paid once per micro-batch (the first
all-gather and the last reduce-scatter, which have nothing to hide behind), each a line in tokens.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from profilers.timing import loss_backward, slowest, sync, time_fwd_bwd

STACK = 4  # blocks in the larger stack on CPUs (and the least on GPUs): per-block cost = the difference to one block, over STACK - 1
# on GPUs, for FSDP2, DDP and DeepSpeed ZeRO-3: the per-block figure is a difference of two stack timings, so its noise
# shrinks with the stack; 4-block stacks spread 0.46-1.69 ms per gpt2-xl block (benchmarks/results/campaign_2xh200.md)
GPU_STACK = 8
# DeepSpeed ZeRO-2's larger stack: 4-block profiles put gpt2-xl's dp2 step at 0.433-0.583 s against 0.48 s measured,
# 8-block ones at 0.467-0.510 s (benchmarks/results/run_2xh200.md); ZeRO-3's 4-block figures held and stay at STACK
DEEPSPEED_ZERO2_STACK = 8
# ... held to the blocks whose model states (bf16 plain stack 2 B + fp32 weights 4 B + fp32 gradients 4 B + Adam's
# 8 B sharded, counted whole: 18 B/param) take at most this share of the GPU: 8 llama-2-70b blocks would take 125 GB
DEEPSPEED_STACK_MEMORY_SHARE = 0.5


def blocks_that_fit(want: int, least: int, block_params: int, device_bytes: float | None) -> int:
    """`want` blocks, fewer where their model states (18 B/param, as DeepSpeed's stacks hold them; FSDP2's and
    DDP's hold less) would pass DEEPSPEED_STACK_MEMORY_SHARE of `device_bytes` (None: no limit, CPU), never fewer
    than `least`."""
    if device_bytes is None:
        return want
    fit = int(DEEPSPEED_STACK_MEMORY_SHARE * device_bytes // (18 * block_params))
    return max(min(least, want), min(want, fit))


def deepspeed_zero2_blocks(settings: ShardingSettings, block_params: int, device_bytes: float | None) -> int:
    """Blocks in DeepSpeed ZeRO-2's larger stack: DEEPSPEED_ZERO2_STACK (or settings.stack where larger), fewer
    where they would not fit (blocks_that_fit), never fewer than settings.stack."""
    return blocks_that_fit(max(settings.stack, DEEPSPEED_ZERO2_STACK), settings.stack, block_params, device_bytes)


def stack_blocks(settings: ShardingSettings, block_params: int, device: torch.device) -> int:
    """Blocks in the larger FSDP2 / DDP / DeepSpeed ZeRO-3 stack: settings.stack (GPU_STACK on GPUs unless the
    profile asked otherwise), fewer where they would not fit the GPU (blocks_that_fit), never fewer than STACK."""
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return blocks_that_fit(settings.stack, STACK, block_params, memory)


@dataclass(frozen=True)
class ShardingSettings:
    model: str  # zoo name or model file (each process loads it)
    seq_len: int
    micro_batches: tuple[int, ...]
    warmup: int = 2
    trials: int = 3
    deepspeed: bool = False  # also measure DeepSpeed (measure_deepspeed) at the whole world's group size
    deepspeed_stages: tuple[int, ...] = (2, 3)  # its ZeRO stages (--quick: 2 only, the practitioners' baseline)
    ddp: bool = True  # also measure DistributedDataParallel (ZeRO-0 of the torch engine) on the same stacks
    pipeline: bool = True  # also measure torch.distributed.pipelining's cost per operation over 2 ranks (profilers/pipeline.py)
    pipeline_schedules: tuple[str, ...] = ("1f1b", "interleaved")  # the schedules it runs (--quick: interleaved only)
    tensor_parallel: bool = True  # also measure the torch engine's DTensor TP over 2 ranks (profilers/tensor_parallel.py)
    # blocks in the larger FSDP2 / DDP / DeepSpeed ZeRO-3 stack (distplan profile --stack-blocks; profilers/run.py
    # asks GPU_STACK on GPUs), held to what fits the GPU (stack_blocks)
    stack: int = STACK


def _time_round_robin(variants: list[tuple[nn.Module, Callable[[], None]]], x: torch.Tensor, grad: torch.Tensor,
                      device: torch.device, warmup: int, trials: int) -> list[float]:
    """Median seconds of one forward + backward of each (module, set-up) variant, the variants taking turns trial
    by trial (each set-up runs before its variant's every trial): a drift of the GPU's clock or of the other ranks
    during the measurement reaches every variant alike, where timing one variant after the other put it into
    their difference (llama-3-8b's 4-block ZeRO-3 stack on 2xH200: benchmarks/results/cost_model_notes.md)."""
    times: list[list[float]] = [[] for _ in variants]
    for i in range(warmup + trials):
        for k, (module, setup) in enumerate(variants):
            setup()
            t = time_fwd_bwd(module, x, grad, device, 0, 1)
            if i >= warmup:
                times[k].append(t)
    return [statistics.median(t) for t in times]


def fsdp_points(plain: nn.Module, root: nn.Module, x: torch.Tensor, grad: torch.Tensor, device: torch.device,
                settings: ShardingSettings, group, point: dict) -> list[dict]:
    """Two raw points of an FSDP2-wrapped `root` against `plain`: a synchronising micro-batch and a gradient-
    accumulating one (the engine's every one but the last of a step: no reduce-scatter, the unsharded gradients
    summed in place), the three timed in turns (_time_round_robin), each the slowest rank's over `group`; `point`
    gives the keys the two share."""
    timed = _time_round_robin([(plain, lambda: None),
                               (root, partial(root.set_requires_gradient_sync, True)),
                               (root, partial(root.set_requires_gradient_sync, False))],
                              x, grad, device, settings.warmup, settings.trials)
    root.set_requires_gradient_sync(True)
    t_plain, t_sync, t_accum = (slowest(t, group, device) for t in timed)
    return [{**point, "sync": synced, "plain_s": t_plain, "wrapped_s": t, "overhead_s": t - t_plain}
            for synced, t in ((True, t_sync), (False, t_accum))]


def measure(settings: ShardingSettings, group, n: int, device: torch.device, dtype: torch.dtype,
            report=lambda label: None) -> list[dict]:
    """Raw points of one group of `n` ranks (every rank of `group` calls this; all get the same list):
    [{group_size, reshard_after_forward, micro_batch, tokens, plain_s, wrapped_s, overhead_s}]."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from planner.core.model import load_model
    from profilers.compute import build_layer, make_inputs

    spec = load_model(settings.model)
    kind = "moe_block" if spec.is_moe else "block"
    mesh = DeviceMesh.from_group(group, device.type)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)
    points = []
    for blocks in (1, stack_blocks(settings, spec.block_params(), device)):
        plain = nn.Sequential(*(build_layer(spec, kind, 1, device, dtype) for _ in range(blocks)))
        for reshard in (True, False):
            # fp32 shards (the masters, as in the engine), one fully_shard per block under a parameter-less root
            stack = [build_layer(spec, kind, 1, device, torch.float32) for _ in range(blocks)]
            root = nn.Sequential(*stack)
            for block in stack:
                fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
            fully_shard(root, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
            for mb in settings.micro_batches:
                (x,), grad = make_inputs(spec, kind, 1, mb, settings.seq_len, device, dtype)
                points += fsdp_points(plain, root, x, grad, device, settings, group,
                                      {"group_size": n, "reshard_after_forward": reshard, "blocks": blocks,
                                       "micro_batch": mb, "tokens": mb * settings.seq_len})
            report(f"fully_shard {blocks} block(s) n={n} reshard={reshard}")
            del root, stack
        if settings.ddp:
            points += _measure_ddp(settings, spec, kind, plain, group, n, blocks, device, dtype)
            report(f"DDP {blocks} block(s) n={n}")
        del plain
    return points


def _measure_ddp(settings: ShardingSettings, spec, kind: str, plain: nn.Module, group, n: int, blocks: int,
                 device: torch.device, dtype: torch.dtype) -> list[dict]:
    """DistributedDataParallel as the torch engine applies it (parallelize.apply_ddp: the stage's dtype,
    gradient_as_bucket_view, gradients zeroed between steps) on a copy of the plain stack: its bucketed
    all-reduce runs beside the backward, so `overhead_s` is what it adds to a micro-batch that synchronises."""
    import copy

    from planner.build.parallelize import apply_ddp
    from profilers.compute import make_inputs

    wrapped = apply_ddp(copy.deepcopy(plain), group, device)
    points = []
    for mb in settings.micro_batches:
        (x,), grad = make_inputs(spec, kind, 1, mb, settings.seq_len, device, dtype)
        t_plain = slowest(time_fwd_bwd(plain, x, grad, device, settings.warmup, settings.trials), group, device)
        t_ddp = slowest(time_fwd_bwd(wrapped, x, grad, device, settings.warmup, settings.trials, zero_grads=True),
                        group, device)
        points.append({"impl": "ddp", "group_size": n, "reshard_after_forward": False, "blocks": blocks,
                       "micro_batch": mb, "tokens": mb * settings.seq_len, "plain_s": t_plain, "wrapped_s": t_ddp,
                       "overhead_s": t_ddp - t_plain})
    del wrapped
    return points


def deepspeed_config(micro_batch: int, world: int, dtype: torch.dtype, stage: int = 2, block_params: int = 0) -> dict:
    """The ds_config of the measurement: what emitters.deepspeed.ds_config writes for ZeRO `stage` (2 or 3) with
    overlapped gradient reduction, as the deepspeed engine runs it (runtime_config: no clipping, no logging, the
    engine's AdamW), at gradient accumulation 2; ZeRO-3 prefetches one block of `block_params` and keeps two live."""
    from planner.cost.memory import BUCKET_ELEMENTS

    bucket = BUCKET_ELEMENTS
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_scatter": True,
            "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if stage >= 3:
        zero.update({"stage3_prefetch_bucket_size": block_params, "stage3_max_live_parameters": 2 * block_params})
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 2,
            "train_batch_size": micro_batch * 2 * world, "bf16": {"enabled": dtype == torch.bfloat16},
            "zero_optimization": zero, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def measure_deepspeed(settings: ShardingSettings, n: int, device: torch.device, dtype: torch.dtype,
                      report=lambda label: None) -> list[dict]:
    """Raw points of DeepSpeed ZeRO-2 and ZeRO-3 over all `n` ranks of the world (every rank calls this; all get the
    same list): [{impl, group_size, reshard_after_forward (True: ZeRO-3), blocks, micro_batch, tokens, params,
    plain_s, micro_s, boundary_s, overhead_s}] with overhead_s = micro_s - plain_s (see the module docstring).
    ZeRO-3 because the deepspeed engine's ZeRO-3 plans were charged FSDP2's measured overhead in its place."""
    from planner.core.model import load_model
    from planner.build.deepspeed import import_deepspeed
    from planner.build.parallelize import make_optimizer
    from profilers.compute import build_layer, make_inputs

    # DeepSpeed reads the launcher's variables even when torch.distributed is up already (spawned ranks have none)
    rank = dist.get_rank()
    os.environ.setdefault("LOCAL_RANK", str(device.index if device.type == "cuda" else rank))
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(n))
    deepspeed = import_deepspeed(device.type)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    spec = load_model(settings.model)
    kind = "moe_block" if spec.is_moe else "block"
    world = dist.group.WORLD
    points = []
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    zero2 = deepspeed_zero2_blocks(settings, spec.block_params(), memory)
    zero3 = stack_blocks(settings, spec.block_params(), device)
    for stage, blocks in ((st, b) for st in settings.deepspeed_stages for b in (1, zero2 if st == 2 else zero3)):
        plain = nn.Sequential(*(build_layer(spec, kind, 1, device, dtype) for _ in range(blocks)))
        stack = nn.Sequential(*(build_layer(spec, kind, 1, device, torch.float32) for _ in range(blocks)))
        params = sum(p.numel() for p in stack.parameters())
        mbs = settings.micro_batches
        engine, *_ = deepspeed.initialize(model=stack, optimizer=make_optimizer(stack.parameters(), 1e-5),
                                          config=deepspeed_config(mbs[0], n, dtype, stage, params // blocks))
        for mb in mbs:
            (x,), grad = make_inputs(spec, kind, 1, mb, settings.seq_len, device, dtype)
            t_plain = slowest(time_fwd_bwd(plain, x, grad, device, settings.warmup, settings.trials,
                                            through_loss=True), world, device)
            micro, boundary = [], []
            for i in range(settings.warmup + settings.trials):
                pair = []
                for _ in range(2):  # GA 2: the first micro-batch, then the accumulation boundary
                    sync(device)
                    t0 = time.perf_counter()
                    engine.backward(loss_backward(engine(x), grad))
                    engine.step()
                    sync(device)
                    pair.append(time.perf_counter() - t0)
                    x.grad = None
                if i >= settings.warmup:
                    micro.append(pair[0])
                    boundary.append(pair[1])
            t_micro = slowest(statistics.median(micro), world, device)
            t_boundary = slowest(statistics.median(boundary), world, device)
            points.append({"impl": "deepspeed", "group_size": n, "reshard_after_forward": stage == 3, "blocks": blocks,
                           "micro_batch": mb, "tokens": mb * settings.seq_len, "params": params, "plain_s": t_plain,
                           "micro_s": t_micro, "boundary_s": t_boundary, "overhead_s": t_micro - t_plain})
        report(f"deepspeed ZeRO-{stage} {blocks} block(s) n={n}")
        engine.destroy()
        del engine, stack, plain
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return points


def fit_sharding(points: list[dict], optimizer_s_per_param: float = 0.0):
    """ShardingFit per (impl, group size, reshard_after_forward) from the raw points (lines: `_line`).

    Per micro-batch: overhead(k blocks) = edge + k * per_block. With stacks of 1 and K blocks (STACK, or the
    profile's --stack-blocks), per_block = (overhead(K) - overhead(1)) / (K - 1) and edge = overhead(1) - per_block,
    each a line in tokens (negative differences are noise around zero and count as 0). Points of an older
    profile (one block, no "blocks" key) give per_block = overhead(1) and no edge.

    FSDP2 points with "sync" False (a gradient-accumulating micro-batch) give the same lines as `accumulate`
    and `accumulate_edge`; points without the key synchronised.

    DeepSpeed points also give the once-per-step part: extra(k) = boundary_s - micro_s - the plain AdamW
    step of the rank's partition (params / n x `optimizer_s_per_param`), averaged over the micro-batches
    (it does not depend on tokens), split as extra = step_edge_s + step_s_per_param x params between the
    two stacks (each clamped at 0).
    """
    from planner.core.profile import ShardingFit

    keys = sorted({(p.get("impl", "fsdp2"), p["group_size"], p["reshard_after_forward"]) for p in points})
    out = []
    for impl, n, reshard in keys:
        pts = [p for p in points if p.get("impl", "fsdp2") == impl and p["group_size"] == n
               and p["reshard_after_forward"] == reshard and p.get("sync", True)]
        overhead, edge, tokens = _per_block_and_edge(pts)
        fit = ShardingFit(group_size=n, reshard_after_forward=reshard, overhead=overhead, edge=edge, impl=impl,
                          max_tokens=float(max(tokens)))
        accum = [p for p in points if p.get("impl", "fsdp2") == impl and p["group_size"] == n
                 and p["reshard_after_forward"] == reshard and not p.get("sync", True)]
        if accum:
            a_overhead, a_edge, _ = _per_block_and_edge(accum)
            fit = ShardingFit(**{**fit.__dict__, "accumulate": a_overhead, "accumulate_edge": a_edge})
        if impl == "deepspeed":
            per_param, step_edge = _step_split(pts, n, optimizer_s_per_param)
            fit = ShardingFit(**{**fit.__dict__, "step_s_per_param": per_param, "step_edge_s": step_edge})
        out.append(fit)
    return tuple(out)


def _per_block_and_edge(pts: list[dict]):
    """(per-block line, edge line or None, tokens measured) of one kind of points (fit_sharding's docstring)."""
    by = {(p.get("blocks", 1), p["tokens"]): p["overhead_s"] for p in pts}
    tokens = sorted({t for _, t in by})
    k = max(b for b, _ in by)  # the larger stack's blocks (STACK, or distplan profile --stack-blocks)
    if k > 1 and all((k, t) in by and (1, t) in by for t in tokens):
        per = [max((by[(k, t)] - by[(1, t)]) / (k - 1), 0.0) for t in tokens]
        edge = [max(by[(1, t)] - b, 0.0) for t, b in zip(tokens, per)]
        return _line(tokens, per), _line(tokens, edge), tokens
    return _line(tokens, [max(by[(1, t)], 0.0) for t in tokens]), None, tokens


def _step_split(pts: list[dict], n: int, optimizer_s_per_param: float) -> tuple[float, float]:
    """(seconds per parameter, seconds) of the once-per-step extra of DeepSpeed points (fit_sharding)."""
    extra: dict[int, list[float]] = {}
    params: dict[int, float] = {}
    for p in pts:
        k = p.get("blocks", 1)
        params[k] = float(p["params"])
        extra.setdefault(k, []).append(p["boundary_s"] - p["micro_s"] - p["params"] / n * optimizer_s_per_param)
    mean = {k: max(sum(v) / len(v), 0.0) for k, v in extra.items()}
    if len(mean) < 2:
        (k, e), = mean.items()
        return e / params[k], 0.0
    lo, hi = min(mean), max(mean)
    per_param = max((mean[hi] - mean[lo]) / (params[hi] - params[lo]), 0.0)
    return per_param, max(mean[lo] - per_param * params[lo], 0.0)


def _line(xs: list[float], ys: list[float]):
    """Least-squares line through (tokens, seconds); the slope may be negative (a larger micro-batch gives
    the prefetch more compute to hide behind); users clamp at 0 and hold a falling line past the largest
    token count measured (ShardingFit.max_tokens). A constant (the mean) for one token count,
    or where a point is 0 (noise around no overhead: no trend in tokens to fit)."""
    import numpy as np

    from planner.core.profile import LinearFit

    if len(set(xs)) < 2 or any(y <= 0 for y in ys):
        return LinearFit(intercept_s=sum(ys) / len(ys), slope_s=0.0)
    slope, intercept = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    return LinearFit(intercept_s=float(intercept), slope_s=float(slope))
