"""Device facts: what was measured on (names, counts, memory, versions, topology) and the two
ceilings every layer time is judged against: achieved matmul FLOP/s and device copy bandwidth.

- matmul: C = A @ B with square n x n operands in the profile's dtype, 2 n^3 FLOPs (one multiply
  and one add per multiply-accumulate), random data (zeros run faster and overstate the rate),
  back-to-back calls timed as one loop, median of repeats after warm-up; a sweep of n gives the
  efficiency-by-size curve.
- copy: dst.copy_(src) of one large buffer; bandwidth counts bytes read plus bytes written
  (2 x size / time), the convention of the STREAM copy kernel and nvbandwidth.
- host: pinned host-to-device copy of one buffer (CUDA only), the `host` link tier.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable

import torch

from profilers.timing import Clock

GIB = 2**30  # bytes per GiB


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    # nvidia-smi underlines its table headers with terminal escapes; keep the text
    return re.sub(r"\x1b\[[0-9;]*m", "", out.stdout).strip() if out.returncode == 0 else None


def host_memory_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_facts(device: torch.device) -> dict:
    """Names, counts, memory and versions; topology from `nvidia-smi topo -m` where present."""
    facts = {
        "measured_on": device.type,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "host_memory_gib": round(host_memory_gib(), 2),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        nccl = torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else None
        facts.update({
            "gpu_name": props.name,
            "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gib": round(props.total_memory / GIB, 2),
            "multiprocessors": props.multi_processor_count,
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
            "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
            "topology": _run(["nvidia-smi", "topo", "-m"]),
            "nvls_enabled_env": os.environ.get("NCCL_NVLS_ENABLE"),
        })
        if facts["driver"]:
            facts["driver"] = facts["driver"].splitlines()[0]
    return facts


def matmul_tflops(n: int, device: torch.device, dtype: torch.dtype, repeats: int = 10, warmup: int = 3,
                  loop_s: float = 0.005) -> float:
    """Achieved TFLOP/s of n x n x n matmuls run back to back, as a layer's GEMMs run: each repeat
    times a loop of calls lasting about `loop_s` (a lone small matmul would time its launch gap);
    median of `repeats` after `warmup`.

    On CUDA the loop is captured once in a CUDA graph and replayed: the GPU's rate, not the host's launch
    rate. Eager loops at n = 1024 (11-17 us per matmul, about one launch) read 116-183 TFLOP/s from run
    to run on H200 (benchmarks/results/profile_2xh200.md); what they measured was the CPU."""
    clock = Clock(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=c)
    clock.sync()
    t0 = clock.mark()
    torch.matmul(a, b, out=c)
    t1 = clock.mark()
    clock.sync()
    inner = max(1, min(1000, round(loop_s / max(clock.seconds(t0, t1), 1e-7))))
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                torch.matmul(a, b, out=c)
        run = graph.replay
        for _ in range(warmup):
            run()
    else:
        def run():
            for _ in range(inner):
                torch.matmul(a, b, out=c)
    times = []
    for _ in range(repeats):
        clock.sync()
        t0 = clock.mark()
        run()
        t1 = clock.mark()
        clock.sync()
        times.append(clock.seconds(t0, t1) / inner)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def copy_bandwidth_gb_s(nbytes: int, device: torch.device, repeats: int = 10, warmup: int = 3) -> float:
    """Device copy bandwidth, bytes read + written, GB/s (1e9 bytes)."""
    clock = Clock(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        clock.sync()
        t0 = clock.mark()
        dst.copy_(src)
        t1 = clock.mark()
        clock.sync()
        times.append(clock.seconds(t0, t1))
    times.sort()
    return 2 * nbytes / times[len(times) // 2] / 1e9


def host_to_device_gb_s(nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """Pinned host-to-device copy, GB/s (bytes moved once)."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    clock = Clock(device)
    times = []
    for _ in range(repeats):
        clock.sync()
        t0 = clock.mark()
        dst.copy_(src, non_blocking=True)
        t1 = clock.mark()
        clock.sync()
        times.append(clock.seconds(t0, t1))
    times.sort()
    return nbytes / times[len(times) // 2] / 1e9


def matmul_sizes(cuda: bool, quick: bool) -> tuple[int, ...]:
    """Square matmul sizes of the sweep: up to 8192 on GPUs (where cuBLAS plateaus), 2048 on CPUs."""
    if cuda:
        return (2048, 4096, 8192) if quick else (1024, 2048, 4096, 8192)
    return (256, 512, 1024) if quick else (256, 512, 1024, 2048)


def measure_ceilings(device: torch.device, dtype: torch.dtype, quick: bool,
                     on_point: Callable[[str], None] = lambda _: None) -> dict:
    """The matmul sweep, copy bandwidth and (CUDA) host link of one device."""
    cuda = device.type == "cuda"
    sweep = []
    for n in matmul_sizes(cuda, quick):
        t0 = time.perf_counter()
        tflops = matmul_tflops(n, device, dtype, repeats=10 if cuda else 3, warmup=3 if cuda else 1)
        sweep.append({"n": n, "gflop": 2 * n**3 / 1e9, "tflops": tflops, "seconds": time.perf_counter() - t0})
        on_point(f"matmul {n}^3")
    copy_bytes = (2 * GIB if not quick else GIB) if cuda else 64 * 2**20
    out = {"matmul": sweep, "copy_bytes": copy_bytes, "copy_gb_s": copy_bandwidth_gb_s(copy_bytes, device,
                                                                                      repeats=10 if cuda else 3)}
    on_point("copy bandwidth")
    if cuda:
        out["host_to_device_gb_s"] = host_to_device_gb_s(256 * 2**20, device)
    out["optimizer_s_per_param"] = optimizer_s_per_param(2**28 if cuda else 2**20, device, repeats=10 if cuda else 3)
    on_point("optimizer step")
    if cuda:  # the torch engine's offloaded step: make_optimizer's AdamW on fp32 tensors in host memory, with the
        # threads `distplan run` gives each rank when every GPU of the node runs one
        from planner.build.host import host_threads_per_rank

        threads = host_threads_per_rank(torch.cuda.device_count())
        out["host_optimizer_s_per_param"] = host_optimizer_s_per_param(2**26 if not quick else 2**25, threads=threads)
    return out


def host_optimizer_s_per_param(numel: int, repeats: int = 3, tensors: int = 16, threads: int | None = None) -> float:
    """Seconds per parameter of the torch engine's AdamW step (parallelize.make_optimizer) on fp32 parameters and
    gradients in host memory, as FSDP2's CPUOffloadPolicy leaves them (the engine's optimizer offload), over
    `numel` parameters in `tensors` tensors, with `threads` CPU threads (default: this process's). Median of
    `repeats` after a warm-up.
    The per-parameter loop took 26 ns per parameter on the 2x H200 host (gpt2-xl ZeRO-3 with offload: a 20.7 s
    step of 0.78 B parameters, benchmarks/results/campaign_2xh200.md); the engine runs the fused CPU kernel."""
    from planner.build.parallelize import make_optimizer

    per = max(1, numel // tensors)
    params = [torch.nn.Parameter(torch.zeros(per)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt = make_optimizer(params, lr=1e-4, offloaded=True)
    times, before = [], torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            opt.step()
            if i:
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    del opt, params
    return sorted(times)[len(times) // 2] / (per * tensors)


def optimizer_s_per_param(numel: int, device: torch.device, repeats: int = 10, tensors: int = 16) -> float:
    """Seconds per parameter of one mixed-precision AdamW step as the torch engine runs it
    (planner/build/parallelize.MasterWeightsOptimizer: bf16 gradients cast onto fp32 masters, fused
    AdamW on CUDA, masters rounded back into bf16 weights), over `numel` parameters in `tensors` equal
    tensors (a transformer block has 4-16). Median of `repeats` after one warm-up; memory-bound, so the
    rate holds for any model size, and it is an upper bound for FSDP2 and DeepSpeed (no bf16 casts).
    """
    from planner.build.parallelize import MasterWeightsOptimizer

    clock, per = Clock(device), max(1, numel // tensors)
    weights = [torch.zeros(per, dtype=torch.bfloat16, device=device) for _ in range(tensors)]
    pairs = [(w, w.float()) for w in weights]
    opt = MasterWeightsOptimizer(pairs, lr=1e-4)
    times = []
    for i in range(repeats + 1):
        for w in weights:
            w.grad = torch.full_like(w, 1e-3)
        clock.sync()
        t0 = clock.mark()
        opt.step()
        t1 = clock.mark()
        clock.sync()
        if i:
            times.append(clock.seconds(t0, t1))
    del opt, pairs, weights
    return sorted(times)[len(times) // 2] / (per * tensors)
