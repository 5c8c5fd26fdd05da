"""Trainable PyTorch transformers built from a ModelSpec: gpt, llama, mixtral and vit.

One module tree serves every consumer: the meta-device tracer (`planner.build.graph`), the profilers and
the runners. Its layout is fixed so pipeline and tensor-parallel runners can cut it by name:

    model.embed      tokens [batch, seq] (or images [batch, channels, image, image]) -> hidden [batch, seq, h]
    model.layers     nn.ModuleList of blocks, each hidden [batch, seq, h] -> hidden [batch, seq, h]
    model.norm       final norm
    model.head       LM head [batch, seq, h] -> [batch, seq, vocab] (ViT: class token -> [batch, classes])

Inside a block: `attn_norm, attn (q_proj, k_proj, v_proj, core, o_proj), attn_add, mlp_norm, mlp, mlp_add`;
`mlp` is fc1/act/fc2 (gpt, vit), gate_proj/up_proj/act/mul/down_proj (llama) or router/experts
(mixtral). Residual adds, the SwiGLU product and the attention core are modules too, so that
forward hooks see every operator of the op graph with its inputs (`planner.build.graph.trace_op_graph`).

Tensor parallelism: the attention core counts heads from the width of the q/k/v tensors it gets
(`width // head_dim`), never from the spec, so q/k/v sharded column-wise and o_proj row-wise
(Megatron-LM, Shoeybi et al. 2019, Sec. 3) run unchanged on the local shards.

Architectures: GPT-2 (Radford et al. 2019: pre-LayerNorm, learned positions, tanh-GeLU MLP, tied head),
Llama (Touvron et al. 2023: RMSNorm, rotary positions (Su et al. 2021), SwiGLU (Shazeer 2020), GQA
(Ainslie et al. 2023); with `qkv_bias`, Qwen2 (Yang et al. 2024): biases on q/k/v alone), Mixtral
(Jiang et al. 2024: Llama + top-k mixture of SwiGLU experts) and
ViT (Dosovitskiy et al. 2021: patch convolution, class token, learned positions, exact GeLU).
No dropout: current pre-training recipes use none.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from planner.core.errors import require
from planner.core.model import ModelSpec

INIT_STD = 0.02  # GPT-2 / nanoGPT: every weight ~ N(0, 0.02)
LAYER_NORM_EPS = 1e-5  # GPT-2 and torch default
RMS_NORM_EPS = 1e-5  # Llama 2/3 and Mixtral HF configs
ROPE_THETA = 10_000.0  # rotary base of Su et al. / Llama 2 (Llama 3 uses 500000; it changes no shape or FLOP)


# ---- operators that are modules so hooks can see them --------------------------------------------

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), computed in float32 like Llama."""

    def __init__(self, hidden_size: int, eps: float = RMS_NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Add(nn.Module):
    """Residual connection x + y."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


class Mul(nn.Module):
    """Elementwise product (the gating product of SwiGLU)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * y


def apply_rotary(x: torch.Tensor, theta: float = ROPE_THETA) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021, eq. 34) of x [batch, heads, seq, head_dim].

    Half-split ("rotate_half") layout of the Hugging Face Llama code; positions are 0..seq-1.
    """
    seq, head_dim = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=x.device, dtype=torch.float32) / head_dim)
    angles = torch.arange(seq, device=x.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)  # [seq, head_dim]
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x32 * angles.cos() + rotated * angles.sin()).type_as(x)


class AttentionCore(nn.Module):
    """softmax(Q K^T / sqrt(d)) V over all heads (Vaswani et al. 2017, eq. 1), via torch's SDPA.

    Takes the q/k/v projections as [batch, seq, heads_local * head_dim] and returns
    [batch, seq, q_heads_local * head_dim]; the local head counts come from those widths.
    """

    def __init__(self, head_dim: int, causal: bool, rotary: bool):
        super().__init__()
        self.head_dim, self.causal, self.rotary = head_dim, causal, rotary

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = q.shape
        q, k, v = (t.view(batch, seq, t.shape[-1] // self.head_dim, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.rotary:
            q, k = apply_rotary(q), apply_rotary(k)
        groups = q.shape[1] // k.shape[1]  # grouped-query attention: each K/V head serves `groups` Q heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return out.transpose(1, 2).reshape(batch, seq, -1)


# ---- blocks ------------------------------------------------------------------------------------

def make_norm(spec: ModelSpec) -> nn.Module:
    if spec.family in ("gpt", "vit"):
        return nn.LayerNorm(spec.hidden_size, eps=LAYER_NORM_EPS)
    return RMSNorm(spec.hidden_size)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, qkv_bias = spec.hidden_size, spec.qkv_biased
        self.q_proj = nn.Linear(h, h, bias=qkv_bias)
        self.k_proj = nn.Linear(h, spec.kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(h, spec.kv_dim, bias=qkv_bias)
        self.core = AttentionCore(spec.head_dim, causal=not spec.is_vit, rotary=not spec.learned_positions)
        self.o_proj = nn.Linear(h, h, bias=spec.uses_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.core(self.q_proj(x), self.k_proj(x), self.v_proj(x)))


class MLP(nn.Module):
    """fc2(GeLU(fc1 x)); GPT-2 uses the tanh approximation of GeLU, ViT the exact one."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.fc1 = nn.Linear(spec.hidden_size, spec.ffn_hidden_size)
        self.act = nn.GELU(approximate="tanh" if spec.family == "gpt" else "none")
        self.fc2 = nn.Linear(spec.ffn_hidden_size, spec.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    """SwiGLU: down(SiLU(gate x) * up x) (Shazeer 2020, eq. 6), no biases."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, f = spec.hidden_size, spec.ffn_hidden_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.act = nn.SiLU()
        self.mul = Mul()
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.mul(self.act(self.gate_proj(x)), self.up_proj(x)))


class Router(nn.Module):
    """Top-k gating (Shazeer et al. 2017; Mixtral eq. 2): softmax over the k largest router logits."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.top_k = spec.top_k
        self.gate = nn.Linear(spec.hidden_size, spec.num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights [..., top_k] in x's dtype, expert indices [..., top_k] int64)."""
        top_logits, experts = self.gate(x).topk(self.top_k, dim=-1)
        return torch.softmax(top_logits.float(), dim=-1).type_as(x), experts


def tokens_per_expert(expert_of_slot: torch.Tensor, num_experts: int) -> list[int]:
    """How many (token, slot) pairs each expert receives.

    On the meta device the routing has no data, so the load is taken as perfectly balanced
    (slots / num_experts each, the remainder to the first experts): the load an auxiliary
    balancing loss aims for, and the top_k experts per token that ModelSpec counts.
    """
    slots = expert_of_slot.numel()
    if expert_of_slot.is_meta:
        return [slots // num_experts + (1 if e < slots % num_experts else 0) for e in range(num_experts)]
    return torch.bincount(expert_of_slot, minlength=num_experts).tolist()


class Experts(nn.Module):
    """num_experts SwiGLU MLPs; each token's output is the routing-weighted sum of its top_k experts."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.experts = nn.ModuleList(GatedMLP(spec) for _ in range(spec.num_experts))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        top_k = indices.shape[-1]
        expert_of_slot = indices.reshape(-1)  # slot = token * top_k + j
        order = torch.argsort(expert_of_slot, stable=True)  # slots grouped by expert
        token_of_slot = order // top_k
        weight_of_slot = weights.reshape(-1)[order]
        out = torch.zeros_like(tokens)
        start = 0
        for expert, count in zip(self.experts, tokens_per_expert(expert_of_slot, len(self.experts))):
            rows = token_of_slot[start:start + count]
            y = expert(tokens.index_select(0, rows)) * weight_of_slot[start:start + count, None]
            out.index_add_(0, rows, y)
            start += count
        return out.view_as(x)


class MoE(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.router = Router(spec)
        self.experts = Experts(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, indices = self.router(x)
        return self.experts(x, weights, indices)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm x), then x + mlp(norm x)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.attn_norm = make_norm(spec)
        self.attn = Attention(spec)
        self.attn_add = Add()
        self.mlp_norm = make_norm(spec)
        self.mlp = MoE(spec) if spec.is_moe else GatedMLP(spec) if spec.gated_mlp else MLP(spec)
        self.mlp_add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_add(x, self.attn(self.attn_norm(x)))
        return self.mlp_add(x, self.mlp(self.mlp_norm(x)))


# ---- embeddings and heads --------------------------------------------------------------------------

class TokenEmbedding(nn.Module):
    """Token lookup, plus learned positions 0..seq-1 for gpt."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.tok = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.pos = nn.Embedding(spec.max_seq_len, spec.hidden_size) if spec.learned_positions else None
        self.add = Add() if spec.learned_positions else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens)
        if self.pos is None:
            return x
        seq = tokens.shape[1]
        require(seq <= self.pos.num_embeddings,
                f"sequence length {seq} exceeds the {self.pos.num_embeddings} learned positions of this model")
        return self.add(x, self.pos(torch.arange(seq, device=tokens.device)))


class ClassTokenAndPositions(nn.Module):
    """ViT: patches [b, h, grid, grid] -> [class token; patches] + learned positions, [b, 1 + grid^2, h]."""

    def __init__(self, hidden_size: int, seq_len: int):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos = nn.Parameter(torch.zeros(1, seq_len, hidden_size))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = patches.flatten(2).transpose(1, 2)
        return torch.cat((self.cls.expand(x.shape[0], -1, -1), x), dim=1) + self.pos


class PatchEmbedding(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.patch = nn.Conv2d(spec.num_channels, spec.hidden_size, spec.patch_size, stride=spec.patch_size)
        self.cls_pos = ClassTokenAndPositions(spec.hidden_size, spec.seq_len)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.cls_pos(self.patch(images))


class ClassifierHead(nn.Linear):
    """ViT classifier on the class token (position 0): [b, seq, h] -> [b, classes]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[:, 0])


# ---- the model ---------------------------------------------------------------------------------

def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in float32.

    Decoders: logits [b, seq, vocab], targets [b, seq] already shifted (targets[:, t] is token t+1).
    ViT: logits [b, classes], targets [b] class ids.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


class TransformerModel(nn.Module):
    loss = staticmethod(lm_loss)

    def __init__(self, spec: ModelSpec, num_layers: int):
        super().__init__()
        self.spec = spec
        self.embed = PatchEmbedding(spec) if spec.is_vit else TokenEmbedding(spec)
        self.layers = nn.ModuleList(Block(spec) for _ in range(num_layers))
        self.norm = make_norm(spec)
        if spec.is_vit:
            self.head = ClassifierHead(spec.hidden_size, spec.vocab_size)
        else:
            self.head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.tie_weights()

    @property
    def tied(self) -> bool:
        return self.spec.tie_embeddings and not self.spec.is_vit

    def tie_weights(self) -> None:
        """Share the LM head's weight with the token embedding (GPT-2) when the spec says so."""
        if self.tied:
            self.head.weight = self.embed.tok.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def init_weights(model: TransformerModel) -> None:
    """GPT-2 initialisation (Radford et al. 2019, Sec. 2.3; nanoGPT `_init_weights`).

    Weights ~ N(0, 0.02); the projections that write into the residual stream (o_proj, fc2,
    down_proj) ~ N(0, 0.02 / sqrt(2 * layers)); biases 0; norm scales 1. Draws come from torch's
    global generator in module order, so `torch.manual_seed(s)` before the build fixes them.
    """
    residual_std = INIT_STD / math.sqrt(2 * max(len(model.layers), 1))
    with torch.no_grad():
        for name, module in model.named_modules():
            if module is model.head and model.tied:
                continue  # its weight is the token embedding, drawn already
            if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
                residual = name.rsplit(".", 1)[-1] in ("o_proj", "fc2", "down_proj")
                module.weight.normal_(0.0, residual_std if residual else INIT_STD)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, ClassTokenAndPositions):
                module.cls.normal_(0.0, INIT_STD)
                module.pos.normal_(0.0, INIT_STD)


def build_model(spec: ModelSpec, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32,
                num_layers: int | None = None) -> TransformerModel:
    """The model of `spec` (with `num_layers` blocks if given) on `device` in `dtype`.

    On "meta" nothing is allocated. Elsewhere the module is built on meta, materialised on the
    device and initialised by `init_weights` (seed torch's generator before calling).
    """
    layers = spec.num_layers if num_layers is None else num_layers
    require(layers > 0, f"num_layers must be positive, got {layers}")
    require(dtype.is_floating_point, f"dtype must be a floating-point torch dtype, got {dtype}")
    with torch.device("meta"):
        model = TransformerModel(spec, layers)
    model = model.to(dtype=dtype)
    materialise = torch.device(device).type != "meta"
    if materialise:
        model = model.to_empty(device=device)
    model.tie_weights()  # .to / .to_empty may swap parameter objects
    if materialise:
        init_weights(model)
    return model
