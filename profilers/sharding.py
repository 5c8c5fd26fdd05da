"""Per-layer overhead of sharded data parallelism (FSDP2 `fully_shard`), measured on one block.

Why: on 2x H200, FSDP2 ZeRO-1/3 and DeepSpeed ZeRO-2 steps took 2.0-2.3x the prediction
(benchmarks/results/run_2xh200.md, miss 1). The bandwidth model charged 2-5 ms for the weight
all-gathers and gradient reduce-scatters; the runs lost about 150 ms per micro-batch over 48 layers:
per-layer collective launches, copy-in/copy-out of the flat buffers and the bf16 <-> fp32 casts of
every layer's parameters and gradients, none of which a bandwidth fit sees.

What: inside the communication profiler's processes (NCCL on GPUs, gloo between CPU processes), over
the group of ranks 0..n-1, one transformer block (profilers.compute.build_layer, tp = 1, the profile's
dtype) runs forward + backward
  - plain (the block in the compute dtype, what the profile's compute fit times), and
  - wrapped as the torch engine wraps it (planner/runner/parallelize.apply_fsdp): fp32 parameters
    sharded by `fully_shard` with MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype), under a
    parameter-less FSDP root so the block's own `reshard_after_forward` holds (FSDP2 never reshards a
    root after forward), once with reshard_after_forward=True (ZeRO-3) and once with False (ZeRO-1/2).
Each (micro-batch, mode) point is the median of `trials` wall-clock runs after `warmup` runs, the
slowest rank's value; overhead = wrapped - plain, per block per micro-batch (gradient reduce-scatter
every micro-batch, as ZeRO-2/3 do; the torch engine skips it for all but the last micro-batch of a step,
so for its ZeRO-1/2 this is an upper bound). The profile keeps the raw points and a fit
overhead = intercept + slope * tokens (profilers.fit.linear_fit) per (group size, mode); a difference
below zero is timing noise around no overhead and counts as 0 (the raw point keeps its sign), and then
the fit is the mean of the points as a constant.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class ShardingSettings:
    model: str  # zoo name or model file (each process loads it)
    seq_len: int
    micro_batches: tuple[int, ...]
    warmup: int = 2
    trials: int = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, device: torch.device,
                  warmup: int, trials: int) -> float:
    """Median wall-clock seconds of one forward + backward (gradients dropped after each run)."""
    times = []
    for i in range(warmup + trials):
        _sync(device)
        t0 = time.perf_counter()
        out = module(x)
        out.backward(grad)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        for p in module.parameters():
            p.grad = None
        x.grad = None
    return statistics.median(times)


def _slowest(value: float, group, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def measure(settings: ShardingSettings, group, n: int, device: torch.device, dtype: torch.dtype,
            report=lambda label: None) -> list[dict]:
    """Raw points of one group of `n` ranks (every rank of `group` calls this; all get the same list):
    [{group_size, reshard_after_forward, micro_batch, tokens, plain_s, wrapped_s, overhead_s}]."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from planner.model import load_model
    from profilers.compute import build_layer, make_inputs

    spec = load_model(settings.model)
    kind = "moe_block" if spec.is_moe else "block"
    mesh = DeviceMesh.from_group(group, device.type)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)
    plain = build_layer(spec, kind, 1, device, dtype)
    points = []
    for reshard in (True, False):
        block = build_layer(spec, kind, 1, device, torch.float32)  # fp32 shards: the masters, as in the engine
        root = nn.Sequential(block)
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
        fully_shard(root, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
        for mb in settings.micro_batches:
            (x,), grad = make_inputs(spec, kind, 1, mb, settings.seq_len, device, dtype)
            t_plain = _slowest(_time_fwd_bwd(plain, x, grad, device, settings.warmup, settings.trials), group, device)
            t_wrapped = _slowest(_time_fwd_bwd(root, x, grad, device, settings.warmup, settings.trials), group, device)
            points.append({"group_size": n, "reshard_after_forward": reshard, "micro_batch": mb,
                           "tokens": mb * settings.seq_len, "plain_s": t_plain, "wrapped_s": t_wrapped,
                           "overhead_s": t_wrapped - t_plain})
        report(f"fully_shard block n={n} reshard={reshard}")
        del root, block
    return points


def fit_sharding(points: list[dict]):
    """ShardingFit per (group size, reshard_after_forward) from the raw points (negative overheads as 0)."""
    from planner.profile import LinearFit, ShardingFit
    from profilers import fit

    keys = sorted({(p["group_size"], p["reshard_after_forward"]) for p in points})
    out = []
    for n, reshard in keys:
        pts = [p for p in points if p["group_size"] == n and p["reshard_after_forward"] == reshard]
        xs = [p["tokens"] for p in pts]
        ys = [max(p["overhead_s"], 0.0) for p in pts]
        if all(y > 0 for y in ys):
            line = fit.linear_fit(xs, ys)
        else:  # some point is noise around zero: a constant, the mean, and no trend in tokens
            line = LinearFit(intercept_s=sum(ys) / len(ys), slope_s=0.0)
        out.append(ShardingFit(group_size=n, reshard_after_forward=reshard, overhead=line))
    return tuple(out)
