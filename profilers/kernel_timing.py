"""The device time of one call, as the kernel database (profilers/hardware.py) times every kernel it measures.

CUDA: `inner` calls are captured once in a CUDA graph on a side stream and the graph is replayed: one warm-up
replay, then `repeats` replays back to back, a CUDA event after each; the time per call is each replay's time
over `inner`, and the median of the replays is kept (min and max beside it). A replay is the GPU's own time:
no Python, dispatcher or launch gap between the calls (eager loops of small matmuls time the CPU: facts.py).
Where a call cannot be captured (a kernel that synchronizes with the host, a library that refuses capture),
the same loop runs eagerly behind a sleep kernel that holds the GPU while the host queues every call
(timing.HostAhead's idea), so the events still time the GPU; the result says which method ran.
CPU: the calls run in a loop timed by the thread's CPU time (timing.Clock: one core, the load of other
processes left out).

`prepare` runs first on the stream the calls will run on (the autograd engine runs a backward on its forward's
stream, so a timed backward needs its forward there). Each call's outputs are dropped before the next.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

from profilers.timing import Clock, HostAhead, is_oom

# kinds of call timed eagerly, never captured: a failed or random-drawing capture leaves the CUDA generator in capture
# mode and every later kernel fails (benchmarks/results/preset_vs_measured.md); memory-bound kernels: capture=False
NO_CAPTURE = ("dropout.",)
GRAPH_TRIES = 2  # failed captures of one kind of call before it is timed eagerly only
MAX_HOLD_S = 0.5  # longest sleep kernel of the eager fallback: a host slower than this per point is timed as it is


class KernelTimer:
    def __init__(self, device: torch.device, loop_s: float, repeats: int):
        self.device, self.loop_s, self.repeats = device, loop_s, repeats
        self.cuda = device.type == "cuda"
        self.clock = Clock(device)
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.cycles_per_s = HostAhead._calibrate() if self.cuda else 0.0
        self.graph_errors: dict[str, int] = {}  # why capture failed -> times (the eager fallback ran instead)
        self.refused: dict[str, int] = {}  # kind of call -> captures it failed; from GRAPH_TRIES on it runs eagerly

    def inner_for(self, est_s: float, max_inner: int) -> int:
        """Calls per timed loop: enough for `loop_s` of device time at the estimated `est_s` per call."""
        return max(1, min(max_inner, math.ceil(self.loop_s / max(est_s, 1e-9))))

    def measure(self, fn: Callable[[], object], est_s: float, max_inner: int,
                prepare: Callable[[], None] | None = None, kind: str = "", capture: bool = True) -> dict:
        """{seconds (median per call), min_s, max_s, inner, repeats, method} of `fn`; `kind` names the call
        (e.g. 'embedding.bwd'), so that one that refuses capture twice is timed eagerly from then on; `capture`
        False: eagerly from the start (behind the sleep kernel, so the events still time the GPU)."""
        inner = self.inner_for(est_s, max_inner)
        if not self.cuda:
            return self._cpu(fn, inner, prepare)
        if capture and self.refused.get(kind, 0) < GRAPH_TRIES and not kind.startswith(NO_CAPTURE):
            try:
                return self._graph(fn, inner, prepare)
            except Exception as exc:  # noqa: BLE001 - any refusal to capture: time it eagerly instead
                if is_oom(exc):
                    raise
                why = f"{kind}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                self.graph_errors[why] = self.graph_errors.get(why, 0) + 1
                self.refused[kind] = self.refused.get(kind, 0) + 1
                # a capture that failed may leave the allocator routing this stream's blocks to its pool: a new stream
                self.stream = torch.cuda.Stream(self.device)
                torch.cuda.synchronize()
        return self._eager(fn, inner, prepare)

    def _result(self, per_call: list[float], inner: int, method: str) -> dict:
        return {"seconds": statistics.median(per_call), "min_s": min(per_call), "max_s": max(per_call),
                "inner": inner, "repeats": len(per_call), "method": method}

    def _graph(self, fn, inner: int, prepare) -> dict:
        s = self.stream
        s.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s):
            if prepare is not None:
                prepare()
            fn()  # warm-up on the capture stream: cuBLAS workspace, autograd buffers, lazy initialisation
            graph.capture_begin()
            try:
                for _ in range(inner):
                    fn()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(s)
        try:
            graph.replay()
            events = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats + 1)]
            events[0].record()
            for e in events[1:]:
                graph.replay()
                e.record()
            torch.cuda.synchronize()
            per_call = [a.elapsed_time(b) / 1e3 / inner for a, b in zip(events, events[1:])]
        finally:
            graph.reset()
        return self._result(per_call, inner, "cuda graph")

    def _eager(self, fn, inner: int, prepare) -> dict:
        if prepare is not None:
            prepare()
        h0 = time.perf_counter()
        for _ in range(inner):  # warm-up, and the host's time to queue one loop
            fn()
        host_s = time.perf_counter() - h0
        torch.cuda.synchronize()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats + 1)]
        hold_s = min(MAX_HOLD_S, 1.5 * host_s * self.repeats + 0.002)
        torch.cuda._sleep(int(hold_s * self.cycles_per_s))
        events[0].record()
        for e in events[1:]:
            for _ in range(inner):
                fn()
            e.record()
        torch.cuda.synchronize()
        per_call = [a.elapsed_time(b) / 1e3 / inner for a, b in zip(events, events[1:])]
        return self._result(per_call, inner, "eager behind a sleep kernel")

    def _cpu(self, fn, inner: int, prepare) -> dict:
        if prepare is not None:
            prepare()
        fn()
        per_call = []
        for _ in range(self.repeats):
            t0 = self.clock.mark()
            for _ in range(inner):
                fn()
            per_call.append(self.clock.seconds(t0, self.clock.mark()) / inner)
        return self._result([max(t, 1e-9) for t in per_call], inner, "cpu thread time")

