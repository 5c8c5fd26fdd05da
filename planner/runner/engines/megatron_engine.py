"""The megatron engine: the plan through megatron-core (GPTModel, its pipeline schedules, DDP and optimizer).

CUDA only. Per rank (megatron-core 0.16-0.19 APIs, read from the wheels):

    parallel_state.initialize_model_parallel(tp, pp, vpp, cp, ep; order tp-cp-ep-dp-pp = the plan's ranks)
    -> TransformerConfig: from the emitted Megatron-LM arguments (`emitters.megatron`) parsed and validated
       by Megatron's own parser (megatron.training.arguments, megatron-core >= 0.17) where it is installed,
       else built directly from the plan (`config_kwargs`); both are checked against the plan
    -> GPTModel per virtual chunk with the local layer spec (no Transformer Engine, so no sequence or
       context parallelism and no optimizer offload: refused up front) -> weights drawn by name (below)
       -> Float16Module (bf16)
    -> megatron DistributedDataParallel; ZeRO >= 1 -> use_distributed_optimizer (Megatron's distributed
       optimizer shards the optimizer states and reduce-scatters the gradients: ZeRO-1; ZeRO-2/3 run as it,
       stated in the notes, since Megatron-FSDP is not used here) -> get_megatron_optimizer (AdamW)
    -> get_forward_backward_func(): no pipelining, 1F1B or interleaved 1F1B, micro-batches per the plan.

Model mapping: gpt -> learned absolute positions, LayerNorm, GeLU (Megatron's F.gelu, as pretrain_gpt.py
runs the emitted arguments), biases, embedding tied to the LM head when the spec ties them; llama ->
rotary positions, RMSNorm, SwiGLU (gated_linear_unit, F.silu), no biases, GQA via num_query_groups;
mixtral -> llama + MoE (num_moe_experts, moe_router_topk, alltoall dispatcher, no auxiliary loss).

Data: the contract's batches (planner.runner.data), token ids fed to GPTModel as they are (no tokenizer),
labels = the shifted tokens, loss = mean token cross-entropy (Megatron's vocab-parallel cross-entropy
in fp32), so step-0 losses are comparable with the other engines. The vocabulary is padded as Megatron
pads it, to a multiple of lcm(128, tp) here (Megatron: 128 * tp) so that every tp <= 128 holds the same
padded table; padded rows are never targets but enter the softmax.

Weights and numerics: megatron-core initialises from its own RNG streams (per pipeline rank, per TP rank),
so neither the same seed nor the torch engine's weights carry over. The engine therefore draws every
parameter from (seed, its model-level Megatron name) - `decoder.layers.<global layer>...`, experts by global
index - on its GPU (parallelize.draw) and keeps this rank's tensor-parallel shard, as parallelize.init_weights_by_name does
for the torch engine. Any tp/pp/vpp/ep layout then starts from the same weights, and `--check-numerics`
for this engine must compare with a single-process megatron run (`reference_plan`: tp = pp = 1), not
with the torch reference (different weights, Megatron's weight decay skips biases and norms).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import replace

import torch

from planner.build.megatron import INIT_STD, layer_config_kwargs, padded_vocab_size, resolve_config, spec_model_kwargs
from planner.core.errors import require
from planner.core.plan import Plan
from planner.cost.engines import engine_model
from planner.runner.data import DataSource, local_batch
from planner.runner.engine_api import DistInfo, RankResult, RunOptions, mark_step

NO_CUDA = "engine 'megatron' needs CUDA GPUs; this machine has none"  # the refusal without CUDA GPUs
# the refusal where megatron-core is not installed
MISSING = "engine 'megatron' needs megatron-core: pip install megatron-core (>= 0.17 on Python 3.12 also brings Megatron's argument parser)"
# flags appended to the emitted arguments: megatron-core's local spec has no fused kernels (they need
# Transformer Engine, Apex or Megatron's compiled extensions)
LOCAL_SPEC_FLAGS = ["--transformer-impl", "local", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
                    "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion",
                    "--no-bias-dropout-fusion", "--no-rope-fusion", "--attention-dropout", "0.0", "--hidden-dropout", "0.0"]
# emitted flags this engine does not run: Megatron-FSDP (ZeRO-2/3 run as the distributed optimizer) and its checkpoint format
DROPPED_FLAGS = {"--use-megatron-fsdp": 0, "--data-parallel-sharding-strategy": 1, "--ckpt-format": 1}
# TransformerConfig fields both paths must agree on (the plan's shape and layout)
CHECKED_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                  "expert_model_parallel_size", "sequence_parallel", "normalization", "gated_linear_unit",
                  "add_bias_linear", "add_qkv_bias", "recompute_granularity", "num_moe_experts", "moe_router_topk",
                  "attention_softmax_in_fp32")


@contextmanager
def fused_torch_adamw(active: bool = True):
    """Inside: torch.optim.AdamW defaults to fused=True. megatron-core without Apex or Transformer Engine builds
    `torch.optim.AdamW(...)` with foreach, whose `_foreach_sqrt` allocates a temporary the size of the second
    moment: a llama-2-13b tp2 plan ran out of memory in that step on 2xH200 (134 GiB allocated, 130 predicted;
    benchmarks/results/campaign_2xh200.md). The fused kernel has no temporaries, as the cost model assumes."""
    if not active:
        yield
        return
    base = torch.optim.AdamW

    class FusedAdamW(base):
        def __init__(self, params, *args, **kwargs):
            kwargs.setdefault("fused", True)
            super().__init__(params, *args, **kwargs)

    torch.optim.AdamW = FusedAdamW
    try:
        yield
    finally:
        torch.optim.AdamW = base

def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_supported(plan: Plan, device: str) -> None:
    """Raise DistplanError if this machine or megatron-core cannot run `plan` (the launcher calls this first)."""
    cfg, spec = plan.parallel, plan.model
    require(device == "cuda", NO_CUDA)
    require(_has("megatron.core"), MISSING)
    require(not spec.is_vit, f"{spec.name} is a ViT; the megatron engine trains decoder language models (GPTModel); "
                             f"use --engine torch")
    # gpipe, sequence parallel, cp, ep with tp, offload (ZeRO-2/3 runs as the distributed optimizer: _ZERO_NOTE)
    engine_model("megatron").check(cfg, device)


# ---- the plan as Megatron arguments (pure: no megatron needed) ----------------------------------------

def pipeline_layout(plan: Plan) -> str | None:
    """Megatron's pipeline layout string for an uneven split ('E' embedding, 't' block, 'L' loss), else None."""
    cfg = plan.parallel
    counts = cfg.layers_per_stage(plan.model.num_layers)
    if cfg.pp == 1 or len(set(counts)) == 1:
        return None
    stages = []
    for v in range(cfg.vpp):
        for r in range(cfg.pp):
            entry = "t" * (counts[r] // cfg.vpp)
            stages.append(("E" if v == 0 and r == 0 else "") + entry + ("L" if v == cfg.vpp - 1 and r == cfg.pp - 1 else ""))
    return "|".join(stages)


def config_kwargs(plan: Plan, dtype: str) -> dict:
    """TransformerConfig keyword arguments for `plan` (activation and dtypes by name; see `resolve_config`)."""
    return layer_config_kwargs(plan.model, plan.parallel, dtype, pipeline_model_parallel_layout=pipeline_layout(plan))


def model_kwargs(plan: Plan) -> dict:
    """GPTModel keyword arguments besides config, layer spec and pre/post process."""
    return spec_model_kwargs(plan.model, plan.parallel.tp)


def parser_argv(plan: Plan, emitted: list[str], lr: float, seed: int) -> list[str]:
    """The emitted pretrain_gpt.py arguments as this engine hands them to Megatron's parser."""
    out, skip = [], 0
    for word in emitted:
        if skip:
            skip -= 1
            continue
        if word in DROPPED_FLAGS:
            skip = DROPPED_FLAGS[word]
            continue
        out.append(word)
    return out + LOCAL_SPEC_FLAGS + ["--train-iters", "1", "--lr", repr(lr), "--seed", str(seed),
                                     "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
                                     "--clip-grad", "0.0"]


def reference_plan(plan: Plan) -> Plan:
    """The single-process plan this engine's numerics are checked against: same model, batch and micro-batch."""
    cfg = replace(plan.parallel, dp=1, tp=1, pp=1, cp=1, ep=1, vpp=1, sequence_parallel=False, zero_stage=0,
                  offload_optimizer=False, layer_split=(), schedule="1f1b")
    return replace(plan, gpus=1, parallel=cfg)


# ---- building TransformerConfig --------------------------------------------------------------------

def build_config(plan: Plan, opts: RunOptions, dist: DistInfo) -> tuple[object, str]:
    """TransformerConfig from Megatron's parser when megatron.training is installed, else from the plan."""
    from megatron.core.transformer import TransformerConfig

    kw = resolve_config(config_kwargs(plan, opts.dtype))
    if _has("megatron.training.arguments"):
        try:
            config = _config_from_parser(plan, opts, dist, kw)
            how = "TransformerConfig from the emitted Megatron-LM arguments (megatron.training parse_args + validate_args)"
        except (AssertionError, ValueError, TypeError, RuntimeError, ImportError, SystemExit) as exc:  # noted, not fatal
            config = None
            how = (f"Megatron's parser rejected the emitted arguments ({type(exc).__name__}: "
                   f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); TransformerConfig built from the plan")
    else:
        config, how = None, "megatron.training not installed (megatron-core < 0.17): TransformerConfig built from the plan"
    if config is None:
        fields = set(TransformerConfig.__dataclass_fields__)
        config = TransformerConfig(**{k: v for k, v in kw.items() if k in fields})
    for name in (f for f in CHECKED_FIELDS if f in kw):
        want = kw[name]
        got = getattr(config, name, None)
        require(got == want, f"megatron: TransformerConfig.{name} is {got!r} but the plan needs {want!r}")
    return config, how


def _config_from_parser(plan: Plan, opts: RunOptions, dist: DistInfo, kw: dict):
    import megatron.training.arguments as A
    from emitters.megatron import megatron_argv

    argv = parser_argv(plan, megatron_argv(plan), opts.lr, opts.seed)
    saved = sys.argv
    sys.argv = ["pretrain_gpt.py", *argv]
    try:
        args = A.parse_args()
    finally:
        sys.argv = saved
    args.rank, args.world_size = dist.rank, dist.world_size
    A.validate_args(args)
    config = A.core_transformer_config_from_args(args)
    # what the local spec needs and the parser leaves at Megatron-LM's defaults
    for key in ("activation_func", "params_dtype", "pipeline_dtype", "bf16", "init_method_std", "layernorm_epsilon",
                "kv_channels", "persist_layer_norm", "gradient_accumulation_fusion", "apply_rope_fusion",
                "masked_softmax_fusion", "bias_activation_fusion", "bias_dropout_fusion", "attention_softmax_in_fp32"):
        setattr(config, key, kw[key])
    if kw.get("num_query_groups") == plan.model.num_heads and config.num_query_groups is None:
        config.num_query_groups = plan.model.num_heads  # Megatron leaves MHA's groups unset (= heads)
    return config


# ---- training ----------------------------------------------------------------------------------------

def train(plan: Plan, opts: RunOptions, dist: DistInfo) -> RankResult:
    import torch.distributed as tdist

    device = torch.device(dist.device)
    check_supported(plan, device.type)
    cfg, spec = plan.parallel, plan.model
    notes = [f"compute dtype {opts.dtype}; fp32 main weights, gradients and AdamW states (Megatron's mixed precision)"]
    if cfg.tp > 1 and os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1":
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"  # validate_args requires it with tp > 1 (pre-Blackwell)
        notes.append("CUDA_DEVICE_MAX_CONNECTIONS=1 set after CUDA started: export it before the run for its effect")

    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ps.initialize_model_parallel(tensor_model_parallel_size=cfg.tp, pipeline_model_parallel_size=cfg.pp,
                                 virtual_pipeline_model_parallel_size=cfg.vpp if cfg.vpp > 1 else None,
                                 context_parallel_size=cfg.cp, expert_model_parallel_size=cfg.ep,
                                 create_gloo_process_groups=False)
    tensor_parallel.model_parallel_cuda_manual_seed(opts.seed)
    try:
        import megatron.core as mc

        config, how = build_config(plan, opts, dist)
        notes += [f"megatron-core {getattr(mc, '__version__', '?')}: {how}", _ZERO_NOTE[min(cfg.zero_stage, 2)]]
        config.perform_initialization = False  # every weight is drawn by name below
        chunks = _build_chunks(plan, config)
        notes.append("layer spec: local (get_gpt_layer_local_spec: torch norms, no Transformer Engine); attention: "
                     "Megatron's DotProductAttention (unfused: it stores the s*s scores whatever flash_attention says)")
        for chunk in chunks:
            init_weights_by_name(chunk, opts.seed, spec.num_layers, ps)
        if opts.dtype == "bf16":
            from megatron.core.transformer.module import Float16Module

            chunks = [Float16Module(config, c) for c in chunks]
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.overlap_grad_reduce,
                                                   use_distributed_optimizer=cfg.zero_stage >= 1)
        model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
                 for i, c in enumerate(chunks)]
        opt_config = OptimizerConfig(optimizer="adam", lr=opts.lr, min_lr=opts.lr, weight_decay=0.1, adam_beta1=0.9,
                                     adam_beta2=0.95, adam_eps=1e-8, clip_grad=0.0, bf16=opts.dtype == "bf16",
                                     params_dtype=config.params_dtype, use_distributed_optimizer=cfg.zero_stage >= 1)
        import megatron.core.optimizer as mco

        with fused_torch_adamw(getattr(mco, "USING_PYTORCH_OPTIMIZER", False)):
            optimizer = get_megatron_optimizer(opt_config, model, use_gloo_process_groups=False)
        if getattr(mco, "USING_PYTORCH_OPTIMIZER", False):
            notes.append("optimizer: torch AdamW, fused (megatron-core falls back to torch's optimizer without "
                         "Apex or Transformer Engine; distplan makes it the fused kernel)")
        for group in optimizer.param_groups:
            group["lr"] = opts.lr  # constant lr (no OptimizerParamScheduler), as the other engines
        config.grad_scale_func = optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        if cfg.overlap_grad_reduce:
            config.no_sync_func = [c.no_sync for c in model] if len(model) > 1 else model[0].no_sync
        forward_backward = get_forward_backward_func()

        m, mb = cfg.num_microbatches, cfg.micro_batch_size
        dp_rank = ps.get_data_parallel_rank()
        is_last = ps.is_pipeline_last_stage(ignore_virtual=True)
        data = DataSource(spec, cfg.seq_len, cfg.global_batch_size, seed=opts.seed, path=opts.data_path, dtype=opts.data_dtype)
        step_times, losses = [], []
        for step in range(opts.warmup + opts.steps):
            mark_step(step)
            inputs, targets = local_batch(*data.global_batch(step), dp_rank, cfg.dp, mb, m)
            inputs, targets = inputs.to(device), targets.to(device)
            micro = [(inputs[j * mb:(j + 1) * mb], targets[j * mb:(j + 1) * mb]) for j in range(m)]
            iterators = [iter(micro) for _ in model]  # one per virtual chunk (each reads every micro-batch)
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for chunk in model:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            reduced = forward_backward(forward_step_func=_forward_step, data_iterator=iterators if len(model) > 1 else iterators[0],
                                       model=model, num_microbatches=m, seq_length=cfg.seq_len, micro_batch_size=mb,
                                       decoder_seq_length=cfg.seq_len, forward_only=False)
            optimizer.step()
            torch.cuda.synchronize(device)
            if step >= opts.warmup:
                step_times.append(time.perf_counter() - t0)
            if is_last:
                loss = torch.stack([r["lm loss"].float() for r in reduced]).mean()
                tdist.all_reduce(loss, group=ps.get_data_parallel_group())
                losses.append(float(loss) / cfg.dp)
            else:
                losses.append(math.nan)
        result = RankResult(
            rank=dist.rank, pp_rank=ps.get_pipeline_model_parallel_rank(), step_times_s=tuple(step_times),
            losses=tuple(losses), peak_allocated_bytes=int(torch.cuda.max_memory_allocated(device)),
            peak_reserved_bytes=int(torch.cuda.max_memory_reserved(device)), device=dist.device, dtype=opts.dtype,
            notes=tuple(notes),
            extra={"dp_rank": dp_rank, "tp_rank": ps.get_tensor_model_parallel_rank(), "has_loss": is_last,
                   "megatron_core": getattr(mc, "__version__", "?"), "config_from": how,
                   "padded_vocab_size": padded_vocab_size(spec.vocab_size, cfg.tp),
                   "local_params": sum(p.numel() for c in model for p in c.parameters())},
        )
    finally:
        ps.destroy_model_parallel()
    return result


