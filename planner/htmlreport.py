"""One self-contained HTML file reviewing a plan: key numbers, layout, stages, time, memory, pictures, why it won.

No external assets: CSS inline, pictures as data: URIs (SVG, or PNG when the SVG would be large),
no scripts; a Content-Security-Policy forbids loading anything else, so the file opens the same
offline, from a mail attachment or a CI artifact.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from planner.core.errors import require
from planner.core.fileio import atomic_write_text, check_writable
from planner.core.plan import Plan, plan_to_yaml
from planner.show import gpu_indices, memory_chart_of, plan_review, timeline_of

MAX_SVG_BYTES = 2_500_000  # beyond this (many thousands of blocks) the timeline is embedded as PNG
MAX_GPU_CELLS = 128  # GPU map: one box per GPU up to 16 nodes of 8; beyond, one per node (thousands would not read)
NODE_COLUMNS = 8  # GPU map boxes per row when it draws one per node
# the letter naming each parallel axis in GPU labels
AXIS_LETTERS = {"stage": "s", "dp": "d", "cp": "c", "tp": "t", "ep": "e"}
# ... and its name in words
AXIS_NAMES = {"stage": "pipeline stage", "dp": "data-parallel replica", "cp": "context-parallel rank",
              "tp": "tensor-parallel shard", "ep": "expert-parallel rank"}
STAGE_HUES = (210, 140, 30, 280, 0, 180, 60, 320, 100, 240)  # HSL hue per pipeline stage, in turn

# the report's style sheet
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:1.5rem;margin:0 0 4px} h2{font-size:1.15rem;margin:0 0 10px;border-bottom:1px solid #e2e5ea;padding-bottom:6px}
.sub{color:#5a6272;margin:0 0 18px} section{background:#fff;border:1px solid #e2e5ea;border-radius:8px;padding:16px 18px;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{flex:1 1 160px;border:1px solid #e2e5ea;border-radius:8px;padding:10px 12px;background:#fbfcfd}
.card .k{font-size:.78rem;color:#5a6272;text-transform:uppercase;letter-spacing:.04em}.card .v{font-size:1.35rem;font-weight:600;margin-top:2px}
.ok{color:#1a7f37}.bad{color:#b42318} table{border-collapse:collapse;width:100%;font-size:.88rem}
th,td{padding:5px 8px;border-bottom:1px solid #eef0f3;text-align:right;vertical-align:top} th{background:#f3f5f8;font-weight:600}
td:not(.l){white-space:nowrap}
td.l,th.l{text-align:left} .bar{background:#4C72B0;height:10px;border-radius:2px;display:inline-block}
.grid{display:grid;gap:3px;font-size:.72rem;margin:8px 0} .gpu{border-radius:4px;padding:4px 2px;text-align:center;color:#111}
.node{font-size:.75rem;color:#5a6272;align-self:center}
.swatches{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:.78rem;color:#5a6272}
.sw i{display:inline-block;width:12px;height:12px;border-radius:3px;margin-right:4px;vertical-align:-2px} img.pic{max-width:100%;height:auto;border:1px solid #eef0f3}
ul.why li{margin:4px 0} pre{background:#f3f5f8;padding:10px;overflow:auto;font-size:.78rem;max-height:480px}
.muted{color:#5a6272;font-size:.85rem} code{background:#f3f5f8;padding:1px 4px;border-radius:3px}
"""


def _num(x, fmt: str, missing: str = "-") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else missing


def _picture(fig, alt: str) -> str:
    from planner.pictures import figure_bytes

    data, mime = figure_bytes(fig, "svg"), "image/svg+xml"
    if len(data) > MAX_SVG_BYTES:
        data, mime = figure_bytes(fig, "png"), "image/png"
    return f'<img class="pic" alt="{escape(alt)}" src="data:{mime};base64,{base64.b64encode(data).decode()}">'


