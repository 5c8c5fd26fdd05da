"""Rich renderings of predictions and plans (CLI layer only)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from planner.core.prediction import Prediction


def prediction_tables(pred: Prediction, title: str, training: dict | None = None) -> list[Table]:
    summary = Table(title=title, show_header=False, title_justify="left")
    summary.add_column("metric", style="bold")
    summary.add_column("value", justify="right")
    summary.add_row("step time", f"{pred.step_time_s:.3f} s")
    summary.add_row("throughput", f"{pred.tokens_per_s:,.0f} tokens/s")
    summary.add_row("model TFLOP/s per GPU", f"{pred.model_tflops_per_gpu:.1f}")
    summary.add_row("hardware TFLOP/s per GPU", f"{pred.hardware_tflops_per_gpu:.1f} (counts recompute)")
    summary.add_row("MFU", f"{100 * pred.mfu:.1f}%")
    if pred.pessimistic_step_time_s is not None:
        summary.add_row("pessimistic step", f"{pred.pessimistic_step_time_s:.3f} s, MFU "
                        f"{100 * pred.mfu * pred.step_time_s / pred.pessimistic_step_time_s:.1f}% (unchecked: "
                        f"{', '.join(pred.unchecked)} at their bounds)")
    over = pred.over_capacity_gib  # the GPU's part of `fits` (the host's is the offload line below; one on a CPU)
    fit = "[green]fits[/]" if over == 0 else f"[red]does not fit (+{over:.1f} GiB)[/]"
    summary.add_row("peak memory per GPU", f"{pred.peak_memory_gib:.2f} / {pred.capacity_gib:.1f} GiB  {fit}")
    if pred.host_memory_gib > 0 and pred.host_is_device:
        summary.add_row("host memory per rank (offload)", f"{pred.host_memory_gib:.2f} GiB, in the same memory as the "
                        "peak above (the device is this host's CPU)")
    elif pred.host_memory_gib > 0:
        host_fit = "[green]fits[/]" if pred.host_fits else "[red]does not fit[/]"
        cap = f"{pred.host_capacity_gib:.1f} GiB" if pred.host_capacity_gib > 0 else "? (host memory unknown)"
        summary.add_row("host memory per GPU (offload)", f"{pred.host_memory_gib:.2f} / {cap}  {host_fit}")
    if training:
        from planner.training import training_line

        summary.add_row("training time", training_line(training))

    time = Table(title="step time breakdown (critical path)", title_justify="left")
    time.add_column("term")
    time.add_column("seconds", justify="right")
    time.add_column("share", justify="right")
    for k, v in pred.breakdown:
        if v > 0:
            time.add_row(k, f"{v:.4f}", f"{100 * v / pred.step_time_s:.1f}%")

    mem = Table(title="memory per pipeline stage (GiB per GPU, the parts live at the step's peak)", title_justify="left")
    for col in ("stage", "layers", "weights", "grads", "optimizer", "activations", "logits", "buffers", "total", "peak"):
        mem.add_column(col, justify="right")
    for s in pred.stages:
        g = s.memory.as_gib()
        mem.add_row(str(s.rank), f"{s.layers[0]}-{s.layers[1]}", *(f"{g[k]:.2f}" for k in
                    ("weights", "gradients", "optimizer", "activations", "logits", "buffers")), f"{s.memory_gib:.2f}",
                    s.memory.peak_phase)
    return [summary, time, mem]


def render_prediction(console: Console, result, training: dict | None = None) -> None:
    cfg = result.config
    title = (f"{result.model.name} on {cfg.gpus} x {result.cluster.gpu.name}: dp={cfg.dp} tp={cfg.tp} pp={cfg.pp} "
             f"cp={cfg.cp} ep={cfg.ep} vpp={cfg.vpp} mb={cfg.micro_batch_size} x {cfg.num_microbatches} "
             f"{cfg.schedule} zero={cfg.zero_stage} recompute={cfg.recompute}{' sp' if cfg.sequence_parallel else ''}"
             f"{' offload' if cfg.offload_optimizer else ''}")
    engine = getattr(result, "engine", "any")
    if engine != "any":  # an engine was named (the default prices no engine in particular)
        title += f", as the {engine} engine runs it"
    for t in prediction_tables(result.prediction, title, training):
        console.print(t)
    for line in getattr(result, "notes", ()):  # what --profile and --calibration contributed (estimate.job_profile)
        console.print(line, highlight=False, soft_wrap=True, markup=False)