# how this engine runs each ZeRO stage, as its run report says
_ZERO_NOTE = {
    0: "ZeRO-0 -> megatron DistributedDataParallel (fp32 gradient buffers, all-reduce)",
    1: "ZeRO-1 -> megatron DistributedDataParallel + distributed optimizer (optimizer states sharded, gradients "
       "reduce-scattered, parameters all-gathered after the step)",
    2: "ZeRO-2/3 -> megatron's distributed optimizer (ZeRO-1 sharding): Megatron-FSDP, the emitted mapping, is not "
       "used by this engine, so gradients and weights stay unsharded (memory exceeds a ZeRO-2/3 prediction)",
}


def _forward_step(data_iterator, model):
    """Megatron's forward_step_func: one micro-batch through the chunk; the loss function for the last stage."""
    tokens, labels = next(data_iterator)
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, None, labels=labels), _loss


def _loss(output_tensor):
    loss = output_tensor.float().mean()  # per-token losses [b, s] -> mean (the contract's loss)
    # a copy: the schedule divides the returned loss by the micro-batch count in place
    return loss, {"lm loss": loss.detach().clone()}


def _build_chunks(plan: Plan, config) -> list:
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = plan.model
    layer_spec = get_gpt_layer_local_spec(num_experts=spec.num_experts if spec.is_moe else None,
                                          normalization=config.normalization)
    vpp = plan.parallel.vpp
    chunks = []
    for v in range(vpp):
        stage = {"vp_stage": v} if vpp > 1 else {}
        pre = ps.is_pipeline_first_stage(ignore_virtual=vpp == 1, **stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=vpp == 1, **stage)
        chunks.append(GPTModel(config=config, transformer_layer_spec=layer_spec, pre_process=pre, post_process=post,
                               vp_stage=v if vpp > 1 else None, **model_kwargs(plan)).cuda(torch.cuda.current_device()))
    return chunks


