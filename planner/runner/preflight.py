"""What `distplan run` refuses before it starts a worker, each as one line (DistplanError, exit 2).

Option values (ranges below), the engine, the data, the plan against this node (its world size against --gpus,
the GPUs visible, or on a CPU host the ranks it can run), and every file the run writes at its end: a run must not
spend its measurement and then fail, or start more processes than the host can hold.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from planner.core.errors import DistplanError, require
from planner.core.plan import Plan
from planner.runner.engine_api import RunOptions

DTYPES = ("auto", "bf16", "fp32")  # --dtype values a run accepts (auto: bf16 on CUDA, fp32 on CPU)
# --steps and --warmup at most: every step's time and loss per rank goes into the report (a million is tens of MB of
# YAML per rank); a longer run is training, for the launch line of `distplan emit`
MAX_STEPS = 1_000_000
# --timeout at most, a week: longer than any measurement, and far inside the timedelta each rank hands c10d (it overflows
# near 1e14 s; inf and nan fail there too)
MAX_TIMEOUT_S = 7 * 24 * 3600.0
# --seed below this: weights are drawn from generators seeded with seed * 2_147_483_629 + crc32(name) (parallelize.draw),
# which stays inside torch's manual_seed range (< 2**63) for seeds < 2**32; numpy's seeds stop there as well
SEED_LIMIT = 2**32
# CPU ranks per core `distplan run` starts unasked: each still gets a quarter of a core (the tests run 4 ranks on 2 cores);
# beyond it the step times measure the scheduler's time-slicing, and each rank's start alone costs ~3 CPU-seconds (import torch)
RANKS_PER_CORE = 4
# host memory of one CPU rank before the model's own: 317 MiB peak RSS measured for a rank of the 4-layer test GPT
# (torch, gloo, the engine), as 64 ranks that held 19 GB did; the plan's predicted per-rank peak comes on top
RANK_BASE_GIB = 0.31


def check_request(plan: Plan, opts: RunOptions, nproc: int | None, device_type: str, cuda_count: int = 0) -> int:
    """Validate everything that can be checked before spawning; returns the number of processes. `nproc` None: the
    plan's world size, refused on a CPU host that cannot run that many ranks; given, the user asked for them."""
    from planner.runner.data import DATA_DTYPES, DataSource
    from planner.runner.engines import ENGINES

    require(opts.engine in ENGINES, f"--engine '{opts.engine}' is unknown; valid: {', '.join(ENGINES)}")
    require(1 <= opts.steps <= MAX_STEPS, f"--steps {opts.steps} is out of range; valid: 1 to {MAX_STEPS:,}")
    require(0 <= opts.warmup <= MAX_STEPS, f"--warmup {opts.warmup} is out of range; valid: 0 to {MAX_STEPS:,}")
    require(math.isfinite(opts.timeout_s) and 0 < opts.timeout_s <= MAX_TIMEOUT_S,
            f"--timeout {opts.timeout_s:g} is out of range; valid: seconds above 0, at most {MAX_TIMEOUT_S:g} (a week)")
    require(math.isfinite(opts.lr) and opts.lr > 0, f"--lr {opts.lr:g} is not a learning rate; valid: a finite number > 0, e.g. 1e-4")
    require(0 <= opts.seed < SEED_LIMIT, f"--seed {opts.seed} is out of range; valid: 0 to {SEED_LIMIT - 1}")
    require(opts.dtype in DTYPES, f"--dtype '{opts.dtype}' is unknown; valid: {', '.join(DTYPES)}")
    require(opts.data_dtype in DATA_DTYPES, f"--data-dtype '{opts.data_dtype}' is unknown; valid: {', '.join(DATA_DTYPES)}")
    world = plan.parallel.gpus
    if device_type == "cpu" and nproc is None:
        _check_cpu_capacity(plan, world)
    nproc = world if nproc is None else nproc
    where = "on CPU each rank is one process and " if device_type == "cpu" else ""
    require(nproc == world,
            f"--gpus {nproc} does not match the plan's world size dp*tp*pp*cp = {plan.parallel.dp}*{plan.parallel.tp}*"
            f"{plan.parallel.pp}*{plan.parallel.cp} = {world}: {where}`distplan run` launches one node, so it needs "
            f"--gpus {world} (for several nodes use the torchrun line of `distplan emit`)")
    if device_type == "cuda":
        require(nproc <= cuda_count, f"the plan needs {nproc} GPUs on this node, but {cuda_count} are visible")
    engine = _engine_module(opts.engine)
    if hasattr(engine, "check_supported"):
        engine.check_supported(plan, device_type)
    DataSource(plan.model, plan.parallel.seq_len, plan.parallel.global_batch_size, seed=opts.seed,
               path=opts.data_path, dtype=opts.data_dtype)  # validates --data / --data-dtype
    return nproc


def host_memory_available_gib(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> float | None:
    """Memory this host can still give (MemAvailable), within this cgroup's limit where there is one; None: unknown."""
    found = []
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path(cgroup, "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path(cgroup, "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) / 1024**3 if found else None


def host_cores() -> int:
    """Cores this process may run on (its affinity: a container's or taskset's share, not the whole machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_ranks_possible(per_rank_gib: float) -> tuple[int, str]:
    """How many CPU ranks this host can run, and why: RANKS_PER_CORE per core, and the available memory over
    `per_rank_gib` each."""
    cores, avail = host_cores(), host_memory_available_gib()
    ranks = cores * RANKS_PER_CORE
    why = [f"{cores} cores x {RANKS_PER_CORE} ranks per core = {ranks}"]
    if avail is not None:
        by_memory = int(avail // per_rank_gib)
        ranks = min(ranks, by_memory)
        why.append(f"{avail:.1f} GiB of memory available / {per_rank_gib:.2f} GiB per rank = {by_memory}")
    return max(ranks, 0), "; ".join(why)


def _check_cpu_capacity(plan: Plan, world: int) -> None:
    """A CPU rank needs RANK_BASE_GIB plus the plan's predicted peak per rank (device and offloaded host memory: on a
    CPU both are this host's)."""
    pred = plan.prediction or {}
    per_rank = RANK_BASE_GIB + float(pred.get("peak_memory_gib") or 0.0) + float(pred.get("host_memory_gib") or 0.0)
    possible, why = cpu_ranks_possible(per_rank)
    require(world <= possible,
            f"the plan needs {world} ranks, but this host can run {possible} CPU ranks ({why}); `--gpus {world}` "
            f"starts them anyway")


def _engine_module(name: str):
    import importlib

    from planner.runner.engines import ENGINES

    try:
        return importlib.import_module(ENGINES[name][0])
    except ImportError as exc:
        raise DistplanError(f"engine '{name}' cannot be loaded ({exc}); install its framework or use --engine torch") from None
