"""The full ranked candidate list of a search (`distplan solve --candidates out.csv|out.json`).

Every configuration of the search space appears once, with what the search did with it (solvers.search.STATUSES),
its prediction where it was evaluated and fits (`planner.cost.predict` of it with the stage DP's layer split), and why
it lost to the chosen plan. Rows are ranked as the search ranks them: fitting configurations by the pessimistic step
(`pessimistic_step_s`: the step with every unchecked mechanism at its bound, planner/cost/mechanisms.py; the
expected step where none applies), then the evaluated ones that do not fit, then those the bounds pruned (by lower
bound, a bound on the pessimistic step), then those the time limit left. Pure: the CLI writes the text these
functions return.
"""

from __future__ import annotations

import csv
import io
import json

from planner.core.cluster import Cluster
from planner.core.job import ParallelConfig
from planner.core.model import ModelSpec
from planner.core.prediction import Prediction
from planner.cost.predict import predict
from planner.core.profile import Profile
from solvers.explain import why_lost
from solvers.search import SearchOutcome, config_key

COLUMNS = ("rank", "status", "dp", "tp", "pp", "cp", "ep", "vpp", "schedule", "sequence_parallel", "zero_stage",
           "offload_optimizer", "micro_batch_size", "num_microbatches", "recompute", "layer_split", "step_time_s",
           "pessimistic_step_s", "tokens_per_s", "mfu", "peak_memory_gib", "fits", "lower_bound_s", "why_lost")
FORMATS = (".csv", ".json")
_ORDER = {"fits": 0, "states_do_not_fit": 1, "no_split_fits": 1, "mesh_pruned": 2, "pruned": 2, "timed_out": 3}


def _why(status: str, c, best: Prediction, pred: Prediction | None, chosen: bool) -> str:
    if chosen:
        return "chosen"
    if status == "fits":
        if not (best.unchecked or pred.unchecked):
            return why_lost(best, pred)
        pct = 100 * (_ranked(pred) / _ranked(best) - 1)
        expected = 100 * (pred.step_time_s / best.step_time_s - 1)
        relies = f"; relies on unchecked {', '.join(pred.unchecked)}" if pred.unchecked else ""
        return f"slower by {pct:.1f}% at the bounds the search ranks by ({expected:+.1f}% expected){relies}"
    if status == "states_do_not_fit":
        return "does not fit: its weights, gradients and optimizer states alone exceed a GPU's memory (or the host's)"
    if status == "no_split_fits":
        return "does not fit: no layer split keeps every pipeline stage within a GPU's memory"
    if status == "mesh_pruned":
        return (f"not evaluated: its lower bound {c.lower_bound_s:.4g} s cannot beat the best plan of its mesh "
                f"({c.bound_to_beat_s:.4g} s)")
    if status == "pruned":
        return (f"not evaluated: its lower bound {c.lower_bound_s:.4g} s cannot beat the plans kept "
                f"({c.bound_to_beat_s:.4g} s)")
    return "not evaluated: the --time-limit ran out first"


def _ranked(pred: Prediction) -> float:
    """The step the search ranks by: the pessimistic one where the plan relies on an unchecked mechanism."""
    return pred.pessimistic_step_time_s if pred.pessimistic_step_time_s is not None else pred.step_time_s


def candidate_rows(model: ModelSpec, cluster: Cluster, profile: Profile | None, outcome: SearchOutcome,
                   chosen: ParallelConfig, chosen_pred: Prediction, engine: str = "any") -> list[dict]:
    """One row per configuration the search considered (COLUMNS), ranked (module doc)."""
    rows = []
    chosen_key = (config_key(chosen), chosen.layer_split)
    for c in outcome.considered:
        cfg = c.config
        pred = predict(model, cluster, cfg, profile, engine=engine) if c.status == "fits" else None
        is_chosen = (config_key(cfg), cfg.layer_split) == chosen_key
        rows.append({
            "status": "chosen" if is_chosen else c.status, "dp": cfg.dp, "tp": cfg.tp, "pp": cfg.pp, "cp": cfg.cp,
            "ep": cfg.ep, "vpp": cfg.vpp, "schedule": cfg.schedule, "sequence_parallel": cfg.sequence_parallel,
            "zero_stage": cfg.zero_stage, "offload_optimizer": cfg.offload_optimizer,
            "micro_batch_size": cfg.micro_batch_size, "num_microbatches": cfg.num_microbatches,
            "recompute": cfg.recompute, "layer_split": ",".join(map(str, cfg.layer_split)),
            "step_time_s": pred.step_time_s if pred else None,
            "pessimistic_step_s": _ranked(pred) if pred else None, "tokens_per_s": pred.tokens_per_s if pred else None,
            "mfu": pred.mfu if pred else None, "peak_memory_gib": pred.peak_memory_gib if pred else None,
            "fits": pred.fits if pred else False if c.status in ("states_do_not_fit", "no_split_fits") else None,
            "lower_bound_s": c.lower_bound_s, "why_lost": _why(c.status, c, chosen_pred, pred, is_chosen)})
    rows.sort(key=lambda r: (r["status"] != "chosen", _ORDER.get(r["status"], 0),
                             r["pessimistic_step_s"] if r["pessimistic_step_s"] is not None else r["lower_bound_s"]))
    for i, r in enumerate(rows, start=1):
        r["rank"] = i
    return [{k: r[k] for k in COLUMNS} for r in rows]


def candidates_text(rows: list[dict], suffix: str) -> str:
    """The rows as CSV (suffix .csv) or as a JSON list of objects (.json)."""
    if suffix == ".json":
        return json.dumps(rows, indent=1) + "\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()
