"""Timing on one device, and across ranks, for the profilers.

One layer's forward, backward and recompute, and its activation memory (`time_point`; profilers.compute.profile_layer
calls it for each micro-batch). CUDA: CUDA events on the current stream, each phase the larger of the GPU's time with
the host queued ahead (HostAhead) and the host's own time; CPU: the thread's CPU time, one core (see Clock). Each
number is the median of `repeats` runs after `warmup` runs. Activation memory: on CUDA the allocator's bytes held
after the forward and its peak; on CPU the bytes of the tensors autograd saves (saved-tensor hooks).

Across ranks (the sharding, pipeline and tensor-parallel profilers): wall-clock forward + backward of a module
(`time_fwd_bwd`) and the slowest rank's value of a measurement (`slowest`).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint


class Repeats(Protocol):
    """What `time_point` reads of its settings (profilers.compute.ComputeSettings has them)."""

    warmup: int  # runs before the timed ones
    repeats: int  # timed runs, at most
    point_budget_s: float  # fewer timed runs (never under one) when they would take longer


class Clock:
    """CUDA events on the current stream; on CPU the CPU time of this thread (time.thread_time).

    A CPU 'device' is one core (the profile runs torch single-threaded there, as each gloo rank is),
    and thread CPU time does not count the time other processes hold the core: a shared CI machine
    gives the same numbers busy or idle, where wall-clock time would measure its load.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.thread_time()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def saved_bytes(run: Callable[[], torch.Tensor], params: set[int]) -> tuple[torch.Tensor, int]:
    """Run a forward counting the bytes of the non-parameter tensors autograd saves (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta" and t.data_ptr() not in params:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(seen.values())


class HostAhead:
    """Lets the host queue a layer's kernels before the GPU runs them (CUDA only).

    Timed from an idle GPU, a layer whose host-side work (Python, launches) outlasts some of its short kernels
    makes the GPU wait between them, and its events time the host, not the GPU. Inside a model the host runs
    ahead of the GPU through the long kernels of earlier layers, so the GPU's own time is what a layer costs
    there unless the host is slower on average: a layer in a model takes max(GPU time, host time). On 2xH200
    gpt2-xl's block is host-bound below micro-batch 8 (forward: 0.58 ms of host, 0.18 ms of GPU at micro-batch
    1); megatron-core's layer, first suspected, was not (its over-prediction was an fp32 softmax the engine
    does not run: benchmarks/results/profile_2xh200.md).

    `hold()` queues a sleep kernel long enough for the host to queue the whole run behind it; the events after
    it then time the GPU alone, and the host's wall clock around the same calls times the host."""

    MIN_S, MAX_S = 0.005, 0.25  # a host slower than MAX_S / 2 per run is timed as host-bound anyway

    def __init__(self):
        self.hold_s = 0.05  # the first run's; then twice the last run's host time, at least MIN_S
        self.cycles_per_s = self._calibrate()

    @staticmethod
    def _calibrate() -> float:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        torch.cuda._sleep(1_000_000)
        b.record()
        torch.cuda.synchronize()
        return 1_000_000 / max(a.elapsed_time(b) / 1e3, 1e-6)

    def hold(self) -> None:
        torch.cuda._sleep(int(self.hold_s * self.cycles_per_s))

    def saw_host(self, host_s: float) -> None:
        self.hold_s = min(max(self.MIN_S, 2 * host_s), self.MAX_S)


