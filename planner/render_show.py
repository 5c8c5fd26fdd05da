"""Rich renderings of `distplan show` and `distplan diff` data (CLI layer only; the data comes from planner/show.py)."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from planner.show import gpu_indices

# rich styles of the pipeline stages, in turn
STAGE_STYLES = ("bold white on blue", "bold black on green", "bold black on yellow", "bold white on magenta",
                "bold black on cyan", "bold white on red", "bold black on bright_green", "bold black on bright_yellow")
MAX_MAP_NODES = 8  # GPU map rows printed; larger clusters repeat the same pattern


def _fmt(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def _gpu_map(rv: dict) -> Table:
    """One row per node, one cell per GPU: its pipeline stage s, data-parallel replica d, tensor-parallel shard t,
    and its context-parallel rank c and expert-parallel rank e where the plan has cp or ep > 1."""
    plan, par = rv["plan"], rv["parallel"]
    where = gpu_indices(rv["layout"])
    extra = [k for k in ("cp", "ep") if par.get(k, 1) > 1]
    gpn = plan["gpus_per_node"]
    shown = min(plan["nodes"], MAX_MAP_NODES)
    more = f"; first {shown} of {plan['nodes']} nodes" if plan["nodes"] > shown else ""
    names = {"cp": "c = context-parallel rank", "ep": "e = expert-parallel rank"}
    table = Table(title="GPU map (s = pipeline stage, d = data-parallel replica, "
                        + "".join(f"{names[k]}, " for k in extra) + f"t = tensor-parallel shard{more})",
                  title_justify="left", box=None, padding=(0, 1), collapse_padding=True)
    table.add_column("node", style="dim", no_wrap=True)
    for i in range(gpn):
        table.add_column(f"+{i}", justify="center", no_wrap=True)
    for node in range(shown):
        cells = []
        for g in range(node * gpn, (node + 1) * gpn):
            if g not in where:
                cells.append("")
                continue
            w = where[g]
            label = f"s{w['stage']}d{w['dp']}" + "".join(f"{k[0]}{w[k]}" for k in extra) + f"t{w['tp']}"
            cells.append(Text(label, style=STAGE_STYLES[w["stage"] % len(STAGE_STYLES)]))
        table.add_row(str(node), *cells)
    return table


def render_review(console: Console, rv: dict) -> None:
    pl, pr, b, sc = rv["plan"], rv["prediction"], rv["batching"], rv["schedule"]
    head = Table(title=f"{pl['model']} ({pl['params_b']:.2f} B params) on {pl['gpus']} x {pl['gpu']} "
                       f"({pl['nodes']} node(s), {pl['cluster']})", title_justify="left", show_header=False)
    head.add_column("what", style="bold")
    head.add_column("value")
    head.add_row("parallel", rv["parallel"]["summary"])
    head.add_row("micro-batching", f"global batch {b['global_batch_size']} x {b['seq_len']} tokens = {b['num_microbatches']} "
                                   f"micro-batches of {b['micro_batch_size']} per replica")
    head.add_row("schedule", f"{sc['kind']}" + (f", {sc['vpp']} chunks per rank" if sc["vpp"] > 1 else "")
                 + f"; bubble {sc['bubble_s']:.3f} s ({100 * sc['bubble_share']:.1f}% of the step)")
    head.add_row("step time", f"{pr['step_time_s']:.3f} s   {pr['tokens_per_s']:,.0f} tokens/s   MFU {100 * pr['mfu']:.1f}%")
    if pr.get("pessimistic"):
        pe = pr["pessimistic"]
        head.add_row("pessimistic step", f"{pe['step_time_s']:.3f} s   MFU {100 * pe['mfu']:.1f}%   (unchecked: "
                     f"{', '.join(pe['unchecked'])} at their bounds; the plan's sources say what would settle each)")
    fit = "[green]fits[/]" if pr["fits"] else "[red]does not fit[/]"
    head.add_row("peak memory", f"{pr['peak_memory_gib']:.2f} GiB per GPU of {pr['capacity_gib']:.1f} usable "
                                f"(limit {pr['fit_limit_gib']:.1f} with allocator slack)  {fit}")
    console.print(head)
    console.print(_gpu_map(rv))

    stages = Table(title="pipeline stages (memory in GiB per GPU)", title_justify="left", box=box.SIMPLE_HEAD,
                   padding=(0, 1), caption="ms/mb: time per micro-batch; infl: micro-batch chunks whose activations are "
                   "held at the peak; w+g: weights and gradients; opt: optimizer states; act: activations; oth: logits and "
                   "buffers; cap: share of usable capacity; +e/+h: holds the embedding/head", caption_justify="left",
                   pad_edge=False)
    for col in ("#", "layers", "GPUs", "ms/mb", "infl", "w+g", "opt", "act", "oth", "total", "cap"):
        stages.add_column(col, justify="right", no_wrap=True)
    for s in rv["stages"]:
        g = {k: float(v) for k, v in s["memory_breakdown_gib"].items()}
        holds = "".join(x for x, on in (("+e", s["holds_embedding"]), ("+h", s["holds_head"])) if on)
        share = s["memory_gib"] / pr["capacity_gib"] if pr["capacity_gib"] else 0.0
        style = "bold red" if s["memory_gib"] > pr["fit_limit_gib"] else ""
        stages.add_row(str(s["rank"]), f"{s['layers'][0]}-{s['layers'][1]}{holds}", s["devices"],
                       f"{1e3 * s['time_per_microbatch_s']:.2f}", str(s["inflight_microbatches"]),
                       f"{g.get('weights', 0) + g.get('gradients', 0):.2f}", f"{g.get('optimizer', 0):.2f}",
                       f"{g.get('activations', 0):.2f}", f"{g.get('logits', 0) + g.get('buffers', 0):.2f}",
                       Text(f"{s['memory_gib']:.2f}", style=style), f"{100 * share:.0f}%")
    console.print(stages)

    time = Table(title="step time breakdown (critical path)", title_justify="left")
    time.add_column("term")
    time.add_column("seconds", justify="right")
    time.add_column("share", justify="right")
    time.add_column("")
    for r in rv["breakdown"]:
        if r["seconds"] > 0:
            time.add_row(r["term"], f"{r['seconds']:.4f}", f"{100 * r['share']:.1f}%", "█" * max(1, round(30 * r["share"])))
    console.print(time)

    if rv["rationale"]:
        console.print("[bold]why this plan[/]")
        for line in rv["rationale"]:
            console.print(f"  - {line}", highlight=False, markup=False, soft_wrap=True)
    if rv["alternatives"]:
        alts = Table(title="alternatives considered (why each lost: below)", title_justify="left")
        for col in ("#", "configuration", "step s", "vs chosen", "peak GiB", "fits"):
            alts.add_column(col, justify="left" if col == "configuration" else "right")
        for i, a in enumerate(rv["alternatives"], 1):
            alts.add_row(str(i), escape(a["name"]), _fmt(a["step_time_s"], ".3f"),
                         _fmt(a["slower_pct"], "+.1f") + ("%" if a["slower_pct"] is not None else ""),
                         _fmt(a["peak_memory_gib"], ".1f"), "-" if a["fits"] is None else ("yes" if a["fits"] else "no"))
        console.print(alts)
        for i, a in enumerate(rv["alternatives"], 1):
            console.print(f"  {i}. {a['why_lost'] or '(no reason recorded)'}", highlight=False, markup=False, soft_wrap=True)
    if rv.get("measured"):
        meas = Table(title="predicted vs measured", title_justify="left")
        for col in ("plan", "pred step s", "meas step s", "pred GiB", "meas GiB"):
            meas.add_column(col, justify="right")
        for r in rv["measured"]:
            meas.add_row(escape(str(r["name"])), _fmt(r["predicted_step_s"], ".3f"), _fmt(r["measured_step_s"], ".3f"),
                         _fmt(r["predicted_mem_gib"], ".1f"), _fmt(r["measured_mem_gib"], ".1f"))
        console.print(meas)


def render_diff(console: Console, d: dict) -> None:
    if d["identical"]:
        console.print(f"[green]{escape(d['verdict'])}[/]", highlight=False)
        return
    if not d["same_workload"]:
        console.print("[yellow]note:[/] the plans train different workloads (model, batch or sequence length differ); "
                      "their times are not like for like", highlight=False, soft_wrap=True)
    changes = Table(title=escape(f"what differs: {d['a']} -> {d['b']}"), title_justify="left")
    changes.add_column("key")
    changes.add_column(escape(d["a"]), justify="right")
    changes.add_column(escape(d["b"]), justify="right")
    for c in d["changes"]:
        changes.add_row(c["key"], escape(str(c["a"])), escape(str(c["b"])))
    console.print(changes)

    cons = Table(title="predicted consequence", title_justify="left")
    for col in ("metric", d["a"], d["b"], "change"):
        cons.add_column(col, justify="left" if col == "metric" else "right")
    fmt = {"step_time_s": ".3f", "tokens_per_s": ",.0f", "mfu": ".3f", "peak_memory_gib": ".2f"}
    for m in d["consequences"]:
        improved = (m["delta"] < 0) == (m["better"] == "lower")
        style = "" if abs(m["delta"]) < 1e-12 else ("green" if improved else "red")
        pct = f" ({m['delta_pct']:+.1f}%)" if m["delta_pct"] is not None else ""
        cons.add_row(m["metric"], format(m["a"], fmt[m["metric"]]), format(m["b"], fmt[m["metric"]]),
                     Text(format(m["delta"], "+" + fmt[m["metric"]]) + pct, style=style))
    cons.add_row("fits", "yes" if d["fits"]["a"] else "no", "yes" if d["fits"]["b"] else "no", "")
    console.print(cons)

    br = Table(title="step time breakdown (seconds on the critical path)", title_justify="left")
    for col in ("term", d["a"], d["b"], "change"):
        br.add_column(col, justify="left" if col == "term" else "right")
    for t in d["breakdown"]:
        br.add_row(t["term"], f"{t['a']:.4f}", f"{t['b']:.4f}",
                   Text(f"{t['delta']:+.4f}", style="" if abs(t["delta"]) < 1e-9 else ("green" if t["delta"] < 0 else "red")))
    console.print(br)

    mem = Table(title="peak memory per GPU by stage (GiB)", title_justify="left")
    for col in ("stage", d["a"], d["b"]):
        mem.add_column(col, justify="right")
    for s in d["stage_memory"]:
        mem.add_row(str(s["rank"]), _fmt(s["a"], ".2f"), _fmt(s["b"], ".2f"))
    console.print(mem)
    console.print(f"[bold]verdict:[/] {escape(d['verdict'])}", highlight=False, soft_wrap=True)
