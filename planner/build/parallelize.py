"""Cut a zoo model into pipeline stages and apply PyTorch's own parallelism to them.

Used by the torch engine and by the single-process numerics reference, so both train the same
weights. In order (torchtitan's `parallelize_llama` order):

1. `stage_layers` / `build_stage`: the layers of each (virtual) pipeline stage, from the plan's uneven
   `layer_split`; a stage is a `StageModule` holding model.embed (first), model.layers[a:b], model.norm
   and model.head (last) under the full model's parameter names, built on the meta device.
2. `apply_tp`: Megatron tensor parallelism (Shoeybi et al. 2019, sec. 3) through DTensor: q/k/v and
   fc1 / gate / up column-wise, o_proj and fc2 / down row-wise, token embedding row-wise over the
   vocabulary, LM head column-wise; with sequence parallelism (Korthikanti et al. 2022, sec. 4.2.2) the
   norms and residual stream are sharded over the sequence (all-gather before attention/MLP,
   reduce-scatter after).
3. `apply_ac`: activation checkpointing; full: every block; selective: the attention core only
   (Korthikanti et al. 2022 sec. 5: recompute QK^T, softmax and AV, keep the linear layers' inputs).
4. `apply_data_parallel`: ZeRO stage -> PyTorch data parallelism (ZERO_MAPPING, below).
5. `init_weights_by_name`: the weights, identical for any cut and sharding of the model.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from planner.core.job import ParallelConfig
from planner.core.model import ModelSpec
from planner.build.modeling import INIT_STD, ClassTokenAndPositions, RMSNorm, build_model

# how the torch engine runs each ZeRO stage, as its run report says
ZERO_MAPPING = {
    0: "ZeRO-0 -> DistributedDataParallel (gradients all-reduced, bucketed and overlapped with backward); with bf16 the "
       "model holds bf16 weights and gradients (all-reduced as bf16) and MasterWeightsOptimizer the fp32 master weights "
       "and AdamW states (2 + 2 + 12 bytes/param); with tp > 1 its DTensor-aware equivalent, FSDP2's replicate() "
       "(per block: weights replicated, gradients all-reduced, bf16 through MixedPrecisionPolicy)",
    1: "ZeRO-1 -> FSDP2 fully_shard(reshard_after_forward=False): optimizer states and gradients sharded, weights "
       "kept unsharded from forward to backward; FSDP2 has no optimizer-only sharding, so ZeRO-1 runs as ZeRO-2",
    2: "ZeRO-2 -> FSDP2 fully_shard(reshard_after_forward=False): optimizer states and gradients sharded, "
       "weights all-gathered once per step and kept between forward and backward (SHARD_GRAD_OP)",
    3: "ZeRO-3 -> FSDP2 fully_shard(reshard_after_forward=True): weights, gradients and optimizer states sharded; "
       "weights all-gathered for forward and again for backward",
}
RESIDUAL_PROJECTIONS = ("o_proj", "fc2", "down_proj")  # write into the residual stream: smaller init (GPT-2)
_WRAPPED = "_checkpoint_wrapped_module."  # the name prefix torch's checkpoint_wrapper adds to a module's parameters


# ---- stages ------------------------------------------------------------------------------------------

def stage_layers(cfg: ParallelConfig, num_layers: int) -> list[list[tuple[int, int]]]:
    """[pp rank][chunk] -> (first, end) model layer indices (end exclusive).

    Virtual stage v = chunk * pp + rank (Megatron's interleaving) holds layers_per_stage[rank] / vpp
    consecutive layers; virtual stages are laid out in v order, so with vpp = 1 rank r holds the
    plan's contiguous range stage_layer_ranges()[r].
    """
    per_rank = cfg.layers_per_stage(num_layers)
    out: list[list[tuple[int, int]]] = [[] for _ in range(cfg.pp)]
    start = 0
    for v in range(cfg.pp * cfg.vpp):
        rank = v % cfg.pp
        n = per_rank[rank] // cfg.vpp
        out[rank].append((start, start + n))
        start += n
    return out


class StageModule(nn.Module):
    """One (virtual) pipeline stage: embed (first), layers[first:end], norm + head (last).

    Parameter names are the full model's (`embed.tok.weight`, `layers.7.attn.q_proj.weight`,
    `head.weight`), so weights and checkpoints are addressed the same way for any split.
    """

    def __init__(self, full: nn.Module, first: int, end: int, has_embed: bool, has_head: bool):
        super().__init__()
        self.embed = full.embed if has_embed else None
        self.layers = nn.ModuleDict({str(i): full.layers[i] for i in range(first, end)})
        self.norm = full.norm if has_head else None
        self.head = full.head if has_head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for layer in self.layers.values():
            x = layer(x)
        if self.head is not None:
            x = self.head(self.norm(x))
        return x


# torch.distributed.pipelining's schedule class for each ParallelConfig.schedule (the torch engine's and the
# pipeline profiler's)
PIPELINE_SCHEDULES = {"1f1b": "Schedule1F1B", "gpipe": "ScheduleGPipe", "interleaved": "ScheduleInterleaved1F1B"}


def pipeline_schedule(kind: str):
    """torch.distributed.pipelining's class of the schedule `kind` (PIPELINE_SCHEDULES)."""
    from torch.distributed import pipelining

    return getattr(pipelining, PIPELINE_SCHEDULES[kind])


