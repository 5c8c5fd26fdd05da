"""DeepSpeed target: ds_config.json, launch.sh (the `deepspeed` launcher), a hostfile for multi-node, and for
pipelines the stage partition in pipeline_partition.json.

Mapping (DeepSpeed 0.19, read from its source):
- batch: train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * dp, where dp is the
  data-parallel size DeepSpeedConfig sees (its `world_size`: the pipeline module's grid / the mpu's data-parallel
  size when model parallelism is used; deepspeed/runtime/config.py DeepSpeedConfig.__init__).
- ZeRO: `zero_optimization.stage`, `overlap_comm` = the plan's overlap_grad_reduce, buckets sized as the cost
  model assumes (planner.cost.memory.DDP_BUCKET_BYTES of bf16 gradients per bucket; ZeRO-3 prefetches one layer),
  `offload_optimizer` {device: cpu} when planned. The plan never offloads parameters, so no offload_param.
- tensor parallelism without a pipeline: DeepSpeed AutoTP training (`tensor_parallel.autotp_size`).
- pipeline: DeepSpeed's PipelineEngine (1F1B) over PipelineModule with PipeModelDataParallelTopology(pp, tp, dp);
  its `pipeline` section sets activation_checkpoint_interval and the tp-partitioned p2p. PipelineEngine asserts
  ZeRO stage < 2 (runtime/pipe/engine.py: "ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism").
  PipelineModule._partition_layers (runtime/pipe/module.py) knows only 'uniform', 'parameters' and
  'type:REGEX'; none takes explicit per-stage counts and there is no 'custom' method, and the config has no
  key for the partition. The planned split therefore goes into pipeline_partition.json as DeepSpeed `parts`
  boundaries over the layer-spec list [embedding, block 0..L-1, head]; distplan's DeepSpeed runner (or your
  script) subclasses PipelineModule and sets `self.parts` from it in `_partition_layers`.
- experts: DeepSpeed AutoEP (`expert_parallel` {enabled, autoep_size, preset_model}).
- recompute: an `activation_checkpointing` section for deepspeed.checkpointing; with a pipeline, full recompute
  is `pipeline.activation_checkpoint_interval` 1 (every block), selective is 0 (the block checkpoints its
  attention core itself).
What DeepSpeed cannot express is refused with the nearest plan it can (see `_refuse`).
"""

from __future__ import annotations

import json
import shlex

from emitters.common import (
    EmitOptions,
    Emission,
    commented,
    header_dict,
    header_lines,
    inexpressible,
    launch_geometry,
    shell_line,
    shell_script,
)
from planner.core.errors import DistplanError
from planner.cost.memory import BUCKET_ELEMENTS
from planner.core.plan import Plan

TARGET = "deepspeed"  # this emitter's --target name
CONFIG = "ds_config.json"  # DeepSpeed's JSON config file
PARTITION = "pipeline_partition.json"  # the stage layer split, for the training script
HOSTFILE = "hostfile"  # DeepSpeed's launcher host list
DEFAULT_SCRIPT = "train.py"  # the training script the launch line names unless told
# AutoEP model presets (deepspeed/module_inject/auto_ep_presets) for the zoo's MoE families
AUTOEP_PRESETS = {"mixtral": "mixtral"}


