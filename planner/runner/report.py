"""The run report: predicted vs measured step time and per-stage memory, numerics, failures.

`build_report` is pure (results in, Report out); `save_report` writes it atomically (house rule 1:
frozen dataclasses, plain-dict files with a version). Measured step time of step k is the slowest
rank's time for k (the step ends when the last rank's optimizer step does); the report gives the
median over the measured steps with the 10th and 90th percentiles as spread. Errors are relative:
(measured - predicted) / predicted. Memory is compared where it is measured (CUDA's caching
allocator: peak allocated, with peak reserved alongside); on CPU it is not measured and says so.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from planner.core.errors import DistplanError, require
from planner.core.fileio import atomic_write_text
from planner.core.plan import Plan
from planner.runner.engine_api import RankResult

RANK_EXTRAS = ("dp_rank", "tp_rank", "chunks", "optimizer_s", "microbatch_s", "alloc_retries", "chunk_compute_s",
               "chunk_host_s", "trace", "memory_peak")  # engine extras per rank
REPORT_VERSION = 1  # the run report's format version (its `version` key)
GIB = 1024**3  # bytes per GiB


@dataclass(frozen=True)
class Failure:
    rank: int
    step: int  # the step the rank was in (-1: before the first step: start-up, model build)
    kind: str  # error | oom | killed | timeout | missing | terminated
    reason: str
    exit_code: int | None = None
    primary: bool = True  # False: stopped because another rank failed first
    log_tail: str = ""


@dataclass(frozen=True)
class NumericsResult:
    checked: bool
    dtype: str
    rtol: float
    atol: float
    reference_losses: tuple[float, ...] = ()
    parallel_losses: tuple[float, ...] = ()
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    passed: bool | None = None  # None: not checked (see note)
    note: str = ""


@dataclass(frozen=True)
class StageResult:
    stage: int
    ranks: tuple[int, ...]
    predicted_memory_gib: float
    peak_allocated_gib: float | None  # None: not measured (CPU)
    peak_reserved_gib: float | None
    memory_error: float | None
    median_step_time_s: float | None


@dataclass(frozen=True)
class Report:
    plan: str
    plan_digest: str
    config: str  # one-line summary of the parallel configuration
    engine: str
    device: str
    dtype: str
    world_size: int
    steps: int
    warmup: int
    data: str
    tolerance: float
    predicted_step_time_s: float
    measured_step_time_s: float | None  # median over measured steps of the slowest rank
    step_time_p10_s: float | None
    step_time_p90_s: float | None
    step_time_error: float | None
    stages: tuple[StageResult, ...]
    losses: tuple[float, ...]  # global-batch loss per step (warm-up included), from the last pipeline stage
    numerics: NumericsResult | None
    failures: tuple[Failure, ...]
    passed: bool
    verdict: tuple[str, ...]  # why it passed or failed, one line each
    notes: tuple[str, ...] = ()
    ranks: tuple[dict, ...] = ()
    calibration: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    # --checkpoint-dir: dir, every, saved_steps (optimizer steps done at each save, warm-up included),
    # resumed_from_step (None: from step 0), save_s (seconds saving, outside the measured step times); {}: none
    checkpoint: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"version": REPORT_VERSION, **asdict(self)}
        return _plain(d)


def _plain(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) else float(f"{obj:.6g}")
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def save_report(report: Report, path: str | Path) -> None:
    """Atomic: the file is complete or absent, never half-written (also when a rank was killed)."""
    header = "# distplan run report (version 1): predicted vs measured. Units are in key names.\n"
    atomic_write_text(Path(path), header + yaml.safe_dump(report.to_dict(), sort_keys=False, width=110))


def load_report_dict(path: str | Path) -> dict:
    path = Path(path)
    require(path.exists(), f"report '{path}' does not exist")
    d = yaml.safe_load(path.read_text())
    require(isinstance(d, dict) and d.get("version") == REPORT_VERSION, f"report '{path}': expected version {REPORT_VERSION}")
    return d


# ---- rank results as files (the worker writes them, the launcher reads them) --------------------------

def rank_result_to_dict(r: RankResult) -> dict:
    return {"rank": r.rank, "pp_rank": r.pp_rank, "step_times_s": list(r.step_times_s),
            "losses": [None if math.isnan(x) else x for x in r.losses], "peak_allocated_bytes": r.peak_allocated_bytes,
            "peak_reserved_bytes": r.peak_reserved_bytes, "device": r.device, "dtype": r.dtype, "notes": list(r.notes),
            "extra": r.extra}


def rank_result_from_dict(d: dict) -> RankResult:
    try:
        return RankResult(rank=int(d["rank"]), pp_rank=int(d["pp_rank"]), step_times_s=tuple(float(x) for x in d["step_times_s"]),
                          losses=tuple(math.nan if x is None else float(x) for x in d["losses"]),
                          peak_allocated_bytes=int(d["peak_allocated_bytes"]), peak_reserved_bytes=int(d["peak_reserved_bytes"]),
                          device=str(d["device"]), dtype=str(d["dtype"]), notes=tuple(d.get("notes") or ()),
                          extra=dict(d.get("extra") or {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise DistplanError(f"malformed rank result ({type(exc).__name__}: {exc})") from None


# ---- building the report ---------------------------------------------------------------------------

def _percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def global_losses(results: list[RankResult]) -> tuple[float, ...]:
    """Loss per step from the ranks that hold the loss (the last pipeline stage); they agree after the dp mean."""
    holders = [r for r in results if r.losses and not all(math.isnan(x) for x in r.losses)]
    return holders[0].losses if holders else ()


def config_summary(plan: Plan) -> str:
    c = plan.parallel
    return (f"dp={c.dp} tp={c.tp} pp={c.pp} cp={c.cp} ep={c.ep} vpp={c.vpp} mb={c.micro_batch_size}x{c.num_microbatches} "
            f"{c.schedule} zero={c.zero_stage} recompute={c.recompute}{' sp' if c.sequence_parallel else ''}")


def _where_the_step_went(rank_rows) -> list[str]:
    """One note per pipeline stage (its first rank) that timed its chunks: compute, optimizer, and the rest of the
    step (the schedule: waiting for other stages, transfers, bubbles)."""
    out, seen = [], set()
    for r in rank_rows:
        chunks, step, opt = r.get("chunk_compute_s"), r.get("median_step_time_s"), r.get("optimizer_s") or 0.0
        if not chunks or not step or r["pp_rank"] in seen:
            continue
        seen.add(r["pp_rank"])
        compute = chunks["fwd"] + chunks["bwd"]
        rest = step - compute - opt
        out.append(f"pipeline stage {r['pp_rank']} (rank {r['rank']}): chunk compute {compute:.4g} s (forward "
                   f"{chunks['fwd']:.4g}, backward {chunks['bwd']:.4g}), optimizer {opt:.4g} s, the rest of the step "
                   f"{rest:.4g} s ({100 * rest / step:.0f}%: waiting for other stages, transfers, the bubble)")
    return out


def build_report(plan: Plan, plan_path: str, engine: str, device: str, dtype: str, steps: int, warmup: int,
                 data: str, tolerance: float, prediction: dict, results: list[RankResult], failures: list[Failure],
                 numerics: NumericsResult | None, notes: tuple[str, ...] = (), wall_time_s: float = 0.0,
                 calibration: dict | None = None, checkpoint: dict | None = None) -> Report:
    results = sorted(results, key=lambda r: r.rank)
    predicted = float(prediction["step_time_s"])
    measured = p10 = p90 = err = None
    complete = [r for r in results if len(r.step_times_s) == steps and steps > 0]
    if complete and not failures:
        per_step = [max(r.step_times_s[k] for r in complete) for k in range(steps)]
        measured, p10, p90 = statistics.median(per_step), _percentile(per_step, 10), _percentile(per_step, 90)
        err = (measured - predicted) / predicted if predicted > 0 else None

    per_stage = plan.parallel.dp * plan.parallel.cp * plan.parallel.tp
    pred_mem = {s["rank"]: float(s["memory_gib"]) for s in prediction.get("stages", [])}
    stages = []
    for stage in range(plan.parallel.pp):
        ranks = tuple(range(stage * per_stage, (stage + 1) * per_stage))
        mine = [r for r in results if r.rank in ranks]
        measured_mem = [r for r in mine if r.peak_allocated_bytes > 0]
        alloc = max(r.peak_allocated_bytes for r in measured_mem) / GIB if measured_mem else None
        res = max(r.peak_reserved_bytes for r in measured_mem) / GIB if measured_mem else None
        pm = pred_mem.get(stage, math.nan)
        mem_err = (alloc - pm) / pm if alloc is not None and pm > 0 else None
        med = statistics.median(t for r in mine for t in r.step_times_s) if any(r.step_times_s for r in mine) else None
        stages.append(StageResult(stage, ranks, pm, alloc, res, mem_err, med))

    verdict = []
    if failures:
        first = [f for f in failures if f.primary] or list(failures)
        for f in first:
            verdict.append(f"rank {f.rank} failed at step {f.step} ({f.kind}): {f.reason}")
    if err is not None:
        ok = abs(err) <= tolerance
        verdict.append(f"step time {measured:.4g} s vs predicted {predicted:.4g} s: {100 * err:+.1f}% "
                       f"({'within' if ok else 'exceeds'} the {100 * tolerance:.0f}% tolerance)")
    for s in stages:
        if s.memory_error is not None:
            ok = abs(s.memory_error) <= tolerance
            verdict.append(f"stage {s.stage} peak memory {s.peak_allocated_gib:.2f} GiB vs predicted {s.predicted_memory_gib:.2f} GiB: "
                           f"{100 * s.memory_error:+.1f}% ({'within' if ok else 'exceeds'} tolerance)")
    if numerics is not None:
        if numerics.passed is None:
            verdict.append(f"numerics not checked: {numerics.note}")
        else:
            verdict.append(f"numerics {'match' if numerics.passed else 'DIVERGE'}: max relative loss error "
                           f"{numerics.max_rel_error:.2e} over {len(numerics.reference_losses)} steps "
                           f"(tolerance rtol {numerics.rtol:g}, atol {numerics.atol:g} for {numerics.dtype})")
    passed = (not failures and err is not None and abs(err) <= tolerance
              and all(s.memory_error is None or abs(s.memory_error) <= tolerance for s in stages)
              and (numerics is None or numerics.passed is not False))

    rank_rows = tuple({"rank": r.rank, "pp_rank": r.pp_rank,
                       "median_step_time_s": statistics.median(r.step_times_s) if r.step_times_s else None,
                       "peak_allocated_gib": r.peak_allocated_bytes / GIB if r.peak_allocated_bytes else None,
                       "peak_reserved_gib": r.peak_reserved_bytes / GIB if r.peak_reserved_bytes else None,
                       "losses": list(r.losses), **{k: v for k, v in r.extra.items() if k in RANK_EXTRAS}}
                      for r in results)
    all_notes = list(notes)
    for r in results[:1]:
        all_notes.extend(r.notes)
    all_notes.extend(_where_the_step_went(rank_rows))
    return Report(
        plan=str(plan_path), plan_digest=plan.digest(), config=config_summary(plan), engine=engine, device=device,
        dtype=dtype, world_size=plan.parallel.gpus, steps=steps, warmup=warmup, data=data, tolerance=tolerance,
        predicted_step_time_s=predicted, measured_step_time_s=measured, step_time_p10_s=p10, step_time_p90_s=p90,
        step_time_error=err, stages=tuple(stages), losses=global_losses(results), numerics=numerics,
        failures=tuple(sorted(failures, key=lambda f: (not f.primary, f.rank))), passed=passed, verdict=tuple(verdict),
        notes=tuple(dict.fromkeys(all_notes)), ranks=rank_rows, calibration=dict(calibration or {}), wall_time_s=wall_time_s,
        checkpoint=dict(checkpoint or {}),
    )