def build_stage(spec: ModelSpec, first: int, end: int, has_embed: bool, has_head: bool) -> StageModule:
    """A stage on the meta device (nothing allocated); `materialise` puts it on a device."""
    return StageModule(build_model(spec, "meta"), first, end, has_embed, has_head)


def build_full(spec: ModelSpec) -> StageModule:
    return build_stage(spec, 0, spec.num_layers, True, True)


def materialise(module: nn.Module, device: torch.device, spec: ModelSpec, seed: int,
                draw_on: torch.device | None = None) -> None:
    """Allocate a meta-device module (possibly TP/FSDP-sharded) on `device` and initialise its weights, drawn on
    `draw_on` (default `device`; an FSDP shard offloaded to the host is drawn on the run's GPU: draw_device)."""
    module.to_empty(device=device)
    tie_head(module, spec)
    init_weights_by_name(module, spec, seed, draw_on or device)


def tie_head(module: nn.Module, spec: ModelSpec) -> None:
    """Re-share head.weight with embed.tok.weight in a stage holding both (to_empty and TP swap parameters)."""
    if isinstance(module, StageModule) and module.embed is not None and module.head is not None and tied(spec):
        module.head.weight = module.embed.tok.weight


def tied(spec: ModelSpec) -> bool:
    return spec.tie_embeddings and not spec.is_vit


# ---- weights --------------------------------------------------------------------------------------

def canonical_name(name: str) -> str:
    """Strip wrapper prefixes (activation checkpointing, DDP) so names are the model's own."""
    name = name.replace(_WRAPPED, "")
    return name[len("module."):] if name.startswith("module.") else name


def draw_device(device: torch.device) -> torch.device:
    """Where weights are drawn for a run computing on `device`: its GPU on CUDA, else the CPU."""
    return device if device.type == "cuda" else torch.device("cpu")


