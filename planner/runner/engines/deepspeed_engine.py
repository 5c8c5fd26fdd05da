"""The deepspeed engine: runs the plan's emitted ds_config through `deepspeed.initialize`.

The config is `emitters.deepspeed`'s, unchanged except for what a measured, numerics-checked run needs
(`runtime_config`, pure and tested): the compute dtype the worker chose, no DeepSpeed optimizer or
scheduler section (the engine passes the same AdamW as the torch engine and the single-process reference,
`parallelize.make_optimizer`, at the constant `--lr`), no gradient clipping (as in the reference), and no
DeepSpeed logging. The model and its weights are the torch engine's (`parallelize.build_stage` +
`materialise`, drawn by parameter name from `--seed`), so `--check-numerics` compares against the same
single-process reference.

- pp = 1: ZeRO stage 0-3 on the whole model, `train_batch_size = micro_batch * gas * dp`; each optimizer
  step runs `gas` micro-batches of `engine(x)` / `engine.backward` / `engine.step` (DeepSpeed scales the
  loss by 1/gas and steps at the accumulation boundary).
- pp > 1 (ZeRO 0 or 1): DeepSpeed's pipeline engine on a `PipelineModule` over [embedding, block 0 .. L-1,
  norm+head] cut at the plan's `layer_split`, the `parts` that `distplan emit --target deepspeed` writes to
  pipeline_partition.json. DeepSpeed 0.19's `partition_method` offers 'parameters' (the default: balance
  parameter counts), 'uniform' (balance layer counts) and 'type:<regex>' (balance the count of matching
  layers); none takes explicit boundaries, so `PlannedPipelineModule` overrides `_partition_layers` to set
  `parts` (the attribute those methods compute) from the plan. A tied GPT-2 embedding / LM head is a
  `TiedLayerSpec`: DeepSpeed sums the first and last stage's gradients of it every step. DeepSpeed's
  `TrainSchedule` is 1F1B-like; a plan asking for gpipe runs with it (stated in the notes).
- Recompute: selective (the attention core) and, with pp = 1, full (every block) use the torch engine's
  activation checkpointing (`parallelize.apply_ac`); with pp > 1 full recompute is DeepSpeed's own, the
  emitted `pipeline.activation_checkpoint_interval` 1 over the blocks. The emitted `activation_checkpointing`
  section only acts on models that call `deepspeed.checkpointing` themselves.
- Optimizer offload: on CUDA, DeepSpeedCPUAdam (DeepSpeed's host AdamW; its C++ op is JIT-built on first
  use, about two minutes, cached in ~/.cache/torch_extensions). On CPU the "device" already is the host,
  so torch's AdamW is kept (`zero_force_ds_cpu_optimizer: false`) and nothing is compiled.
- CPU (gloo): DS_ACCELERATOR=cpu and no C++ compiled (planner/build/deepspeed.import_deepspeed says why).

Not supported (clear error, exit 2): tp > 1 (DeepSpeed's engine needs Megatron's mpu for tensor
parallelism), cp > 1, ep > 1, vpp > 1 (no interleaved schedule), and pp > 1 with ZeRO-2/3.
"""

from __future__ import annotations

import copy
import importlib.util
import time

import torch
from torch import nn

from planner.core.errors import require
from planner.build.modeling import Block, lm_loss
from planner.core.plan import Plan
from planner.cost.engines import engine_model
from planner.runner.data import DataSource, local_batch
from planner.runner.engine_api import DistInfo, RankResult, RunOptions, mark_step
from planner.build.deepspeed import MISSING, import_deepspeed
from planner.build.parallelize import apply_ac, build_stage, make_optimizer, materialise, tied

LOG_NEVER = 10**9  # steps_per_print: DeepSpeed prints nothing (the report has the numbers)


def check_supported(plan: Plan, device: str) -> None:
    """Raise DistplanError if DeepSpeed is missing or cannot run `plan` (the launcher calls this before spawning)."""
    cfg = plan.parallel
    require(importlib.util.find_spec("deepspeed") is not None, MISSING)
    engine_model("deepspeed").check(cfg, device)  # tp, cp, ep, vpp, ZeRO with a pipeline (a gpipe plan runs as its 1F1B)


