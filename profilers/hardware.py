"""`distplan profile --hardware`: measure this GPU's kernel database (planner/core/kerneldb.py reads it) in minutes.

Sections, in order, each within its share of one wall-time budget (time a section leaves over goes to the next):
1. facts and probes: names, versions, clocks, and an 8192^3 matmul and a 1 GiB copy, whose rates size the loops
   and the GEMM grid;
2. launch overhead: the host's seconds per eager op (what a layer of small kernels pays when the GPU outruns the
   host), a tiny kernel's GPU time inside a CUDA graph, and one op's round trip;
3. GEMMs (kernel_grid.measure_gemm): the finest grid of GEMM_GRIDS whose estimated time (kernel_grid.gemm_estimate_s
   at the probed rates) fits the section's share; m at octaves, n and k at half-octaves (2^j and 3 * 2^(j-1), the
   widths models use: 1536, 3072, 6144, 12288, 24576, 49152, 98304, 196608), every value a multiple of 64;
4. unaligned GEMMs: odd n (2^j + 1) on a coarser grid (kernel_grid.UNALIGNED_N);
5. attention, 6. memory-bound kernels (kernel_grid);
7. AdamW seconds per parameter (facts.optimizer_s_per_param: the torch engine's fused step);
8. the sustained clock: back-to-back 8192^3 matmuls for SUSTAIN_S with nvidia-smi sampling beside them
   (profilers/gpu_clocks), as the GEMM, attention and memory-bound sections were sampled too.
A section that fails is recorded as not measured with its error, and the others still run.

On a CPU the same code runs tiny grids in fp32 in a few seconds, one thread (timing.Clock): what CI tests.
The database (`database`) is the grids' medians; `raw` keeps every point (median, min, max, loop size, method).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from planner.core.errors import require
from planner.core.fields import is_number
from planner.core.kerneldb import ATTENTION_AXES, GEMM_AXES, GEMM_LAYOUTS, KIND, VERSION
from profilers import facts as device_facts_mod
from profilers.kernel_grid import (GIB, Settings, gemm_estimate_s, measure_attention, measure_gemm,
                                   measure_memory_bound, nest, plan_settings)
from profilers.kernel_timing import KernelTimer
from profilers.run import yaml_plain

BUDGET_S = {"cuda": 390.0, "cpu": 30.0}  # default budget: an H100 done in ~6.5 min plus start-up, inside a 10-min call
QUICK_BUDGET_S = {"cuda": 150.0, "cpu": 10.0}
SHARES = {"gemm": 0.50, "gemm_unaligned": 0.07, "attention": 0.28, "memory_bound": 0.15}  # of the budget left after probes, launch and the tail
TAIL_S = {"cuda": 30.0, "cpu": 3.0}  # kept for the optimizer step and the sustained clock, which run last
GEMM_FIT = 0.8  # a GEMM grid is chosen when its estimate takes at most this share of the section's time
HOST_POINT_S = 2e-3  # estimate: host time per GEMM point and layout (capture, instantiate, events, Python)
HOST_CALL_S = 15e-6  # estimate: host time per captured call (dispatcher and capture of one launch)
PROBE_FALLBACK = {"cuda": (5e14, 2e12), "cpu": (1e10, 1e10)}  # FLOP/s, bytes/s sizing the loops if a probe failed
PROGRESS_EVERY_S = 5.0  # progress lines inside a section at most this often (a log stays readable)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Budget:
    """Deadlines of the grid sections: each gets its SHARES part of what is left before the tail."""

    def __init__(self, total_s: float, tail_s: float, sections: tuple[str, ...] = tuple(SHARES)):
        self.t0, self.total_s, self.tail_s, self.sections = time.monotonic(), total_s, tail_s, sections

    def elapsed_s(self) -> float:
        return time.monotonic() - self.t0

    def deadline(self, section: str) -> float:
        later = [s for s in list(SHARES)[list(SHARES).index(section):] if s in self.sections]
        left = max(0.0, self.total_s - self.elapsed_s() - self.tail_s)
        return time.monotonic() + left * SHARES[section] / sum(SHARES[s] for s in later)


@dataclass(frozen=True)
class Measured:
    database: dict  # the file under configs/hardware/ (planner.core.kerneldb reads it)
    raw: dict  # every point, for benchmarks/results/


@contextmanager
def sampled(device: torch.device, into: dict, key: str):
    """nvidia-smi's SM clock and power while the block runs, median over busy samples, into `into[key]`."""
    if device.type != "cuda":
        yield
        return
    from profilers import gpu_clocks

    fd, name = tempfile.mkstemp(suffix=".csv", prefix="distplan-clocks.")
    os.close(fd)
    proc = gpu_clocks.start(Path(name))
    try:
        yield
    finally:
        gpu_clocks.stop(proc)
        try:
            summary = gpu_clocks.summarize(Path(name).read_text())
        except OSError:
            summary = {}
        Path(name).unlink(missing_ok=True)
        mine = summary.get(torch.cuda.current_device()) if len(summary) > 1 else next(iter(summary.values()), None)
        into[key] = mine if proc is not None else "nvidia-smi not found"