def draw(key: str, seed: int, shape, std: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """N(0, std) of `shape`, from a generator seeded with (seed, key) on `device`: the same numbers for the same
    (seed, key, shape) on any rank, and on any GPU of one kind and torch version (CUDA's Philox), but not the
    same numbers on the CPU as on a GPU. Every rank and the single-process reference of one run draw on the same
    kind of device (draw_device), so the numerics check compares like with like.

    On the GPU because the CPU was the slow part of starting a run: one core draws about 1.7e8 numbers a second,
    and each FSDP rank draws every full tensor (llama-2-13b: 13e9 numbers, over a minute per rank; a 2xH200
    campaign spent 50-70 s of each 13B run starting)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed * 2_147_483_629 + zlib.crc32(key.encode()))
    return torch.randn(tuple(shape), generator=gen, device=device) * std


@torch.no_grad()
def init_weights_by_name(module: nn.Module, spec: ModelSpec, seed: int, device: torch.device | str = "cpu") -> None:
    """GPT-2 initialisation (the distribution of planner.build.modeling.init_weights), drawn per parameter name.

    Each tensor is drawn whole on `device` (`draw`) from a generator seeded with (seed, its model-level name):
    N(0, 0.02) weights, N(0, 0.02 / sqrt(2 * layers)) for the residual projections, zero biases, unit
    norm scales. A pipeline stage, a tensor-parallel shard or an FSDP shard thus holds exactly the
    values the whole single-process model holds, on any device. A DTensor gets its local shard of the
    full draw. An untied copy of a tied LM head (the last pipeline stage) draws the embedding's values.
    """
    residual_std = INIT_STD / math.sqrt(2 * spec.num_layers)
    where = draw_device(torch.device(device))
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        for pname, param in mod.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = canonical_name(f"{mod_name}.{pname}" if mod_name else pname)
            if name == "head.weight" and tied(spec):
                name = "embed.tok.weight"
            shape = param.shape
            if isinstance(mod, (nn.LayerNorm, RMSNorm)):
                full = torch.ones(shape) if pname == "weight" else torch.zeros(shape)
            elif pname == "bias":
                full = torch.zeros(shape)
            elif isinstance(mod, ClassTokenAndPositions) or isinstance(mod, (nn.Linear, nn.Embedding, nn.Conv2d)):
                leaf = canonical_name(mod_name).rsplit(".", 1)[-1]
                std = residual_std if leaf in RESIDUAL_PROJECTIONS else INIT_STD
                full = draw(name, seed, shape, std, where)
            else:
                raise TypeError(f"init_weights_by_name: no rule for parameter {name} of {type(mod).__name__}")
            _assign(param, full)


def _assign(param: torch.Tensor, full: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


# ---- tensor parallelism ---------------------------------------------------------------------------

def apply_tp(stage: StageModule, tp_mesh, spec: ModelSpec, sequence_parallel: bool) -> None:
    """Megatron TP (+ SP) on one stage through parallelize_module (torchtitan's plan for our names)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                                   RowwiseParallel, SequenceParallel, parallelize_module)

    sp = sequence_parallel
    plan: dict = {}
    if stage.embed is not None:
        # row-wise over the vocabulary: each rank looks up its slice, an all-reduce sums (Megatron VocabParallelEmbedding);
        # learned positions are added replicated, then the sequence is split for SP (a local chunk, no communication)
        plan["embed.tok"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        if sp:
            plan["embed"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1))
    if stage.head is not None:
        if sp:
            plan["norm"] = SequenceParallel()
        # full logits on every TP rank (the loss needs the whole vocabulary row)
        plan["head"] = ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Replicate())
    for key in stage.layers:
        p = f"layers.{key}"
        seq = Shard(1) if sp else Replicate()
        layer = {f"{p}.attn.q_proj": ColwiseParallel(), f"{p}.attn.k_proj": ColwiseParallel(),
                 f"{p}.attn.v_proj": ColwiseParallel(), f"{p}.attn.o_proj": RowwiseParallel(output_layouts=seq)}
        if sp:
            layer[f"{p}.attn_norm"] = SequenceParallel()
            layer[f"{p}.mlp_norm"] = SequenceParallel()
            layer[f"{p}.attn"] = PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate())
        if spec.is_moe:
            for e in range(spec.num_experts):
                q = f"{p}.mlp.experts.experts.{e}"
                layer.update({f"{q}.gate_proj": ColwiseParallel(), f"{q}.up_proj": ColwiseParallel(),
                              f"{q}.down_proj": RowwiseParallel()})
            if sp:  # the experts' sum is replicated; hand the residual stream its sequence shard
                layer[f"{p}.mlp"] = _input_output(Replicate(), Shard(1))
        else:
            if sp:
                layer[f"{p}.mlp"] = PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate())
            if spec.gated_mlp:
                layer.update({f"{p}.mlp.gate_proj": ColwiseParallel(), f"{p}.mlp.up_proj": ColwiseParallel(),
                              f"{p}.mlp.down_proj": RowwiseParallel(output_layouts=seq)})
            else:
                layer.update({f"{p}.mlp.fc1": ColwiseParallel(), f"{p}.mlp.fc2": RowwiseParallel(output_layouts=seq)})
        plan.update(layer)
    parallelize_module(stage, tp_mesh, plan)
    tie_head(stage, spec)


