"""`distplan show` and `distplan diff`: what a plan holds and what changes between two, as plain data.

Everything here returns dicts and lists (the `--format json|yaml` output); planner/render_show.py
draws them with rich, planner/htmlreport.py as HTML, planner/pictures.py as pictures; planner/show_files.py
writes the files `distplan show` asks for.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from planner.core.errors import require
from planner.core.fileio import read_yaml
from planner.core.prediction import FRAGMENTATION
from planner.cost.memory import inflight_microbatch_chunks
from planner.core.plan import Plan, load_plan
from planner.core.prediction import BREAKDOWN_KEYS

# the memory terms shown, in order
MEMORY_KEYS = ("weights", "gradients", "optimizer", "activations", "logits", "buffers")
STRETCH_NOTED = 0.005  # the timeline says so when the plan's pipeline time and its simulation differ by more
# the keys of a measured row
MEASURED_KEYS = ("name", "predicted_step_s", "measured_step_s", "predicted_mem_gib", "measured_mem_gib")


def parallel_summary(par: dict) -> str:
    """One line naming a configuration, e.g. 'dp=8 tp=8 pp=16 mb=1x192 1f1b zero=1 recompute=full sp'."""
    get = par.get
    s = f"dp={get('dp', 1)} tp={get('tp', 1)} pp={get('pp', 1)}"
    for key in ("cp", "ep", "vpp"):
        if get(key, 1) != 1:
            s += f" {key}={get(key)}"
    mb = get("micro_batch_size", "?")
    if "num_microbatches" in par:
        mb = f"{mb}x{par['num_microbatches']}"
    s += f" mb={mb} {get('schedule', '1f1b')} zero={get('zero_stage', 0)} recompute={get('recompute', 'none')}"
    return s + (" sp" if get("sequence_parallel") else "") + (" offload" if get("offload_optimizer") else "")


def plan_summary(plan: Plan) -> str:
    return parallel_summary({**plan.parallel.to_dict(), "num_microbatches": plan.parallel.num_microbatches})


def _checked_prediction(plan: Plan) -> dict:
    """The plan's prediction, with the keys show/diff/report read checked (files can be edited by hand)."""
    pred = plan.prediction
    for key in ("step_time_s", "tokens_per_s", "mfu", "peak_memory_gib", "capacity_gib", "fits", "breakdown", "stages"):
        require(key in pred, f"plan prediction lacks '{key}'; regenerate the plan with `distplan solve` or `distplan estimate`")
    require(isinstance(pred["breakdown"], dict), "plan prediction.breakdown must be a mapping of term -> seconds")
    require(isinstance(pred["stages"], list) and len(pred["stages"]) == plan.parallel.pp,
            f"plan prediction.stages must list {plan.parallel.pp} stages (pp = {plan.parallel.pp})")
    for i, st in enumerate(pred["stages"]):
        require(isinstance(st, dict) and isinstance(st.get("memory_breakdown_gib"), dict)
                and isinstance(st.get("time_per_microbatch_s"), (int, float)),
                f"plan prediction.stages[{i}] needs memory_breakdown_gib and time_per_microbatch_s")
    for key in ("step_time_s", "tokens_per_s", "mfu", "peak_memory_gib", "capacity_gib"):
        require(isinstance(pred[key], (int, float)) and not isinstance(pred[key], bool),
                f"plan prediction.{key} must be a number, got {pred[key]!r}")
    return pred