def runtime_config(plan: Plan, emitted: dict, dtype: str, device_type: str) -> tuple[dict, list[str]]:
    """The emitted ds_config as this run uses it, and notes on what changed (pure: no DeepSpeed needed)."""
    p = plan.parallel
    conf = copy.deepcopy(emitted)
    notes: list[str] = []
    gas = p.num_microbatches
    for key, want in (("train_micro_batch_size_per_gpu", p.micro_batch_size), ("gradient_accumulation_steps", gas),
                      ("train_batch_size", p.micro_batch_size * gas * p.dp)):
        if key in conf:
            require(conf[key] == want, f"emitted ds_config has {key} {conf[key]!r} but the plan needs {want} "
                                       f"(micro_batch {p.micro_batch_size}, gas {gas}, dp {p.dp})")
        conf[key] = want
    zero = dict(conf.get("zero_optimization") or {})
    require(zero.get("stage", 0) == p.zero_stage,
            f"emitted ds_config has ZeRO stage {zero.get('stage', 0)} but the plan says {p.zero_stage}")
    zero["stage"] = p.zero_stage
    offload = p.offload_optimizer
    if offload:
        zero.setdefault("offload_optimizer", {"device": "cpu"})
    conf["zero_optimization"] = zero
    # precision: the worker's choice (bf16 on CUDA, fp32 on CPU); fp32 master weights either way
    conf.pop("fp16", None)
    conf["bf16"] = {**(conf.get("bf16") or {}), "enabled": dtype == "bf16"}
    if dtype != "bf16" and (emitted.get("bf16") or {}).get("enabled"):
        notes.append(f"ds_config bf16 turned off: this run computes in {dtype}")
    # the optimizer is the reference's AdamW, passed to deepspeed.initialize (no fused/CPU Adam JIT build)
    for section in ("optimizer", "scheduler"):
        if section in conf:
            notes.append(f"ds_config '{section}' section replaced: AdamW (0.9, 0.95), eps 1e-8, weight decay 0.1, "
                         f"constant lr, as the torch engine and the numerics reference")
            conf.pop(section)
    conf["zero_allow_untested_optimizer"] = True
    if offload and device_type != "cuda":
        conf["zero_force_ds_cpu_optimizer"] = False
        notes.append("offload_optimizer on CPU: torch AdamW on the host (DeepSpeedCPUAdam would only JIT-build a faster step)")
    if conf.get("gradient_clipping"):
        notes.append(f"gradient_clipping {conf['gradient_clipping']} turned off, as in the numerics reference")
    conf["gradient_clipping"] = 0.0
    conf["steps_per_print"] = LOG_NEVER
    conf["wall_clock_breakdown"] = False
    return conf, notes


def emitted_config(plan: Plan) -> dict:
    """The plan's ds_config as `distplan emit` writes it."""
    from emitters.deepspeed import ds_config

    return ds_config(plan)