# ---- weights by name ---------------------------------------------------------------------------------

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")  # a megatron-core parameter name's layer number
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")  # ... and its expert number
_RESIDUAL = ("linear_proj", "linear_fc2")  # projections that write into the residual stream (smaller init, GPT-2)


def global_name(name: str, layer_numbers: dict[int, int], expert_offset: int) -> str:
    """A parameter's model-level name: global layer index (0-based) and global expert index."""
    match = _LAYER.match(name)
    if match:
        name = f"decoder.layers.{layer_numbers[int(match.group(1))]}." + name[match.end():]
    return _EXPERT.sub(lambda e: f".local_experts.{int(e.group(1)) + expert_offset}.", name)


def _draw(key: str, seed: int, shape, std: float, device: torch.device) -> torch.Tensor:
    """parallelize.draw where the parameter lives (its GPU in a run; its single-process reference draws there too)."""
    from planner.build.parallelize import draw, draw_device

    return draw(key, seed, shape, std, draw_device(device))


@torch.no_grad()
def init_weights_by_name(model, seed: int, num_layers: int, ps) -> None:
    """Draw every parameter of one GPTModel chunk from (seed, global name); keep this rank's TP shard.

    Weights ~ N(0, 0.02), residual projections (linear_proj, linear_fc2) ~ N(0, 0.02 / sqrt(2 * layers))
    (Megatron's scaled_init_method_normal), norm scales 1, biases 0. A tensor-parallel parameter (attribute
    `tensor_model_parallel`) is drawn at full size along its `partition_dim` and sliced; SwiGLU's fused
    fc1 holds [gate shard; up shard], so gate and up are drawn and sliced apart. A tied LM head on the last
    pipeline stage draws the embedding's values.
    """
    layer_numbers = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    experts_per_rank = None
    residual_std = INIT_STD / math.sqrt(2 * num_layers)
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    for name, param in model.named_parameters():
        is_expert = ".experts." in name
        if is_expert and experts_per_rank is None:
            experts_per_rank = model.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
        offset = ps.get_expert_model_parallel_rank() * (experts_per_rank or 0)
        key = global_name(name, layer_numbers, offset)
        if key == "output_layer.weight" and tied:
            key = "embedding.word_embeddings.weight"
        leaf = name.rsplit(".", 1)[-1]
        if "layernorm." in name or leaf.startswith("layer_norm_"):  # torch norms; TE's norm fused into a linear
            param.fill_(1.0 if leaf.endswith("weight") else 0.0)
            continue
        if leaf == "bias":
            param.zero_()
            continue
        std = residual_std if any(f".{r}." in name for r in _RESIDUAL) else INIT_STD
        tp_rank = ps.get_expert_tensor_parallel_rank() if is_expert else ps.get_tensor_model_parallel_rank()
        tp_size = ps.get_expert_tensor_parallel_world_size() if is_expert else ps.get_tensor_model_parallel_world_size()
        sharded = getattr(param, "tensor_model_parallel", False) and tp_size > 1
        dim = getattr(param, "partition_dim", 0)
        if name.endswith("linear_fc1.weight") and model.config.gated_linear_unit:  # at any tp, tp = 1 included
            half = list(param.shape)
            half[0] //= 2
            size = tp_size if sharded else 1
            parts = [_shard(_draw(f"{key}.{part}", seed, _full(half, 0, size), std, param.device), 0, tp_rank if sharded else 0, size)
                     for part in ("gate", "up")]
            param.copy_(torch.cat(parts, 0))
        elif sharded:
            param.copy_(_shard(_draw(key, seed, _full(param.shape, dim, tp_size), std, param.device), dim, tp_rank, tp_size))
        else:
            param.copy_(_draw(key, seed, param.shape, std, param.device))


def _full(shape, dim: int, tp_size: int) -> list[int]:
    full = list(shape)
    full[dim] *= tp_size
    return full


def _shard(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return full.chunk(size, dim=dim)[rank]

