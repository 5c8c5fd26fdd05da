"""`distplan run --calibrate`: measured-over-predicted correction factors, written into a profile.

The cost model multiplies each term by a factor from `Profile.calibration` (planner/costmodel.py):
"compute" scales profiled layer times, and each collective ("all_reduce", "all_gather",
"reduce_scatter", "all_to_all", "p2p") scales its latency + bytes / bandwidth time. A run measures
one number, the step time M, while the prediction (without calibration) splits into terms
T_k per kind k plus a part F no factor scales (the optimizer step):

    M  ~=  F + sum_k f_k * T_k                                                         (1)

One run gives one equation. Every calibrated run is kept in the profile (raw.calibration_runs),
and the factors are the least-squares solution of (1) over all of them, in relative error, with a
small ridge term pulling each f_k toward the pooled ratio f0 = sum_i (M_i - F_i) / sum_i sum_k T_ik:

    min_f  sum_i ((F_i + sum_k f_k T_ik - M_i) / M_i)^2  +  RIDGE * sum_k (f_k - f0)^2

With a single run this is f_k = f0 for every k (the one equation is met exactly and the ridge is
zero), i.e. the measured/predicted ratio of the calibratable part; runs that mix the kinds
differently (other tp, pp, ZeRO) separate the factors. The exposed (overlapped) communication is
treated as linear in its factor, which holds while the overlap window does not change much.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from planner.plan import Plan
from planner.predict import predict
from planner.profile import Profile, save_profile

RIDGE = 1e-3
MIN_FACTOR = 1e-3  # factors are positive: a term cannot take negative time
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


def calibrate_profile(plan: Plan, profile: Profile | None, report, profile_path: str | Path) -> dict:
    """Add this run to the profile's calibration runs, refit the factors, save the profile; returns a summary."""
    if profile is None:  # a new, calibration-only profile
        profile = Profile(gpu_name=plan.cluster.gpu.name, device=report.device.split(":")[0], model=plan.model.name,
                          seq_len=plan.parallel.seq_len, dtype=report.dtype)
    raw_profile = replace(profile, calibration=())
    before = predict(plan.model, plan.cluster, plan.parallel, profile).step_time_s
    terms, fixed = attribute(plan, predict(plan.model, plan.cluster, plan.parallel, raw_profile).to_dict()["breakdown"])
    run = {"plan_digest": plan.digest(), "config": report.config, "device": report.device, "dtype": report.dtype,
           "measured_step_time_s": float(report.measured_step_time_s), "fixed_s": fixed, "terms_s": terms}
    runs = [r for r in (profile.raw or {}).get("calibration_runs", []) if r.get("plan_digest") != run["plan_digest"]]
    runs.append(run)
    factors = fit_factors(runs)
    calibration = {**dict(profile.calibration), **factors}
    new = replace(profile, calibration=tuple(sorted(calibration.items())), raw={**(profile.raw or {}), "calibration_runs": runs})
    save_profile(new, profile_path)
    after = predict(plan.model, plan.cluster, plan.parallel, new).step_time_s
    kind = "moe_block" if plan.model.is_moe else "block"
    note = ""
    if "compute" in factors and new.compute_fit(kind, plan.parallel.tp) is None:
        note = (f"the cost model applies the compute factor to profiled layer times only, and this profile has no "
                f"'{kind}' fit at tp={plan.parallel.tp}: run `distplan profile` first for the compute factor to take effect")
    return {"profile": str(profile_path), "runs": len(runs), "factors": factors, "measured_step_time_s": run["measured_step_time_s"],
            "predicted_before_s": before, "predicted_after_s": after, **({"note": note} if note else {})}