def train(plan: Plan, opts: RunOptions, dist: DistInfo) -> RankResult:
    import torch.distributed as tdist

    device = torch.device(dist.device)
    check_supported(plan, device.type)
    cfg, spec = plan.parallel, plan.model
    deepspeed = import_deepspeed(device.type)
    deepspeed.init_distributed(dist_backend=dist.backend)  # wraps the worker's process group (PipelineModule needs it)
    conf, notes = runtime_config(plan, emitted_config(plan), opts.dtype, device.type)
    notes.insert(0, f"DeepSpeed {deepspeed.__version__}, ZeRO-{cfg.zero_stage}, compute dtype {opts.dtype}, "
                    f"fp32 master weights and AdamW states")
    m = cfg.num_microbatches
    pp_rank, dp_rank = dist.rank // cfg.dp, dist.rank % cfg.dp  # Megatron order, tp = cp = 1

    first, last = cfg.stage_layer_ranges(spec.num_layers)[pp_rank]
    end = last + 1
    model = build_stage(spec, first, end, has_embed=pp_rank == 0, has_head=pp_rank == cfg.pp - 1)
    apply_ac(model, "none" if cfg.pp > 1 and cfg.recompute == "full" else cfg.recompute)  # pp > 1: DeepSpeed's own
    materialise(model, device, spec, opts.seed)
    if cfg.pp > 1:
        model = pipeline_module(model, plan, pp_rank)
        if cfg.schedule != "1f1b":
            notes.append(f"schedule '{cfg.schedule}' planned; DeepSpeed's pipeline engine runs its own 1F1B TrainSchedule")
    optimizer = _optimizer(deepspeed, model, opts.lr, cfg.offload_optimizer and device.type == "cuda")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=conf)
    notes.append(f"DeepSpeed optimizer {type(engine.optimizer).__name__} over "
                 f"{type(getattr(engine, 'basic_optimizer', None) or optimizer).__name__}")
    if cfg.pp > 1:
        require(engine.grid.get_stage_id() == pp_rank and engine.grid.get_data_parallel_id() == dp_rank,
                f"DeepSpeed placed rank {dist.rank} at stage {engine.grid.get_stage_id()}, data-parallel rank "
                f"{engine.grid.get_data_parallel_id()}; the plan's order puts it at {pp_rank}, {dp_rank}")
        notes.append(f"pipeline: PipelineModule parts {list(engine.module.parts)} over [embedding, blocks, norm+head] "
                     f"(layer_split {list(cfg.layers_per_stage(spec.num_layers))}); activation checkpoint interval "
                     f"{engine.module.activation_checkpoint_interval}")

    data = DataSource(spec, cfg.seq_len, cfg.global_batch_size, seed=opts.seed, path=opts.data_path, dtype=opts.data_dtype)
    step_times, losses = [], []
    for step in range(opts.warmup + opts.steps):
        mark_step(step)
        inputs, targets = local_batch(*data.global_batch(step), dp_rank, cfg.dp, cfg.micro_batch_size, m)
        inputs, targets = inputs.to(device), targets.to(device)
        _sync(device)
        t0 = time.perf_counter()
        if cfg.pp == 1:
            loss = _accumulate(engine, inputs, targets, m)
        else:
            mb = cfg.micro_batch_size
            batches = iter([(inputs[j * mb:(j + 1) * mb], targets[j * mb:(j + 1) * mb]) for j in range(m)])
            loss = engine.train_batch(data_iter=batches).detach().float()  # mean over the global batch, on every stage
        _sync(device)
        if step >= opts.warmup:
            step_times.append(time.perf_counter() - t0)
        if cfg.pp == 1 and cfg.dp > 1:
            tdist.all_reduce(loss, op=tdist.ReduceOp.SUM)
            loss = loss / cfg.dp
        losses.append(float(loss))

    peak_alloc = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    peak_res = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
    if device.type != "cuda":
        notes.append("CPU: peak memory is not measured (no caching allocator statistics)")
    return RankResult(
        rank=dist.rank, pp_rank=pp_rank, step_times_s=tuple(step_times), losses=tuple(losses),
        peak_allocated_bytes=int(peak_alloc), peak_reserved_bytes=int(peak_res), device=dist.device, dtype=opts.dtype,
        notes=tuple(notes),
        extra={"dp_rank": dp_rank, "tp_rank": 0, "has_loss": True, "chunks": [[pp_rank, first, end]],
               "deepspeed_version": deepspeed.__version__, "zero_stage": cfg.zero_stage,
               "pipeline_parts": list(engine.module.parts) if cfg.pp > 1 else [],
               "schedule": "deepspeed TrainSchedule" if cfg.pp > 1 else "none (pp=1)",
               "local_params": sum(p.numel() for p in model.parameters())},
    )


def _optimizer(deepspeed, model: nn.Module, lr: float, cpu_adam: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    if not cpu_adam:
        return make_optimizer(params, lr)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, adamw_mode=True)