def parallel_layout(plan: Plan) -> list[dict]:
    """Which GPU holds which pipeline stage, data-parallel replica, context-parallel rank and tensor-parallel
    shard (Megatron rank order: tp innermost, then cp, dp, pp), and its expert-parallel rank when ep > 1."""
    p = plan.parallel
    gpn = plan.cluster.gpus_per_node
    out = []
    for stage in plan.stages():
        base = stage["rank"] * p.dp * p.cp * p.tp
        replicas = []
        for d in range(p.dp):
            for c in range(p.cp):
                first = base + (d * p.cp + c) * p.tp
                rep = {"dp": d, "cp": c, "gpus": list(range(first, first + p.tp))}
                if p.ep > 1:  # experts split over consecutive dp*cp ranks after tp (Megatron's tp-ep-dp expert order)
                    rep["ep"] = (d * p.cp + c) % p.ep
                replicas.append(rep)
        devs = plan.stage_devices(stage["rank"])
        nodes = sorted({g // gpn for g in devs})
        out.append({"stage": stage["rank"], "layers": stage["layers"], "gpus": stage["devices"],
                    "nodes": f"{nodes[0]}-{nodes[-1]}" if len(nodes) > 1 else str(nodes[0]), "replicas": replicas})
    return out


def gpu_indices(layout: list[dict]) -> dict[int, dict]:
    """GPU -> its index on every axis: {"stage", "dp", "cp", "tp"} and "ep" where the plan has ep > 1."""
    out = {}
    for st in layout:
        for rep in st["replicas"]:
            for t, g in enumerate(rep["gpus"]):
                out[g] = {"stage": st["stage"], "dp": rep["dp"], "cp": rep["cp"], "tp": t,
                          **({"ep": rep["ep"]} if "ep" in rep else {})}
    return out


def normalized_alternatives(plan: Plan) -> list[dict]:
    """The solver's runners-up in one shape: name, step time, memory, fits, and why each lost.

    Reads `name` or `summary` or `parallel`; numbers from the entry or its `prediction`;
    the reason from `why_lost`, `why`, `reason` or `lost_because`.
    """
    best = float(plan.prediction.get("step_time_s", 0.0)) or None
    out = []
    for i, alt in enumerate(plan.alternatives):
        if not isinstance(alt, dict):
            out.append({"name": str(alt), "step_time_s": None, "peak_memory_gib": None, "fits": None,
                        "slower_pct": None, "why_lost": ""})
            continue
        pred = alt.get("prediction") if isinstance(alt.get("prediction"), dict) else {}
        par = alt.get("parallel")
        name = alt.get("name") or alt.get("summary") or (parallel_summary(par) if isinstance(par, dict) else par) or f"alternative {i + 1}"
        step = alt.get("step_time_s", pred.get("step_time_s"))
        mem = alt.get("peak_memory_gib", pred.get("peak_memory_gib"))
        fits = alt.get("fits", pred.get("fits"))
        why = next((alt[k] for k in ("why_lost", "why", "reason", "lost_because") if alt.get(k)), "")
        slower = 100 * (float(step) - best) / best if isinstance(step, (int, float)) and best else None
        out.append({"name": str(name), "step_time_s": step, "peak_memory_gib": mem, "fits": fits,
                    "slower_pct": slower, "why_lost": str(why)})
    return out


def plan_review(plan: Plan) -> dict:
    """Everything `distplan show` prints: layout, stages, batching, schedule, time and memory, rationale."""
    pred = _checked_prediction(plan)
    p = plan.parallel
    step = float(pred["step_time_s"])
    stages = []
    for st, sp in zip(plan.stages(), pred["stages"]):
        stages.append({**st, "time_per_microbatch_s": sp["time_per_microbatch_s"],
                       "memory_gib": sp.get("memory_gib", sum(sp["memory_breakdown_gib"].values())),
                       "memory_breakdown_gib": sp["memory_breakdown_gib"],
                       "inflight_microbatches": inflight_microbatch_chunks(p, st["rank"])})
    breakdown = [{"term": k, "seconds": float(v), "share": float(v) / step if step else 0.0}
                 for k, v in pred["breakdown"].items()]
    order = {k: i for i, k in enumerate(BREAKDOWN_KEYS)}
    breakdown.sort(key=lambda r: order.get(r["term"], len(order)))
    cap = float(pred["capacity_gib"])
    return {
        "plan": {"model": plan.model.name, "params_b": round(plan.model.total_params() / 1e9, 3),
                 "cluster": plan.cluster.name, "gpu": plan.cluster.gpu.name, "gpus": plan.gpus, "nodes": plan.nodes,
                 "gpus_per_node": plan.cluster.gpus_per_node, "digest": plan.digest()},
        "parallel": {**p.to_dict(), "summary": plan_summary(plan)},
        "batching": {"global_batch_size": p.global_batch_size, "micro_batch_size": p.micro_batch_size,
                     "num_microbatches": p.num_microbatches, "seq_len": p.seq_len,
                     "tokens_per_step": p.global_batch_size * p.seq_len},
        "schedule": {"kind": p.schedule, "pp": p.pp, "vpp": p.vpp, "num_microbatches": p.num_microbatches,
                     "bubble_s": float(pred["breakdown"].get("pipeline_bubble", 0.0)),
                     "bubble_share": float(pred["breakdown"].get("pipeline_bubble", 0.0)) / step if step else 0.0},
        "layout": parallel_layout(plan),
        "stages": stages,
        "prediction": {"step_time_s": step, "tokens_per_s": float(pred["tokens_per_s"]), "mfu": float(pred["mfu"]),
                       "model_tflops_per_gpu": pred.get("model_tflops_per_gpu"),
                       "peak_memory_gib": float(pred["peak_memory_gib"]), "capacity_gib": cap,
                       "fit_limit_gib": cap / (1 + float(pred.get("allocator_slack", FRAGMENTATION))), "fits": bool(pred["fits"]),
                       **({"pessimistic": pred["pessimistic"]} if isinstance(pred.get("pessimistic"), dict) else {})},
        "breakdown": breakdown,
        "rationale": [str(r) for r in plan.rationale],
        "alternatives": normalized_alternatives(plan),
        "provenance": dict(plan.provenance),
    }


# ---- diff -------------------------------------------------------------------------------------------


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _metric(name: str, a: float, b: float, better: str) -> dict:
    delta = b - a
    return {"metric": name, "a": a, "b": b, "delta": delta, "delta_pct": 100 * delta / a if a else None, "better": better}


def diff_plans(a: Plan, b: Plan, a_name: str = "a", b_name: str = "b") -> dict:
    """What differs between two plans (inputs and configuration) and its predicted consequence."""
    pa, pb = _checked_prediction(a), _checked_prediction(b)
    da, db = a.to_dict(), b.to_dict()
    fa = _flatten({k: da[k] for k in ("model", "cluster", "job", "parallel")})
    fb = _flatten({k: db[k] for k in ("model", "cluster", "job", "parallel")})
    fa["stages.layers"] = [s["layers"] for s in da["stages"]]
    fb["stages.layers"] = [s["layers"] for s in db["stages"]]
    changes = [{"key": k, "a": fa.get(k), "b": fb.get(k)} for k in list(fa) + [k for k in fb if k not in fa]
               if fa.get(k) != fb.get(k)]
    metrics = [
        _metric("step_time_s", float(pa["step_time_s"]), float(pb["step_time_s"]), "lower"),
        _metric("tokens_per_s", float(pa["tokens_per_s"]), float(pb["tokens_per_s"]), "higher"),
        _metric("mfu", float(pa["mfu"]), float(pb["mfu"]), "higher"),
        _metric("peak_memory_gib", float(pa["peak_memory_gib"]), float(pb["peak_memory_gib"]), "lower"),
    ]
    terms = list(BREAKDOWN_KEYS) + [k for k in list(pa["breakdown"]) + list(pb["breakdown"]) if k not in BREAKDOWN_KEYS]
    breakdown = [{"term": t, "a": float(pa["breakdown"].get(t, 0.0)), "b": float(pb["breakdown"].get(t, 0.0)),
                  "delta": float(pb["breakdown"].get(t, 0.0)) - float(pa["breakdown"].get(t, 0.0))}
                 for t in dict.fromkeys(terms) if pa["breakdown"].get(t) or pb["breakdown"].get(t)]
    ma = [float(s.get("memory_gib", 0.0)) for s in pa["stages"]]
    mb = [float(s.get("memory_gib", 0.0)) for s in pb["stages"]]
    stage_memory = [{"rank": r, "a": ma[r] if r < len(ma) else None, "b": mb[r] if r < len(mb) else None}
                    for r in range(max(len(ma), len(mb)))]
    return {"a": a_name, "b": b_name, "identical": not changes,
            "same_workload": all(fa.get(k) == fb.get(k) for k in fa if k.startswith(("model.", "job.global_batch_size", "job.seq_len"))),
            "changes": changes, "consequences": metrics,
            "fits": {"a": bool(pa["fits"]), "b": bool(pb["fits"])},
            "breakdown": breakdown, "stage_memory": stage_memory,
            "verdict": _verdict(a_name, b_name, metrics, breakdown, bool(pa["fits"]), bool(pb["fits"]), not changes)}


def _verdict(a_name: str, b_name: str, metrics: list[dict], breakdown: list[dict], fits_a: bool, fits_b: bool,
             identical: bool) -> str:
    if identical:
        return f"{a_name} and {b_name} are the same plan"
    step, mem = metrics[0], metrics[3]
    if abs(step["delta"]) < 1e-12:
        speed = f"{b_name} takes the same time per step ({step['a']:.3f} s)"
    else:
        word = "faster" if step["delta"] < 0 else "slower"
        speed = f"{b_name} is {abs(step['delta_pct']):.1f}% {word} than {a_name} ({step['a']:.3f} s -> {step['b']:.3f} s per step)"
    if abs(mem["delta"]) < 0.005:
        memory = "the same peak memory per GPU"
    else:
        memory = (f"{abs(mem['delta']):.1f} GiB {'less' if mem['delta'] < 0 else 'more'} peak memory per GPU "
                  f"({mem['a']:.1f} -> {mem['b']:.1f} GiB)")
    movers = sorted((t for t in breakdown if abs(t["delta"]) > 1e-9), key=lambda t: -abs(t["delta"]))[:2]
    why = ""
    if movers:
        why = "; mostly " + " and ".join(f"{t['term']} {t['delta']:+.3f} s" for t in movers)
    fit = {(True, True): "both fit", (False, False): "neither fits"}.get(
        (fits_a, fits_b), f"only {a_name if fits_a else b_name} fits")
    return f"{speed}, with {memory}{why}; {fit}"


# ---- files --------------------------------------------------------------------------------------------


def record_from_run_report(d: dict, source: str) -> dict:
    """One predicted-vs-measured record from a `distplan run` report (planner/runner/report.py's file).

    Memory: the largest stage's predicted peak against the largest measured peak allocated (None on CPU).
    """
    stages = d.get("stages") or []
    require(isinstance(stages, list), f"run report '{source}': 'stages' must be a list")
    pred_mem = [s.get("predicted_memory_gib") for s in stages if isinstance(s, dict)]
    meas_mem = [s.get("peak_allocated_gib") for s in stages if isinstance(s, dict)]
    pred_mem = [x for x in pred_mem if isinstance(x, (int, float))]
    meas_mem = [x for x in meas_mem if isinstance(x, (int, float))]
    return {"name": str(d.get("config") or d.get("plan") or source), "predicted_step_s": d.get("predicted_step_time_s"),
            "measured_step_s": d.get("measured_step_time_s"), "predicted_mem_gib": max(pred_mem) if pred_mem else None,
            "measured_mem_gib": max(meas_mem) if meas_mem else None}


def load_measurements(*paths: str | Path) -> list[dict]:
    """Predicted-vs-measured records, one list from all `paths`.

    Each file (YAML or JSON) is a `distplan run` report, or a list of records (or a mapping with
    'records') with keys name, predicted_step_s, measured_step_s, predicted_mem_gib, measured_mem_gib.
    """
    out = []
    for path in map(Path, paths):
        data = read_yaml(path, "measurements file", mapping=False)  # YAML is a superset of JSON
        if isinstance(data, dict) and "predicted_step_time_s" in data:
            data = [record_from_run_report(data, str(path))]
        elif isinstance(data, dict):
            data = data.get("records")
        require(isinstance(data, list) and data and all(isinstance(r, dict) for r in data),
                f"measurements file '{path}' must be a `distplan run` report or a list of records with keys "
                f"{', '.join(MEASURED_KEYS)}")
        for i, r in enumerate(data):
            missing = [k for k in MEASURED_KEYS if k not in r]
            require(not missing, f"measurements file '{path}': record {i} lacks {', '.join(missing)}")
            for k in MEASURED_KEYS[1:]:
                ok = r[k] is None if k.startswith("measured") else False
                require(ok or (isinstance(r[k], (int, float)) and not isinstance(r[k], bool) and r[k] >= 0),
                        f"measurements file '{path}': record {i} {k} must be a number"
                        + (" or null" if k.startswith("measured") else "") + f", got {r[k]!r}")
        out.extend(data)
    return out


def stage_idle_shares(plan: Plan) -> list[float]:
    """Each stage's idle share of the step, from the plan's prediction: (pipeline - m * t_i) / step, where the
    pipeline is the step less the gradient sync and optimizer. The slowest stage's is the pipeline bubble's
    share; faster stages wait on it for the rest."""
    pred = _checked_prediction(plan)
    step = float(pred["step_time_s"])
    br = pred["breakdown"]
    pipeline = step - float(br.get("dp_grad_sync", 0.0)) - float(br.get("optimizer", 0.0))
    m = plan.parallel.num_microbatches
    times = [float(s["time_per_microbatch_s"]) for s in pred["stages"]]
    return [max(0.0, pipeline - m * t) / step if step > 0 else 0.0 for t in times]


def stage_labels(plan: Plan) -> list[str]:
    idle = stage_idle_shares(plan) if plan.parallel.pp > 1 else None
    return [f"stage {s['rank']}\nGPUs {s['devices']}" + (f"\nidle {100 * idle[s['rank']]:.1f}%" if idle else "")
            for s in plan.stages()]


def timeline_numbers(review: dict) -> str:
    """The step time and bubble the timeline prints: the plan's prediction, in `distplan show`'s precision."""
    pr, sc = review["prediction"], review["schedule"]
    times = [s["time_per_microbatch_s"] for s in review["stages"]]
    slowest = times.index(max(times))
    where = f" on stage {slowest}, the slowest" if len(times) > 1 else ""
    return (f"predicted step {pr['step_time_s']:.3f} s, bubble {sc['bubble_s']:.3f} s "
            f"({100 * sc['bubble_share']:.1f}% of the step){where}")


def timeline_of(plan: Plan):
    from planner.pictures import timeline_figure
    from planner.cost.timeline import plan_schedule

    title = f"{plan.model.name} on {plan.gpus} x {plan.cluster.gpu.name}: {plan_summary(plan)}"
    sched = plan_schedule(plan)
    numbers = timeline_numbers(plan_review(plan))
    if sched.stretch - 1 > STRETCH_NOTED:
        numbers += (f"\nthe plan's pipeline is {100 * (sched.stretch - 1):.1f}% longer than this schedule's simulation: "
                    "the difference is drawn as idle before the gradient sync")
    elif 1 - sched.stretch > STRETCH_NOTED:
        numbers += f"\nthe schedule's simulation is drawn {100 * (1 - sched.stretch):.1f}% shorter, to the plan's pipeline time"
    return timeline_figure(sched, title=title, stage_labels=stage_labels(plan), numbers=numbers)


def memory_chart_of(plan: Plan):
    from planner.pictures import memory_figure

    pred = _checked_prediction(plan)
    pr = plan_review(plan)["prediction"]
    headline = (f"peak {pr['peak_memory_gib']:.2f} GiB of {pr['capacity_gib']:.1f} usable, "
                + ("fits" if pr["fits"] else "does not fit"))
    return memory_figure(pred["stages"], pr["capacity_gib"], headline=headline,
                         allocator_slack=float(pred.get("allocator_slack", FRAGMENTATION)),
                         title=f"{plan.model.name} on {plan.gpus} x {plan.cluster.gpu.name}: {plan_summary(plan)}")


def diff_plan_files(a: str | Path, b: str | Path) -> dict:
    return diff_plans(load_plan(a), load_plan(b), str(a), str(b))


def dumps(data: dict, fmt: str) -> str:
    """The --format json|yaml text of show/diff data."""
    if fmt == "json":
        return json.dumps(data, indent=2)
    return yaml.safe_dump(data, sort_keys=False, width=110)