def _refuse(plan: Plan) -> None:
    """Raise for the parts of a plan DeepSpeed has no way to run."""
    p = plan.parallel
    if p.cp > 1:
        raise inexpressible(TARGET, f"context parallelism cp={p.cp} (DeepSpeed has no ring context parallelism; "
                            "its Ulysses sequence parallelism splits attention heads, a different plan)",
                            f"cp=1 with dp={p.dp * p.cp}, or --target megatron")
    if p.pp > 1 and (p.vpp > 1 or p.schedule == "interleaved"):
        raise inexpressible(TARGET, f"interleaved pipeline with vpp={p.vpp} (DeepSpeed's PipelineEngine runs one "
                            "model chunk per stage)", "vpp=1 with schedule 1f1b, or --target megatron")
    if p.pp > 1 and p.schedule == "gpipe":
        raise inexpressible(TARGET, "the GPipe schedule (DeepSpeed's PipelineEngine runs 1F1B)",
                            "schedule 1f1b (same predicted step time, fewer micro-batches in flight)")
    if p.pp > 1 and p.zero_stage >= 2:
        raise inexpressible(TARGET, f"pipeline parallelism (pp={p.pp}) with ZeRO-{p.zero_stage} (DeepSpeed's "
                            "PipelineEngine rejects ZeRO-2 and ZeRO-3)", f"ZeRO-1 (zero_stage=1) with the same pp={p.pp}")
    if p.tp > 1 and p.pp == 1 and p.sequence_parallel:
        raise inexpressible(TARGET, "sequence parallelism with DeepSpeed AutoTP (AutoTP shards linear layers "
                            "only; norms and dropout stay replicated)", "sequence_parallel=false, or --target megatron")
    if p.ep > 1 and p.tp > 1:
        raise inexpressible(TARGET, f"experts sharded over ep*tp = {p.ep}*{p.tp} (DeepSpeed AutoEP requires "
                            "expert_tensor_parallel_size=1: each expert whole on one rank)",
                            "tp=1 with the same ep, or --target megatron")
    if p.ep > 1 and plan.model.family not in AUTOEP_PRESETS:
        raise inexpressible(TARGET, f"expert parallelism for model family '{plan.model.family}' (no DeepSpeed "
                            f"AutoEP preset; presets exist for {', '.join(sorted(AUTOEP_PRESETS))})", "ep=1")


def ds_config(plan: Plan) -> dict:
    """The DeepSpeed config dict for `plan` (keys in DeepSpeed's documented order of concerns)."""
    p, m = plan.parallel, plan.model
    cfg: dict = {
        "train_batch_size": p.global_batch_size,
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": p.num_microbatches,
        "bf16": {"enabled": True},
    }
    zero: dict = {"stage": p.zero_stage}
    if p.zero_stage >= 1:
        zero.update({"overlap_comm": p.overlap_grad_reduce, "contiguous_gradients": True, "reduce_scatter": True,
                     "reduce_bucket_size": BUCKET_ELEMENTS, "allgather_bucket_size": BUCKET_ELEMENTS})
    if p.zero_stage >= 3:
        layer = (m.block_params() - m.expert_params_per_block()) // p.tp  # one block's dense weights per GPU
        # the cost model holds the current and the prefetched block gathered (planner.cost.memory.stage_memory)
        zero.update({"stage3_prefetch_bucket_size": layer, "stage3_max_live_parameters": 2 * layer})
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    cfg["zero_optimization"] = zero
    if p.recompute != "none":
        cfg["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False,
                                           "cpu_checkpointing": False, "synchronize_checkpoint_boundary": False,
                                           "profile": False}
    if p.pp > 1:
        cfg["pipeline"] = {"stages": p.pp, "activation_checkpoint_interval": 1 if p.recompute == "full" else 0,
                           "pipe_partitioned": p.tp > 1, "grad_partitioned": p.tp > 1}
    elif p.tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": p.tp}
    if p.ep > 1:
        cfg["expert_parallel"] = {"enabled": True, "autoep_size": p.ep, "preset_model": AUTOEP_PRESETS[m.family]}
    return cfg


def partition(plan: Plan, opts: EmitOptions) -> dict:
    """pipeline_partition.json: DeepSpeed `parts` over [embedding, blocks, head] and the 3-D topology."""
    p = plan.parallel
    parts, start = [0], 1  # spec 0 is the embedding; blocks are specs 1..L; the head is spec L+1
    counts = p.layers_per_stage(plan.model.num_layers)
    for i, n in enumerate(counts):
        start += n
        parts.append(start + (1 if i == p.pp - 1 else 0))
    return {
        "version": 1,
        "distplan": header_dict(plan, opts, TARGET),
        "layer_specs": f"[embedding, block 0 .. block {plan.model.num_layers - 1}, head]",
        "parts": parts,
        "topology": {"num_pp": p.pp, "num_mp": p.tp, "num_dp": p.dp},
        "sequence_parallel": p.sequence_parallel,
        "recompute": p.recompute,
        "stages": [{k: s[k] for k in ("rank", "layers", "num_layers", "holds_embedding", "holds_head")}
                   for s in plan.stages()],
    }