def _table(head: list[str], rows: list[list[str]], left: int = 1, last_left: bool = False) -> str:
    """Cells are already-escaped HTML; the first `left` columns (and the last, if `last_left`) are left-aligned."""
    n = len(head)

    def cls(i: int) -> str:
        return "l" if i < left or (last_left and i == n - 1) else ""

    th = "".join(f'<th class="{cls(i)}">{h}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{cls(i)}">{c}</td>' for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _cards(rv: dict) -> str:
    pr = rv["prediction"]
    fit = (f'<span class="ok" data-key="fits">fits</span>' if pr["fits"]
           else f'<span class="bad" data-key="fits">does not fit</span>')
    cards = [("step time", f'<span data-key="step_time_s">{pr["step_time_s"]:.3f} s</span>'),
             ("throughput", f'<span data-key="tokens_per_s">{pr["tokens_per_s"]:,.0f}</span> tokens/s'),
             ("MFU", f'<span data-key="mfu">{100 * pr["mfu"]:.1f}%</span>'),
             ("peak memory per GPU", f'<span data-key="peak_memory_gib">{pr["peak_memory_gib"]:.2f} GiB</span> '
                                     f'<span class="muted">/ {pr["capacity_gib"]:.1f}</span>'),
             *([("pessimistic step", f'<span data-key="pessimistic_step_time_s">{pr["pessimistic"]["step_time_s"]:.3f} s'
                                     f'</span> <span class="muted">unchecked: '
                                     f'{escape(", ".join(pr["pessimistic"]["unchecked"]))}</span>')]
               if pr.get("pessimistic") else []),
             ("memory check", fit),
             ("pipeline bubble", f'{100 * rv["schedule"]["bubble_share"]:.1f}% of the step')]
    return '<div class="cards">' + "".join(f'<div class="card"><div class="k">{k}</div><div class="v">{v}</div></div>'
                                           for k, v in cards) + "</div>"


def _why(rv: dict) -> str:
    parts = []
    if rv["rationale"]:
        parts.append('<ul class="why">' + "".join(f"<li>{escape(r)}</li>" for r in rv["rationale"]) + "</ul>")
    else:
        parts.append('<p class="muted">This plan records no rationale (made by hand or by <code>distplan estimate</code>).</p>')
    alts = rv["alternatives"]
    if alts:
        rows = [[escape(a["name"]), _num(a["step_time_s"], ".3f"),
                 _num(a["slower_pct"], "+.1f") + ("%" if a["slower_pct"] is not None else ""),
                 _num(a["peak_memory_gib"], ".1f"),
                 "-" if a["fits"] is None else ("yes" if a["fits"] else '<span class="bad">no</span>'),
                 escape(a["why_lost"]) or "-"] for a in alts]
        parts.append("<h3>Alternatives considered, and why each lost</h3>"
                     + _table(["configuration", "step time (s)", "vs chosen", "peak GiB/GPU", "fits", "why it lost"], rows,
                            last_left=True))
    return "".join(parts)


def _stage_colour(stage: int) -> str:
    return f"hsl({STAGE_HUES[stage % len(STAGE_HUES)]},60%,{88 - 14 * (stage // len(STAGE_HUES) % 3)}%)"


def _span(values) -> str:
    """'3' for one value, '0-7' for a contiguous run, else the values (at most 4, then '...')."""
    vs = sorted(set(values))
    if len(vs) == 1:
        return str(vs[0])
    if vs == list(range(vs[0], vs[-1] + 1)):
        return f"{vs[0]}-{vs[-1]}"
    return ",".join(map(str, vs[:4])) + (",..." if len(vs) > 4 else "")


def _axes_label(cells: list[dict], keys: tuple[str, ...]) -> str:
    """'s0 d1 c0 t3' for one GPU; each axis's span ('s0 d0 c0-7 t0') for a node."""
    return " ".join(f"{AXIS_LETTERS[k]}{_span(c[k] for c in cells)}" for k in keys)


def _gpu_grid(rv: dict) -> str:
    plan, layout, par = rv["plan"], rv["layout"], rv["parallel"]
    gpn, pp = plan["gpus_per_node"], par["pp"]
    where = gpu_indices(layout)
    keys = ("stage", "dp", "cp", "tp") + (("ep",) if par.get("ep", 1) > 1 else ())
    layers = {st["stage"]: st["layers"] for st in layout}
    per_gpu = plan["gpus"] <= MAX_GPU_CELLS
    cells = []
    for node in range(plan["nodes"]):
        gpus = [g for g in range(node * gpn, min((node + 1) * gpn, plan["gpus"])) if g in where]
        if per_gpu:
            cells.append(f'<div class="node">node {node}</div>')
            for g in gpus:
                w = where[g]
                stage = w["stage"]
                title = (f"GPU {g} (node {node}): stage {stage} (layers {layers[stage][0]}-{layers[stage][1]}), "
                         + ", ".join(f"{AXIS_NAMES[k]} {w[k]}" for k in keys[1:]))
                cells.append(f'<div class="gpu" data-gpu="{g}" style="background:{_stage_colour(stage)}" '
                             f'title="{escape(title)}">{g}<br>{_axes_label([w], keys)}</div>')
            continue
        group = [where[g] for g in gpus]
        stages = sorted({w["stage"] for w in group})
        colours = [_stage_colour(st) for st in stages]
        background = colours[0] if len(colours) == 1 else f"linear-gradient(90deg,{','.join(colours)})"
        title = f"node {node}, GPUs {gpus[0]}-{gpus[-1]}: " + ", ".join(
            f"{AXIS_NAMES[k]} {_span(w[k] for w in group)}" for k in keys)
        cells.append(f'<div class="gpu" data-node="{node}" style="background:{background}" title="{escape(title)}">'
                     f"node {node}<br>GPUs {gpus[0]}-{gpus[-1]}<br>{_axes_label(group, keys)}</div>")
    columns = (f"70px repeat({gpn},minmax(64px,1fr))" if per_gpu
               else f"repeat({min(plan['nodes'], NODE_COLUMNS)},minmax(110px,1fr))")
    grid = f'<div class="grid" style="grid-template-columns:{columns}">{"".join(cells)}</div>'
    letters = ", ".join(f"<b>{AXIS_LETTERS[k]}</b> {AXIS_NAMES[k]}" for k in keys)
    unit = ("Each box is one GPU: its global rank, then " if per_gpu else
            f"{plan['gpus']} GPUs: each box is one node of {gpn} GPUs, with the range of each index it holds: ")
    legend = (f'<p class="muted">{unit}{letters}. Rank order: tp innermost, then cp, dp, pp outermost, as '
              f'Megatron-LM{" (ep: consecutive dp x cp ranks)" if "ep" in keys else ""}. {pp} stage(s), '
              f'{par["dp"]} data-parallel replica(s) of each. Colour: pipeline stage. Hover a box for details.</p>')
    swatches = "".join(f'<span class="sw"><i style="background:{_stage_colour(st["stage"])}"></i>stage {st["stage"]}: '
                       f'layers {st["layers"][0]}-{st["layers"][1]}, GPUs {st["gpus"]}</span>' for st in layout)
    rows = [[f"{st['stage']}", f"{st['layers'][0]}-{st['layers'][1]}", st["gpus"], st["nodes"],
             escape("; ".join(" ".join(str(g) for g in r["gpus"]) for r in st["replicas"][:4])
                    + ("; ..." if len(st["replicas"]) > 4 else ""))] for st in layout]
    table = _table(["stage", "layers", "GPUs", "nodes", "tensor-parallel groups (GPUs sharing one layer)"], rows, left=0, last_left=True)
    return legend + f'<div class="swatches">{swatches}</div>' + grid + table


def _stages(rv: dict) -> str:
    rows = []
    for s in rv["stages"]:
        g = s["memory_breakdown_gib"]
        holds = ", ".join(x for x, on in (("embedding", s["holds_embedding"]), ("head", s["holds_head"])) if on) or "-"
        rows.append([str(s["rank"]), f"{s['layers'][0]}-{s['layers'][1]} ({s['num_layers']})", s["devices"], holds,
                     f"{1e3 * s['time_per_microbatch_s']:.2f}", str(s["inflight_microbatches"]),
                     *(_num(g.get(k), ".2f") for k in ("weights", "gradients", "optimizer", "activations", "logits", "buffers")),
                     f"<b>{s['memory_gib']:.2f}</b>"])
    return _table(["stage", "layers", "GPUs", "holds", "ms / micro-batch", "in-flight mb", "weights", "grads", "optimizer",
                   "activations", "logits", "buffers", "total GiB"], rows, left=0)


def _breakdown(rv: dict) -> str:
    rows = []
    for b in rv["breakdown"]:
        if b["seconds"] <= 0:
            continue
        rows.append([escape(b["term"]), f"{b['seconds']:.4f}", f"{100 * b['share']:.1f}%",
                     f'<span class="bar" style="width:{max(1, round(300 * b["share"]))}px"></span>'])
    return _table(["term (critical path)", "seconds", "share", ""], rows, last_left=True)


def _measured(records: list[dict]) -> str:
    from planner.pictures import comparison_figure

    rows = [[escape(str(r["name"])), _num(r["predicted_step_s"], ".3f"), _num(r.get("measured_step_s"), ".3f"),
             _num(r["predicted_mem_gib"], ".1f"), _num(r.get("measured_mem_gib"), ".1f")] for r in records]
    return (_picture(comparison_figure(records), "predicted vs measured step time and memory")
            + _table(["plan", "predicted step (s)", "measured step (s)", "predicted GiB", "measured GiB"], rows))


def report_html(plan: Plan, measured: list[dict] | None = None) -> str:
    """The report as one HTML string (see module doc)."""
    rv = plan_review(plan)
    p, pl = rv["parallel"], rv["plan"]
    title = f"{pl['model']} on {pl['gpus']} x {pl['gpu']}"
    b = rv["batching"]
    sections = [
        ("summary", "Predicted performance", _cards(rv)
         + f'<p class="muted">Configuration: <code data-key="summary">{escape(p["summary"])}</code>. '
           f'Global batch {b["global_batch_size"]} sequences of {b["seq_len"]} tokens = {b["num_microbatches"]} '
           f'micro-batches of {b["micro_batch_size"]} per data-parallel replica.</p>'),
        ("why", "Why this plan", _why(rv)),
        ("layout", "Parallel layout: which GPU holds what", _gpu_grid(rv)),
        ("stages", "Pipeline stages", _stages(rv)),
        ("breakdown", "Where the step time goes", _breakdown(rv)),
        ("timeline", "Pipeline schedule", _picture(timeline_of(plan), "pipeline schedule timeline")
         + '<p class="muted">Each row is one pipeline rank; blocks are forward, backward and recompute passes per '
           "micro-batch, red slivers pipeline send/receive, hatched grey the bubble (idle), then the data-parallel "
           "gradient sync and the optimizer step. With many micro-batches, runs of passes are drawn as one block each "
           "(the picture's title says so). The step time and bubble in its title are the plan's prediction.</p>"),
        ("memory", "Memory per GPU against capacity", _picture(memory_chart_of(plan), "memory per stage")),
    ]
    if measured:
        sections.append(("measured", "Predicted vs measured", _measured(measured)))
    sections.append(("plan-file", "The plan file",
                     f"<details><summary>plan.yaml ({escape(pl['digest'])})</summary><pre>{escape(plan_to_yaml(plan))}</pre></details>"))
    body = "".join(f'<section id="{sid}"><h2>{escape(h)}</h2>{content}</section>' for sid, h, content in sections)
    prov = rv["provenance"]
    footer = escape(f"distplan plan {pl['digest']}" + (f" | {prov['command']}" if prov.get("command") else ""))
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>distplan: {escape(title)}</title>"
            f"<style>{CSS}</style></head><body><main><h1>{escape(title)}</h1>"
            f"<p class=\"sub\">{escape(pl['cluster'])}, {pl['nodes']} node(s) of {pl['gpus_per_node']} GPUs; model "
            f"{pl['params_b']:.2f} B parameters</p>{body}<p class=\"muted\">{footer}</p></main></body></html>\n")


def write_report(plan: Plan, path: str | Path, measured: list[dict] | None = None) -> Path:
    """Write the self-contained HTML report of `plan` to `path` (atomically); returns the path."""
    path = check_report_path(path)
    atomic_write_text(path, report_html(plan, measured))
    return path


def check_report_path(path: str | Path, what: str = "report") -> Path:
    """`path` if the report can be written there (suffix .html or .htm, see fileio.check_writable)."""
    path = Path(path)
    check_writable(path, what)
    require(path.suffix.lower() in (".html", ".htm"),
            f"{what} '{path}': the suffix must be .html or .htm, got '{path.suffix or '(none)'}'")
    return path
