"""The `distplan` command line: thin typer commands, one library call each, rich only here.

Every DistplanError becomes one line on stderr and exit code 2 (no traceback).
Options shared by several commands are declared once below and reused.
"""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from planner.errors import DistplanError



class _Group(TyperGroup):
    """Turns DistplanError from any command into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DistplanError as exc:
            fail(str(exc))


app = typer.Typer(cls=_Group, add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="distplan: plan, check and run parallel training of large models.")
out = Console()
err = Console(stderr=True)

@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    """distplan: profile, solve, estimate, emit and run parallel training plans."""
    if version:
        from planner import __version__

        out.print(f"distplan {__version__}")
        raise typer.Exit(0)


# ---- options declared once ---------------------------------------------------------------------
ModelOpt = typer.Option(..., "--model", "-m", help="Zoo name (e.g. gpt2-xl, llama-3-8b), a HF config.json or a zoo YAML.")
ClusterOpt = typer.Option("dgx-h100-80gb", "--cluster", "-c", help="Cluster preset name or cluster YAML file.")
GpusOpt = typer.Option(..., "--gpus", "-n", help="Total number of GPUs.")
ProfileOpt = typer.Option(None, "--profile", help="profile.yaml from `distplan profile`: measured numbers replace the preset's.")
SeqLenOpt = typer.Option(None, "--seq-len", help="Sequence length (default: the model's).")
GlobalBatchOpt = typer.Option(None, "--global-batch", help="Sequences per optimizer step (default: the model's).")
FormatOpt = typer.Option("table", "--format", help="Output format: table or json.")


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def check_format(fmt: str, valid=("table", "json")) -> None:
    if fmt not in valid:
        raise DistplanError(f"--format '{fmt}' is unknown; valid: {', '.join(valid)}")


# ---- estimate ------------------------------------------------------------------------------------


@app.command()
def estimate(
    model: str = ModelOpt,
    cluster: str = ClusterOpt,
    gpus: int = GpusOpt,
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree."),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel degree."),
    dp: Optional[int] = typer.Option(None, "--dp", help="Data-parallel degree (default: gpus/(tp*pp*cp))."),
    cp: int = typer.Option(1, "--cp", help="Context-parallel degree."),
    ep: int = typer.Option(1, "--ep", help="Expert-parallel degree (MoE models)."),
    vpp: int = typer.Option(1, "--vpp", help="Virtual pipeline stages per rank (interleaved schedule)."),
    micro_batch: int = typer.Option(1, "--micro-batch", help="Micro-batch size per GPU."),
    global_batch: Optional[int] = GlobalBatchOpt,
    seq_len: Optional[int] = SeqLenOpt,
    schedule: str = typer.Option("1f1b", "--schedule", help="1f1b, gpipe or interleaved."),
    recompute: str = typer.Option("none", "--recompute", help="none, selective or full."),
    sequence_parallel: bool = typer.Option(False, "--sequence-parallel", help="Megatron sequence parallelism (needs tp > 1)."),
    zero: int = typer.Option(0, "--zero", help="ZeRO stage 0-3."),
    offload_optimizer: bool = typer.Option(False, "--offload-optimizer", help="Optimizer states and step on the host."),
    layer_split: Optional[str] = typer.Option(None, "--layer-split", help="Layers per pipeline stage, e.g. 19,21,21,19."),
    no_flash: bool = typer.Option(False, "--no-flash-attention", help="Unfused attention (stores s*s scores)."),
    no_overlap: bool = typer.Option(False, "--no-overlap-grad-reduce", help="Data-parallel reduce after backward."),
    profile: Optional[str] = ProfileOpt,
    fmt: str = FormatOpt,
):
    """Predict step time, memory and throughput of a configuration you fix by hand.

    Example: distplan estimate -m gpt3-175b -c dgx-a100-80gb -n 1024 --tp 8 --pp 16 --micro-batch 1
    --global-batch 1536 --recompute full
    """
    from planner.estimate import EstimateRequest, run_estimate
    from planner.render import render_prediction

    check_format(fmt)
    req = EstimateRequest(model=model, cluster=cluster, gpus=gpus, tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, vpp=vpp,
                          micro_batch=micro_batch, global_batch=global_batch, seq_len=seq_len, schedule=schedule,
                          recompute=recompute, sequence_parallel=sequence_parallel, zero=zero,
                          offload_optimizer=offload_optimizer, layer_split=layer_split, flash_attention=not no_flash,
                          overlap_grad_reduce=not no_overlap, profile=profile)
    result = run_estimate(req)
    if fmt == "json":
        print(json.dumps(result.to_json(), indent=2))
    else:
        render_prediction(out, result)
    if not result.prediction.fits:
        err.print(f"[bold yellow]warning:[/] does not fit: peak {result.prediction.peak_memory_gib:.1f} GiB "
                  f"(+{100 * 0.05:.0f}% allocator slack) exceeds {result.prediction.capacity_gib:.1f} GiB usable by "
                  f"{result.prediction.over_capacity_gib:.1f} GiB", highlight=False, soft_wrap=True)
        raise typer.Exit(2)


# ---- entry point -----------------------------------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    main()
