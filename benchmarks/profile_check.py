"""Independent checks of a `distplan profile` on GPUs: a plain torch matmul loop and an nccl-tests-style
collective loop, each compared with what the profile fitted (benchmarks/results/profile_*.md).

Matmul, three ways: the plain loop below, (matmul_queued) the same eager loop queued behind a sleep
kernel and timed with CUDA events between its first and last call, so that where one matmul takes about
as long as its launch (n = 1024) the GPU's rate is measured rather than the host's, and (matmul_kernels)
the kernels' own device time from the CUDA profiler (CUPTI) over a plain loop, without the gaps between
kernels that a queued eager loop still has; the profiler replays a CUDA graph instead.

The methods differ from the profiler's on purpose: host wall clock around one synchronised loop
of back-to-back calls (not CUDA events), averaged, no median of trials (nccl-tests' way: -w 5 warm-up
calls, then -n calls; -n is at least 20 and large enough for the loop to last 20 ms, so that launch
and synchronisation overhead stay out of small messages), fresh processes and buffers.

Use (on a GPU node): python3 benchmarks/profile_check.py PROFILE.yaml [-o check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from planner.core.profile import bus_factor  # noqa: E402
from planner.cost.profiled import load_profile  # noqa: E402
from profilers.fit import collective_time_s  # noqa: E402

WARMUP, ITERS = 5, 20  # nccl-tests defaults: -w 5 -n 20
LOOP_S = 0.02  # more iterations where 20 would take less than this
MIB = 2**20  # bytes per MiB
COLL_SIZES = (16 * MIB, 256 * MIB, 1024 * MIB)  # sizes the profile's x4 sweep from 64 KiB also measured


def _iters(op) -> int:
    """nccl-tests' -n: 20, or more so that the timed loop lasts LOOP_S."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    op()
    torch.cuda.synchronize()
    return max(ITERS, round(LOOP_S / max(time.perf_counter() - t0, 1e-7)))


def matmul_loop(n: int) -> float:
    """Plain eager `a @ b` loop, host clock around it (nccl-tests' way), for sizes whose matmul outlasts its
    launch. Where it does not (n = 1024 on H200: the loop then times the host's launch rate), see
    matmul_queued."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(WARMUP):
        a @ b
    iters = _iters(lambda: a @ b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


QUEUED = (250, 500)  # matmuls queued behind the sleep: both counts must agree (a drained queue would not)
SLEEP_S = 0.2  # GPU busy while the host queues them (a few us per launch: 500 launches take ~5 ms)


def matmul_queued(n: int) -> dict:
    """GPU rate of an eager matmul loop without the host's launch gaps, and without CUDA graphs (the
    profiler's way): a sleep kernel keeps the GPU busy while the host queues `k` plain `a @ b` calls;
    CUDA events recorded after the sleep and after the last call time them back to back. Returns
    TFLOP/s for each k in QUEUED (they agree when the queue did not drain) and the host's launch time."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(WARMUP):
        a @ b
    # cycles per second of the sleep kernel, measured
    s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s0.record()
    torch.cuda._sleep(10**7)
    s1.record()
    torch.cuda.synchronize()
    cycles = int(SLEEP_S / (s0.elapsed_time(s1) / 1e3) * 10**7)
    out = {"n": n}
    for k in QUEUED:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)
        h0 = time.perf_counter()
        e0.record()
        for _ in range(k):
            a @ b
        e1.record()
        out[f"host_queue_s_{k}"] = time.perf_counter() - h0  # must stay below SLEEP_S
        torch.cuda.synchronize()
        out[f"tflops_{k}"] = 2 * n**3 * k / (e0.elapsed_time(e1) / 1e3) / 1e12
    return out


KERNEL_LOOP_S, KERNEL_CALLS_MAX = LOOP_S, 2000  # matmuls under the CUDA profiler: a loop as long as the others'


