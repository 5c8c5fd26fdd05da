"""The cost model's safety net: a snapshot of what it predicts today, and a diff against a committed one.

Before the cost model is moved or restructured, its predictions are recorded here; after, the same inputs must give
the same numbers (to floating-point noise), or the diff names every change, to be explained one by one.

The snapshot holds:
- `replay`: every committed GPU run re-predicted (benchmarks/replay.py over each campaign folder): step time, peak
  memory and fit, per row;
- `estimate_accuracy`: the published checks (planner.core.published: SC'21 Table 1, ZeRO's memory) as predicted today;
- `predict`: a grid of configurations per model (every STRIDE-th configuration of the search space, engines any,
  torch, deepspeed and megatron where they run it, with and without a committed profile of that model): step time,
  each breakdown term, peak memory per stage, fit and sources;
- `solve`: the plan `solve` chooses for each zoo model at a few GPU counts (its configuration, layer split, step
  time, memory and MFU), the rationale's first line, and the solver's statistics.

Usage: python3 benchmarks/snapshot.py write [-o FILE]     # record today's (default benchmarks/results/snapshot.json.gz)
       python3 benchmarks/snapshot.py diff [FILE]         # compare today's with FILE; exit 1 when something changed
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
sys.path.insert(0, str(ROOT))

from planner.core.cluster import load_cluster  # noqa: E402
from planner.cost.engines import runnable  # noqa: E402
from planner.core.errors import DistplanError  # noqa: E402
from planner.core.model import load_model, zoo_names  # noqa: E402
from planner.cost.predict import predict  # noqa: E402
from planner.cost.profiled import cluster_for_profile  # noqa: E402
from planner.cost.profiled import load_profile, mismatch  # noqa: E402
from solvers import solve  # noqa: E402
from solvers.search import search_space  # noqa: E402

DEFAULT = ROOT / "benchmarks" / "results" / "snapshot.json.gz"  # the committed snapshot
RESULTS = ROOT / "benchmarks" / "results"  # committed runs and profiles
# (campaign folder, merge rows by case) replayed
CAMPAIGNS = [("campaign_2xh200", True), ("campaign_2xh200/engines", False), ("campaign_1xh200", True),
             ("campaign_1xh100", True), ("campaign_4xh200", True)]
STRIDE = 37  # every 37th configuration of a search space (a prime: it walks every axis of the canonical order)
# (model, GPUs, cluster) of the prediction grid
GRID = [("gpt2-xl", 8, "dgx-h100-80gb"), ("gpt2-xl", 2, "h200-141gb"), ("llama-3-8b", 16, "dgx-h100-80gb"),
        ("llama-3-8b", 2, "h200-141gb"), ("llama-2-13b", 2, "h200-141gb"), ("mixtral-8x7b", 64, "dgx-h100-80gb"),
        ("llama-3-70b", 64, "dgx-h100-80gb"), ("gpt3-175b", 1024, "dgx-a100-80gb"), ("vit-huge", 16, "dgx-a100-80gb")]
# committed profiles the grid also predicts with (where their model matches)
PROFILES = [RESULTS / "profile_2xh200/session11/profile-gpt2-xl-s1024.yaml",
            RESULTS / "profile_2xh200/session7/profile-llama-3-8b-s4096.yaml",
            RESULTS / "profile_2xh200/session7/profile-llama-2-13b-s4096.yaml",
            RESULTS / "profile_1xh100/profile-gpt2-xl-1xh100.yaml"]
SOLVE_SIZES = (1, 8, 64, 512)  # GPU counts solved per zoo model
ENGINES = ("any", "torch", "deepspeed", "megatron")  # engines predicted per configuration
REL_TOL = 1e-9  # two numbers are the same when they differ by less than this share (floating-point order)


def _replay() -> dict:
    spec = importlib.util.spec_from_file_location("replay", ROOT / "benchmarks" / "replay.py")
    replay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay)
    out = {}
    for folder, merge in CAMPAIGNS:
        rows = replay.replay(RESULTS / folder, merge=merge)
        out[folder] = {f"{r['call']}|{r['case']}|{r['plan']}|{r['engine']}|{r['config']}":
                       {"step_now_s": r["step_now_s"], "now_gib": r["now_gib"], "now_fits": r["now_fits"],
                        "peak_at": r["peak_at"]} for r in rows}
    return out


def _prediction(pred) -> dict:
    return {"step_time_s": pred.step_time_s, "breakdown": dict(pred.breakdown), "fits": pred.fits,
            "peak_memory_gib": pred.peak_memory_gib, "stages_gib": [s.memory_gib for s in pred.stages],
            "peak_at": [s.memory.peak_phase for s in pred.stages], "mfu": pred.mfu,
            "host_memory_gib": pred.host_memory_gib, "sources": dict(pred.sources)}


def _predict_grid() -> dict:
    out = {}
    for name, gpus, cluster_name in GRID:
        model, cluster = load_model(name), load_cluster(cluster_name)
        space = search_space(model, cluster, gpus, model.default_global_batch, model.seq_len, wide_cp=True)
        profiles = [None] + [p for p in PROFILES if mismatch(load_profile(p), model, model.seq_len) is None]
        for prof_path in profiles:
            prof = load_profile(prof_path) if prof_path else None
            try:
                here = cluster_for_profile(prof, cluster) if prof else cluster
            except DistplanError:
                continue  # a profile of another GPU than this cluster's
            for cfg in space[::STRIDE]:
                for engine in ENGINES:
                    if not runnable(engine, cfg):
                        continue
                    key = f"{name}|{gpus}|{cluster_name}|{prof_path.name if prof_path else '-'}|{engine}|{cfg}"
                    try:
                        out[key] = _prediction(predict(model, here, cfg, prof, engine=engine))
                    except DistplanError as exc:
                        out[key] = {"error": str(exc)}
    return out


def _solves() -> dict:
    out = {}
    for name in zoo_names():
        model = load_model(name)
        for gpus in SOLVE_SIZES:
            key = f"{name}|{gpus}"
            try:
                r = solve(model, load_cluster("dgx-h100-80gb"), gpus, top_k=2)
            except DistplanError as exc:
                out[key] = {"error": str(exc)}
                continue
            out[key] = {"config": str(r.plan.parallel), "step_time_s": r.prediction.step_time_s,
                        "peak_memory_gib": r.prediction.peak_memory_gib, "mfu": r.prediction.mfu,
                        "alternatives": [str(a.config) for a in r.alternatives], "rationale0": r.plan.rationale[0],
                        "candidates": r.stats["candidates"], "evaluated": r.stats["evaluated_with_stage_dp"]}
    return out


def _accuracy() -> dict:
    from planner.core.published import sc21_table1

    out = {}
    for case in sc21_table1():
        pred = predict(case.model, load_cluster("dgx-a100-80gb"), case.config)
        out[f"sc21|{case.params_billion}B@{case.gpus}"] = _prediction(pred)
    return out


def take() -> dict:
    return {"replay": _replay(), "estimate_accuracy": _accuracy(), "predict": _predict_grid(), "solve": _solves()}


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= REL_TOL * max(abs(a), abs(b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def diff(old: dict, new: dict) -> list[str]:
    """One line per entry that differs, was added or went missing."""
    lines = []
    for part in sorted(set(old) | set(new)):
        a, b = old.get(part, {}), new.get(part, {})
        for key in sorted(set(a) | set(b)):
            if key not in b:
                lines.append(f"{part}: {key}: missing now")
            elif key not in a:
                lines.append(f"{part}: {key}: new")
            elif not _same(a[key], b[key]):
                lines.append(f"{part}: {key}: {json.dumps(a[key], sort_keys=True)[:300]} -> "
                             f"{json.dumps(b[key], sort_keys=True)[:300]}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    w = sub.add_parser("write")
    w.add_argument("-o", "--out", type=Path, default=DEFAULT)
    d = sub.add_parser("diff")
    d.add_argument("file", type=Path, nargs="?", default=DEFAULT)
    args = ap.parse_args()
    now = take()
    if args.what == "write":
        args.out.write_bytes(gzip.compress((json.dumps(now, indent=0, sort_keys=True) + "\n").encode(), mtime=0))
        print(f"wrote {args.out}: " + ", ".join(f"{k} {len(v)}" for k, v in now.items()))
        return 0
    lines = diff(json.loads(gzip.decompress(args.file.read_bytes())), now)
    print("\n".join(lines) if lines else f"no difference from {args.file}")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