def time_point(layer: nn.Module, inputs_fn: Callable, settings: Repeats, device: torch.device,
               recompute: bool) -> dict:
    """Median fwd/bwd(/recompute) seconds and activation bytes of one layer on one micro-batch.

    On CUDA each phase is the larger of the GPU's time with the host queued ahead (HostAhead) and the host's
    own time for the same calls; both are recorded (gpu_*_s, host_*_s)."""
    clock = Clock(device)
    ahead = HostAhead() if device.type == "cuda" else None
    params = {p.data_ptr() for p in layer.parameters()}

    def forward(args, ckpt=False):
        return checkpoint(layer, *args, use_reentrant=False) if ckpt else layer(*args)

    def backward(out, grad):
        out.backward(grad) if grad is not None else out.backward()

    phases = ("fwd", "bwd", "recompute_bwd")
    gpu, host = {ph: [] for ph in phases}, {ph: [] for ph in phases}
    memory = {}
    runs, i = settings.warmup + settings.repeats, 0
    while i < runs:
        args, grad = inputs_fn()
        measure_memory = i == settings.warmup - 1 or (settings.warmup == 0 and i == 0)
        clock.sync()
        if measure_memory and device.type == "cuda":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        if ahead is not None and i >= settings.warmup:  # timed runs only
            ahead.hold()
        wall = h0 = time.perf_counter()
        t0 = clock.mark()
        if measure_memory and device.type != "cuda":
            out, saved = saved_bytes(lambda: forward(args), params)
        else:
            out = forward(args)
        t1 = clock.mark()
        h1 = time.perf_counter()
        if measure_memory:
            clock.sync()
            if device.type == "cuda":
                memory = {"activation_bytes": torch.cuda.memory_allocated() - base,
                          "fwd_peak_bytes": torch.cuda.max_memory_allocated() - base}
            else:
                memory = {"activation_bytes": saved + out.numel() * out.element_size()}
            h1 = time.perf_counter()
        backward(out, grad)
        t2 = clock.mark()
        h2 = time.perf_counter()
        if recompute:
            del out
            args, grad = inputs_fn()
            out = forward(args, ckpt=True)
            t3 = clock.mark()
            h3 = time.perf_counter()
            backward(out, grad)
            t4 = clock.mark()
            h4 = time.perf_counter()
        if ahead is not None:
            ahead.saw_host(time.perf_counter() - h0)
        clock.sync()
        if measure_memory and device.type == "cuda":
            memory["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        del out, args, grad
        if i >= settings.warmup:
            gpu["fwd"].append(clock.seconds(t0, t1))
            gpu["bwd"].append(clock.seconds(t1, t2))
            host["fwd"].append(h1 - h0)
            host["bwd"].append(h2 - h1)
            if recompute:
                gpu["recompute_bwd"].append(clock.seconds(t3, t4))
                host["recompute_bwd"].append(h4 - h3)
        elif i == settings.warmup - 1:
            # the last warm-up run sets how many repeats fit the budget (at least one)
            per_run = time.perf_counter() - wall
            runs = settings.warmup + max(1, min(settings.repeats, int(settings.point_budget_s / max(per_run, 1e-9))))
        i += 1
    med = lambda xs: float(torch.tensor(xs, dtype=torch.float64).median())  # noqa: E731
    if ahead is None:  # CPU: thread time is the device's own
        cost = {ph: med(gpu[ph]) for ph in phases if gpu[ph]}
        point = {"fwd_s": cost["fwd"], "bwd_s": cost["bwd"], "repeats": len(gpu["fwd"]), **memory}
    else:
        cost = {ph: med([max(g, h) for g, h in zip(gpu[ph], host[ph])]) for ph in phases if gpu[ph]}
        point = {"fwd_s": cost["fwd"], "bwd_s": cost["bwd"], "repeats": len(gpu["fwd"]), **memory}
        for ph in phases:
            if gpu[ph]:
                point[f"gpu_{ph}_s"], point[f"host_{ph}_s"] = med(gpu[ph]), med(host[ph])
    if recompute:
        point["recompute_s"] = max(0.0, cost["recompute_bwd"] - point["bwd_s"])
    return point


# ---- across ranks ------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def slowest(value: float, group, device: torch.device) -> float:
    """The largest of every rank's `value` over `group` (every rank of it calls this)."""
    t = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def loss_backward(out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient w.r.t. `out` is `grad` (DeepSpeed's engine.backward takes a loss)."""
    return (out * grad).sum()


def time_fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, device: torch.device,
                 warmup: int, trials: int, through_loss: bool = False, zero_grads: bool = False) -> float:
    """Median wall-clock seconds of one forward + backward (gradients dropped after each run, or zeroed in place
    with `zero_grads`, as the torch engine keeps DDP's); `through_loss`: backward from the scalar
    `loss_backward` gives (as DeepSpeed's engine.backward needs) instead of out.backward."""
    times = []
    for i in range(warmup + trials):
        sync(device)
        t0 = time.perf_counter()
        out = module(x)
        if through_loss:
            loss_backward(out, grad).backward()
        else:
            out.backward(grad)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        for p in module.parameters():
            if zero_grads and p.grad is not None:
                p.grad.zero_()
            else:
                p.grad = None
        x.grad = None
    return statistics.median(times)