def hostfile(plan: Plan, opts: EmitOptions) -> str:
    nodes, per_node = launch_geometry(plan)
    hosts = list(opts.hosts) or [f"node{i}" for i in range(nodes)]
    text = commented(header_lines(plan, opts, TARGET))
    if not opts.hosts:
        text += "# Placeholder host names: replace them with your nodes (one line per node, slots = GPUs).\n"
    return text + "".join(f"{h} slots={per_node}\n" for h in hosts)


def launch_argv(plan: Plan, script: str, host_file: str | None) -> list[str]:
    nodes, per_node = launch_geometry(plan)
    argv = ["deepspeed", "--num_nodes", str(nodes), "--num_gpus", str(per_node)]
    if host_file:
        argv += ["--hostfile", host_file]
    return argv + [script, "--deepspeed_config", CONFIG]


def emit_deepspeed(plan: Plan, opts: EmitOptions) -> Emission:
    _refuse(plan)
    p = plan.parallel
    nodes, _ = launch_geometry(plan)
    if opts.hosts and len(opts.hosts) != nodes:
        raise DistplanError(f"--hosts names {len(opts.hosts)} host(s), but the plan needs {nodes} node(s)")
    script = opts.script or DEFAULT_SCRIPT
    files = {CONFIG: json.dumps(ds_config(plan), indent=2) + "\n"}
    notes = [f"{CONFIG} has no header (JSON has no comments and DeepSpeed ignores unknown top-level keys "
             "silently); this README carries it with the file's sha256."]
    if p.pp > 1:
        files[PARTITION] = json.dumps(partition(plan, opts), indent=2) + "\n"
        notes.append(f"pipeline: DeepSpeed's PipelineModule cannot take explicit per-stage layer counts; "
                     f"{PARTITION} gives the planned split as PipelineModule `parts` "
                     f"({list(p.layers_per_stage(plan.model.num_layers))} blocks per stage) and the topology "
                     f"PipeModelDataParallelTopology(num_pp={p.pp}, num_mp={p.tp}, num_dp={p.dp}) for the runner.")
        notes.append(f"DeepSpeed's PipelineEngine accepts ZeRO stage 0 or 1 only (ZeRO-2/3 are rejected at "
                     f"initialize); this plan uses ZeRO-{p.zero_stage}.")
        if p.tp > 1:
            notes.append(f"tensor parallelism tp={p.tp} inside the pipeline comes from the model code "
                         "(Megatron-DeepSpeed style, num_mp in the topology); this config does not use AutoTP.")
    elif p.tp > 1:
        notes.append(f"tensor parallelism: DeepSpeed AutoTP with autotp_size={p.tp}; pass the TP/DP groups as "
                     "mpu to deepspeed.initialize so the batch sizes count data-parallel ranks only.")
    if p.recompute == "selective":
        notes.append("selective recompute: the training script checkpoints each block's attention core with "
                     "deepspeed.checkpointing (configured by the activation_checkpointing section).")
    host_file = HOSTFILE if nodes > 1 else None
    if host_file:
        files[HOSTFILE] = hostfile(plan, opts)
    argv = launch_argv(plan, script, host_file)
    body = [f'SCRIPT="${{SCRIPT:-{script}}}"  # the DeepSpeed training script; it must accept --deepspeed_config',
            'cd "$HERE"',
            "exec " + shlex.join(argv[:-3]) + ' "$SCRIPT" ' + shlex.join(argv[-2:]) + ' "$@"']
    purpose = [f"Starts the plan with DeepSpeed's launcher on {nodes} node(s)"
               + (" over ssh/pdsh to the hosts in hostfile." if nodes > 1 else "."),
               "Extra arguments are passed to the training script."]
    files["launch.sh"] = shell_script(plan, opts, TARGET, body, purpose)
    return Emission(target=TARGET, files=files, launch=shell_line(argv), executable=("launch.sh",), notes=tuple(notes))
