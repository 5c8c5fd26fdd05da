"""Pictures of a plan (matplotlib, Agg; PNG or SVG): pipeline timeline, memory per stage, predicted vs measured.

Each `*_figure` builds a matplotlib Figure from data and touches no file and no global state (no
pyplot: figures are independent objects, so concurrent callers do not share a current figure).
`save_figure` writes one; `figure_bytes` gives PNG or SVG bytes for the HTML report.
"""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from planner.core.errors import require
from planner.core.fileio import atomic_write_bytes, check_writable
from planner.core.prediction import FRAGMENTATION
from planner.cost.pipeline import PHASES, Schedule

# colour per timeline phase
PHASE_COLORS = {
    "forward": "#4C72B0",  # blue
    "backward": "#55A868",  # green
    "recompute": "#8172B3",  # purple
    "p2p": "#C44E52",  # red: pipeline send/receive
    "grad_sync": "#DD8452",  # orange: data-parallel gradient reduction
    "optimizer": "#937860",  # brown
    "bubble": "#EEEEEE",  # idle
}
# legend label per timeline phase
PHASE_LABELS = {
    "forward": "forward", "backward": "backward", "recompute": "recompute (forward re-run)",
    "p2p": "pipeline p2p (send/recv)", "grad_sync": "data-parallel grad sync", "optimizer": "optimizer step",
    "bubble": "bubble (idle)",
}
# the memory terms drawn, bottom up
MEMORY_PARTS = ("weights", "gradients", "optimizer", "activations", "logits", "buffers")
MEMORY_COLORS = {"weights": "#4C72B0", "gradients": "#55A868", "optimizer": "#DD8452", "activations": "#C44E52",
                 "logits": "#8172B3", "buffers": "#937860"}
FORMATS = ("png", "svg")  # image formats written (matplotlib)
MAX_LABELS = 400  # micro-batch numbers are written into blocks only while they stay readable
FIG_WIDTH_IN, DPI = 13, 110  # timeline size: 1430 px wide, fits a laptop screen and the report's 1180 px column
AXES_PX = FIG_WIDTH_IN * DPI * 0.85  # the time axis's width in pixels (the rest: stage labels and margins)
MIN_BLOCK_PX = 3  # below this a block is a hairline: passes are merged into runs (timeline_figure's aggregation)


def _shade(color: str, chunk: int, vpp: int) -> tuple[float, float, float]:
    """Later model chunks of the interleaved schedule are drawn lighter (mixed with white)."""
    if vpp <= 1:
        return to_rgb(color)
    w = 0.55 * chunk / (vpp - 1)
    r, g, b = to_rgb(color)
    return (r + (1 - r) * w, g + (1 - g) * w, b + (1 - b) * w)


def _time_unit(seconds: float) -> tuple[str, float]:
    return ("ms", 1e3) if seconds < 2.0 else ("s", 1.0)


def _op_runs(schedule: Schedule, rank: int, min_gap_s: float) -> list[dict]:
    """`rank`'s passes merged into runs: its warm-up forwards, its steady forward/backward alternation and its
    cool-down backwards, each split where the rank idles at least `min_gap_s`. A run: start_s, end_s, busy
    seconds per phase, forwards, backwards and class ('F' forwards only, 'B' backwards only, 'FB' alternating)."""
    ops: list[dict] = []  # one per pass: forward (+ its send) or recompute + backward (+ its send)
    kind = "F"
    for e in schedule.rank_events(rank, ("forward", "recompute", "backward", "p2p")):
        kind = {"forward": "F", "recompute": "B", "backward": "B"}.get(e.phase, kind)
        key = (kind, e.microbatch, e.chunk)
        if not ops or ops[-1]["key"] != key:
            ops.append({"key": key, "kind": kind, "start_s": e.start_s, "end_s": e.end_s, "busy": {}})
        op = ops[-1]
        op["end_s"] = e.end_s
        op["busy"][e.phase] = op["busy"].get(e.phase, 0.0) + e.duration_s
    kinds = [o["kind"] for o in ops]
    for i, o in enumerate(ops):  # a pass next to one of its own kind is warm-up or cool-down; else it alternates
        alone = (i == 0 or kinds[i - 1] != o["kind"]) and (i == len(ops) - 1 or kinds[i + 1] != o["kind"])
        o["cls"] = "FB" if alone else o["kind"]
    runs: list[dict] = []
    for o in ops:
        r = runs[-1] if runs else None
        if r is None or r["cls"] != o["cls"] or o["start_s"] - r["end_s"] >= min_gap_s:
            r = {"cls": o["cls"], "start_s": o["start_s"], "end_s": o["end_s"], "busy": {}, "forwards": 0, "backwards": 0}
            runs.append(r)
        r["end_s"] = o["end_s"]
        r["forwards" if o["kind"] == "F" else "backwards"] += 1
        for phase, s in o["busy"].items():
            r["busy"][phase] = r["busy"].get(phase, 0.0) + s
    return runs


