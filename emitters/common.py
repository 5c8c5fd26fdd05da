"""What every emitter shares: the Emission and CheckResult types, the header, launch geometry, the atomic output folder.

An emitter is a pure function `Plan, EmitOptions -> Emission`: file names and their text, plus the launch
command. Nothing here prints. Files reach disk only through `write_emission`, which writes the whole set
into a temporary folder beside the target and renames it into place, so a reader (or a crash) never sees
half of an emission.

Header policy (every emitted file carries one):
- files that allow comments (shell, sbatch, hostfile, Megatron argument file, YAML) start with a `#` header:
  distplan version, plan hash (`Plan.digest()`), predicted step time and peak memory, regenerate command;
- JSON has no comments, and DeepSpeed's `DeepSpeedConfig` silently ignores unknown top-level keys (it reads
  known keys with `dict.get`; only its nested pydantic sections forbid extras, see deepspeed/runtime/config.py),
  so a `_distplan` key would be accepted without being understood. `ds_config.json` therefore carries no
  header; README.txt beside it carries the header and the sha256 of every file, so a copied or edited
  config can be traced back to its plan. distplan's own JSON sidecars carry the header in a `distplan` key.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from planner.core.version import __version__
from planner.core.errors import DistplanError
from planner.core.plan import Plan

README = "README.txt"  # the file every emitter writes beside its outputs


@dataclass(frozen=True)
class EmitOptions:
    """What the user chose beyond the plan; everything here appears in the regenerate command."""

    plan_path: str = "plan.yaml"  # as given on the command line (the runner and the header refer to it)
    out_dir: str = "out"
    script: str | None = None  # DeepSpeed training script (default train.py); Megatron-LM checkout is $MEGATRON_LM
    wrap: str = "torchrun"  # the target an sbatch script wraps (--target slurm)
    hosts: tuple[str, ...] = ()  # host names for the DeepSpeed hostfile (default: placeholders node0..)
    outer: str | None = None  # set by a wrapping target (slurm): its command regenerates the wrapped files too


@dataclass(frozen=True)
class Emission:
    target: str
    files: dict[str, str]  # file name (relative to the output folder) -> text, in the order to list them
    launch: str  # the command that starts the plan, run from the output folder
    executable: tuple[str, ...] = ()  # files to mark executable
    notes: tuple[str, ...] = ()  # choices the emitter made that a reviewer should know (also in README.txt)
    env: dict[str, str] = field(default_factory=dict)  # environment the launch script exports


def inexpressible(target: str, what: str, nearest: str) -> DistplanError:
    """The error for a plan the target cannot express: say what, and the nearest plan it can."""
    return DistplanError(f"{target} cannot express this plan: {what}; nearest expressible plan: {nearest}")


PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one validator of emitted files (emitters/checks.py, emitters/checks_megatron.py)."""

    name: str
    status: str  # pass | fail | skip
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL


def check_result(name: str, errors: list[str], ok_detail: str = "") -> CheckResult:
    return CheckResult(name, FAIL, "; ".join(errors)) if errors else CheckResult(name, PASS, ok_detail)


# ---- geometry ---------------------------------------------------------------------------------


def launch_geometry(plan: Plan) -> tuple[int, int]:
    """(nodes, processes per node): one process per GPU, nodes filled to gpus_per_node."""
    per_node = min(plan.gpus, plan.cluster.gpus_per_node)
    if plan.gpus % per_node:
        raise DistplanError(f"the plan's {plan.gpus} GPUs are not a whole number of {per_node}-GPU nodes of "
                            f"cluster '{plan.cluster.name}'; launchers start the same number of processes per node")
    return plan.nodes, per_node


def shell_line(argv: list[str]) -> str:
    """Join argv for display and copy-paste: quote what the shell would split or glob, keep $VARS expandable."""
    return " ".join(w if re.fullmatch(r"[\w@%+=:,./${}-]+", w) else shlex.quote(w) for w in argv)


def rdzv_id(plan: Plan) -> str:
    return f"distplan-{plan.digest()}"