def _accumulate(engine, inputs: torch.Tensor, targets: torch.Tensor, m: int) -> torch.Tensor:
    """pp = 1: m micro-batches through the engine; returns their mean loss (this rank's share of the batch)."""
    mb = inputs.shape[0] // m
    total = torch.zeros((), device=inputs.device)
    for j in range(m):
        loss = lm_loss(engine(inputs[j * mb:(j + 1) * mb]), targets[j * mb:(j + 1) * mb])
        engine.backward(loss)
        engine.step()
        total += loss.detach().float() / m
    return total


# ---- the pipeline module ------------------------------------------------------------------------

class NormHead(nn.Module):
    """The last pipeline layer: final norm, then the LM head (or ViT classifier)."""

    def __init__(self, norm: nn.Module, head: nn.Module):
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def pipeline_parts(layer_split) -> list[int]:
    """PipelineModule boundaries over the layer list [embedding, block 0 .. block L-1, norm+head].

    Stage s builds layers [parts[s], parts[s+1]): stage 0 the embedding and its blocks, the last stage its
    blocks and the norm+head. The same `parts` as `distplan emit --target deepspeed`'s pipeline_partition.json.
    """
    parts, start = [0], 1
    for n in layer_split:
        start += n
        parts.append(start)
    parts[-1] += 1
    return parts


def pipeline_module(stage: nn.Module, plan: Plan, pp_rank: int) -> nn.Module:
    """This rank's materialised stage as a PipelineModule over the whole model's layer list.

    Local entries are the stage's own modules (on the device, with the reference weights); entries of
    other stages are LayerSpecs that are never built here. With full recompute DeepSpeed checkpoints
    every block itself (the emitted `pipeline.activation_checkpoint_interval` 1; blocks only, not the
    embedding or head).
    """
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    spec, cfg = plan.model, plan.parallel
    parts = pipeline_parts(cfg.layers_per_stage(spec.num_layers))
    local = range(parts[pp_rank], parts[pp_rank + 1])
    tie = tied(spec)

    class PrebuiltTied(TiedLayerSpec):
        """A TiedLayerSpec whose module is built already (the stage's own, with the reference weights)."""

        def __init__(self, key, module, **kw):
            super().__init__(key, type(module), **kw)
            self.module = module

        def build(self, log=False):
            return self.module

    def placeholder():  # another stage's layer: never built on this rank
        return TiedLayerSpec("embedding", nn.Identity) if tie else LayerSpec(nn.Identity)

    last = spec.num_layers + 1
    norm_head = NormHead(stage.norm, stage.head) if last in local else None
    layers: list = []
    if 0 in local:
        layers.append(PrebuiltTied("embedding", stage.embed, tied_weight_attr="tok.weight") if tie else stage.embed)
    else:
        layers.append(placeholder())
    layers += [stage.layers[str(i)] if i + 1 in local else LayerSpec(Block, spec) for i in range(spec.num_layers)]
    if norm_head is not None:
        layers.append(PrebuiltTied("embedding", norm_head, tied_weight_attr="head.weight") if tie else norm_head)
    else:
        layers.append(placeholder())

    class PlannedPipelineModule(PipelineModule):
        """PipelineModule cut at the plan's layer_split (see the module docstring)."""

        def _partition_layers(self, method="uniform"):
            self.parts = list(parts)
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    full = cfg.recompute == "full"
    module = PlannedPipelineModule(layers, topology=PipeDataParallelTopology(num_pp=cfg.pp, num_dp=cfg.dp),
                                   loss_fn=lm_loss, partition_method="planned", activation_checkpoint_interval=int(full),
                                   checkpointable_layers=["Block"] if full else None)
    if tie and norm_head is not None:
        # DeepSpeed marks every parameter of the second copy of a tied module as replicated (left out of the
        # gradient norm); only head.weight is a copy, the final norm is this stage's alone
        for p in norm_head.norm.parameters():
            p.ds_pipe_replicated = False
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
