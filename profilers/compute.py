"""Per-layer compute profiling: forward, backward and recompute time, and activation memory,
of each layer kind of a model, sharded as tensor parallelism shards it, run on one device.

What is timed (one layer, one micro-batch of `micro_batch` sequences of `seq_len` tokens):
- fwd: the forward with autograd recording (as in training);
- bwd: its backward, parameter gradients accumulating as they do across micro-batches;
- recompute (blocks only): backward under full activation checkpointing minus the plain backward,
  i.e. the cost of re-running the forward inside backward (Chen et al. 2016; Megatron "full").
How (profilers/timing.py): CUDA events, each phase the larger of the GPU's time with the host queued
ahead and the host's own time; CPU: the thread's CPU time, one core (timing.Clock). Each number is the
median of `repeats` runs after `warmup` runs (warm up, repeat, take the median).

Tensor-parallel shards (Megatron-LM, Shoeybi et al. 2019, sec. 3): q/k/v and fc1 (gate/up) are
split column-wise (heads / tp query heads, max(1, kv_heads / tp) key/value heads, ffn / tp), o_proj
and fc2 (down) row-wise; the embedding and LM head are split over the vocabulary (ceil(V / tp)
rows, Megatron's VocabParallelEmbedding and vocab-parallel cross-entropy). Norms and residual
adds are replicated. The collectives TP adds are not timed here: profilers.comm measures them and
the cost model adds them (planner.cost.layer.block_time).

Activation memory: on CUDA, the allocator's bytes still held after the forward (what the layer
keeps for its backward) and its peak over forward + backward; on CPU (no allocator statistics),
the bytes of the tensors autograd saves for backward (saved-tensor hooks), which is the same
quantity counted tensor by tensor.

Out of memory: a micro-batch that raises an out-of-memory error (or, on CPU, whose extrapolated
need exceeds `memory_cap_bytes`) is recorded as infeasible, and larger ones are not tried.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from planner.core.errors import require
from planner.core.model import ModelSpec
from planner.build.modeling import Block, ClassifierHead, PatchEmbedding, TokenEmbedding, lm_loss, make_norm
from planner.core.profile import MEGATRON_BLOCK_KIND, MEGATRON_HEAD_KIND, UNFUSED_ATTENTION_KIND
from profilers.timing import free_memory, is_oom, time_point

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --dtype names to torch dtypes
TP_DEGREES = (1, 2, 4, 8, 16)  # TP degrees a layer is profiled at (those dividing its heads and FFN)


@dataclass(frozen=True)
class ComputeSettings:
    micro_batches: tuple[int, ...] = (1, 2, 4, 8)
    warmup: int = 2
    repeats: int = 5
    point_budget_s: float = 10.0  # fewer repeats (never under one) when one point would take longer
    recompute: bool = True  # also time the checkpointed backward (blocks)
    memory_cap_bytes: float | None = None  # CPU guard: skip a micro-batch that would need more
    skip_kinds: tuple[str, ...] = ()  # profiled kinds left out (--quick where megatron's own layer is measured)


def layer_kinds(spec: ModelSpec) -> tuple[str, ...]:
    return ("embedding", "moe_block" if spec.is_moe else "block", "head")


# Profiled besides the layers: the attention core as Megatron's local layer spec computes it (no flash
# kernel), for plans that run unfused attention (the megatron engine without Transformer Engine).
UNFUSED_ATTENTION = UNFUSED_ATTENTION_KIND


def profiled_kinds(spec: ModelSpec) -> tuple[str, ...]:
    return layer_kinds(spec) + (() if spec.is_vit else (UNFUSED_ATTENTION,))


def tp_degrees(spec: ModelSpec, max_tp: int) -> list[int]:
    """TP degrees up to `max_tp` that Megatron accepts: they divide the query heads and the FFN width."""
    return [t for t in TP_DEGREES if t <= max_tp and spec.num_heads % t == 0 and spec.ffn_hidden_size % t == 0]


# ---- building one TP shard of a layer ---------------------------------------------------------


def _linear(d_in: int, d_out: int, bias: bool) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=bias)


def _shard_mlp(mlp: nn.Module, h: int, f_local: int, bias: bool) -> None:
    if hasattr(mlp, "fc1"):
        mlp.fc1, mlp.fc2 = _linear(h, f_local, bias), _linear(f_local, h, bias)
    else:
        mlp.gate_proj, mlp.up_proj = _linear(h, f_local, False), _linear(h, f_local, False)
        mlp.down_proj = _linear(f_local, h, False)


def shard_block(block: Block, spec: ModelSpec, tp: int) -> Block:
    """Replace the block's projections by their rank-0 shards under `tp`-way tensor parallelism."""
    require(spec.num_heads % tp == 0 and spec.ffn_hidden_size % tp == 0,
            f"tp={tp} must divide num_heads {spec.num_heads} and ffn_hidden_size {spec.ffn_hidden_size}")
    if tp == 1:
        return block
    h, d, bias = spec.hidden_size, spec.head_dim, spec.uses_bias
    q_local, kv_local = spec.num_heads // tp, max(1, spec.num_kv_heads // tp)
    attn = block.attn
    qkv_bias = spec.qkv_biased  # Qwen2: q/k/v biased, o_proj not
    attn.q_proj = _linear(h, q_local * d, qkv_bias)
    attn.k_proj, attn.v_proj = _linear(h, kv_local * d, qkv_bias), _linear(h, kv_local * d, qkv_bias)
    attn.o_proj = _linear(q_local * d, h, bias)
    f_local = spec.ffn_hidden_size // tp
    if spec.is_moe:
        for expert in block.mlp.experts.experts:
            _shard_mlp(expert, h, f_local, False)
    else:
        _shard_mlp(block.mlp, h, f_local, bias)
    return block


