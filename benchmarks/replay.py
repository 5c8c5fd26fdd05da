"""Re-predict the step time and peak memory of every campaign run already measured on GPUs, with today's
cost model.

The campaign (benchmarks/campaign.py) records each run's plan, its predictions at the time and what the run
measured (median step time; peak allocated memory, or its out-of-memory error). After a change to the cost or
memory model this script replays those plans through `predict` with the engine that ran them and the profile
the plan names, so the change is judged against every measurement at once, without a GPU. It is not a new
measurement: the measured columns are the runs' own, from the committed rows; the replayed prediction is only
as independent as the model change was (say which runs motivated it when reporting).

Usage: python3 benchmarks/replay.py [--results benchmarks/results/campaign_2xh200] [--every-row] [-o OUT.md]
Each call directory holds rows.json and campaign.tar.gz (the plans). A case re-run by a later call keeps only
the later call's rows (as `campaign.py --merge`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from campaign import call_number, merge_rows, spearman  # noqa: E402
from planner.core.prediction import FRAGMENTATION  # noqa: E402
from planner.core.plan import load_plan  # noqa: E402
from planner.cost.predict import predict  # noqa: E402
from planner.core.cluster import load_cluster  # noqa: E402
from planner.core.errors import DistplanError  # noqa: E402
from planner.cost.profiled import cluster_for_profile, load_profile, mismatch, profile_for_job, with_host_memory  # noqa: E402

OOM_SLACK_GIB = 1.0  # an OOM row is "caught" when the replay says it does not fit


def _call_order(call: Path) -> tuple[float, str]:
    """call2-x before call10-y (campaign.call_number)."""
    return (call_number(call.name), call.name)


def _out_of_memory(row: dict) -> bool:
    """A run that ran out of memory: on the GPU (status oom), or on the host, where the kernel's OOM killer stopped a
    rank (status failed, SIGKILL: DeepSpeed's optimizer offload for 13B on a 252 GiB 2xH200 host,
    benchmarks/results/run_2xh200.md)."""
    return row.get("status") == "oom" or (row.get("status") == "failed" and "OOM killer" in str(row.get("why", "")))


def _latest_rows(results: Path, merge: bool = True) -> list[tuple[Path, dict]]:
    """(call dir, row) of the rows that ran (or ran out of memory), each case from the last call that ran it
    (campaign.merge_rows, as `campaign.py --merge`), and every earlier out-of-memory run of a plan (case, engine,
    config) that no later call ran: a later call leaves a plan predicted not to fit unmade, and the replay
    keeps checking the measurement that says so. `merge` False: every call's rows (engine-coverage calls run one
    case once per engine, campaign_2xh200/engines/)."""
    calls = sorted((p for p in results.iterdir() if (p / "rows.json").exists()), key=_call_order)
    tagged = [[{**row, "_call": call} for row in json.loads((call / "rows.json").read_text())] for call in calls]
    if not merge:
        return [(row.pop("_call"), row) for rows in tagged for row in rows
                if (row.get("status") == "ran" or _out_of_memory(row)) and not row.get("measured_in")]
    latest = [row for row in merge_rows(tagged) if row.get("status") == "ran" or _out_of_memory(row)]
    key = lambda r: (r["case"], r.get("engine"), r.get("config"))  # noqa: E731
    seen = {key(r) for r in latest}
    for rows in reversed(tagged):
        for row in rows:
            if _out_of_memory(row) and key(row) not in seen:
                latest.append(row)
                seen.add(key(row))
    return [(row.pop("_call"), row) for row in latest]


def _fail(message: str) -> None:
    """One line on stderr, exit code 2 (the project's bad-input convention)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def _flag(command: str, flag: str) -> str:
    words = command.split()
    return words[words.index(flag) + 1] if flag in words[:-1] else ""


def _find_profile(path: str, call_dir: Path, results_call: Path | None = None) -> Path | None:
    """The profile a plan names: the version the call ran with where a later session replaced that committed file
    (the call's profile_map.json: committed path -> the saved copy, profile_2xh200/history/NAME@COMMIT.yaml),
    else in the repository (committed profiles), or one the call measured (the device's out/profiles/, kept in
    the call's tarball)."""
    if not path:
        return None
    mapping = results_call / "profile_map.json" if results_call is not None else None
    if mapping is not None and mapping.exists():
        saved = json.loads(mapping.read_text()).get(path)
        if saved and (ROOT / saved).exists():
            return ROOT / saved
    for cand in (ROOT / path, call_dir / "profiles" / Path(path).name):
        if cand.exists():
            return cand
    _fail(f"replay: profile {path} named by a plan of {call_dir.name} is neither committed nor in the tarball")


def _job_profile(path: Path, plan, call: Path):
    """The profile at `path` as it applies to the plan's model and sequence length (planner.cost.profiled: a profile of
    another shape is refused, as estimate, solve and run refuse it)."""
    try:
        return profile_for_job(load_profile(path), plan.model, plan.parallel.seq_len, source=str(path))
    except DistplanError as exc:
        _fail(f"replay: {call.name}: {exc}")


def replay(results: Path, overrides: dict[str, list[Path]] | None = None, merge: bool = True,
           presets: dict[str, str] | None = None) -> list[dict]:
    """`overrides`: engine -> profiles to use instead of the plan's for that engine's rows (the one whose model shape
    and sequence length match the plan's (planner.cost.profiled.mismatch), where it was measured after the plan's own: facts.date_utc), e.g. a profile
    re-measured after a profiler fix. `merge`: as _latest_rows. `presets`: plan cluster name -> cluster preset or
    file; each row then also gets the prediction without a profile on that cluster (preset_s, preset_gib)."""
    rows = []
    overrides = overrides or {}
    with tempfile.TemporaryDirectory() as tmp:
        for call, row in _latest_rows(results, merge):
            dest = Path(tmp) / call.name
            if not dest.exists():
                with tarfile.open(call / "campaign.tar.gz") as tar:
                    tar.extractall(dest, filter="data")
            rel = row["plan_path"].rsplit("/campaign/", 1)[1]  # OUT may end in campaign/ (campaign_2xh200/call32-*)
            plan = load_plan(dest / "campaign" / rel)
            prof_path = plan.provenance.get("profile") or _flag(plan.provenance.get("command", ""), "--profile")
            found = _find_profile(prof_path, dest, call)
            profile = _job_profile(found, plan, call) if found else None
            engine = row.get("engine") or "any"
            cluster = plan.cluster
            if profile is not None and not cluster.host_memory_gib:  # a plan made before the host's memory was modelled
                cluster = with_host_memory(cluster, profile)
            for cand in overrides.get(engine, []):
                other = load_profile(cand)
                newer = str(other.facts.get("date_utc", "")) > str(profile.facts.get("date_utc", "")) if profile else True
                if mismatch(other, plan.model, plan.parallel.seq_len) is None and newer:
                    found, profile = cand.resolve(), other
                    cluster = cluster_for_profile(other, load_cluster(plan.cluster.name.split("+")[0]))
            pred = predict(plan.model, cluster, plan.parallel, profile, engine=engine)
            fullest = max(pred.stages, key=lambda s: s.memory.total)
            measured = row.get("peak_allocated_gib")
            extra = {}
            if presets is not None:
                base = plan.cluster.name.split("+")[0]
                if base not in presets:
                    _fail(f"replay: {call.name}: no preset given for cluster '{base}' (known: {', '.join(presets)})")
                bare = predict(plan.model, load_cluster(presets[base]), plan.parallel, None, engine=engine)
                extra = {"preset_s": bare.step_time_s, "preset_gib": bare.peak_memory_gib,
                         "preset_sources": dict(bare.sources)}
            rows.append({**extra, "call": call.name, "case": row["case"], "plan": row["name"], "engine": engine,
                         "config": row["config"], "status": row["status"], "measured_gib": measured,
                         "step_measured_s": row.get("measured_step_time_s"),
                         "step_then_s": row.get("predicted_step_time_s"), "step_now_s": pred.step_time_s,
                         "then_gib": row.get("predicted_memory_gib"), "now_gib": pred.peak_memory_gib,
                         "now_fits": pred.fits, "peak_at": fullest.memory.peak_phase,
                         "profile": str(found.relative_to(ROOT)) if found and found.is_relative_to(ROOT) else
                         (f"{call.name}/profiles/{found.name}" if found else "-")})
    return rows


def _pct(predicted: float | None, measured: float | None) -> str:
    """Measured over predicted, as the campaign reports it (-2.6%: the run peaked 2.6% below the prediction)."""
    if predicted is None or measured is None or not predicted:
        return "-"
    return f"{100 * (measured - predicted) / predicted:+.1f}%"


def render(rows: list[dict], results: Path, overrides: list[str] | None = None, every_row: bool = False) -> str:
    lines = [f"# Replay: {results.name} re-predicted with today's cost model",
             "", f"Machine: {platform.machine()}, Python {platform.python_version()}; date "
             f"{datetime.date.today().isoformat()}. Command: `python3 benchmarks/replay.py --results "
             f"{results.relative_to(ROOT)}" + "".join(f" --profile {o}" for o in overrides or [])
             + (" --every-row" if every_row else "") + "`.",
             "", "Measured: the run's median step time and peak allocated memory on its fullest GPU (from the committed "
             "rows; a case re-run by a later call keeps the later call's rows). Then: the prediction when it ran. Now: "
             "`predict` today, same plan, engine and profile. Errors: measured over predicted, as in the campaign. "
             "Peak at: the moment of the step the memory model puts the peak at. An OOM row is caught when today's "
             f"prediction says it does not fit (fit limit: usable memory / {1 + FRAGMENTATION:.2f}).", "",
             "| case | plan | engine | config | step measured (s) | error then | error now | memory measured (GiB) "
             "| error then | error now | peak at | status | profile now |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    within, step_within, ran, caught, ooms = 0, 0, 0, 0, 0
    for r in rows:
        if r["status"] == "ran":
            ran += 1
            within += abs(r["measured_gib"] - r["now_gib"]) <= 0.10 * r["now_gib"]
            step_within += abs(r["step_measured_s"] - r["step_now_s"]) <= 0.10 * r["step_now_s"]
            status = "ran"
        else:
            ooms += 1
            caught += not r["now_fits"]
            status = ("oom" if r["status"] == "oom" else "host oom") + ": " + (
                "caught (does not fit now)" if not r["now_fits"] else "missed (fits now)")
        step = "-" if r["step_measured_s"] is None else f"{r['step_measured_s']:.3f}"
        mem = "-" if r["measured_gib"] is None else f"{r['measured_gib']:.1f}"
        lines.append(f"| {r['case']} | {r['plan']} | {r['engine']} | {r['config']} | {step} | "
                     f"{_pct(r['step_then_s'], r['step_measured_s'])} | {_pct(r['step_now_s'], r['step_measured_s'])} | "
                     f"{mem} | {_pct(r['then_gib'], r['measured_gib'])} | {_pct(r['now_gib'], r['measured_gib'])} | "
                     f"{r['peak_at']} | {status} | {r['profile']} |")
    lines += ["", f"Runs within 10% now: step time {step_within} of {ran}, memory {within} of {ran}; out-of-memory runs "
              f"the model now says do not fit: {caught} of {ooms}.", ""]
    lines += rank_table(rows)
    return "\n".join(lines) + "\n"


def case_spearman(rows: list[dict]) -> dict[str, tuple[int, float | None, float | None]]:
    """case -> (plans that ran, Spearman of the predicted against the measured step times as run, and now)."""
    out = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        ran = [r for r in rows if r["case"] == case and r["status"] == "ran"]
        measured = [r["step_measured_s"] for r in ran]
        out[case] = (len(ran), spearman([r["step_then_s"] for r in ran], measured),
                     spearman([r["step_now_s"] for r in ran], measured))
    return out


def rank_table(rows: list[dict]) -> list[str]:
    """Per case: does the cost model order the plans as they measured (the campaign's Spearman target, >= 0.9)?"""
    lines = ["Rank agreement per case (Spearman of predicted against measured step time over the plans that ran; a "
             "reused run counts once per plan, as in the campaign):", "",
             "| case | plans | Spearman as run | Spearman now |", "|---|---|---|---|"]
    for case, (n, then, now) in case_spearman(rows).items():
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {case} | {n} | {fmt(then)} | {fmt(now)} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "campaign_2xh200")
    ap.add_argument("-o", "--out", type=Path, default=None)
    ap.add_argument("--profile", action="append", default=[], metavar="ENGINE:PATH",
                    help="re-predict ENGINE's rows with this profile (matching model and sequence length) instead of "
                         "the plan's; repeatable")
    ap.add_argument("--every-row", action="store_true",
                    help="every call's rows, no merge by case (campaign_2xh200/engines: one case per engine)")
    args = ap.parse_args()
    results = args.results.resolve()
    overrides: dict[str, list[Path]] = {}
    for item in args.profile:
        engine, sep, path = item.partition(":")
        if not sep or engine not in ("torch", "deepspeed", "megatron") or not Path(path).is_file():
            _fail(f"replay: --profile {item!r}: expected ENGINE:PATH to an existing profile (ENGINE: torch, "
                  f"deepspeed, megatron)")
        overrides.setdefault(engine, []).append(Path(path))
    text = render(replay(results, overrides, merge=not args.every_row), results, args.profile, args.every_row)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
