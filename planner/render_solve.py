"""Rich rendering of `distplan solve` results (CLI layer only; the data comes from solvers.solve)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from planner.render import prediction_tables


def _round(x):
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    return x


def solve_json(result) -> dict:
    """The plan (as written to plan.yaml) plus the search statistics."""
    return {**result.plan.to_dict(), "search": _round(dict(result.stats))}


def _plan_table(result, path: str) -> Table:
    plan, cfg = result.plan, result.plan.parallel
    t = Table(title=f"plan for {plan.model.name} on {plan.gpus} x {plan.cluster.gpu.name} ({plan.cluster.name}) "
                    f"-> {path}", show_header=False, title_justify="left")
    t.add_column("setting", style="bold")
    t.add_column("value")
    t.add_row("parallel degrees", f"dp={cfg.dp} tp={cfg.tp} pp={cfg.pp} cp={cfg.cp} ep={cfg.ep}"
              + (" + sequence parallel" if cfg.sequence_parallel else ""))
    sched = f"interleaved 1F1B, {cfg.vpp} virtual stages per rank" if cfg.schedule == "interleaved" else cfg.schedule.upper()
    t.add_row("schedule", sched if cfg.pp > 1 else f"{sched} (no pipeline)")
    t.add_row("micro-batching", f"micro-batch {cfg.micro_batch_size} x {cfg.num_microbatches} per step, "
              f"global batch {cfg.global_batch_size} x {cfg.seq_len} tokens")
    t.add_row("ZeRO", f"stage {cfg.zero_stage}" + (" + optimizer offload" if cfg.offload_optimizer else ""))
    t.add_row("recompute", cfg.recompute)
    t.add_row("attention / grad reduce", f"{'flash' if cfg.flash_attention else 'unfused'} / "
              f"{'overlapped' if cfg.overlap_grad_reduce else 'after backward'}")
    return t


def _stages_table(result) -> Table:
    t = Table(title="pipeline stages", title_justify="left")
    for col in ("stage", "layers", "#", "devices", "holds", "memory GiB", "ms per micro-batch"):
        t.add_column(col, justify="right")
    preds = {s.rank: s for s in result.prediction.stages}
    for st in result.plan.stages():
        holds = ", ".join(x for x, flag in (("embedding", st["holds_embedding"]), ("head", st["holds_head"])) if flag)
        p = preds[st["rank"]]
        t.add_row(str(st["rank"]), f"{st['layers'][0]}-{st['layers'][1]}", str(st["num_layers"]), st["devices"],
                  holds or "-", f"{p.memory_gib:.2f}", f"{1e3 * p.time_per_microbatch_s:.2f}")
    return t


def _alternatives_table(result) -> Table:
    t = Table(title=f"alternatives (best of each other mesh; {len(result.alternatives)})", title_justify="left")
    for col, just in (("configuration", "left"), ("step s", "right"), ("MFU", "right"), ("peak GiB", "right"),
                      ("why it lost", "left")):
        t.add_column(col, justify=just)
    for a in result.plan.alternatives:
        t.add_row(a["parallel"], f"{a['step_time_s']:.3f}", f"{100 * a['mfu']:.1f}%", f"{a['peak_memory_gib']:.1f}",
                  a["why_lost"])
    return t


def _sharding_table(result) -> Table:
    t = Table(title="intra-op sharding (ILP, per layer kind)", title_justify="left")
    t.add_column("layer kind")
    t.add_column("operator -> strategy")
    for kind, ops in result.plan.sharding.items():
        t.add_row(kind, ", ".join(f"{op}: {s}" for op, s in ops.items()))
    return t


def render_solve(console: Console, result, path: str, training: dict | None = None) -> None:
    console.print(_plan_table(result, path))
    console.print(_stages_table(result))
    for table in prediction_tables(result.prediction, "predicted", training):
        console.print(table)
    console.print(_sharding_table(result))
    if result.alternatives:
        console.print(_alternatives_table(result))
    console.print("[bold]why this plan[/]")
    for line in result.plan.rationale:
        console.print(f"  - {line}", highlight=False, soft_wrap=True)
    s = result.stats
    console.print(f"[dim]searched {s['candidates']} configurations ({s['evaluated_with_stage_dp']} through the stage DP) "
                  f"in {s['seconds']:.2f} s (ILP {s['ilp_seconds']:.2f} s)"
                  + (" - stopped at the time limit" if s.get("timed_out") else "") + "[/]", highlight=False)
