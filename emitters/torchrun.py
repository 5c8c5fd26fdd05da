"""torchrun target: launch distplan's own PyTorch-native runner for the plan (what `distplan run` executes).

Files: plan.yaml (the plan itself, which the runner's workers read) and launch.sh. One node: torchrun
--standalone; several: c10d rendezvous at $MASTER_ADDR:$MASTER_PORT, the same command on every node.

RUNNER_WORKER is the contract with the runner (planner/runner/, written separately): the module torchrun
starts on every GPU and its arguments. `distplan run` must start exactly this argv; it is spelled here and
nowhere else, so change it here and both stay aligned.
"""

from __future__ import annotations

from emitters.common import (
    EmitOptions,
    Emission,
    commented,
    header_lines,
    launch_geometry,
    shell_line,
    shell_script,
    torchrun_prefix,
    torchrun_shell,
)
from planner.core.errors import DistplanError
from planner.core.plan import Plan, plan_to_yaml

TARGET = "torchrun"  # this emitter's --target name
PLAN_FILE = "plan.yaml"  # the plan copied beside the launch script

#: argv after `torchrun <torchrun options>`: the runner's per-GPU worker module and its arguments;
#: "{plan}" is replaced by the plan file's path. Used by this emitter and by `distplan run`.
RUNNER_WORKER: tuple[str, ...] = ("-m", "planner.runner.worker", "--plan", "{plan}", "--engine", "torch")


def runner_worker_argv(plan_file: str) -> list[str]:
    """RUNNER_WORKER with the plan file filled in."""
    return [arg.replace("{plan}", plan_file) for arg in RUNNER_WORKER]


def runner_refusal(plan: Plan) -> str | None:
    """Why the worker this target launches (distplan's torch engine, on GPUs) would refuse `plan`; None if it runs it."""
    from planner.runner.engines.torch_engine import check_supported  # the engine table's torch row, and the model's

    try:
        check_supported(plan, "cuda")
    except DistplanError as exc:
        return str(exc)
    return None


def emit_torchrun(plan: Plan, opts: EmitOptions) -> Emission:
    nodes, _ = launch_geometry(plan)
    worker = runner_worker_argv(PLAN_FILE)
    body = ['cd "$HERE"', "exec " + torchrun_shell(plan) + " " + shell_line(worker) + ' "$@"']
    where = "on every node (MASTER_ADDR = the first node; job.sbatch does this under SLURM)" if nodes > 1 else "on the node"
    purpose = [f"Starts distplan's PyTorch runner (planner.runner.worker) for this plan {where}.",
               "Extra arguments are passed to the worker."]
    plan_text = commented(header_lines(plan, opts, TARGET)) + plan_to_yaml(plan)
    files = {PLAN_FILE: plan_text, "launch.sh": shell_script(plan, opts, TARGET, body, purpose)}
    notes = [f"{PLAN_FILE} is the plan the workers run; its digest is {plan.digest()}."]
    why = runner_refusal(plan)
    if why is not None:  # `emit --check` fails on it
        notes.append(f"distplan's torch engine refuses this plan ({why}): re-plan with `distplan solve --engine torch`")
    return Emission(target=TARGET, files=files, launch=shell_line(torchrun_prefix(plan) + worker),
                    executable=("launch.sh",), notes=tuple(notes))