class UnfusedAttentionCore(nn.Module):
    """softmax(Q K^T / sqrt(d) + causal mask) V as megatron-core's DotProductAttention runs it without fusion
    (masked_softmax_fusion off, attention_softmax_in_fp32 off as Megatron-LM's arguments leave it, dropout 0):
    baddbmm into bf16 scores, masked_fill of the causal mask, softmax in the scores' dtype, bmm with V.
    Input (b, s, heads_local*d)
    serves as Q, K and V (the projections are timed in the block); output the same shape. Parameter-free."""

    def __init__(self, spec: ModelSpec, tp: int):
        super().__init__()
        self.heads, self.d = spec.num_heads // tp, spec.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = x.view(b, s, self.heads, self.d).permute(0, 2, 1, 3).reshape(b * self.heads, s, self.d)
        scores = torch.baddbmm(torch.empty(b * self.heads, s, s, dtype=x.dtype, device=x.device), q, q.transpose(1, 2),
                               beta=0.0, alpha=1.0 / math.sqrt(self.d))
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu_(1)
        probs = torch.softmax(scores.masked_fill(mask, -10000.0), dim=-1)
        ctx = torch.bmm(probs, q)
        return ctx.view(b, self.heads, s, self.d).permute(0, 2, 1, 3).reshape(b, s, self.heads * self.d)