def _clock_limits() -> dict:
    text = device_facts_mod._run(["nvidia-smi", "--query-gpu=clocks.max.sm,clocks.max.mem,power.limit",
                                  "--format=csv,noheader,nounits"])
    if not text:
        return {}
    lines = text.splitlines()
    parts = [p.strip() for p in lines[min(torch.cuda.current_device(), len(lines) - 1)].split(",")]
    out = {}
    for key, value in zip(("max_sm_mhz", "max_mem_mhz", "power_limit_w"), parts):
        try:
            out[key] = float(value)
        except ValueError:
            pass
    return out


def _launch(device: torch.device, timer: KernelTimer) -> dict:
    cuda, x = device.type == "cuda", torch.zeros(1024, device=device)
    now = time.perf_counter if cuda else time.thread_time
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = 2000 if cuda else 200
    for _ in range(100):
        x + 1
    sync()
    t0 = now()
    for _ in range(n):
        x + 1
    out = {"eager_op_s": (now() - t0) / n}
    sync()
    trips = []
    for _ in range(50):
        sync()
        t0 = now()
        x + 1
        sync()
        trips.append(now() - t0)
    out["eager_roundtrip_s"] = statistics.median(trips)
    if cuda:
        out["graph_kernel_s"] = timer.measure(lambda: x.add(1), 2e-6, 200, kind="launch")["seconds"]
    return {k: float(f"{max(v, 1e-9):.4g}") for k, v in out.items()}


def _sustained(device: torch.device, dtype: torch.dtype, seconds: float, n: int, into: dict) -> dict:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    rates, end = [], time.monotonic() + seconds
    with sampled(device, into, "sustained"):
        while not rates or time.monotonic() < end:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(50):
                torch.mm(a, b, out=c)
            e1.record()
            torch.cuda.synchronize()
            rates.append(50 * 2 * n**3 / (e0.elapsed_time(e1) / 1e3) / 1e12)
    s = into.get("sustained")
    out = {"matmul_n": n, "seconds": seconds, "tflops_first": round(rates[0], 1), "tflops_last": round(rates[-1], 1),
           "tflops_median": round(statistics.median(rates), 1)}
    if isinstance(s, dict):
        out.update(sustained_sm_mhz=s["sm_mhz"], power_w=s["power_w"], samples=s["samples"])
    else:
        out["not_measured"] = s or "no busy nvidia-smi sample"
    return out


def _grid_section(sec, keys: dict, axes: dict, extra: dict) -> dict:
    """The database's form of one grid section, or its reason when a key has no measured point."""
    empty = [k for k in keys if not any(not isinstance(v, str) for v in sec.seconds.get(k, {}).values())]
    if empty:
        return {"not_measured": f"no point of {', '.join(empty)} measured ({_counts(sec.counts)})"}
    return {"axes": {a: list(v) for a, v in axes.items()}, **extra,
            "seconds": {k: nest(sec, k, tuple(axes.values())) for k in keys}}