def matmul_kernels(n: int) -> dict:
    """GPU kernel time of a plain eager `a @ b` loop, from the CUDA profiler (CUPTI, torch.profiler): the
    device time of each kernel the loop ran, summed and divided by the calls. It times what the profiler's
    CUDA graph times (the matmul kernel, not the launch gaps between kernels or the host), by a third
    method sharing neither graphs nor CUDA events with it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(WARMUP):
        a @ b
    # as long a loop as the host-clock one (n = 8192 x 200 calls ran 340 ms: the clocks drop under such a load)
    calls = min(_iters(lambda: a @ b), KERNEL_CALLS_MAX)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            a @ b
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.count > 0]
    device_us = sum(e.self_device_time_total for e in kernels)  # microseconds
    return {"n": n, "kernels": {e.key: e.count for e in kernels}, "matmuls": calls,
            "kernel_us_per_matmul": device_us / calls, "tflops": 2 * n**3 * calls / (device_us / 1e6) / 1e12}


def _worker(rank: int, world: int, init: str, q) -> None:
    os.environ.setdefault("TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING", "false")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    out = {}
    for size in COLL_SIZES:
        n = size // 2  # bf16 elements
        buf, full, part = (torch.ones(n, dtype=torch.bfloat16, device="cuda"),
                           torch.ones(n, dtype=torch.bfloat16, device="cuda"),
                           torch.ones(n // world, dtype=torch.bfloat16, device="cuda"))
        ops = {
            "all_reduce": lambda: dist.all_reduce(buf),
            "all_gather": lambda: dist.all_gather_into_tensor(full, part),
            "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full),
            "all_to_all": lambda: dist.all_to_all_single(full, buf),
            "p2p": (lambda: dist.send(buf, 1)) if rank == 0 else (lambda: dist.recv(buf, 0)),  # one way, as the profile
        }
        for name, op in ops.items():
            for _ in range(WARMUP):
                op()
            n_iters = torch.tensor([_iters(op)], device="cuda")
            dist.all_reduce(n_iters, op=dist.ReduceOp.MAX)  # every rank runs the same count
            iters = int(n_iters.item())
            torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                op()
            torch.cuda.synchronize()
            t = torch.tensor([(time.perf_counter() - t0) / iters], device="cuda")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            out[f"{name}@{size}"] = float(t.item())
    if rank == 0:
        q.put(out)
    dist.destroy_process_group()


def collective_loop(world: int) -> dict:
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, world, os.path.join(tmp, "rdv"), q)) for r in range(world)]
        for p in procs:
            p.start()
        out = q.get(timeout=600)
        for p in procs:
            p.join()
    return out


def pct(measured: float, reference: float) -> float:
    return 100.0 * (measured - reference) / reference


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("-o", "--output")
    args = ap.parse_args()
    prof = load_profile(args.profile)
    rows = {"gpu": torch.cuda.get_device_name(0), "profile": args.profile, "matmul": [], "collectives": []}
    for entry in prof.raw["ceilings"]["matmul"]:
        indep = matmul_loop(entry["n"])
        queued = matmul_queued(entry["n"])
        q = queued[f"tflops_{QUEUED[-1]}"]
        kern = matmul_kernels(entry["n"])
        rows["matmul"].append({"n": entry["n"], "profile_tflops": entry["tflops"], "loop_tflops": indep,
                               "diff_pct": pct(entry["tflops"], indep), "queued": queued, "queued_tflops": q,
                               "diff_queued_pct": pct(entry["tflops"], q), "kernels": kern,
                               "kernel_tflops": kern["tflops"], "diff_kernel_pct": pct(entry["tflops"], kern["tflops"])})
    world = min(torch.cuda.device_count(), 2)
    if world >= 2:
        times = collective_loop(world)
        for key, t in times.items():
            op, size = key.split("@")
            size = int(size)
            fit = prof.collective_fit(op, world)
            if fit is None:
                continue
            loop_busbw = size * bus_factor(op, world) / t / 1e9
            fit_busbw = size * bus_factor(op, world) / collective_time_s(fit, size) / 1e9
            raw = [p["time_s"] for p in prof.raw["communication"]["points"]
                   if p["op"] == op and p["group_size"] == world and p["bytes"] == size]
            rows["collectives"].append({
                "op": op, "group_size": world, "bytes": size, "loop_busbw_gb_s": loop_busbw,
                "fit_busbw_gb_s": fit_busbw, "diff_pct": pct(fit_busbw, loop_busbw),
                "raw_busbw_gb_s": size * bus_factor(op, world) / raw[0] / 1e9 if raw else None})
    for r in rows["matmul"]:
        print(f"matmul n={r['n']}: profile {r['profile_tflops']:.0f} vs loop {r['loop_tflops']:.0f} TFLOP/s "
              f"({r['diff_pct']:+.1f}%), vs queued loop {r['queued_tflops']:.0f} ({r['diff_queued_pct']:+.1f}%; "
              + ", ".join(f"{k}: {r['queued'][f'tflops_{k}']:.0f} TFLOP/s, queued in "
                          f"{1e3 * r['queued'][f'host_queue_s_{k}']:.1f} ms" for k in QUEUED) + ")"
              f", vs CUDA-profiler kernel time {r['kernel_tflops']:.0f} ({r['diff_kernel_pct']:+.1f}%, "
              f"{r['kernels']['kernel_us_per_matmul']:.2f} us per matmul)")
    for r in rows["collectives"]:
        print(f"{r['op']} n={r['group_size']} {r['bytes'] // MIB} MiB: fit {r['fit_busbw_gb_s']:.0f} vs loop "
              f"{r['loop_busbw_gb_s']:.0f} GB/s busbw ({r['diff_pct']:+.1f}%)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