class HeadWithLoss(nn.Module):
    """Final norm, the (vocab-sharded) output head and the cross-entropy loss: the 'head' layer kind."""

    def __init__(self, spec: ModelSpec, tp: int):
        super().__init__()
        self.norm = make_norm(spec)
        out = math.ceil(spec.vocab_size / tp)
        self.head = ClassifierHead(spec.hidden_size, out) if spec.is_vit else nn.Linear(spec.hidden_size, out, bias=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(self.head(self.norm(x)), targets)


def _init(module: nn.Module) -> None:
    """Weights ~ N(0, 0.02), biases 0, norm scales 1 (planner.build.modeling.init_weights' distribution)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2 or name.endswith(("cls", "pos")):
                p.normal_(0.0, 0.02)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def build_layer(spec: ModelSpec, kind: str, tp: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The rank-0 shard of one layer of `kind`, on `device` in `dtype`, initialised (megatron-core's own kinds:
    profilers.megatron_layer.build_layer)."""
    with torch.device("meta"):
        if kind in ("block", "moe_block"):
            layer = shard_block(Block(spec), spec, tp)
        elif kind == "embedding":
            layer = PatchEmbedding(spec) if spec.is_vit else TokenEmbedding(spec)
            if not spec.is_vit and tp > 1:
                layer.tok = nn.Embedding(math.ceil(spec.vocab_size / tp), spec.hidden_size)
        elif kind == "head":
            layer = HeadWithLoss(spec, tp)
        elif kind == UNFUSED_ATTENTION:
            layer = UnfusedAttentionCore(spec, tp)
        else:
            raise ValueError(f"unknown layer kind {kind!r}")
    layer = layer.to(dtype=dtype).to_empty(device=device)
    _init(layer)
    return layer


def make_inputs(spec: ModelSpec, kind: str, tp: int, micro_batch: int, seq_len: int, device: torch.device,
                dtype: torch.dtype) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """(forward arguments, gradient of the output) of one micro-batch; None: the output is a loss."""
    b, h = micro_batch, spec.hidden_size
    if kind == "embedding":
        if spec.is_vit:
            x = torch.randn(b, spec.num_channels, spec.image_size, spec.image_size, device=device, dtype=dtype)
        else:
            x = torch.randint(0, math.ceil(spec.vocab_size / tp), (b, seq_len), device=device)
        return (x,), torch.randn(b, seq_len, h, device=device, dtype=dtype)
    if kind == MEGATRON_BLOCK_KIND:  # megatron's [s, b, h] layout
        x = torch.randn(seq_len, b, h, device=device, dtype=dtype, requires_grad=True)
        return (x,), torch.randn(seq_len, b, h, device=device, dtype=dtype)
    if kind == MEGATRON_HEAD_KIND:  # [s, b, h] in, labels [b, s], a loss out
        x = torch.randn(seq_len, b, h, device=device, dtype=dtype, requires_grad=True)
        return (x, torch.randint(0, spec.vocab_size, (b, seq_len), device=device)), None
    if kind == UNFUSED_ATTENTION:
        h = spec.num_heads // tp * spec.head_dim
    x = torch.randn(b, seq_len, h, device=device, dtype=dtype, requires_grad=True)
    if kind == "head":
        classes = math.ceil(spec.vocab_size / tp)
        targets = torch.randint(0, classes, (b,) if spec.is_vit else (b, seq_len), device=device)
        return (x, targets), None
    return (x,), torch.randn(b, seq_len, h, device=device, dtype=dtype)


# ---- profiling one layer kind (timing: profilers/timing.py) -------------------------------------------


def profile_layer(spec: ModelSpec, kind: str, tp: int, seq_len: int, device: torch.device, dtype: torch.dtype,
                  settings: ComputeSettings, on_point: Callable[[str], None] = lambda _: None,
                  time_fn: Callable = time_point, build_fn: Callable = build_layer) -> dict:
    """Measure one (kind, tp) over the settings' micro-batches; stops at the first out-of-memory one. `build_fn`
    builds the layer (build_layer's arguments; profilers.megatron_layer passes megatron-core's).

    Returns {"kind", "tp", "points": [{micro_batch, tokens, fwd_s, bwd_s, ...}], "oom_micro_batch"}.
    """
    started = time.perf_counter()
    result = {"kind": kind, "tp": tp, "points": [], "oom_micro_batch": 0}
    recompute = settings.recompute and kind in ("block", "moe_block")
    layer = None
    try:
        layer = build_fn(spec, kind, tp, device, dtype)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is expected; anything else propagates
        if not is_oom(exc):
            raise
    if layer is None:  # freed outside the except clause: its traceback holds the partial tensors
        free_memory(device)
        result["oom_micro_batch"] = min(settings.micro_batches)
        result["error"] = "out of memory building the layer"
        return result
    weight_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    for mb in sorted(settings.micro_batches):
        tokens = mb * seq_len
        label = f"{kind} tp={tp} micro-batch {mb}"
        prev = result["points"][-1] if result["points"] else None
        if settings.memory_cap_bytes is not None and prev is not None:
            # activations grow linearly in tokens; gradients of weights and inputs double the weights
            need = 2 * weight_bytes + 2 * prev.get("activation_bytes", 0) * tokens / prev["tokens"]
            if need > settings.memory_cap_bytes:
                result["oom_micro_batch"] = mb
                result["error"] = f"micro-batch {mb} would need {need / 2**30:.1f} GiB > memory cap"
                on_point(label + " (over memory cap)")
                break
        point = None
        try:
            point = time_fn(layer, lambda: make_inputs(spec, kind, tp, mb, seq_len, device, dtype), settings,
                            device, recompute)
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
        if point is None:  # out of memory; freed here, once the exception and its frames are gone
            free_memory(device)
            result["oom_micro_batch"] = mb
            result["error"] = f"out of memory at micro-batch {mb}"
            on_point(label + " (out of memory)")
            break
        result["points"].append({"micro_batch": mb, "tokens": tokens, **point})
        on_point(label)
    for mb in sorted(settings.micro_batches):
        if result["oom_micro_batch"] and mb > result["oom_micro_batch"]:
            on_point(f"{kind} tp={tp} micro-batch {mb} (skipped: a smaller one did not fit)")
    del layer
    free_memory(device)
    result["wall_s"] = round(time.perf_counter() - started, 3)  # building, inputs and timing: where a profile's time goes
    return result


def profile_compute(spec: ModelSpec, seq_len: int, tps: list[int], device: torch.device, dtype: torch.dtype,
                    settings: ComputeSettings, on_point: Callable[[str], None] = lambda _: None) -> list[dict]:
    """Every layer kind of `spec` at every TP degree in `tps`: a list of profile_layer results."""
    torch.manual_seed(0)
    return [profile_layer(spec, kind, tp, seq_len, device, dtype, settings, on_point)
            for kind in profiled_kinds(spec) if kind not in settings.skip_kinds for tp in tps]


def layer_seq_len(spec: ModelSpec, seq_len: int) -> int:
    """Tokens per sequence the layers see: the job's sequence length; ViT's patches + class token."""
    return spec.seq_len if spec.is_vit else seq_len

