"""Emitters: turn a Plan into the files and the launch command of one framework, and nothing else.

TARGETS is the explicit registry (nothing registers itself on import). `emit_plan` is the pure step
(Plan -> Emission, README.txt included); `run_emit` is what `distplan emit` calls: load the plan, emit,
optionally check, write the folder atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from emitters.checks import CheckResult, check_emission
from emitters.common import EmitOptions, Emission, with_readme, write_emission
from emitters.deepspeed import emit_deepspeed
from emitters.megatron import emit_megatron
from emitters.slurm import WRAPPABLE, emit_slurm
from emitters.torchrun import RUNNER_WORKER, emit_torchrun, runner_worker_argv
from planner.core.errors import DistplanError, require
from planner.core.fileio import check_writable_folder
from planner.core.plan import Plan, load_plan

# emitter per `distplan emit --target` name
TARGETS = {"deepspeed": emit_deepspeed, "megatron": emit_megatron, "torchrun": emit_torchrun, "slurm": emit_slurm}


def emit_plan(plan: Plan, target: str, opts: EmitOptions | None = None) -> Emission:
    """The files (README.txt included) and launch command of `plan` for `target`. Pure: writes nothing."""
    require(target in TARGETS, f"target '{target}' is unknown; valid: {', '.join(TARGETS)}")
    opts = opts or EmitOptions()
    return with_readme(plan, opts, TARGETS[target](plan, opts))


@dataclass(frozen=True)
class EmitRequest:
    plan: str  # path of the plan file
    target: str
    out: str
    force: bool = False
    check: bool = False
    script: str | None = None
    wrap: str | None = None  # slurm only: the wrapped target (default torchrun)
    hosts: str | None = None  # comma-separated host names for the DeepSpeed hostfile


@dataclass(frozen=True)
class EmitResult:
    plan: Plan
    emission: Emission
    out_dir: Path
    written: tuple[Path, ...]  # empty when a requested check failed (nothing is written then)
    checks: tuple[CheckResult, ...]

    @property
    def failed_checks(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if c.failed)


def _options(req: EmitRequest) -> EmitOptions:
    require(req.target in TARGETS, f"--target '{req.target}' is unknown; valid: {', '.join(TARGETS)}")
    if req.wrap is not None:
        require(req.target == "slurm", "--wrap applies to --target slurm only")
        require(req.wrap in WRAPPABLE, f"--wrap '{req.wrap}' is unknown; valid: {', '.join(WRAPPABLE)}")
    hosts: tuple[str, ...] = ()
    if req.hosts:
        hosts = tuple(h.strip() for h in req.hosts.split(","))
        require(all(hosts), f"--hosts '{req.hosts}' must be comma-separated host names, e.g. node1,node2")
    return EmitOptions(plan_path=req.plan, out_dir=req.out, script=req.script, wrap=req.wrap or "torchrun", hosts=hosts)


def run_emit(req: EmitRequest) -> EmitResult:
    """`distplan emit`: load and validate the plan, emit, check if asked, then write the folder all at once."""
    opts = _options(req)
    out = check_writable_folder(req.out, "--output")
    if out.exists() and not req.force:
        raise DistplanError(f"output folder '{out}' exists; pass --force to replace it, or choose another -o")
    plan = load_plan(req.plan)
    em = emit_plan(plan, req.target, opts)
    checks = tuple(check_emission(plan, em)) if req.check else ()
    if any(c.failed for c in checks):
        return EmitResult(plan=plan, emission=em, out_dir=out, written=(), checks=checks)
    written = tuple(write_emission(em, out, force=req.force))
    return EmitResult(plan=plan, emission=em, out_dir=out, written=written, checks=checks)


__all__ = ["TARGETS", "EmitOptions", "Emission", "EmitRequest", "EmitResult", "emit_plan", "run_emit",
           "RUNNER_WORKER", "runner_worker_argv", "CheckResult"]