def _counts(counts: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no points"


GRIDS = tuple(SHARES)  # the grid sections `only` may name


def measure_hardware(device: torch.device, dtype: torch.dtype, budget_s: float,
                     progress: Callable[[str, int, int], None] | None = None, quick: bool = False,
                     settings: Settings | None = None, only: tuple[str, ...] = GRIDS) -> Measured:
    """Measure the kernel database of `device` within about `budget_s` seconds (see the module doc); `only` the
    grid sections named (the others are recorded as not requested: `merge_databases` combines such files)."""
    threads = torch.get_num_threads()
    if device.type != "cuda":
        torch.set_num_threads(1)  # a CPU 'device' is one core (timing.Clock)
    try:
        return _measure(device, dtype, budget_s, progress, quick, settings, only)
    finally:
        torch.set_num_threads(threads)


def _measure(device: torch.device, dtype: torch.dtype, budget_s: float, progress, quick: bool,
             settings: Settings | None, only: tuple[str, ...] = GRIDS) -> Measured:
    cuda, started = device.type == "cuda", time.monotonic()
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    info = {k: v for k, v in device_facts_mod.device_facts(device).items() if k not in ("topology", "nvls_enabled_env")}
    memory = torch.cuda.get_device_properties(device).total_memory if cuda else int(info["host_memory_gib"] * GIB)
    settings = settings or plan_settings(cuda, quick, memory)
    budget = Budget(budget_s, TAIL_S["cuda" if cuda else "cpu"], only)
    timer = KernelTimer(device, settings.loop_s, settings.repeats)
    sections, raw, db, clocks = {}, {}, {}, {}
    steps, state = 8, {"done": 0, "last": 0.0}

    def tick(label: str, final: bool = False) -> None:
        if progress and (final or time.monotonic() - state["last"] >= PROGRESS_EVERY_S):
            state["last"] = time.monotonic()
            progress(label, state["done"], steps)

    def section(name: str, run: Callable[[], dict | None], **notes) -> None:
        if name in GRIDS and name not in only:
            db[name] = {"not_measured": "not requested (--only)"}
            state["done"] += 1
            return
        t0 = time.monotonic()
        tick(f"{name}: starting", final=True)
        try:
            got = run()
        except Exception as exc:  # noqa: BLE001 - a section's failure is recorded; the others still run
            got = {"not_measured": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}
            if cuda:
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001 - a sticky CUDA error: the next sections record theirs
                    pass
        sections[name] = {"wall_s": round(time.monotonic() - t0, 2), **notes, **sections.get(name, {})}
        if got is not None:
            db[name] = got
        state["done"] += 1
        tick(f"{name}: done", final=True)

    probe = {"matmul_n": settings.probe_n}

    def probes() -> None:
        probe["matmul_tflops"] = round(device_facts_mod.matmul_tflops(settings.probe_n, device, dtype, repeats=5,
                                                                      warmup=2), 3)
        probe["copy_gb_s"] = round(device_facts_mod.copy_bandwidth_gb_s(settings.probe_copy_bytes, device, repeats=5), 2)
        if cuda:
            probe.update(_clock_limits())

    section("probes", probes)
    fallback = PROBE_FALLBACK["cuda" if cuda else "cpu"]
    flops = probe.get("matmul_tflops", fallback[0] / 1e12) * 1e12
    bw = probe.get("copy_gb_s", fallback[1] / 1e9) * 1e9
    section("launch", lambda: _launch(device, timer))

    def gemm() -> dict:
        deadline, elem = budget.deadline("gemm"), dtype.itemsize
        available_s = deadline - time.monotonic()
        host = (HOST_POINT_S, HOST_CALL_S) if cuda else (0.0, 0.0)
        estimates = [gemm_estimate_s(g, elem, flops, bw, settings.loop_s, settings.repeats, settings.max_inner["gemm"],
                                     *host) for g in settings.gemm]
        pick = next((i for i, e in enumerate(estimates) if e <= GEMM_FIT * available_s),
                    len(estimates) - 1)
        grid = settings.gemm[pick]
        with sampled(device, clocks, "gemm"):
            sec = measure_gemm(grid, device, dtype, timer, flops, bw, settings.max_inner["gemm"], deadline, tick)
        sections["gemm"] = {"section_budget_s": round(available_s, 1),
                            "estimates_s": [round(e, 1) for e in estimates], "grid_chosen": pick,
                            "counts": sec.counts, "errors": sec.errors}
        raw["gemm"] = {"points": sec.points, "counts": sec.counts, "errors": sec.errors}
        return _grid_section(sec, GEMM_LAYOUTS, dict(zip(GEMM_AXES, (grid.m, grid.n, grid.k))), {
            "layouts": {"fwd": "x @ W.T", "dgrad": "dy @ W", "wgrad": "dy.T @ x"}, "flop_cap": grid.flop_cap,
            "operand_cap_bytes": grid.operand_cap_bytes})

    section("gemm", gemm)

    def gemm_unaligned() -> dict:
        grid, deadline = settings.gemm_unaligned, budget.deadline("gemm_unaligned")
        with sampled(device, clocks, "gemm_unaligned"):
            sec = measure_gemm(grid, device, dtype, timer, flops, bw, settings.max_inner["gemm"], deadline, tick)
        sections["gemm_unaligned"] = {"counts": sec.counts, "errors": sec.errors}
        raw["gemm_unaligned"] = {"points": sec.points, "counts": sec.counts, "errors": sec.errors}
        return _grid_section(sec, GEMM_LAYOUTS, dict(zip(GEMM_AXES, (grid.m, grid.n, grid.k))), {
            "n_is": "odd: rows of the output and of dy not 16-byte aligned", "flop_cap": grid.flop_cap,
            "operand_cap_bytes": grid.operand_cap_bytes})

    section("gemm_unaligned", gemm_unaligned)

    def attention() -> dict:
        grid, deadline = settings.attention, budget.deadline("attention")
        with sampled(device, clocks, "attention"):
            sec, mode = measure_attention(grid, device, dtype, timer, flops, settings.max_inner["attention"], deadline,
                                          tick)
        backends = {}
        for p in sec.points:
            backends[p["backend"]] = backends.get(p["backend"], 0) + 1
        sections["attention"] = {"counts": sec.counts, "errors": sec.errors}
        raw["attention"] = {"points": sec.points, "counts": sec.counts, "errors": sec.errors}
        axes = dict(zip(ATTENTION_AXES, (grid.seq, grid.heads, grid.head_dim, grid.gqa)))
        return _grid_section(sec, ("fwd", "bwd"), axes, {
            "causal": True, "gqa_mode": mode, "backends": backends, "flop_cap": grid.flop_cap,
            "heads_are": "batch x query heads per GPU (SDPA runs them as one grid)"})

    section("attention", attention)

    def memory_bound() -> dict:
        grid, deadline = settings.memory, budget.deadline("memory_bound")
        with sampled(device, clocks, "memory_bound"):
            sec = measure_memory_bound(grid, device, dtype, timer, bw, settings.max_inner["memory_bound"], deadline,
                                       tick)
        sections["memory_bound"] = {"counts": sec.counts, "errors": sec.errors}
        raw["memory_bound"] = {"points": sec.points, "counts": sec.counts, "errors": sec.errors}
        kernels = {}
        for key in sorted(sec.seconds):
            op = key.split(".")[0]
            got = _grid_section(sec, (key,), {"width": grid.widths[op], "rows": grid.rows}, {})
            if "not_measured" not in got:
                kernels[key] = {"axes": got["axes"], "fixed": dict(grid.fixed.get(op, {})), "seconds": got["seconds"][key]}
        return {"kernels": kernels} if kernels else {"not_measured": f"no kernel measured ({_counts(sec.counts)})"}

    section("memory_bound", memory_bound)

    def optimizer() -> dict:
        rate = device_facts_mod.optimizer_s_per_param(settings.adamw_params, device, repeats=10 if cuda else 3)
        return {"adamw_s_per_param": float(f"{rate:.4g}"), "params": settings.adamw_params,
                "implementation": "planner/build/parallelize.MasterWeightsOptimizer (fused AdamW on fp32 masters)"}

    section("optimizer", optimizer)
    if cuda:
        section("clock", lambda: {**{k: probe[k] for k in ("max_sm_mhz",) if k in probe},
                                  **_sustained(device, dtype, settings.sustain_s, settings.probe_n, clocks)})
    else:
        section("clock", lambda: {"not_measured": "no GPU: the CPU's clock is not sampled"})
    if timer.graph_errors:
        info["graph_capture_errors"] = timer.graph_errors
    info.update(budget_s=budget_s, quick=quick, wall_time_s=round(time.monotonic() - started, 1), probe=probe,
                sections=sections, clocks_while_measuring=clocks,
                timer="cuda graph replays (kernel_timing), median of repeats" if cuda
                else "time.thread_time, one thread")
    gpu_name = info.get("gpu_name") or f"cpu {info.get('cpu', '')}".strip()
    database = {"version": VERSION, "kind": KIND, "gpu_name": gpu_name.replace("[", "(").replace("]", ")")[:200],
                "device": device.type, "dtype": dtype_name, "facts": info, **db}
    return Measured(database=yaml_plain(database), raw=yaml_plain({"version": VERSION, "kind": f"{KIND} raw points",
                                                           "gpu_name": gpu_name, "facts": info, **raw}))


def resolve(device: str, dtype: str, budget_s: float | None, quick: bool) -> tuple[torch.device, torch.dtype, float]:
    """The CLI's --device, --dtype and --budget-s, checked; auto picks the GPU if there is one, bf16 there, fp32 on
    a CPU, and the default budget of the device (--quick: the shorter one)."""
    require(device in ("auto", "cuda", "cpu"), f"--device '{device}' is unknown; valid: auto, cuda, cpu")
    require(dtype == "auto" or dtype in DTYPES, f"--dtype '{dtype}' is unknown; valid: auto, {', '.join(DTYPES)}")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    require(not cuda or torch.cuda.is_available(), "--device cuda: no CUDA device is visible to torch")
    kind = "cuda" if cuda else "cpu"
    if budget_s is None:
        budget_s = (QUICK_BUDGET_S if quick else BUDGET_S)[kind]
    require(is_number(budget_s) and 0 < budget_s <= 3600,
            f"--budget-s must be seconds above 0 and at most 3600, got {budget_s}")
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dev, DTYPES[dtype if dtype != "auto" else "bf16" if cuda else "fp32"], float(budget_s)


def points_path(output: Path) -> Path:
    """Where the raw points go beside the database: h100.yaml -> h100.points.json."""
    return output.with_name(f"{output.stem}.points.json")


def save_hardware(measured: Measured, output: Path, command: str = "") -> list[Path]:
    """Write the database (YAML) and its raw points (JSON) together, or neither."""
    import json

    from planner.core.fileio import atomic_write_files, dump_yaml

    db = measured.database
    header = (f"# distplan kernel database: {db['gpu_name']}, {db['dtype']}, measured {db['facts'].get('date_utc')}"
              f"{f' by `{command}`' if command else ''}.\n# Read by planner/core/kerneldb.py; made by profilers/hardware.py; "
              f"raw points in {points_path(output).name}.\n")
    text = header + dump_yaml(db, sort_keys=False, width=120, default_flow_style=None)
    raw = json.dumps(measured.raw, separators=(",", ":"), allow_nan=False)
    atomic_write_files({output: text, points_path(output): raw + "\n"})
    return [output, points_path(output)]


def merge_databases(base: dict, newer: dict) -> dict:
    """`base` with every section `newer` measured (a grid, or the launch, optimizer and clock figures) taken from
    `newer`; both must be of the same GPU and dtype. `facts.merged` says which sections came from which date."""
    for key in ("gpu_name", "dtype", "device"):
        require(base.get(key) == newer.get(key), f"cannot merge kernel databases of different {key}: "
                                                 f"{base.get(key)!r} and {newer.get(key)!r}")
    out = {**base, "facts": dict(base.get("facts", {}))}
    taken = []
    for name in (*GRIDS, "launch", "optimizer", "clock"):
        sec = newer.get(name)
        if isinstance(sec, dict) and "not_measured" not in sec:
            out[name] = sec
            taken.append(name)
    out["facts"]["merged"] = {"base_date_utc": base.get("facts", {}).get("date_utc"),
                              "newer_date_utc": newer.get("facts", {}).get("date_utc"), "from_newer": taken,
                              "newer_facts": newer.get("facts", {})}
    return out