def _input_output(out_layout, desired_out):
    """MoE block under SP: gather the sequence in, split it back out (router and experts see local tensors)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInputOutput

    return PrepareModuleInputOutput(input_layouts=Shard(1), desired_input_layouts=Replicate(), use_local_input=True,
                                    output_layouts=out_layout, desired_output_layouts=desired_out, use_local_output=True)


# ---- activation checkpointing ---------------------------------------------------------------------

def apply_ac(stage: StageModule, mode: str, flash_attention: bool = False) -> None:
    """full: checkpoint every block (keep its input only); selective: checkpoint the attention core only.

    Selective with flash attention does nothing more, as in the cost model: the fused SDPA kernel keeps no
    seq x seq scores and recomputes them in its backward already (FlashAttention, Dao et al. 2022).
    """
    if mode == "none" or (mode == "selective" and flash_attention):
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    for key, block in list(stage.layers.items()):
        if mode == "full":
            stage.layers[key] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False)
        else:
            block.attn.core = checkpoint_wrapper(block.attn.core, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                                 preserve_rng_state=False)


# ---- data parallelism -----------------------------------------------------------------------------

def apply_fsdp(stage: StageModule, dp_mesh, zero_stage: int, mp_policy=None, offload_policy=None) -> None:
    """FSDP2 per block, then the stage root (embedding, norm, head). See ZERO_MAPPING."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kwargs = {"mesh": dp_mesh, "reshard_after_forward": zero_stage >= 3, "mp_policy": mp_policy or MixedPrecisionPolicy(),
              "offload_policy": offload_policy or OffloadPolicy()}
    for block in stage.layers.values():
        fully_shard(block, **kwargs)
    fully_shard(stage, **kwargs)


