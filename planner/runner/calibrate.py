"""`distplan run --calibrate`: measured-over-predicted correction factors, written into a calibration file.

The cost model multiplies each term by a factor (Profile.calibration, planner/cost/layer.py): "compute"
scales layer times, and each collective ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")
scales its latency + bytes / bandwidth time. A run measures one number, the step time M, while the
prediction (without calibration) splits into terms T_k per kind k plus a part F no factor scales (the
optimizer step):

    M  ~=  F + sum_k f_k * T_k                                                         (1)

One run gives one equation. The runs are kept per record of the calibration file (planner/core/calibration.py:
one per engine, GPU, model shape and sequence length, and profile file), and a record's factors are the
least-squares solution of (1) over its runs, in relative error, with a small ridge term pulling each f_k
toward the pooled ratio f0 = sum_i (M_i - F_i) / sum_i sum_k T_ik:

    min_f  sum_i ((F_i + sum_k f_k T_ik - M_i) / M_i)^2  +  RIDGE * sum_k (f_k - f0)^2

With a single run this is f_k = f0 for every k (the one equation is met exactly and the ridge is
zero), i.e. the measured/predicted ratio of the calibratable part; runs that mix the kinds
differently (other tp, pp, ZeRO) separate the factors. The exposed (overlapped) communication is
treated as linear in its factor, which holds while the overlap window does not change much.
A run of one engine or model never moves another's factors, and the profile file is never written.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from planner.core.calibration import CalibrationRecord, job_key, load_calibration, profile_digest, save_calibration
from planner.core.plan import Plan
from planner.cost.predict import predict
from planner.core.profile import Profile
from planner.core.model import model_shape

RIDGE = 1e-3  # weight of the ridge term pulling each factor to the pooled ratio (module docstring, eq. (2))
MIN_FACTOR = 1e-3  # factors are positive: a term cannot take negative time
# the prediction terms a calibration factor scales
KINDS = ("compute", "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")


def attribute(plan: Plan, breakdown: dict) -> tuple[dict[str, float], float]:
    """Split a prediction's step-time breakdown into seconds per calibration kind, and the fixed rest."""
    c = plan.parallel
    terms = {k: 0.0 for k in KINDS}
    terms["compute"] = sum(breakdown.get(k, 0.0) for k in ("compute_fwd", "compute_bwd", "recompute", "pipeline_bubble"))
    tp = breakdown.get("tp_comm", 0.0)
    if c.sequence_parallel:  # reduce-scatter + all-gather in place of each all-reduce (Korthikanti sec. 4.2.2)
        terms["reduce_scatter"] += tp / 2
        terms["all_gather"] += tp / 2
    else:
        terms["all_reduce"] += tp
    terms["all_to_all" if c.ep > 1 else "p2p"] += breakdown.get("cp_ep_comm", 0.0)
    terms["p2p"] += breakdown.get("pp_p2p", 0.0)
    z = breakdown.get("zero_comm", 0.0)
    if c.zero_stage >= 3:  # two weight all-gathers (forward, backward) and one gradient reduce-scatter
        terms["all_gather"] += 2 * z / 3
        terms["reduce_scatter"] += z / 3
    else:
        terms["reduce_scatter"] += z
    terms["all_gather" if c.zero_stage == 2 else "all_reduce"] += breakdown.get("dp_grad_sync", 0.0)
    fixed = breakdown.get("optimizer", 0.0)
    return {k: v for k, v in terms.items() if v > 0}, fixed


def fit_factors(runs: list[dict]) -> dict[str, float]:
    """Least-squares factors over recorded runs ({measured_step_time_s, fixed_s, terms_s}); see the module docstring."""
    kinds = sorted({k for r in runs for k, v in r["terms_s"].items() if v > 0})
    if not kinds:
        return {}
    meas = np.array([r["measured_step_time_s"] for r in runs])
    fixed = np.array([r["fixed_s"] for r in runs])
    T = np.array([[r["terms_s"].get(k, 0.0) for k in kinds] for r in runs])
    f0 = max(MIN_FACTOR, float((meas - fixed).sum() / T.sum()))
    A = np.vstack([T / meas[:, None], np.sqrt(RIDGE) * np.eye(len(kinds))])
    b = np.concatenate([(meas - fixed) / meas, np.sqrt(RIDGE) * np.full(len(kinds), f0)])
    f, *_ = np.linalg.lstsq(A, b, rcond=None)
    return {k: float(max(MIN_FACTOR, v)) for k, v in zip(kinds, f)}


def machine_gpu(profile: Profile | None) -> str:
    """The GPU this process runs on, as a calibration record names it: CUDA's device 0; on a CPU the profiled CPU's
    name where the profile is a CPU one (estimate then plans on that machine), else "cpu"."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return profile.gpu_name if profile is not None and profile.device == "cpu" else "cpu"


def calibrate_run(plan: Plan, profile: Profile | None, report, calibration_path: str | Path,
                  profile_path: str | Path | None, applied: tuple[str, ...] = ()) -> dict:
    """Add this run to its record of the calibration file (engine, this machine's GPU, the plan's model shape and
    sequence length, the profile file), refit that record's factors, save the file; returns a summary. `profile`:
    as the run was predicted with (planner.estimate.job_profile), its calibration factors aside."""
    engine, gpu = report.engine, machine_gpu(profile)
    base = replace(profile, calibration=(), calibration_source="") if profile is not None else None
    before = predict(plan.model, plan.cluster, plan.parallel, profile, engine=engine).step_time_s
    terms, fixed = attribute(plan, predict(plan.model, plan.cluster, plan.parallel, base, engine=engine).to_dict()["breakdown"])
    run = {"plan_digest": plan.digest(), "model": plan.model.name, "config": report.config, "device": report.device,
           "dtype": report.dtype, "measured_step_time_s": float(report.measured_step_time_s), "fixed_s": fixed,
           "terms_s": terms}
    cal = load_calibration(calibration_path, missing_ok=True)
    digest = profile_digest(profile_path)
    record = cal.find(job_key(engine, gpu, plan.model, plan.parallel.seq_len, digest)) or CalibrationRecord(
        engine=engine, gpu=gpu, model=plan.model.name, model_shape=model_shape(plan.model), seq_len=plan.parallel.seq_len,
        profile=digest, profile_path=str(profile_path or ""))
    runs = [r for r in record.runs if r.get("plan_digest") != run["plan_digest"]] + [run]
    factors = fit_factors(runs)
    record = replace(record, factors=tuple(sorted(factors.items())), runs=tuple(runs))
    save_calibration(cal.with_record(record), calibration_path)
    carrier = base if base is not None else Profile(gpu_name=gpu, device=report.device.split(":")[0],
                                                    model=plan.model.name, seq_len=plan.parallel.seq_len,
                                                    dtype=report.dtype, model_shape=model_shape(plan.model))
    after = predict(plan.model, plan.cluster, plan.parallel, replace(carrier, calibration=record.factors),
                    engine=engine).step_time_s
    return {"file": str(calibration_path), "engine": engine, "gpu": gpu, "model": plan.model.name,
            "seq_len": plan.parallel.seq_len, "profile": str(profile_path) if profile_path else None,
            "runs": len(runs), "factors": factors, "measured_step_time_s": run["measured_step_time_s"],
            "predicted_before_s": before, "predicted_after_s": after, **({"applied": list(applied)} if applied else {})}