def torchrun_prefix(plan: Plan) -> list[str]:
    """torchrun's own arguments: standalone on one node, c10d rendezvous at $MASTER_ADDR:$MASTER_PORT on several."""
    nodes, per_node = launch_geometry(plan)
    if nodes == 1:
        return ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", str(per_node)]
    return ["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(per_node), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "$MASTER_ADDR:$MASTER_PORT", "--rdzv-id", rdzv_id(plan)]


def torchrun_shell(plan: Plan) -> str:
    """torchrun_prefix as a shell fragment: the rendezvous endpoint expands from the environment."""
    argv = torchrun_prefix(plan)
    if "--rdzv-endpoint" not in argv:
        return shlex.join(argv)
    i = argv.index("--rdzv-endpoint")
    return (shlex.join(argv[:i + 1]) + ' "${MASTER_ADDR:?set MASTER_ADDR to the first node}:${MASTER_PORT:-29500}" '
            + shlex.join(argv[i + 2:]))


# ---- header -----------------------------------------------------------------------------------


def plan_summary(plan: Plan) -> str:
    p = plan.parallel
    sp = ", sp" if p.sequence_parallel else ""
    off = ", offload-optimizer" if p.offload_optimizer else ""
    return (f"{plan.model.name} on {plan.gpus} x {plan.cluster.gpu.name}: dp={p.dp} tp={p.tp} pp={p.pp} cp={p.cp} "
            f"ep={p.ep} vpp={p.vpp}, micro-batch {p.micro_batch_size} x {p.num_microbatches} {p.schedule}, "
            f"zero={p.zero_stage}{off}, recompute={p.recompute}{sp}")


def regenerate_command(opts: EmitOptions, target: str) -> str:
    argv = ["distplan", "emit", opts.plan_path, "--target", target, "-o", opts.out_dir]
    if opts.script:
        argv += ["--script", opts.script]
    if target == "slurm":
        argv += ["--wrap", opts.wrap]
    if opts.hosts:
        argv += ["--hosts", ",".join(opts.hosts)]
    return shlex.join(argv)


def header_lines(plan: Plan, opts: EmitOptions, target: str) -> list[str]:
    pred = plan.prediction
    mem = pred.get("peak_memory_gib")
    cap = pred.get("capacity_gib")
    mem_text = f"peak memory {mem:.2f} GiB per GPU" if isinstance(mem, (int, float)) else "peak memory unknown"
    if isinstance(cap, (int, float)):
        mem_text += f" (of {cap:.1f} GiB usable)"
    return [
        f"Generated by distplan {__version__} (target {target}); regenerating overwrites edits.",
        f"Plan {plan.digest()}: {plan_summary(plan)}",
        f"Predicted: step time {pred['step_time_s']:.4g} s, {mem_text}",
        f"Regenerate: {regenerate_command(opts, opts.outer or target)}",
    ]


def commented(lines: list[str], prefix: str = "# ") -> str:
    return "".join(f"{prefix}{line}".rstrip() + "\n" for line in lines)


def header_dict(plan: Plan, opts: EmitOptions, target: str) -> dict:
    """The header as data, for distplan's own JSON sidecars."""
    pred = plan.prediction
    return {"distplan_version": __version__, "plan_hash": plan.digest(), "target": target,
            "predicted_step_time_s": pred["step_time_s"], "predicted_peak_memory_gib": pred.get("peak_memory_gib"),
            "regenerate": regenerate_command(opts, opts.outer or target)}


def shell_script(plan: Plan, opts: EmitOptions, target: str, body: list[str], purpose: list[str]) -> str:
    """A bash script: shebang, header, what it does, strict mode, then `body` lines."""
    text = "#!/usr/bin/env bash\n" + commented(header_lines(plan, opts, target)) + commented(purpose)
    text += "set -euo pipefail\n"
    text += 'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"\n'
    return text + "".join(line + "\n" for line in body)


# ---- README -----------------------------------------------------------------------------------


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def with_readme(plan: Plan, opts: EmitOptions, em: Emission) -> Emission:
    """Add README.txt: header, launch command, every file with its sha256, and the emitter's notes."""
    lines = header_lines(plan, opts, em.target)
    lines += ["", "Launch (from this folder):", f"  {em.launch}", "", "Files (sha256):"]
    lines += [f"  {name}  {sha256_text(text)}" for name, text in em.files.items()]
    if em.notes:
        lines += ["", "Notes:"] + [f"  - {n}" for n in em.notes]
    text = "".join(line.rstrip() + "\n" for line in lines)
    return Emission(target=em.target, files={**em.files, README: text}, launch=em.launch,
                    executable=em.executable, notes=em.notes, env=em.env)


# ---- writing ----------------------------------------------------------------------------------


def write_emission(em: Emission, out_dir: str | Path, force: bool = False) -> list[Path]:
    """Write every file of `em` under `out_dir`, all or nothing.

    The files go into a fresh temporary folder beside `out_dir`, which is then renamed into place. An
    existing `out_dir` is refused unless `force`; with `force` it is moved aside, replaced, then deleted.
    """
    out = Path(out_dir)
    if out.exists() and not force:
        raise DistplanError(f"output folder '{out}' exists; pass --force to replace it, or choose another -o")
    if out.exists() and not out.is_dir():
        raise DistplanError(f"output path '{out}' exists and is not a folder")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise DistplanError(f"cannot create output folder '{out}': {exc.strerror}") from None
    try:
        for name, text in em.files.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            if name in em.executable:
                path.chmod(0o755)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DistplanError(f"cannot write output folder '{out}': {exc.strerror}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / name for name in em.files]
