"""The drawn timeline of a plan: the pipeline schedule's simulation with the cost model's durations, made to agree
with the plan's recorded prediction (planner/show.py and planner/pictures.py draw it).

Apart from planner/cost/pipeline.py because it asks `predict.rank_timer` for the per-rank terms, and predict
imports the pipeline for its step time.
"""

from __future__ import annotations

from planner.cost.pipeline import Schedule, end_chunk_extras, fitted, simulate, stage_op_times
from planner.cost.predict import rank_timer


def plan_schedule(plan) -> Schedule:
    """The timeline of a Plan (planner.core.plan.Plan), agreeing with its prediction.

    The simulation places every operation: cost-model durations calibrated to the plan's recorded stage
    times, the embedding and head on their own chunks (as predict charges them). predict extrapolates long
    interleaved schedules and keeps the closed form where it is longer, so the simulated pipeline can differ
    from the plan's by a little; fitted() scales it to the plan's pipeline time (step - dp_grad_sync -
    optimizer), so the drawn step is the plan's step_time_s. `stretch` says by how much.
    """
    cfg = plan.parallel
    pred = plan.prediction
    stages = pred.get("stages") or []
    recorded = None
    if len(stages) == cfg.pp and all(isinstance(s, dict) and isinstance(s.get("time_per_microbatch_s"), (int, float))
                                     for s in stages):
        recorded = [float(s["time_per_microbatch_s"]) for s in sorted(stages, key=lambda s: s.get("rank", 0))]
    extras = end_chunk_extras(plan.model, plan.cluster, cfg)
    times = stage_op_times(cfg, rank_terms(plan.model, plan.cluster, cfg), recorded, extras=extras)
    br = pred.get("breakdown") or {}
    sync, opt = float(br.get("dp_grad_sync", 0.0)), float(br.get("optimizer", 0.0))
    sim = simulate(cfg.schedule, cfg.pp, cfg.vpp, cfg.num_microbatches, times, extras=extras)
    step = pred.get("step_time_s")
    if not isinstance(step, (int, float)) or isinstance(step, bool) or step <= sync + opt or sim.pipeline_s <= 0:
        return simulate(cfg.schedule, cfg.pp, cfg.vpp, cfg.num_microbatches, times, sync, opt, extras)
    return fitted(sim, float(step) - sync - opt, sync, opt)


def rank_terms(model, cluster, cfg, profile=None, engine: str = "any") -> list[dict[str, float]]:
    """Every pipeline rank's per-micro-batch terms under `cfg`'s layer split: what `predict` sums."""
    timer = rank_timer(model, cluster, cfg, profile, engine=engine)
    return [dict(timer(rank, layers).terms) for rank, layers in enumerate(cfg.layers_per_stage(model.num_layers))]
