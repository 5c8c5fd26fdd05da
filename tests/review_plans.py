"""Small hand-made plans for the review tests (show, diff, pictures, report); no solver involved."""

from __future__ import annotations

from planner.core.cluster import load_cluster
from planner.core.job import ParallelConfig, validate_config
from planner.core.model import load_model
from planner.core.plan import Plan, make_plan
from planner.cost.predict import predict

RATIONALE = (
    "pp=4 keeps every stage's weights and activations under the 74 GiB fit limit",
    "1F1B holds at most pp micro-batches of activations per stage; GPipe would hold all of them",
)
ALTERNATIVES = (
    {"parallel": {"dp": 8, "tp": 1, "pp": 1, "micro_batch_size": 2, "schedule": "1f1b", "zero_stage": 1},
     "prediction": {"step_time_s": 0.091, "peak_memory_gib": 41.2, "fits": True},
     "why_lost": "no pipeline, but the data-parallel all-reduce of all 1.6 B gradients is exposed"},
    {"name": "dp=2 tp=4 pp=1", "step_time_s": 0.5, "peak_memory_gib": 20.5, "fits": True,
     "why": "TP all-reduces cost 4 per layer per micro-batch"},
)


def review_plan(model: str = "gpt2-xl", cluster: str = "dgx-h100-80gb", rationale=RATIONALE,
                alternatives=ALTERNATIVES, **parallel) -> Plan:
    """A Plan with a real prediction for the configuration given by keyword (ParallelConfig fields)."""
    spec, cl = load_model(model), load_cluster(cluster)
    kw = {"dp": 2, "pp": 4, "micro_batch_size": 2, "global_batch_size": 32, "seq_len": spec.seq_len, **parallel}
    cfg = ParallelConfig(**kw)
    validate_config(spec, cfg, cfg.gpus)
    return make_plan(spec, cl, cfg.gpus, cfg, predict(spec, cl, cfg), rationale=rationale, alternatives=alternatives,
                     provenance={"command": "distplan solve -m gpt2-xl -n 8 -o plan.yaml"})
