"""What torch.distributed.pipelining's schedules cost per operation beyond the chunks' compute, measured.

Why: on 2x H200 the torch engine's pipelines ran longer than a simulation of their schedule fed with the chunks'
own measured compute (CUDA events around every forward_one_chunk / backward_one_chunk): by 0.07-0.08 s on
llama-3-8b interleaved v8 x 4 micro-batches and gpt2-xl interleaved v2 x 16 (64 operations per rank, about
1.2-1.3 ms each), and about 0.5 ms per operation on 1F1B (benchmarks/results/campaign_2xh200.md). The cost model
charged only the activation's transfer at the profiled p2p bandwidth (0.1-0.2 ms), which the collective
profiler times as a back-to-back loop of sends. Where the rest goes is not settled (benchmarks/DEVICE_NOTES.md:
head-of-line blocking of the pair's NCCL stream was simulated and explains little); this measures the runtime as
it is. A llama-3-8b profile measured 0.52 ms per operation at that plan's 64 MiB: about half of what the run lost at
v = 8 (this measures v = VPP; benchmarks/results/campaign_2xh200.md).

What: inside the communication profiler's processes, over ranks 0 and 1 (NCCL on GPUs, gloo on CPUs), a
2-stage pipeline whose every chunk is one transformer block (profilers.compute.build_layer, tp = 1, the
profile's dtype) runs the torch engine's schedules (planner/build/parallelize.pipeline_schedule: Schedule1F1B with one
chunk per rank, ScheduleInterleaved1F1B with VPP chunks; --quick on GPUs the interleaved one only) over
MICROBATCHES micro-batches, and the interleaved one again with LONG_VPP chunks over LONG_MICROBATCHES, at the
smallest and the largest micro-batch of the sharding stacks. Beside it, the same block alone gives the forward and
backward seconds of one chunk. The schedule simulation of the cost model (planner.cost.pipeline.span_s) with those
per-chunk times + `a` per operation is solved for the `a` that matches the measured step: the exposed cost of
one forward or backward operation of the schedule, transfer included (a point's `action_s`). fit_pipeline
turns the points into a line in the bytes of the activation each operation sends, per schedule kind.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from profilers.sharding import ShardingSettings
from profilers.timing import slowest, sync

VPP = 2  # chunks per rank of the interleaved measurement
MICROBATCHES = 4  # micro-batches per step (a multiple of the 2 ranks, as the interleaved schedule needs)
# the interleaved schedule again at a longer shape (v4 x 8 = 64 operations per rank): its cost per operation grows in
# proportion to the operations per rank (benchmarks/results/pipeline_grid_2xh200.md); fit_pipeline takes the growth
LONG_VPP, LONG_MICROBATCHES = 4, 8


def _chunk_times(block: nn.Module, x: torch.Tensor, grad: torch.Tensor, device: torch.device,
                 warmup: int, trials: int) -> tuple[float, float]:
    """Median (forward, backward) seconds of one block on one micro-batch, each phase synchronised."""
    fwd, bwd = [], []
    for i in range(warmup + trials):
        sync(device)
        t0 = time.perf_counter()
        out = block(x)
        sync(device)
        t1 = time.perf_counter()
        out.backward(grad)
        sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        for p in block.parameters():
            p.grad = None
        x.grad = None
    return statistics.median(fwd), statistics.median(bwd)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out.float() * target).mean()


def _step_time(kind: str, spec, mb: int, seq_len: int, group, device: torch.device, dtype: torch.dtype,
               warmup: int, trials: int, vpp: int = VPP, microbatches: int = MICROBATCHES) -> float:
    """Median wall-clock seconds of one step of the `kind` schedule over ranks 0 and 1 (this rank's part), with
    `vpp` one-block chunks per rank (interleaved; 1F1B has one) and `microbatches` micro-batches."""
    return step_times(kind, spec, mb, seq_len, group, device, dtype, warmup, trials, vpp, microbatches)[1]


def step_times(kind: str, spec, mb: int, seq_len: int, group, device: torch.device, dtype: torch.dtype,
               warmup: int, trials: int, vpp: int = VPP, microbatches: int = MICROBATCHES) -> tuple[float, float]:
    """Medians (host seconds until schedule.step returns, wall seconds to the synchronised end) of one step of
    the `kind` schedule over ranks 0 and 1 (_step_time; benchmarks/pipeline_grid.py reads both)."""
    from torch.distributed import pipelining

    from profilers.compute import build_layer

    rank, vpp = dist.get_rank(group), (vpp if kind == "interleaved" else 1)
    chunks = [build_layer(spec, "block", 1, device, dtype) for _ in range(vpp)]
    stages = [pipelining.PipelineStage(mod, c * 2 + rank, 2 * vpp, device, group=group) for c, mod in enumerate(chunks)]
    from planner.build.parallelize import pipeline_schedule  # the torch engine's own schedule classes

    cls = pipeline_schedule(kind)
    schedule = cls(stages if kind == "interleaved" else stages[0], microbatches, loss_fn=_loss)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(microbatches * mb, seq_len, spec.hidden_size, generator=g).to(device, dtype)
    target = torch.randn(microbatches * mb, seq_len, spec.hidden_size, generator=g).to(device, torch.float32)
    host, wall = [], []
    for i in range(warmup + trials):
        sync(device)
        dist.barrier(group=group)
        t0 = time.perf_counter()
        if rank == 0:
            schedule.step(x)
        else:
            schedule.step(target=target, losses=[])
        t1 = time.perf_counter()
        sync(device)
        if i >= warmup:
            host.append(t1 - t0)
            wall.append(time.perf_counter() - t0)
        for mod in chunks:
            for p in mod.parameters():
                p.grad = None
    del schedule, stages, chunks
    return statistics.median(host), statistics.median(wall)


def solve_action_s(kind: str, step_s: float, fwd_s: float, bwd_s: float, vpp: int = VPP,
                   microbatches: int = MICROBATCHES) -> float:
    """Seconds `a` per operation such that the schedule simulation of 2 ranks (each chunk fwd_s + a forward,
    bwd_s + a backward; `vpp` chunks per rank for interleaved) spans `step_s`; 0 when the step is no longer
    than the compute alone."""
    from planner.cost.pipeline import StageOpTimes, span_s

    vpp = vpp if kind == "interleaved" else 1

    def span(a: float) -> float:
        stages = [StageOpTimes(rank=r, forward_s=fwd_s + a, backward_s=bwd_s + a, recompute_s=0.0, p2p_s=0.0)
                  for r in range(2)]
        return span_s(kind, 2, vpp, microbatches, stages, {})

    if step_s <= span(0.0):
        return 0.0
    lo, hi = 0.0, max(step_s, 1e-6)
    for _ in range(60):  # span grows with a: bisection
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if span(mid) < step_s else (lo, mid)
    return (lo + hi) / 2


def measure(settings: ShardingSettings, group, device: torch.device, dtype: torch.dtype,
            report=lambda label: None) -> list[dict]:
    """Raw points over ranks 0 and 1 (both call this; both get the same list): [{impl "pipeline", schedule,
    group_size 2, vpp, microbatches, micro_batch, tokens, bytes, chunk_fwd_s, chunk_bwd_s, step_s, action_s}]."""
    from planner.core.model import load_model
    from profilers.compute import build_layer, make_inputs

    spec = load_model(settings.model)
    if spec.is_moe or spec.is_vit:  # dense token models only (the campaign's); others keep the p2p bandwidth
        return []
    points = []
    for mb in settings.micro_batches:
        block = build_layer(spec, "block", 1, device, dtype)
        (x,), grad = make_inputs(spec, "block", 1, mb, settings.seq_len, device, dtype)
        fwd, bwd = _chunk_times(block, x, grad, device, settings.warmup, settings.trials)
        fwd, bwd = slowest(fwd, group, device), slowest(bwd, group, device)
        del block, x, grad
        for kind in settings.pipeline_schedules:
            longer = kind == "interleaved" and mb == settings.micro_batches[0]
            shapes = [(VPP, MICROBATCHES)] + ([(LONG_VPP, LONG_MICROBATCHES)] if longer else [])
            for vpp, m in shapes:
                vpp = vpp if kind == "interleaved" else 1
                step = slowest(_step_time(kind, spec, mb, settings.seq_len, group, device, dtype, settings.warmup,
                                          settings.trials, vpp, m), group, device)
                tokens = mb * settings.seq_len
                points.append({"impl": "pipeline", "schedule": kind, "group_size": 2, "vpp": vpp, "microbatches": m,
                               "ops_per_rank": 2 * vpp * m, "micro_batch": mb, "tokens": tokens,
                               "bytes": tokens * spec.hidden_size * torch.tensor([], dtype=dtype).element_size(),
                               "chunk_fwd_s": fwd, "chunk_bwd_s": bwd, "step_s": step,
                               "action_s": solve_action_s(kind, step, fwd, bwd, vpp, m)})
            report(f"pipeline {kind} micro-batch {mb}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return points


def _ops(p: dict) -> int:
    """Operations per rank of a point's step (points before the key existed: VPP / 1 chunks x MICROBATCHES)."""
    return int(p.get("ops_per_rank") or 2 * int(p.get("vpp", VPP if p["schedule"] == "interleaved" else 1))
               * int(p.get("microbatches", MICROBATCHES)))


def fit_pipeline(points: list[dict]):
    """PipelineFit per schedule kind: seconds per operation as a line in the bytes each operation sends (a
    constant with one size), each point clamped at 0; a falling line is held past the largest size measured.
    The line is fitted at the shape with the fewest operations per rank; where a longer shape was measured too,
    the growth per operation more is the mean over the sizes measured at both of (longer / base - 1) / (the
    operation counts' difference), at least 0 (planner.core.profile.pipeline_growth)."""
    from planner.core.profile import LinearFit, PipelineFit, pipeline_growth

    out = []
    for kind in sorted({p["schedule"] for p in points if p.get("impl") == "pipeline"}):
        mine = [p for p in points if p.get("impl") == "pipeline" and p["schedule"] == kind]
        base_ops, max_ops, growth = pipeline_growth([(_ops(p), float(p["bytes"]), float(p["action_s"])) for p in mine])
        base_ops = base_ops or min(_ops(p) for p in mine)
        pts = sorted((float(p["bytes"]), max(float(p["action_s"]), 0.0)) for p in mine if _ops(p) == base_ops)
        xs, ys = [b for b, _ in pts], [a for _, a in pts]
        if len(set(xs)) < 2:
            line = LinearFit(intercept_s=sum(ys) / len(ys), slope_s=0.0)
        else:
            (x0, y0), (x1, y1) = (xs[0], ys[0]), (xs[-1], ys[-1])  # the two ends (the profiler measures two)
            slope = (y1 - y0) / (x1 - x0)
            line = LinearFit(intercept_s=y0 - slope * x0, slope_s=slope)
        longer = max_ops > base_ops
        out.append(PipelineFit(schedule=kind, group_size=2, action=line, max_bytes=max(xs),
                               base_ops=base_ops if longer else 0, max_ops=max_ops if longer else 0,
                               growth_per_op=growth))
    return tuple(out)
