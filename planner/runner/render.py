"""Rich rendering of a run report (CLI layer only)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from planner.runner.report import Report


def _s(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _pct(x: float | None, tol: float) -> str:
    if x is None:
        return "n/a"
    color = "green" if abs(x) <= tol else "red"
    return f"[{color}]{100 * x:+.1f}%[/]"


def report_tables(r: Report) -> list[Table]:
    title = f"{escape(r.plan)} ({r.config}) on {r.world_size} x {r.device}, engine {r.engine}, {r.dtype}"
    time = Table(title=title, title_justify="left")
    for col in ("", "predicted", "measured (median)", "p10 - p90", "error"):
        time.add_column(col, justify="right" if col else "left")
    spread = "n/a" if r.step_time_p10_s is None else f"{_s(r.step_time_p10_s)} - {_s(r.step_time_p90_s)}"
    time.add_row("step time (s)", _s(r.predicted_step_time_s), _s(r.measured_step_time_s), spread,
                 _pct(r.step_time_error, r.tolerance))

    mem = Table(title="peak memory per pipeline stage (GiB per GPU)", title_justify="left")
    for col in ("stage", "ranks", "predicted", "allocated", "reserved", "error", "median step (s)"):
        mem.add_column(col, justify="right")
    for s in r.stages:
        ranks = f"{s.ranks[0]}-{s.ranks[-1]}" if len(s.ranks) > 1 else str(s.ranks[0])
        mem.add_row(str(s.stage), ranks, f"{s.predicted_memory_gib:.2f}",
                    "not measured" if s.peak_allocated_gib is None else f"{s.peak_allocated_gib:.2f}",
                    "" if s.peak_reserved_gib is None else f"{s.peak_reserved_gib:.2f}", _pct(s.memory_error, r.tolerance),
                    _s(s.median_step_time_s))
    tables = [time, mem]

    if r.numerics is not None and r.numerics.checked:
        n = r.numerics
        num = Table(title=f"numerics vs single process ({n.dtype}: rtol {n.rtol:g}, atol {n.atol:g})", title_justify="left")
        for col in ("step", "parallel loss", "single-process loss", "relative error"):
            num.add_column(col, justify="right")
        for k, (p, q) in enumerate(zip(n.parallel_losses, n.reference_losses)):
            num.add_row(str(k), f"{p:.6f}", f"{q:.6f}", f"{abs(p - q) / abs(q):.2e}" if q else "n/a")
        tables.append(num)

    traced = [rk for rk in r.ranks if isinstance(rk.get("trace"), dict) and rk["trace"].get("wall_s")]
    if traced:  # --trace (planner/runner/trace.py): one extra step, profiled
        tr = Table(title="traced step (one extra, profiled; not in the step times)", title_justify="left")
        for col in ("rank", "step (s)", "GPU busy (s)", "compute busy (s)", "GPU idle", "kernel seconds by kind"):
            tr.add_column(col, justify="left" if col.startswith("kernel") else "right")
        for rk in traced:
            t = rk["trace"]
            kinds = ", ".join(f"{k} {v:.3g}" for k, v in sorted(t["by_category_s"].items(), key=lambda kv: -kv[1]))
            tr.add_row(str(rk["rank"]), _s(t["wall_s"]), _s(t["busy_s"]), _s(t["compute_busy_s"]),
                       f"{100 * t['idle_s'] / t['wall_s']:.0f}%", kinds or "no GPU kernels")
        tables.append(tr)

    peaks = [rk for rk in r.ranks if isinstance(rk.get("memory_peak"), dict)]
    if peaks:  # --memory-peak (planner/runner/memory_peak.py): one extra step, the allocator's history recorded
        mp = Table(title="memory at one extra step's peak (GiB; allocated in the step, by where)", title_justify="left")
        for col in ("rank", "before the step", "step peak", "largest places live at the peak"):
            mp.add_column(col, justify="left" if col.startswith("largest") else "right")
        for rk in peaks:
            m = rk["memory_peak"]
            places = "; ".join(f"{p['gib']:.2f} {escape(p['where'])}" for p in m["live_at_peak"][:3])
            mp.add_row(str(rk["rank"]), f"{m['before_step_gib']:.2f}", f"{m['step_peak_gib']:.2f}", places or "none")
        tables.append(mp)

    if r.failures:
        fail = Table(title="failures", title_justify="left")
        for col in ("rank", "step", "kind", "reason"):
            fail.add_column(col)
        for f in r.failures:
            style = "bold red" if f.primary else "dim"
            fail.add_row(str(f.rank), str(f.step) if f.step >= 0 else "start-up", f.kind, escape(f.reason), style=style)
        tables.append(fail)
    return tables


def render_report(console: Console, r: Report, report_path: str | None = None) -> None:
    for t in report_tables(r):
        console.print(t)
    for line in r.verdict:
        console.print(f"  {escape(line)}", highlight=False)
    c = r.calibration or {}
    for line in c.get("applied", ()):  # what the verified prediction took from --profile and --calibration
        console.print(f"  {escape(line)}", highlight=False)
    if c.get("file"):
        factors = ", ".join(f"{k} x{v:.3g}" for k, v in sorted(c.get("factors", {}).items()))
        console.print(f"calibration of the {c.get('engine')} engine for {escape(str(c.get('model')))} ({c.get('runs')} "
                      f"run(s)) written to {escape(str(c['file']))}: {factors}; predicted step time "
                      f"{c.get('predicted_before_s', 0):.4g} s -> {c.get('predicted_after_s', 0):.4g} s "
                      f"(measured {c.get('measured_step_time_s', 0):.4g} s)", highlight=False)
    k = r.checkpoint or {}
    if k:
        resumed = f"resumed after step {k['resumed_from_step']}; " if k.get("resumed_from_step") is not None else ""
        console.print(f"  checkpoints in {escape(str(k.get('dir')))}: {resumed}saved after steps "
                      f"{', '.join(map(str, k.get('saved_steps') or [])) or 'none'} ({k.get('save_s', 0):.3g} s saving, "
                      f"outside the step times)", highlight=False)
    verdict = "[bold green]PASSED[/]" if r.passed else "[bold red]FAILED[/]"
    where = f"; report written to {escape(report_path)}" if report_path else ""
    console.print(f"verification {verdict} (tolerance {100 * r.tolerance:.0f}%){where}")
