"""The preset against the GPUs (issue 24): for every run measured on one or two Hopper GPUs, the prediction without
a profile (the cluster preset, kernel database and all), the prediction with the profile measured on that GPU, and
the measured step time and peak memory.

Rows come from two places:
- the campaigns (benchmarks/results/campaign_<machine>/, through benchmarks/replay.py: the plan that ran, its
  engine and its profile; each case from the last call that ran it);
- the pre-registered shapes (benchmarks/results/preset_check/<machine>/: the plans of preset_check/plans/, the
  reports `distplan run` wrote and the quick profile measured in the same device call,
  benchmarks/device_preset_check.sh).
Errors are measured over predicted, as the campaign reports them. Targets: the preset within 10% of the measured
step time, the profile within 5%.

Usage: python3 benchmarks/preset_vs_measured.py [--campaign DIR ...] [--check DIR ...] [-o OUT.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from replay import replay  # noqa: E402
from planner.core.cluster import load_cluster  # noqa: E402
from planner.core.fileio import read_yaml  # noqa: E402
from planner.core.plan import load_plan  # noqa: E402
from planner.cost.predict import predict  # noqa: E402
from planner.cost.profiled import load_profile, profile_for_job  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CAMPAIGNS = ("campaign_1xh100", "campaign_1xh200", "campaign_2xh200")
CHECKS = ("preset_check/h100", "preset_check/h200")
PRESETS = {"dgx-h100-80gb": "dgx-h100-80gb", "h200-141gb": "h200-141gb"}  # a plan's cluster -> today's preset
PRESET_TARGET, PROFILE_TARGET = 0.10, 0.05  # issue 24's bars


def campaign_rows(results: Path) -> list[dict]:
    out = []
    for r in replay(results, presets=PRESETS):
        if r["status"] != "ran":
            continue
        out.append({"source": f"{results.name}/{r['call']}", "case": r["case"], "plan": r["plan"],
                    "engine": r["engine"], "config": r["config"], "measured_s": r["step_measured_s"],
                    "measured_gib": r["measured_gib"], "preset_s": r["preset_s"], "preset_gib": r["preset_gib"],
                    "profile_s": r["step_now_s"], "profile_gib": r["now_gib"],
                    "database": r["preset_sources"].get("compute.block.tp1", "-")})
    return out


def check_rows(folder: Path) -> list[dict]:
    """Rows of one machine's pre-registered runs: every report under `folder` with its plan and profile."""
    out = []
    for report_path in sorted(folder.glob("*.report.yaml")):
        report = read_yaml(report_path, "run report")
        name = report_path.name.removesuffix(".report.yaml")
        plan = load_plan(RESULTS / "preset_check" / "plans" / f"{name}.yaml")
        model, gpu = name.split(f"-{folder.name}-")[0], folder.name
        prof_path = folder / f"profile-{model}-{gpu}.yaml"
        engine = report.get("engine", "torch")
        bare = predict(plan.model, load_cluster(PRESETS[plan.cluster.name.split("+")[0]]), plan.parallel, None,
                       engine=engine)
        profiled = None
        if prof_path.exists():
            prof = profile_for_job(load_profile(prof_path), plan.model, plan.parallel.seq_len, source=str(prof_path))
            profiled = predict(plan.model, plan.cluster, plan.parallel, prof, engine=engine)
        out.append({"source": str(folder.relative_to(RESULTS)), "case": model, "plan": name.split(f"-{gpu}-")[1],
                    "engine": engine, "config": report.get("config", ""),
                    "measured_s": report.get("measured_step_time_s"), "measured_gib": report.get("peak_allocated_gib"),
                    "preset_s": bare.step_time_s, "preset_gib": bare.peak_memory_gib,
                    "profile_s": profiled.step_time_s if profiled else None,
                    "profile_gib": profiled.peak_memory_gib if profiled else None,
                    "database": dict(bare.sources).get("compute.block.tp1", "-")})
    return out


def _err(predicted: float | None, measured: float | None) -> float | None:
    return None if not predicted or measured is None else (measured - predicted) / predicted


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def render(rows: list[dict], command: str) -> str:
    lines = [f"Machine: {platform.machine()}, Python {platform.python_version()}; date "
             f"{datetime.date.today().isoformat()}. Command: `{command}`.", "",
             "| source | case | plan | engine | config | measured s | preset s | error | profile s | error "
             "| measured GiB | preset GiB | error | preset prices compute from |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    counts = {"preset": [0, 0], "profile": [0, 0]}
    for r in rows:
        e_pre, e_prof = _err(r["preset_s"], r["measured_s"]), _err(r["profile_s"], r["measured_s"])
        for key, e, bar in (("preset", e_pre, PRESET_TARGET), ("profile", e_prof, PROFILE_TARGET)):
            if e is not None:
                counts[key][0] += abs(e) <= bar
                counts[key][1] += 1
        fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append(f"| {r['source']} | {r['case']} | {r['plan']} | {r['engine']} | {r['config']} | "
                     f"{fmt(r['measured_s'])} | {fmt(r['preset_s'])} | {_pct(e_pre)} | {fmt(r['profile_s'])} | "
                     f"{_pct(e_prof)} | {fmt(r['measured_gib'], 1)} | {fmt(r['preset_gib'], 1)} | "
                     f"{_pct(_err(r['preset_gib'], r['measured_gib']))} | {r['database']} |")
    lines += ["", f"Step time: preset within {PRESET_TARGET:.0%} on {counts['preset'][0]} of {counts['preset'][1]} rows; "
              f"profile within {PROFILE_TARGET:.0%} on {counts['profile'][0]} of {counts['profile'][1]}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--campaign", action="append", default=None, help="campaign results folder (repeatable)")
    ap.add_argument("--check", action="append", default=None, help="preset_check/<machine> folder (repeatable)")
    ap.add_argument("-o", "--out", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for c in args.campaign if args.campaign is not None else [str(RESULTS / c) for c in CAMPAIGNS]:
        rows += campaign_rows(Path(c).resolve())
    for c in args.check if args.check is not None else [str(RESULTS / c) for c in CHECKS]:
        if Path(c).is_dir():
            rows += check_rows(Path(c).resolve())
    text = render(rows, "python3 benchmarks/preset_vs_measured.py " + " ".join(sys.argv[1:]))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