def apply_ddp(stage: nn.Module, dp_group, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the data-parallel group.

    Gradients travel in the parameters' dtype: bf16 when the stage was cast by `to_bf16_with_masters` (the
    cost model's 2 bytes per gradient element; no compression hook needed, gloo and NCCL reduce bf16),
    fp32 for an fp32 run.
    """
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(stage, process_group=dp_group,
                                   device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)  # no second gradient copy: the buckets are the gradients


def apply_replicate(stage: StageModule, dp_mesh, mp_policy=None) -> None:
    """ZeRO-0 for DTensor (TP) parameters, which DDP cannot take: FSDP2's replicate(), per block then the root."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.fsdp import MixedPrecisionPolicy

    for block in stage.layers.values():
        replicate(block, mesh=dp_mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    replicate(stage, mesh=dp_mesh, mp_policy=mp_policy or MixedPrecisionPolicy())


def make_optimizer(params, lr: float, offloaded: bool = False) -> torch.optim.Optimizer:
    """AdamW as in GPT-3 (Brown et al. 2020, app. B): betas (0.9, 0.95), eps 1e-8, weight decay 0.1.

    fp32 states on fp32 parameters: the 12 bytes per parameter (master weight + m + v) of ZeRO's
    accounting. Used directly on fp32 parameters (FSDP2's sharded parameters, fp32 runs, the numerics
    reference) and, through MasterWeightsOptimizer, on the fp32 masters of a bf16 model.

    On CUDA the fused kernel (also for FSDP2's DTensor shards): one pass over parameter, gradient, m and v
    with no temporaries. The per-parameter loop (foreach=False) took 86-93 ms per step for gpt2-xl on
    H200 against 11 ms of memory traffic, and FSDP2's DTensor shards 140 ms
    (benchmarks/results/cost_model_notes.md); foreach would allocate a full-size temporary per state. `offloaded`
    (the torch engine's optimizer offload: FSDP2's fp32 shards in host memory): the fused CPU kernel too; the
    per-parameter loop took 26 ns per parameter on the 2x H200 host, 20.7 s per step of gpt2-xl ZeRO-3 with offload
    (benchmarks/results/campaign_2xh200.md), the fused kernel 2.4 ns on two cores of the development machine.
    Other CPU runs (CI's numerics, whose tensor-parallel stages mix DTensor and
    plain parameters, which the fused CPU kernel refuses): the per-parameter loop.
    """
    params = list(params)
    cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                             **({"fused": True} if cuda or offloaded else {"foreach": False}))


# ---- bf16 weights with fp32 master weights (layouts without FSDP) ------------------------------------

# How many parameter elements MasterWeightsOptimizer updates at a time. Its only cost is a transient fp32
# copy of that many gradient elements (2**25 x 4 B = 128 MiB), which bounds the step's extra memory the way
# DDP's buckets bound its communication buffers; any chunk holds at least one whole parameter.
MASTER_CHUNK_NUMEL = 2 ** 25


def to_bf16_with_masters(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cast an initialised fp32 module to bf16 in place; return (bf16 parameter, its fp32 master copy) pairs.

    The masters are copied before the cast, so they hold the exact fp32 initialisation that FSDP2's sharded
    parameters and the single-process reference hold. nn.Module.to keeps every Parameter object (and the
    sharing of a tied embedding / LM head), so the pairs stay valid after the cast.
    """
    params = list(module.parameters())  # deduplicated: a tied weight appears once
    masters = [p.detach().clone() for p in params]
    module.to(torch.bfloat16)
    return list(zip(params, masters))


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local")


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: writes reach the parameter), any other tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


class MasterWeightsOptimizer:
    """Mixed-precision AdamW (Micikevicius et al. 2018, "Mixed Precision Training", sec. 3.1; ZeRO's 2 + 2 + 12).

    The model computes with bf16 weights and receives bf16 gradients (2 + 2 bytes/param on the GPU, the
    cost model's assumption); this optimizer holds an fp32 master copy of every weight and AdamW's fp32
    m and v (4 + 8 bytes/param). step(): per chunk of at most MASTER_CHUNK_NUMEL elements, the bf16
    gradients are cast to fp32 onto the masters, AdamW (make_optimizer) updates the masters, and the
    updated masters are rounded back into the bf16 weights. This is what FSDP2's MixedPrecisionPolicy
    does for the sharded layouts (fp32 sharded parameters, bf16 unsharded compute copies), so all
    torch-engine layouts train the same arithmetic.

    One AdamW (make_optimizer) per chunk: AdamW keeps its state and step count per parameter, so
    stepping each chunk's optimizer once is one AdamW step of the whole model.
    """

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], lr: float,
                 chunk_numel: int = MASTER_CHUNK_NUMEL):
        self.pairs = list(pairs)
        # tensor parallel without FSDP (tp > 1, dp = 1) mixes DTensor parameters (the sharded projections) with
        # plain ones (norms without sequence parallel); the fused AdamW kernel refuses a mixed list ("got mixed
        # torch.Tensor and DTensor": llama-2-13b tp2, benchmarks/results/campaign_2xh200.md), so a chunk holds one kind
        self.chunks: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for kind in (False, True):
            size, chunk = 0, []
            for pair in (p for p in self.pairs if _is_dtensor(p[1]) == kind):
                n = pair[1].numel()
                if chunk and size + n > chunk_numel:
                    self.chunks.append(chunk)
                    size, chunk = 0, []
                chunk.append(pair)
                size += n
            if chunk:
                self.chunks.append(chunk)
        self.inners = [make_optimizer((m for _, m in chunk), lr) for chunk in self.chunks]

    @torch.no_grad()
    def step(self) -> None:
        for chunk, inner in zip(self.chunks, self.inners):
            live = [(p, m) for p, m in chunk if p.grad is not None]
            if not live:
                continue
            for p, m in live:
                m.grad = p.grad.to(m.dtype)
            inner.step()
            # round the updated fp32 masters into the bf16 compute weights (one grouped copy per chunk)
            # (on the local shards: DTensor, tensor parallel's parameters, has no sharding rule for it)
            torch._foreach_copy_([local_shard(p) for p, _ in live], [local_shard(m) for _, m in live])
            for _, m in live:
                m.grad = None  # free the chunk's fp32 gradient before the next chunk

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, m in self.pairs:
            m.grad = None
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
