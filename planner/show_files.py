"""`distplan show`'s files: a plan's timeline and memory chart (planner/pictures.py) and its HTML report
(planner/htmlreport.py), drawn from planner/show.py's review, checked, then written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from planner.core.errors import require
from planner.core.fileio import atomic_write_bytes, atomic_write_text
from planner.core.plan import load_plan
from planner.show import load_measurements, memory_chart_of, plan_review, timeline_of


@dataclass(frozen=True)
class ShowResult:
    review: dict
    written: tuple[Path, ...]  # pictures and report files written, in order


def show_plan(path: str | Path, timeline: str | Path | None = None, memory_chart: str | Path | None = None,
              report: str | Path | None = None, measured: list[str | Path] | tuple = ()) -> ShowResult:
    """Load a plan, review it, and write the pictures and the HTML report asked for.

    Every output is checked (suffix, a file not a folder, a writable folder, no two the same) and everything
    is drawn before the first file is written, each atomically: a bad output writes nothing at all.
    """
    from planner.htmlreport import check_report_path, report_html  # matplotlib and the report: only when asked
    from planner.pictures import check_picture_path, figure_bytes

    plan = load_plan(path)
    review = plan_review(plan)
    records = load_measurements(*measured) if measured else None
    if records:
        review["measured"] = records
    targets: dict[str, Path] = {}
    for flag, target in (("--timeline", timeline), ("--memory-chart", memory_chart), ("--report", report)):
        if target is None:
            continue
        checked = check_report_path(target, flag) if flag == "--report" else check_picture_path(target, flag)
        same = next((f for f, p in targets.items() if p.resolve() == checked.resolve()), None)
        require(same is None, f"{flag} '{target}' is also the {same} file; give each output its own file")
        targets[flag] = checked
    outputs: list[tuple[Path, str | bytes]] = []
    for flag, target in targets.items():
        if flag == "--report":
            outputs.append((target, report_html(plan, records)))
        else:
            fig = timeline_of(plan) if flag == "--timeline" else memory_chart_of(plan)
            outputs.append((target, figure_bytes(fig, target.suffix.lower().lstrip("."))))
    for target, data in outputs:
        (atomic_write_text if isinstance(data, str) else atomic_write_bytes)(target, data)
    return ShowResult(review=review, written=tuple(target for target, _ in outputs))
