"""Where one training step's time goes on the GPU: an optional torch.profiler trace of one extra step.

Why: a run that is slower than its prediction can be bound by the GPU's kernels (the compute fits are off),
by communication kernels that do not overlap, or by the host (Python, DTensor dispatch, the pipelining
runtime) leaving the GPU idle. The step's wall clock cannot tell these apart; the kernels' own intervals can.

What: with `distplan run --trace` (which sets DISTPLAN_TRACE=1 for the workers; the campaign's device script passes
the variable through), the torch engine runs one more step after the measured ones
(not counted in the step times: the profiler slows the host) inside torch.profiler, and each rank's report
carries `trace`: the traced step's wall seconds; `busy_s`, the union of all kernel intervals on the rank's
GPU; `compute_busy_s`, the same without communication kernels (NCCL); and the kernels' summed time per
category (matmul, attention, communication, other) with the largest kernels by summed time.
Idle = wall - busy is time the GPU waited on the host (queued nothing); a rank waiting for its peers inside a
collective shows as communication kernel time instead (NCCL's kernels run while they wait).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

ENV = "DISTPLAN_TRACE"  # set to 1 for the workers by --trace
TOP = 8  # kernels listed by summed time

_CATEGORIES = (  # first match wins; lower-case substrings of kernel names
    ("communication", ("nccl",)),
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma")),
)


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def _union_s(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of (start, end) intervals given in microseconds."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total / 1e6


def summarize(kernels: list[tuple[str, float, float]], wall_s: float) -> dict:
    """kernels: (name, start_us, end_us) of every GPU kernel of the step -> the report's `trace` dict."""
    by_cat: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for name, s, e in kernels:
        d = (e - s) / 1e6
        by_cat[category(name)] = by_cat.get(category(name), 0.0) + d
        by_name[name] = by_name.get(name, 0.0) + d
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:TOP]
    busy = _union_s([(s, e) for _, s, e in kernels])
    compute = _union_s([(s, e) for n, s, e in kernels if category(n) != "communication"])
    return {"wall_s": wall_s, "busy_s": busy, "compute_busy_s": compute, "idle_s": max(wall_s - busy, 0.0),
            "kernels": len(kernels), "by_category_s": dict(sorted(by_cat.items())),
            "top_kernels": [{"name": n[:120], "s": t} for n, t in top]}


@contextmanager
def traced(device):
    """Profile the block; yields a list that receives the (name, start_us, end_us) of its GPU kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out: list[tuple[str, float, float]] = []
    with profile(activities=acts) as prof:
        yield out
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            out.append((e.name, float(e.time_range.start), float(e.time_range.end)))
