"""SLURM target: job.sbatch wrapping another target (--wrap torchrun|megatron|deepspeed) for the plan's nodes.

The wrapped target's files are emitted unchanged beside job.sbatch. The batch script allocates N whole
nodes with one task each and sets MASTER_ADDR to the first node, then:
- torchrun / megatron: `srun` runs the wrapped launch.sh once per node (torchrun's c10d rendezvous joins them);
- deepspeed: writes a hostfile of the allocated nodes and runs DeepSpeed's launcher once with
  `--launcher slurm`, which starts the ranks through srun itself.
Partition, account and time limit are site choices: give them to sbatch (`sbatch -p P -A A -t T job.sbatch`).
"""

from __future__ import annotations

from dataclasses import replace

from emitters.common import EmitOptions, Emission, commented, header_lines, launch_geometry, rdzv_id
from emitters.deepspeed import CONFIG, DEFAULT_SCRIPT, emit_deepspeed
from emitters.megatron import emit_megatron
from emitters.torchrun import emit_torchrun
from planner.core.errors import DistplanError
from planner.core.plan import Plan

TARGET = "slurm"  # this emitter's --target name
SBATCH = "job.sbatch"  # the batch script written
# the targets an sbatch script can wrap (explicit: nothing registers itself)
WRAPPABLE = {"torchrun": emit_torchrun, "megatron": emit_megatron, "deepspeed": emit_deepspeed}


def sbatch_text(plan: Plan, opts: EmitOptions, inner: Emission) -> str:
    nodes, per_node = launch_geometry(plan)
    text = "#!/usr/bin/env bash\n" + commented(header_lines(plan, opts, TARGET))
    text += commented([f"Runs the '{inner.target}' launch of this plan on {nodes} node(s) x {per_node} GPU(s).",
                       "Submit from this folder: sbatch [-p PARTITION] [-A ACCOUNT] [-t TIME] job.sbatch"])
    text += "".join(f"#SBATCH {opt}\n" for opt in (
        f"--job-name={rdzv_id(plan)}", f"--nodes={nodes}", "--ntasks-per-node=1", f"--gpus-per-node={per_node}",
        "--exclusive", "--output=%x-%j.out"))
    text += "set -euo pipefail\n"
    text += 'HERE="${SLURM_SUBMIT_DIR:-$(pwd)}"\n'
    text += 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"\n'
    text += 'export MASTER_PORT="${MASTER_PORT:-29500}"\n'
    if nodes == 1:
        text += 'exec bash "$HERE/launch.sh" "$@"\n'
    elif inner.target == "deepspeed":
        script = opts.script or DEFAULT_SCRIPT
        text += 'HOSTFILE="${TMPDIR:-/tmp}/distplan-hostfile.$SLURM_JOB_ID"\n'
        text += f'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots={per_node}/" > "$HOSTFILE"\n'
        text += 'cd "$HERE"\n'
        text += (f'exec deepspeed --num_nodes {nodes} --num_gpus {per_node} --hostfile "$HOSTFILE" --launcher slurm '
                 f'"${{SCRIPT:-{script}}}" --deepspeed_config {CONFIG} "$@"\n')
    else:
        text += f'exec srun --nodes={nodes} --ntasks-per-node=1 bash "$HERE/launch.sh" "$@"\n'
    return text


def emit_slurm(plan: Plan, opts: EmitOptions) -> Emission:
    if opts.wrap not in WRAPPABLE:
        raise DistplanError(f"--wrap '{opts.wrap}' is unknown; valid: {', '.join(WRAPPABLE)}")
    inner = WRAPPABLE[opts.wrap](plan, replace(opts, outer=TARGET))
    files = {SBATCH: sbatch_text(plan, opts, inner), **inner.files}
    notes = (f"job.sbatch wraps the '{inner.target}' target; its launch.sh is what runs on the nodes.",) + inner.notes
    if inner.target == "deepspeed" and plan.nodes > 1:
        notes += ("under SLURM the hostfile is written at run time from the allocation; the hostfile here is for "
                  "launches outside SLURM.",)
    return Emission(target=TARGET, files=files, launch=f"sbatch {SBATCH}", executable=(SBATCH,) + inner.executable,
                    notes=notes, env=inner.env)
