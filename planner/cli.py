"""The `distplan` command line: thin typer commands, one library call each, rich only here.

Every DistplanError becomes one line on stderr and exit code 2 (no traceback).
Options shared by several commands are declared once below and reused.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from planner.cli_usage import NoArgsIsHelpError, UsageError, usage_line
from planner.core.errors import DistplanError
from planner.core.fileio import check_writable



def _metavar(param) -> str:
    """What help shows for a parameter's value: its name for arguments, the kind of value for options, nothing for
    flags (typer's default shows Python type names such as <bool> and <list[Path]>)."""
    if param.param_type_name == "argument":
        return param.name.upper()
    if getattr(param, "is_flag", False):
        return ""
    # typer >= 0.25 names the Python type (bare_type: "Path", "int", ...); older typer keeps click's ParamType
    kind = param.bare_type() if hasattr(param, "bare_type") else getattr(getattr(param, "type", None), "name", "")
    return {"path": "PATH", "int": "INTEGER", "integer": "INTEGER", "float": "NUMBER"}.get(kind.lower(), "TEXT") \
        if "path" not in kind.lower() else "PATH"


class _Command(TyperCommand):
    """A command whose help names values in plain words (_metavar): `Usage: distplan show [OPTIONS] PLAN`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.metavar is None:
                param.metavar = _metavar(param)
            if param.param_type_name == "argument":
                param.display_type_rich = lambda ctx: None  # the name says it; typer would add <path>

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    def collect_usage_pieces(self, ctx) -> list[str]:
        args = [p.metavar if p.required else f"[{p.metavar}]" for p in self.params if p.param_type_name == "argument"]
        return [self.options_metavar, *args]


class _Group(TyperGroup):
    """Turns DistplanError from any command, and every usage error (a bad option value, a missing or unknown option
    or command), into one line on stderr and exit code 2."""

    def make_context(self, info_name, args, parent=None, **extra):
        argv = list(args)  # click consumes `args` as it parses
        try:
            ctx = super().make_context(info_name, args, parent=parent, **extra)
        except NoArgsIsHelpError:
            raise
        except UsageError as exc:
            fail(usage_line(exc, argv, info_name or "distplan"))
        ctx.meta["distplan.argv"] = argv
        return ctx

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:  # --version, --install-completion, --show-completion, --help: flags
            if param.metavar is None:
                param.metavar = _metavar(param)
        return params

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DistplanError as exc:
            fail(str(exc))
        except NoArgsIsHelpError:
            raise
        except UsageError as exc:
            fail(usage_line(exc, ctx.meta.get("distplan.argv", []), ctx.command_path))


app = typer.Typer(cls=_Group, add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="distplan: plan, check and run parallel training of large models.\n\n"
                       "Example: distplan show plan.yaml --timeline timeline.png --report report.html")
out = Console()
err = Console(stderr=True)

def _print_version(value: bool) -> None:
    if value:
        from planner.core.version import __version__

        out.print(f"distplan {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the version and exit.")):
    """distplan: profile, solve, estimate, emit and run parallel training plans."""


# ---- options declared once ---------------------------------------------------------------------
ModelOpt = typer.Option(..., "--model", "-m", help="Zoo name (e.g. gpt2-xl, llama-3-8b), a HF config.json or a zoo YAML.")
ClusterOpt = typer.Option("dgx-h100-80gb", "--cluster", "-c", help="Cluster preset name or cluster YAML file.")
GpusOpt = typer.Option(..., "--gpus", "-n", help="Total number of GPUs.")
ProfileOpt = typer.Option(None, "--profile", help="profile.yaml from `distplan profile`: measured numbers replace the preset's.")
SeqLenOpt = typer.Option(None, "--seq-len", help="Sequence length (default: the model's).")
GlobalBatchOpt = typer.Option(None, "--global-batch", help="Sequences per optimizer step (default: the model's).")
FormatOpt = typer.Option("table", "--format", help="Output format: table or json.")
TrainTokensOpt = typer.Option(None, "--train-tokens", help="Tokens to train on, e.g. 2e12: adds training days and GPU-hours.")
GpuHourPriceOpt = typer.Option(None, "--gpu-hour-price", help="Price per GPU-hour, with --train-tokens: adds the cost.")


def _axis(flag: str, what: str):
    """A solve constraint: the values one axis may take, as a comma-separated list (None: any)."""
    return typer.Option(None, flag, help=f"{what} the search may use, e.g. {'1,2,4' if 'degree' in what else 'no'} "
                                          "(default: any).")
ProfileFallbackOpt = typer.Option(False, "--profile-fallback", help="With a --profile of another model shape or sequence length: price the layers from the preset and keep only its model-independent numbers (sources say which), instead of refusing.")
CalibrationOpt = typer.Option(None, "--calibration", help="Calibration file from `distplan run --calibrate`: the factors of this engine, GPU, model shape and profile apply (shown in the output).")


def fail(message: str) -> None:
    """Print `message` as one line on stderr (its newlines folded, no markup read in it) and exit with code 2."""
    err.print(f"[bold red]error:[/] {escape(' '.join(str(message).split()))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def check_format(fmt: str, valid=("table", "json")) -> None:
    if fmt not in valid:
        raise DistplanError(f"--format '{fmt}' is unknown; valid: {', '.join(valid)}")


def with_training(plan, train_tokens: Optional[float], gpu_hour_price: Optional[float]):
    """The plan with --train-tokens / --gpu-hour-price kept in its provenance, so `show` prices the same run."""
    if train_tokens is None:
        return plan
    keep = {"train_tokens": train_tokens, **({"gpu_hour_price": gpu_hour_price} if gpu_hour_price is not None else {})}
    return replace(plan, provenance={**plan.provenance, "training": keep})


def cluster_arg(ctx: typer.Context, cluster: str, profile: Optional[str]) -> Optional[str]:
    """--cluster as given, or None when it was left at its default and --profile is given: then the
    profiled GPU picks the cluster (its preset, or the measured machine; planner.core.profile.cluster_for_profile)."""
    source = ctx.get_parameter_source("cluster")  # by name: typer may bundle its own click
    if profile and getattr(source, "name", None) == "DEFAULT":
        return None
    return cluster


# ---- estimate ------------------------------------------------------------------------------------


@app.command(cls=_Command)
def estimate(
    ctx: typer.Context,
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
    engine: str = typer.Option("any", "--engine", help="Who runs it (distplan run's engines): any, torch, deepspeed, megatron; their measured costs apply."),
    profile_fallback: bool = ProfileFallbackOpt,
    calibration: Optional[str] = CalibrationOpt,
    fmt: str = FormatOpt,
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="Also write this configuration as a plan file (for run, emit, show)."),
    train_tokens: Optional[float] = TrainTokensOpt,
    gpu_hour_price: Optional[float] = GpuHourPriceOpt,
):
    """Predict step time, memory and throughput of a configuration you fix by hand.

    Example: distplan estimate -m gpt3-175b -c dgx-a100-80gb -n 1024 --tp 8 --pp 16 --micro-batch 1
    --global-batch 1536 --recompute full

    With -o plan.yaml the configuration is written as a plan (only if it fits), so a hand-picked baseline
    can be emitted, run and diffed like a solved plan.
    """
    from planner.estimate import EstimateRequest, run_estimate
    from planner.render import render_prediction
    from planner.training import check_training_inputs, training_estimate

    check_format(fmt)
    check_training_inputs(train_tokens, gpu_hour_price)
    if output is not None:
        check_writable(output, "--output")
    req = EstimateRequest(model=model, cluster=cluster_arg(ctx, cluster, profile), gpus=gpus, tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, vpp=vpp,
                          micro_batch=micro_batch, global_batch=global_batch, seq_len=seq_len, schedule=schedule,
                          recompute=recompute, sequence_parallel=sequence_parallel, zero=zero,
                          offload_optimizer=offload_optimizer, layer_split=layer_split, flash_attention=not no_flash,
                          overlap_grad_reduce=not no_overlap, profile=profile, engine=engine,
                          profile_fallback=profile_fallback, calibration=calibration)
    result = run_estimate(req)
    training = (training_estimate(result.prediction.tokens_per_s, result.config.gpus, train_tokens, gpu_hour_price)
                if train_tokens is not None else None)
    if fmt == "json":
        print(json.dumps({**result.to_json(), **({"training": training} if training else {})}, indent=2))
    else:
        render_prediction(out, result, training)
    if not result.prediction.fits:
        err.print(f"[bold yellow]warning:[/] does not fit: {result.prediction.misfit()}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    if output is not None:
        from planner.estimate import plan_from_estimate
        from planner.core.plan import save_plan

        plan = plan_from_estimate(result, command=" ".join(["distplan", *sys.argv[1:]]))
        save_plan(with_training(plan, train_tokens, gpu_hour_price), output)
        err.print(f"wrote {output}", highlight=False, markup=False, soft_wrap=True)


# ---- solve ---------------------------------------------------------------------------------------


@app.command(cls=_Command)
def solve(
    ctx: typer.Context,
    model: str = ModelOpt,
    gpus: int = GpusOpt,
    cluster: str = ClusterOpt,
    profile: Optional[str] = ProfileOpt,
    global_batch: Optional[int] = GlobalBatchOpt,
    seq_len: Optional[int] = SeqLenOpt,
    top_k: int = typer.Option(3, "--top-k", help="Runners-up to show, each with why it lost."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Seconds; then the best plan found so far."),
    ilp_backend: str = typer.Option("ortools", "--ilp-backend", help="Intra-op ILP solver: ortools (CP-SAT) or pulp (CBC)."),
    output: Path = typer.Option(Path("plan.yaml"), "--output", "-o", help="Plan file to write."),
    fmt: str = FormatOpt,
    engine: str = typer.Option("any", "--engine", help="Keep only plans this `distplan run` engine executes: any, torch, deepspeed, megatron."),
    te: bool = typer.Option(False, "--te", help="With --engine megatron: Transformer Engine is installed (fused attention); "
                                                "without it megatron's local spec runs unfused attention and plans assume that."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write a self-contained HTML report here."),
    dp: Optional[str] = _axis("--dp", "Data-parallel degrees"),
    tp: Optional[str] = _axis("--tp", "Tensor-parallel degrees"),
    pp: Optional[str] = _axis("--pp", "Pipeline-parallel degrees"),
    cp: Optional[str] = _axis("--cp", "Context-parallel degrees"),
    ep: Optional[str] = _axis("--ep", "Expert-parallel degrees"),
    vpp: Optional[str] = _axis("--vpp", "Virtual pipeline stages per rank (degrees)"),
    micro_batch: Optional[str] = typer.Option(None, "--micro-batch", help="Micro-batch sizes the search may use, e.g. 1,2,4 (default: powers of two up to 64)."),
    max_micro_batch: Optional[int] = typer.Option(None, "--max-micro-batch", help="Largest micro-batch size the search may use."),
    zero: Optional[str] = typer.Option(None, "--zero", help="ZeRO stages the search may use, e.g. 1,3 (default: any)."),
    offload_optimizer: Optional[str] = _axis("--offload-optimizer", "Optimizer offload (yes, no)"),
    recompute: Optional[str] = typer.Option(None, "--recompute", help="Recompute settings the search may use: none, selective, full, e.g. none,full."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="Pipeline schedules the search may use: 1f1b, gpipe, interleaved."),
    sequence_parallel: Optional[str] = _axis("--sequence-parallel", "Sequence parallelism (yes, no)"),
    candidates: Optional[Path] = typer.Option(None, "--candidates", help="Also write every configuration considered, ranked, with its prediction and why it lost (.csv or .json)."),
    train_tokens: Optional[float] = TrainTokensOpt,
    gpu_hour_price: Optional[float] = GpuHourPriceOpt,
    profile_fallback: bool = ProfileFallbackOpt,
    calibration: Optional[str] = CalibrationOpt,
):
    """Search the fastest plan that fits: inter-op stage DP + intra-op sharding ILP (Alpa-style).

    Example: distplan solve --model gpt2-xl --gpus 64 -o plan.yaml --report report.html

    Pin what your stack supports: distplan solve -m llama-3-8b -n 64 --tp 1,2,4 --pp 1 --cp 1 --zero 1,3
    --max-micro-batch 8 --candidates candidates.csv --train-tokens 2e12 --gpu-hour-price 2.5
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from planner.core.fileio import atomic_write_files
    from planner.core.plan import plan_to_yaml
    from planner.render_solve import render_solve, solve_json
    from solvers.request import SolveRequest, run_solve

    from planner.training import check_training_inputs, training_estimate
    from solvers.candidates import FORMATS, candidates_text
    from solvers.request import parse_constraints

    check_format(fmt)
    check_training_inputs(train_tokens, gpu_hour_price)
    constraints = parse_constraints(dp=dp, tp=tp, pp=pp, cp=cp, ep=ep, vpp=vpp, micro_batch=micro_batch,
                                    max_micro_batch=max_micro_batch, zero=zero, offload_optimizer=offload_optimizer,
                                    recompute=recompute, schedule=schedule, sequence_parallel=sequence_parallel)
    req = SolveRequest(model=model, gpus=gpus, cluster=cluster_arg(ctx, cluster, profile), profile=profile,
                       global_batch=global_batch, seq_len=seq_len, top_k=top_k, time_limit_s=time_limit,
                       ilp_backend=ilp_backend, engine=engine, transformer_engine=te, constraints=constraints,
                       candidates=candidates is not None, profile_fallback=profile_fallback, calibration=calibration)
    if report is not None and report.suffix.lower() not in (".html", ".htm"):
        raise DistplanError(f"--report '{report}' must be an .html file")
    if candidates is not None and candidates.suffix.lower() not in FORMATS:
        raise DistplanError(f"--candidates '{candidates}' must end in {' or '.join(FORMATS)}")
    outputs = {"--output": output, "--candidates": candidates, "--report": report}
    named = {option: path for option, path in outputs.items() if path is not None}
    for option, path in named.items():  # all checked before the search, written together after it
        check_writable(path, option)
    same = [option for option, path in named.items() if [p.absolute() for p in named.values()].count(path.absolute()) > 1]
    if same:
        raise DistplanError(f"{' and '.join(same)} name the same file '{named[same[0]]}'; give each its own")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(escape(f"solving {model} on {gpus} GPUs"), total=None)
        result = run_solve(req, progress=lambda done, total: bar.update(task, completed=done, total=total))
    training = (training_estimate(result.prediction.tokens_per_s, result.plan.gpus, train_tokens, gpu_hour_price)
                if train_tokens is not None else None)
    result = replace(result, plan=with_training(result.plan, train_tokens, gpu_hour_price))
    files = {output: plan_to_yaml(result.plan)}
    if candidates is not None:
        files[candidates] = candidates_text(list(result.candidates), candidates.suffix.lower())
    if report is not None:
        from planner.htmlreport import report_html

        files[report] = report_html(result.plan)
    atomic_write_files(files)  # all or none
    if fmt == "json":
        print(json.dumps({**solve_json(result), **({"training": training} if training else {})}, indent=2))
    else:
        render_solve(out, result, str(output), training)
    for warning in result.warnings:
        err.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    for path in files:
        what = f" ({len(result.candidates)} configurations)" if path == candidates else ""
        err.print(f"wrote {path}{what}", highlight=False, markup=False, soft_wrap=True)


# ---- show / diff ---------------------------------------------------------------------------------

ReviewFormatOpt = typer.Option("table", "--format", help="Output format: table, json or yaml.")


@app.command(cls=_Command)
def show(
    plan: Path = typer.Argument(..., help="A plan file written by `distplan solve` (plan.yaml).", show_default=False),
    fmt: str = ReviewFormatOpt,
    timeline: Optional[Path] = typer.Option(None, "--timeline", help="Draw the pipeline schedule to this .png or .svg."),
    memory_chart: Optional[Path] = typer.Option(None, "--memory-chart", help="Draw memory per stage vs capacity to this .png or .svg."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write one self-contained HTML report (plan, pictures, rationale) here."),
    measured: Optional[list[Path]] = typer.Option(None, "--measured", help="A `distplan run` report (or records file) to compare with; repeatable."),
    train_tokens: Optional[float] = typer.Option(None, "--train-tokens", help="Tokens to train on, e.g. 2e12: adds training days and GPU-hours (default: the plan's, if solved with --train-tokens)."),
    gpu_hour_price: Optional[float] = GpuHourPriceOpt,
):
    """Review a plan: GPU layout, stages, micro-batching, schedule, time breakdown, memory against capacity.

    Example: distplan show plan.yaml --timeline timeline.png --report report.html
    """
    from planner.show import dumps
    from planner.show_files import show_plan
    from planner.training import training_estimate

    check_format(fmt, ("table", "json", "yaml"))
    train_tokens, gpu_hour_price = _training_inputs(plan, train_tokens, gpu_hour_price)
    result = show_plan(plan, timeline=timeline, memory_chart=memory_chart, report=report, measured=measured or ())
    training = (training_estimate(float(result.review["prediction"]["tokens_per_s"]), int(result.review["plan"]["gpus"]), train_tokens,
                                  gpu_hour_price) if train_tokens is not None else None)
    if fmt == "table":
        from planner.render_show import render_review
        from planner.training import training_line

        render_review(out, result.review)
        if training:
            out.print(f"[bold]training time[/] {training_line(training)}", highlight=False, soft_wrap=True)
    else:
        print(dumps({**result.review, **({"training": training} if training else {})}, fmt))
    for path in result.written:
        err.print(f"wrote {path}", highlight=False, markup=False, soft_wrap=True)


def _training_inputs(plan_path: Path, train_tokens: Optional[float], gpu_hour_price: Optional[float]):
    """--train-tokens / --gpu-hour-price for `show`, each defaulting to what solve or estimate kept in the plan
    (provenance.training), validated; (None, None) where neither gives the tokens."""
    from planner.core.plan import load_plan
    from planner.training import check_training_inputs

    kept = load_plan(plan_path).provenance.get("training")
    kept = kept if isinstance(kept, dict) else {}
    train_tokens = kept.get("train_tokens") if train_tokens is None else train_tokens
    gpu_hour_price = kept.get("gpu_hour_price") if gpu_hour_price is None else gpu_hour_price
    check_training_inputs(train_tokens, gpu_hour_price)
    return train_tokens, gpu_hour_price


@app.command(cls=_Command)
def diff(
    a: Path = typer.Argument(..., help="The plan to compare from.", show_default=False),
    b: Path = typer.Argument(..., help="The plan to compare to.", show_default=False),
    fmt: str = ReviewFormatOpt,
):
    """Compare two plans: what differs, and the predicted consequence for step time and memory.

    Example: distplan diff plan-a.yaml plan-b.yaml
    """
    from planner.show import diff_plan_files, dumps

    check_format(fmt, ("table", "json", "yaml"))
    result = diff_plan_files(a, b)
    if fmt == "table":
        from planner.render_show import render_diff

        render_diff(out, result)
    else:
        print(dumps(result, fmt))


# ---- profile -------------------------------------------------------------------------------------


@app.command(cls=_Command)
def profile(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Zoo name (e.g. gpt2-xl, llama-3-8b), a HF config.json or a zoo YAML (required unless --hardware)."),
    seq_len: Optional[int] = SeqLenOpt,
    dtype: str = typer.Option("auto", "--dtype", help="Training dtype of the layers and messages: auto (bf16 on GPUs, fp32 on CPUs, as `distplan run` trains), bf16, fp16 or fp32."),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", help="TP degrees and group sizes up to this (default: the GPUs present; CPU: 2 processes)."),
    output: Path = typer.Option(Path("profile.yaml"), "--output", "-o", help="Where to write the profile YAML (--hardware: the kernel database, default hardware.yaml, its raw points beside it as .points.json)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer micro-batches, message sizes and repeats (60-85 s for an 8B-13B model on 2xH200; more GPUs add group sizes); with --hardware coarser grids in a 150 s budget."),
    device: str = typer.Option("auto", "--device", help="auto (GPUs if present), cuda or cpu (gloo between local processes)."),
    micro_batches: Optional[str] = typer.Option(None, "--micro-batches", help="Micro-batch sizes to time, e.g. 1,2,4,8,16 (default: 1,2,4,8 on GPUs, --quick 1,2,4; CPU 1,2, --quick 1)."),
    only: Optional[str] = typer.Option(None, "--only", help="Measure one phase: communication (collectives, sharding, pipelining and TP stacks) or compute (layers, ceilings); the other comes from --base. With --hardware: the grid sections to measure, of gemm, gemm_unaligned, attention, memory_bound (comma-separated)."),
    base: Optional[Path] = typer.Option(None, "--base", help="With --only: the earlier profile (same model, sequence, dtype and machine) whose other phase is reused."),
    stack_blocks: Optional[int] = typer.Option(None, "--stack-blocks", help="Blocks in the sharding profiler's larger stack (FSDP2, DDP, DeepSpeed ZeRO-3; its ZeRO-2 takes at least 8; default: 8 on GPUs, fewer where they would not fit, 4 on CPUs): more measure the per-block overhead with more signal and take longer."),
    hardware: bool = typer.Option(False, "--hardware", help="Measure this GPU's kernel database instead of a model: GEMMs over (tokens, out, in), attention, memory-bound kernels, launch overhead, AdamW and the sustained clock (configs/hardware/ holds the committed ones)."),
    budget_s: Optional[float] = typer.Option(None, "--budget-s", help="With --hardware: wall-time budget of the measurement in seconds (default 390 on a GPU, 150 with --quick); what does not fit is recorded as not measured."),
):
    """Measure per-layer compute, collectives and device ceilings on this node; write profile.yaml.

    Example: distplan profile -m llama-3-8b --seq-len 4096 -o h200.yaml, then
    distplan solve -m llama-3-8b -n 16 --profile h200.yaml. Under torchrun on several nodes the
    inter-node link is measured as well. With --hardware: this GPU's kernel database, e.g.
    distplan profile --hardware -o h100.yaml.
    """
    if hardware:
        given = [flag for flag, value in (("--model", model), ("--seq-len", seq_len), ("--gpus-per-node", gpus_per_node),
                                          ("--micro-batches", micro_batches), ("--base", base),
                                          ("--stack-blocks", stack_blocks)) if value is not None]
        if given:
            raise DistplanError(f"--hardware measures the GPU, not a model: leave out {', '.join(given)}")
        source = ctx.get_parameter_source("output")
        _profile_hardware(Path("hardware.yaml") if getattr(source, "name", None) == "DEFAULT" else output,
                          device, dtype, quick, budget_s, _hardware_sections(only))
        return
    if model is None:
        raise DistplanError("missing option --model / -m (the model to profile); or pass --hardware to measure "
                            "this GPU's kernel database")
    if budget_s is not None:
        raise DistplanError("--budget-s is for --hardware (the kernel database); a model profile sizes itself")
    from planner.core.profile import save_profile
    from profilers.run import ProfileRequest, run_profile

    check_writable(output, "--output")  # before the measurement, which takes minutes
    try:
        mbs = tuple(int(x) for x in micro_batches.split(",")) if micro_batches else None
    except ValueError:
        raise DistplanError(f"--micro-batches '{micro_batches}' must be comma-separated integers, e.g. 1,2,4,8") from None
    req = ProfileRequest(model=model, seq_len=seq_len, dtype=dtype, gpus_per_node=gpus_per_node, quick=quick,
                         device=device, micro_batches=mbs, only=only, base=str(base) if base is not None else None,
                         stack_blocks=stack_blocks)
    with _profile_progress() as progress:
        prof = run_profile(req, progress)
    if prof is None:  # a torchrun rank other than 0: rank 0 writes the profile
        return
    save_profile(prof, output)
    _render_profile(prof, output)


@contextmanager
def _profile_progress():
    """The profile's progress callback (label, done, total): a rich bar on a terminal; in a log (device calls, CI)
    one line per step, so a run stopped by a timeout says how far it got."""
    if err.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task("starting", total=None)
            yield lambda label, done, total: bar.update(task, description=label, completed=done, total=total)
        return
    import time

    t0 = time.monotonic()
    yield lambda label, done, total: print(f"[{time.monotonic() - t0:6.1f} s] {done}/{total} {label}",
                                           file=sys.stderr, flush=True)


def _hardware_sections(only: Optional[str]) -> tuple[str, ...]:
    """--only with --hardware: the grid sections to measure (comma-separated), all by default."""
    from profilers.hardware import GRIDS

    if only is None:
        return GRIDS
    names = tuple(x.strip() for x in only.split(","))
    bad = [x for x in names if x not in GRIDS]
    if bad or not names:
        raise DistplanError(f"--only '{only}' with --hardware: valid sections are {', '.join(GRIDS)} (comma-separated)")
    return names


def _profile_hardware(output: Path, device: str, dtype: str, quick: bool, budget_s: Optional[float],
                      only: tuple[str, ...] = ()) -> None:
    from profilers.hardware import GRIDS, measure_hardware, points_path, resolve, save_hardware

    dev, torch_dtype, budget = resolve(device, dtype, budget_s, quick)
    check_writable(output, "--output")  # before the measurement, which takes minutes
    check_writable(points_path(output), "--output's raw points file")
    with _profile_progress() as progress:
        measured = measure_hardware(dev, torch_dtype, budget, progress, quick, only=only or GRIDS)
    written = save_hardware(measured, output, command=" ".join(["distplan", *sys.argv[1:]]))
    _render_hardware(measured.database, written)


def _render_hardware(db: dict, written: list) -> None:
    from rich.table import Table

    f = db["facts"]
    t = Table(title=f"kernel database of {db['gpu_name']} ({db['device']}, {db['dtype']})", show_header=False,
              title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("versions", f"torch {f.get('torch')}" + (f", CUDA {f.get('cuda')}, driver {f.get('driver')}"
                                                       if db["device"] == "cuda" else ""))
    probe = f.get("probe", {})
    t.add_row("probe", f"matmul {probe.get('matmul_tflops', 0):.1f} TFLOP/s, copy {probe.get('copy_gb_s', 0):.0f} GB/s")
    for name, sec in f.get("sections", {}).items():
        counts = ", ".join(f"{v} {k}" for k, v in sorted(sec.get("counts", {}).items()))
        why = db.get(name, {}).get("not_measured") if isinstance(db.get(name), dict) else None
        t.add_row(name, f"{sec['wall_s']} s" + (f", {counts}" if counts else "") + (f"; not measured: {why}" if why else ""))
    clock = db.get("clock", {})
    if clock.get("sustained_sm_mhz"):
        t.add_row("sustained clock", f"{clock['sustained_sm_mhz']:.0f} MHz, {clock.get('power_w', 0):.0f} W, "
                                     f"{clock.get('tflops_median', 0):.0f} TFLOP/s")
    t.add_row("wall time", f"{f.get('wall_time_s')} s of a {f.get('budget_s')} s budget")
    out.print(t)
    for path in written:
        err.print(f"wrote {path}", highlight=False, markup=False, soft_wrap=True)


def _render_profile(prof, path: Path) -> None:
    from rich.table import Table

    f = prof.facts
    t = Table(title=f"profile of {prof.model} on {prof.device_count} x {prof.gpu_name} ({prof.device})",
              show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("sequence, dtype", f"{prof.seq_len} tokens, {prof.dtype}")
    t.add_row("versions", f"torch {f.get('torch')}" + (f", CUDA {f.get('cuda')}, NCCL {f.get('nccl')}, driver "
                                                       f"{f.get('driver')}" if prof.device == "cuda" else ""))
    t.add_row("matmul", f"{prof.matmul_tflops:.1f} TFLOP/s (best of the sweep)")
    t.add_row("copy bandwidth", f"{prof.hbm_bandwidth_gb_s:.0f} GB/s (read + write)")
    ov = "not measured" if prof.overlap_slowdown is None else f"{100 * prof.overlap_slowdown:.1f}%"
    t.add_row("overlap slowdown", ov)
    t.add_row("layer fits", ", ".join(f"{c.kind}/tp{c.tp}" + (f" (OOM from mb {c.oom_micro_batch})" if c.oom_micro_batch
                                                               else "") for c in prof.compute) or "none")
    for c in sorted(prof.collectives, key=lambda c: (c.group_size, c.op)):
        t.add_row(f"{c.op} n={c.group_size}", f"{c.latency_s * 1e6:.1f} us + {c.bus_bandwidth_gb_s:.1f} GB/s bus")
    t.add_row("inter-node", str(f.get("inter_node")))
    t.add_row("wall time", f"{f.get('wall_time_s')} s")
    out.print(t)
    err.print(f"wrote {path}", highlight=False, markup=False, soft_wrap=True)


# ---- run -----------------------------------------------------------------------------------------


@app.command(cls=_Command)
def run(
    plan: Path = typer.Argument(..., help="plan.yaml from `distplan solve` (or hand-made with estimate's options)."),
    engine: str = typer.Option("torch", "--engine", help="torch (PyTorch-native), deepspeed or megatron."),
    steps: int = typer.Option(10, "--steps", help="Measured optimizer steps (after the warm-up; this run's, also with --resume)."),
    warmup: int = typer.Option(3, "--warmup", help="Steps run before measuring (not timed, but they train: the run does --warmup + --steps optimizer steps)."),
    nproc: Optional[int] = typer.Option(None, "--gpus", "-n", "--nproc", help="GPUs (on a CPU host: processes) to start on this node, as --gpus of solve and estimate; must equal the plan's world size. Default: that, refused on a CPU host with too few cores or too little memory for them; given explicitly it starts them anyway."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Report YAML (default: <plan>.report.yaml)."),
    tolerance: float = typer.Option(0.10, "--tolerance", help="Largest accepted relative error of step time and memory."),
    check_numerics: bool = typer.Option(False, "--check-numerics", help="Compare the first steps' losses with a single-process run."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Record measured/predicted correction factors for this engine and model shape in --calibration (default: the --profile's .calibration.yaml beside it); the profile is never written."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Predict with this profile (it must have measured the plan's model shape and sequence length, or see --profile-fallback)."),
    calibration: Optional[str] = CalibrationOpt,
    profile_fallback: bool = ProfileFallbackOpt,
    data: Optional[str] = typer.Option(None, "--data", help="Tokenized binary file (flat uint16/uint32 tokens); default: synthetic tokens."),
    data_dtype: str = typer.Option("uint16", "--data-dtype", help="Token type of --data: uint16 or uint32."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32."),
    seed: int = typer.Option(1234, "--seed", help="Seed of the weights and the synthetic data."),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate (the numerics check compares the updates it makes)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds before unfinished ranks are killed and reported as hung."),
    trace: bool = typer.Option(False, "--trace", help="torch engine: profile one extra step and report where it went on the GPU (busy, idle, kernel time per kind)."),
    memory_peak: bool = typer.Option(False, "--memory-peak", help="torch engine on CUDA: record one extra step's allocations and report what is live at its peak, by where it was allocated."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="torch engine: save sharded checkpoints (torch.distributed.checkpoint) in DIR/step-<k>, k = optimizer steps done counting warm-up; DIR/latest names the newest."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Save every N optimizer steps (warm-up included); default: after the run's last step."),
    resume: bool = typer.Option(False, "--resume", help="Continue from --checkpoint-dir's latest checkpoint: this run's --warmup + --steps steps follow its step k with the batches and RNG states the uninterrupted run had."),
):
    """Run a plan for real, measure step time, memory and loss, and verify the prediction.

    Exit code 0: verified; 1: a failed rank, diverged numerics or an error above --tolerance; 2: bad input;
    128 + N: signal N (SIGINT, SIGTERM, SIGHUP) stopped the run, and every worker with it.
    Example: distplan run plan.yaml --steps 20 --check-numerics -o report.yaml
    Checkpoints (torch engine): --checkpoint-dir ckpt --checkpoint-every 100, then --resume to continue.
    """
    from planner.runner.engine_api import RunOptions
    from planner.runner.launch import RunStopped, run_plan
    from planner.runner.render import render_report

    opts = RunOptions(engine=engine, steps=steps, warmup=warmup, seed=seed, data_path=data, data_dtype=data_dtype,
                      dtype=dtype, lr=lr, timeout_s=timeout, trace=trace, memory_peak=memory_peak,
                      checkpoint_dir=str(checkpoint_dir) if checkpoint_dir is not None else None,
                      checkpoint_every=checkpoint_every, resume=resume)
    report_path = output if output is not None else plan.with_name(f"{plan.stem}.report.yaml")
    try:
        with _run_progress(f"running {plan.name} ({engine})", warmup + steps) as on_progress:
            report = run_plan(plan, opts, nproc=nproc, out_path=report_path, tolerance=tolerance,
                              check_numerics=check_numerics, profile_path=profile, calibrate=calibrate,
                              on_progress=on_progress, calibration=calibration, profile_fallback=profile_fallback)
    except RunStopped as stop:
        err.print(str(stop), highlight=False, soft_wrap=True)
        raise typer.Exit(stop.exit_code) from None
    render_report(out, report, str(report_path))
    if not report.passed:
        raise typer.Exit(1)


@contextmanager
def _run_progress(label: str, total: int):
    """The run's progress callback: a rich bar on a terminal; in a log (CI, a batch job, a device call) one
    timestamped line each time the slowest rank begins another step, as `distplan profile` prints."""
    if err.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    import time

    t0, last = time.monotonic(), [None]

    def line(done: int, total: int) -> None:
        if (done, total) != last[0]:
            last[0] = (done, total)
            print(f"[{time.monotonic() - t0:6.1f} s] {done}/{total} steps, {label}", file=sys.stderr, flush=True)

    yield line


# ---- emit ----------------------------------------------------------------------------------------


@app.command(cls=_Command)
def emit(
    plan: Path = typer.Argument(..., help="plan.yaml from `distplan solve`."),
    target: str = typer.Option(..., "--target", "-t", help="deepspeed, megatron, torchrun or slurm."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write; refused if it exists, unless --force."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder (atomically)."),
    check: bool = typer.Option(False, "--check", help="Validate the files first (DeepSpeed's and Megatron's own parsers where installed, distplan's mirrors of their rules); write nothing if one fails."),
    script: Optional[str] = typer.Option(None, "--script", help="deepspeed: the training script (default train.py); megatron: pretrain_gpt.py (default $MEGATRON_LM/pretrain_gpt.py)."),
    wrap: Optional[str] = typer.Option(None, "--wrap", help="slurm: the target job.sbatch runs (torchrun, megatron or deepspeed; default torchrun)."),
    hosts: Optional[str] = typer.Option(None, "--hosts", help="deepspeed: comma-separated node names for the hostfile (default: placeholders)."),
):
    """Write the files that launch a plan with one framework, and the launch command.

    Example: distplan emit plan.yaml --target megatron -o out/ --check
    """
    from emitters import EmitRequest, run_emit
    from emitters.render import render_emit

    result = run_emit(EmitRequest(plan=str(plan), target=target, out=str(output), force=force, check=check,
                                  script=script, wrap=wrap, hosts=hosts))
    render_emit(out, result)
    if result.failed_checks:
        first = result.failed_checks[0]
        fail(f"{len(result.failed_checks)} check(s) failed, nothing written; {first.name}: {first.detail}")


# ---- validate ------------------------------------------------------------------------------------


@app.command(cls=_Command)
def validate(
    suite: Optional[str] = typer.Option(None, "--suite", help="Suites to run, comma-separated: sc21_table1, sc21_table2, zero_memory, torchtitan (default: all)."),
    max_mean_error: Optional[float] = typer.Option(None, "--max-mean-error", help="Exit 1 when a suite's mean |error| is above this fraction (0.05 is 5%)."),
    max_row_error: Optional[float] = typer.Option(None, "--max-row-error", help="Exit 1 when a row's |error| is above this fraction (0.10 is 10%)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the report here (.md or .json)."),
):
    """Compare distplan's predictions with published measurements: each row, its error, per-suite and overall mean
    and max |error| (configs/reference/published.yaml holds the rows and their sources).

    Exit code 0 for a completed report; 1 when --max-mean-error or --max-row-error is exceeded (one line says
    which); 2 for bad input.
    Example: distplan validate --suite sc21_table1 --max-mean-error 0.05 --max-row-error 0.10 -o validate.md
    """
    from planner.core.fileio import atomic_write_text
    from planner.validate import check_limit_values, check_limits, parse_suites, run_validation, to_json, to_markdown

    names = parse_suites(suite)
    check_limit_values(max_mean_error, max_row_error)
    if output is not None:
        if output.suffix not in (".md", ".json"):
            raise DistplanError(f"--output '{output}' must end in .md or .json")
        check_writable(output, "--output")
    report = run_validation(names)
    over = check_limits(report, max_mean_error, max_row_error)
    text = to_markdown(report)
    out.print(text, markup=False, highlight=False, soft_wrap=True)
    if output is not None:
        atomic_write_text(output, json.dumps(to_json(report), indent=2) + "\n" if output.suffix == ".json" else text)
        err.print(f"wrote {output}", highlight=False, markup=False, soft_wrap=True)
    if over:
        err.print(f"[bold red]failed:[/] {escape(over)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


# ---- entry point -----------------------------------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    main()
