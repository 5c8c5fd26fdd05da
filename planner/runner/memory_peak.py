"""What the GPU holds at one training step's peak: an optional record of one extra step's allocations.

Why: a run whose peak memory is above its prediction (llama-3-8b pp2 interleaved with full recompute ran 6.8-7.1
GiB over on both stages, benchmarks/results/campaign_2xh200.md) says how much, not what. The caching allocator's
history can: every allocation and free of the step with the Python frames that made it.

What: with `distplan run --memory-peak` (which sets DISTPLAN_MEMORY_PEAK=1 for the workers), the torch engine on
CUDA runs one more step after the measured ones (and after `--trace`'s) with the allocator's history recorded
(torch.cuda.memory._record_memory_history), replays it to the moment the most memory was allocated, and each
rank's report carries `memory_peak`: the bytes allocated before the step (weights, optimizer states, anything
kept from earlier steps), the step's peak, and the blocks live at that peak that the step allocated, summed by
where they were allocated (the innermost frame in distplan's own code and the innermost frame), largest first.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

ENV = "DISTPLAN_MEMORY_PEAK"  # set to 1 for the workers by --memory-peak
TOP = 12  # places listed, by bytes live at the peak
MAX_ENTRIES = 1_000_000  # allocator events kept (a step of a large model makes tens of thousands)
GIB = 1024**3  # bytes per GiB


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def _where(frames: list[dict]) -> str:
    """The innermost frame in distplan's code (planner/) as file:line function, then after "<-" the innermost frame
    where that is outside it (the torch call that allocated: a checkpoint's recompute, a pipeline's receive buffer);
    the innermost frame alone where no frame is distplan's."""
    if not frames:
        return "(no frame recorded)"
    own = [f for f in frames if f"{os.sep}planner{os.sep}" in str(f.get("filename", ""))]

    def name(f: dict, mine: bool) -> str:
        path = str(f.get("filename", "?"))
        short = path[path.rfind(f"{os.sep}planner{os.sep}") + 1:] if mine else os.path.basename(path)
        return f"{short}:{f.get('line', '?')} {f.get('name', '?')}"

    if not own:
        return name(frames[0], False)
    return name(own[0], True) + ("" if frames[0] is own[0] else f" <- {name(frames[0], False)}")


def summarize(events: list[dict], before_bytes: int, top: int = TOP) -> dict:
    """Allocator events of one device in order ({action, addr, size, frames}) -> the report's `memory_peak`.

    "alloc" adds a block, "free_completed" removes it (its memory is reusable from then; "free_requested" only
    queues the free behind the stream's work); other actions (segments, snapshots) do not change what is allocated.
    The peak is the first moment the running total is highest."""
    total, peak, peak_at = 0, 0, -1
    for i, e in enumerate(events):
        if e.get("action") == "alloc":
            total += int(e["size"])
        elif e.get("action") == "free_completed":
            total -= int(e["size"])
        if total > peak:
            peak, peak_at = total, i
    live: dict[int, dict] = {}
    for e in events[:peak_at + 1]:
        if e.get("action") == "alloc":
            live[e["addr"]] = e
        elif e.get("action") == "free_completed":
            live.pop(e["addr"], None)
    by: dict[str, list[int]] = {}
    for e in live.values():
        acc = by.setdefault(_where(e.get("frames") or []), [0, 0])
        acc[0] += int(e["size"])
        acc[1] += 1
    places = sorted(by.items(), key=lambda kv: -kv[1][0])
    return {"before_step_gib": before_bytes / GIB, "step_peak_gib": (before_bytes + peak) / GIB,
            "live_at_peak": [{"where": w, "gib": b / GIB, "blocks": n} for w, (b, n) in places[:top]],
            "live_at_peak_other_gib": sum(b for _, (b, _n) in places[top:]) / GIB}


@contextmanager
def recorded(device):
    """Record the allocator's history over the block (CUDA); yields a dict that receives `memory_peak`."""
    import torch

    out: dict = {}
    before = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=MAX_ENTRIES)
    try:
        yield out
        torch.cuda.synchronize(device)
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    traces = snap.get("device_traces") or []
    events = traces[device.index] if device.index is not None and device.index < len(traces) else []
    out.update(summarize(events, before))