def _draw_aggregated(ax, schedule: Schedule, scale: float, height: float, min_gap_s: float, px_per_s: float) -> None:
    """Each run (see _op_runs) as one block whose bands, top to bottom, are its forward, recompute, backward and
    p2p time and its idle time, each as tall as its share of the run; idle gaps of at least `min_gap_s` and
    the gradient sync and optimizer step as themselves."""
    rects: dict[str, list] = {p: [] for p in PHASES}
    for rank in range(schedule.pp):
        for run in _op_runs(schedule, rank, min_gap_s):
            x0, span = run["start_s"] * scale, (run["end_s"] - run["start_s"]) * scale
            if span <= 0:
                continue
            y = rank - height / 2
            dur = run["end_s"] - run["start_s"]
            shares = {p: run["busy"].get(p, 0.0) / dur for p in ("forward", "recompute", "backward", "p2p")}
            shares["bubble"] = max(0.0, 1.0 - sum(shares.values()))
            for phase in ("forward", "recompute", "backward", "p2p", "bubble"):
                h = height * shares[phase]
                if h > 1e-3 * height:
                    rects[phase].append([(x0, y), (x0 + span, y), (x0 + span, y + h), (x0, y + h)])
                    y += h
            text = {"F": f"{run['forwards']} fwd", "B": f"{run['backwards']} bwd",
                    "FB": f"{run['forwards']} fwd + {run['backwards']} bwd"}[run["cls"]]
            if dur * px_per_s >= 6.5 * len(text) + 8:  # about 6.5 px per character at fontsize 7
                ax.text(x0 + span / 2, rank, text, ha="center", va="center", fontsize=7, color="black",
                        bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.75, "linewidth": 0})
    for e in schedule.events:
        if e.phase in ("grad_sync", "optimizer") or (e.phase == "bubble" and e.duration_s >= min_gap_s):
            x0, x1, y0, y1 = e.start_s * scale, e.end_s * scale, e.rank - height / 2, e.rank + height / 2
            rects[e.phase].append([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
    for phase, verts in rects.items():
        if verts:
            bubble = phase == "bubble"
            ax.add_collection(PolyCollection(verts, facecolors=PHASE_COLORS[phase], hatch="//" if bubble else None,
                                             edgecolors="#BBBBBB" if bubble else "none", linewidths=0.4 if bubble else 0))


def timeline_figure(schedule: Schedule, title: str = "", stage_labels: list[str] | None = None,
                    numbers: str = "") -> Figure:
    """The pipeline schedule: one row per pipeline rank, one block per chunk and micro-batch and phase.

    `numbers`: the step time and bubble to print (planner/show.py passes the plan's prediction); without
    it the title gives the schedule's own step, marked as simulated. When blocks would be narrower than
    MIN_BLOCK_PX, passes are merged into runs (see _draw_aggregated) and the picture says so.
    """
    pp, v = schedule.pp, schedule.vpp
    unit, scale = _time_unit(schedule.step_s)
    fig = Figure(figsize=(FIG_WIDTH_IN, 1.6 + 0.55 * pp), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    height = 0.8
    compute = [e for e in schedule.events if e.phase in ("forward", "backward")]
    px_per_s = AXES_PX / schedule.step_s if schedule.step_s > 0 else 0.0
    typical_px = sorted(e.duration_s for e in compute)[len(compute) // 2] * px_per_s if compute else 0
    aggregated = bool(compute) and typical_px < MIN_BLOCK_PX
    total = schedule.step_s * scale
    if aggregated:
        _draw_aggregated(ax, schedule, scale, height, MIN_BLOCK_PX / px_per_s, px_per_s)
    else:
        groups: dict[tuple[int, str, int], list[tuple[float, float]]] = {}
        for e in schedule.events:
            groups.setdefault((e.rank, e.phase, e.chunk), []).append((e.start_s * scale, e.duration_s * scale))
        # white separators between blocks only while blocks are several pixels wide; else they wash the colours out
        edge = 0.4 if typical_px >= 4 else 0.0
        for (rank, phase, chunk), spans in groups.items():
            kw = {"facecolors": _shade(PHASE_COLORS[phase], chunk, v) if phase in ("forward", "backward", "recompute")
                  else PHASE_COLORS[phase], "edgecolor": "white" if phase != "bubble" else "#BBBBBB",
                  "linewidth": edge if phase != "bubble" else 0.4}
            if phase == "bubble":
                kw["hatch"] = "//"
            ax.broken_barh(spans, (rank - height / 2, height), **kw)
        if len(compute) <= MAX_LABELS:
            for e in compute:
                w = e.duration_s * scale
                if w >= total * 0.012:
                    label = str(e.microbatch) if v == 1 else f"{e.microbatch}.{e.chunk}"
                    r, g, b = _shade(PHASE_COLORS[e.phase], e.chunk, v)
                    ax.text((e.start_s * scale) + w / 2, e.rank, label, ha="center", va="center", fontsize=7,
                            color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.6 else "white")
    if schedule.step_s > schedule.pipeline_s:
        ax.axvline(schedule.pipeline_s * scale, color="#555555", linestyle="--", linewidth=0.8)
        ax.annotate("pipeline ends", (schedule.pipeline_s * scale, -0.5), xytext=(3, 2), textcoords="offset points",
                    fontsize=7, color="#555555", va="bottom")
    ax.set_ylim(pp - 0.5, -0.5 - 0.35)  # rank 0 on top
    ax.set_yticks(range(pp), stage_labels or [f"stage {r}" for r in range(pp)])
    ax.set_xlim(0, total * 1.005)
    ax.set_xlabel(f"time within one training step ({unit})")
    ax.set_ylabel("pipeline rank")
    ax.grid(axis="x", color="#DDDDDD", linewidth=0.5)
    ax.set_axisbelow(True)
    present = {e.phase for e in schedule.events}
    handles = []
    for phase in PHASES:
        if phase not in present:
            continue
        if phase in ("forward", "backward") and v > 1 and not aggregated:
            handles.append(Patch(facecolor=PHASE_COLORS[phase], label=f"{phase} (lighter: later chunks)"))
        else:
            handles.append(Patch(facecolor=PHASE_COLORS[phase], hatch="//" if phase == "bubble" else None,
                                 edgecolor="#BBBBBB" if phase == "bubble" else None, label=PHASE_LABELS[phase]))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    head = (f"{schedule.kind} schedule: pp={pp}" + (f", vpp={v}" if v > 1 else "") + f", {schedule.num_microbatches} "
            "micro-batches; " + (numbers or f"simulated step {schedule.step_s:.3f} s"))
    if aggregated:
        head += (f"\naggregated (passes under {MIN_BLOCK_PX} px wide): one block per run of passes (warm-up, "
                 "alternating, cool-down); band heights = each phase's share of the run")
    ax.set_title(f"{title}\n{head}" if title else head, fontsize=10, loc="left")
    if not aggregated and len(compute) <= MAX_LABELS:
        fig.text(0.995, 0.005, "numbers: micro-batch" + (".chunk" if v > 1 else ""), ha="right", va="bottom",
                 fontsize=7, color="#777777")
    return fig


def memory_figure(stages: list[dict], capacity_gib: float, title: str = "",
                  allocator_slack: float = FRAGMENTATION, headline: str = "") -> Figure:
    """Stacked memory per GPU of each pipeline stage against the usable capacity and the fit limit.

    `stages`: the plan's prediction.stages entries (rank, layers, memory_breakdown_gib, memory_gib);
    `allocator_slack`: the plan's (its fit limit is capacity / (1 + slack)); `headline`: the numbers to
    print after the chart's name (planner/show.py passes the plan's peak and verdict).
    """
    require(stages, "memory chart: the plan has no stages")
    fig = Figure(figsize=(min(18.0, max(9.0, 3.5 + 0.75 * len(stages))), 5.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = list(range(len(stages)))
    bottoms = [0.0] * len(stages)
    for part in MEMORY_PARTS:
        vals = [float(s["memory_breakdown_gib"].get(part, 0.0)) for s in stages]
        if not any(vals):
            continue
        ax.bar(xs, vals, bottom=bottoms, color=MEMORY_COLORS[part], label=part, width=0.65, edgecolor="white", linewidth=0.5)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    limit = capacity_gib / (1 + allocator_slack)
    ax.axhline(capacity_gib, color="#B22222", linewidth=1.4, label=f"usable capacity {capacity_gib:.1f} GiB")
    ax.axhline(limit, color="#B22222", linewidth=1.0, linestyle="--",
               label=f"fit limit {limit:.1f} GiB ({100 * allocator_slack:.0f}% allocator slack)")
    totals = [float(s.get("memory_gib", b)) for s, b in zip(stages, bottoms)]
    top = max(max(bottoms), capacity_gib)
    for x, bar, total in zip(xs, bottoms, totals):
        over = total > limit
        ax.text(x, bar + top * 0.01, f"{total:.1f}", ha="center", va="bottom", fontsize=8,
                color="#B22222" if over else "black", fontweight="bold" if over else "normal")
    ax.set_ylim(0, top * 1.12)
    many = len(stages) > 8
    labels = [(f"{s.get('rank', i)}\n{s['layers'][0]}-{s['layers'][1]}" if many else
               f"stage {s.get('rank', i)}\nlayers {s['layers'][0]}-{s['layers'][1]}") if "layers" in s else str(i)
              for i, s in enumerate(stages)]
    ax.set_xticks(xs, labels, fontsize=7 if many else 8)
    ax.set_ylabel("memory per GPU (GiB)")
    ax.set_xlabel("pipeline stage (and the layers it holds)")
    ax.grid(axis="y", color="#DDDDDD", linewidth=0.5)
    ax.set_axisbelow(True)
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    head = "predicted peak memory per GPU, by pipeline stage" + (f": {headline}" if headline else "")
    ax.set_title(f"{head}\n{title}" if title else head, fontsize=10, loc="left")
    return fig


def comparison_figure(records: list[dict], title: str = "") -> Figure:
    """Predicted vs measured step time and peak memory per plan, after `distplan run`.

    records: [{name, predicted_step_s, measured_step_s, predicted_mem_gib, measured_mem_gib}];
    a measured value may be None (the run failed or did not report it).
    """
    require(records, "comparison chart: no records to draw")
    for i, r in enumerate(records):
        for key in ("name", "predicted_step_s", "predicted_mem_gib"):
            require(key in r, f"comparison record {i} lacks '{key}'; each needs name, predicted_step_s, "
                              "measured_step_s, predicted_mem_gib, measured_mem_gib")
    fig = Figure(figsize=(max(8.0, 2.0 + 1.6 * len(records)), 4.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    xs = list(range(len(records)))
    names = [str(r["name"]) for r in records]
    for ax, (pred_key, meas_key, ylabel) in zip(axes, (("predicted_step_s", "measured_step_s", "step time (s)"),
                                                      ("predicted_mem_gib", "measured_mem_gib", "peak memory per GPU (GiB)"))):
        pred = [float(r[pred_key]) for r in records]
        meas = [r.get(meas_key) for r in records]
        ax.bar([x - 0.2 for x in xs], pred, width=0.4, color="#4C72B0", label="predicted")
        ax.bar([x + 0.2 for x in xs], [float(m) if m is not None else 0.0 for m in meas], width=0.4,
               color="#DD8452", label="measured")
        top = max(pred + [float(m) for m in meas if m is not None])
        for x, p, m in zip(xs, pred, meas):
            text = "not measured" if m is None else f"{100 * (float(m) - p) / p:+.1f}%" if p else f"{float(m):.2f}"
            ax.text(x + 0.2, (float(m) if m is not None else 0.0) + top * 0.01, text, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, names, rotation=15 if len(records) > 3 else 0, fontsize=8)
        ax.set_xlabel("plan")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, top * 1.15)
        ax.grid(axis="y", color="#DDDDDD", linewidth=0.5)
        ax.set_axisbelow(True)
        ax.legend(fontsize=8, frameon=False, loc="upper left")
    axes[0].set_title("step time", fontsize=10, loc="left")
    axes[1].set_title("peak memory per GPU", fontsize=10, loc="left")
    head = "predicted vs measured per plan (labels: measured error, % of predicted)"
    fig.suptitle(f"{title}: {head}" if title else head, fontsize=11)
    return fig


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    require(fmt in FORMATS, f"picture format '{fmt}' is unknown; valid: {', '.join(FORMATS)}")
    buf = io.BytesIO()
    if fmt == "svg":
        # glyphs as paths (matplotlib's default): the picture looks the same without the fonts it was laid out with
        fig.savefig(buf, format="svg", facecolor="white", metadata={"Date": None})
    else:
        fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def check_picture_path(path: str | Path, what: str = "picture") -> Path:
    """`path` if a picture can be written there (suffix .png or .svg, see fileio.check_writable); else a DistplanError."""
    path = Path(path)
    check_writable(path, what)
    require(path.suffix.lower().lstrip(".") in FORMATS,
            f"{what} '{path}': the suffix must be .png or .svg, got '{path.suffix or '(none)'}'")
    return path


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as PNG or SVG, chosen by the file's suffix, atomically."""
    path = check_picture_path(path)
    atomic_write_bytes(path, figure_bytes(fig, path.suffix.lower().lstrip(".")))
    return path
