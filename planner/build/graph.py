"""Layer and operator graphs of a model, traced on the meta device (no memory, no GPU).

Two views feed the solvers (Alpa, Zheng et al. OSDI'22):
- `trace_layer_graph`: one node per layer (embedding, block.0 .. block.{L-1}, head) in execution
  order, for the inter-operator (pipeline stage) DP.
- `trace_op_graph`: the operators of one layer kind with their weight shapes and data flow, for the
  intra-operator sharding ILP.

FLOPs are measured, not assumed: each layer (and each operator) runs forward and then backward
under `torch.utils.flop_counter.FlopCounterMode` on meta tensors. What that counter counts:
- matmul-like ops only (mm, addmm, bmm, convolution, SDPA kernels); norms, activations, softmax,
  adds, gathers (embedding lookup) count 0. Each multiply-accumulate is 2 FLOPs.
- attention: on the meta device SDPA runs its math decomposition, two bmm of the full seq x seq
  score matrix forward (causal masking is not exploited: the same 4*s*h FLOPs per token that
  SC'21 and `ModelSpec.block_matmul_flops_per_token` count), and four bmm backward (exactly 2x).
  A flash/efficient kernel on CUDA is counted 2.5x forward in backward (it recomputes Q K^T).
- MoE: the meta device has no routing data, so experts get a balanced load (see
  `planner.build.modeling.tokens_per_expert`), i.e. top_k expert MLPs per token.
With these rules the traced forward+backward sum equals `ModelSpec.training_flops` for decoders.

Layers of one kind are identical, so one block of each kind is traced and its numbers copied to
all L nodes. Bytes: floating-point tensors and parameters count `dtype_bytes` per element (the
training dtype); integer tensors (token ids, expert indices) their own element size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import networkx as nx
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from planner.core.errors import require
from planner.core.model import ModelSpec
from planner.build.modeling import (Add, AttentionCore, ClassTokenAndPositions, Experts, Mul, RMSNorm, Router,
                                    TransformerModel, build_model)

# the layer kinds a model's graph has (and a profile's compute fits)
LAYER_KINDS = ("embedding", "block", "moe_block", "head")
# the operator kinds inside a layer
OP_KINDS = ("matmul", "attention", "elementwise", "norm", "embedding", "router", "experts")

# Module types that are one operator node each (their submodules are not split further), by op kind.
_OP_OF_MODULE: tuple[tuple[tuple[type, ...], str], ...] = (
    ((nn.Linear, nn.Conv2d), "matmul"),
    ((AttentionCore,), "attention"),
    ((nn.LayerNorm, RMSNorm), "norm"),
    ((nn.Embedding,), "embedding"),
    ((Router,), "router"),
    ((Experts,), "experts"),
    ((Add, Mul, nn.GELU, nn.SiLU, ClassTokenAndPositions), "elementwise"),
)


def block_kind(spec: ModelSpec) -> str:
    """The kind of every transformer block of `spec`."""
    return "moe_block" if spec.is_moe else "block"


def layer_kinds(spec: ModelSpec) -> tuple[str, ...]:
    """The layer kinds `spec` is made of, in execution order."""
    return ("embedding", block_kind(spec), "head")


# ---- tensors and measurement --------------------------------------------------------------------

def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def tensor_bytes(t: torch.Tensor, dtype_bytes: int) -> int:
    """Bytes of `t` when floating point is stored in `dtype_bytes` per element."""
    return t.numel() * (dtype_bytes if t.is_floating_point() else t.element_size())


def _measure_flops(run: Callable[..., object], inputs: tuple) -> tuple[int, int, object]:
    """(forward FLOPs, backward FLOPs, output) of run(*inputs); backward seeds every output that needs grad."""
    with FlopCounterMode(display=False) as counter:
        out = run(*inputs)
    flops_fwd = counter.get_total_flops()
    outs = [t for t in _tensors(out) if t.requires_grad]
    with FlopCounterMode(display=False) as counter:
        if outs:
            torch.autograd.backward(outs, [torch.empty_like(t) for t in outs])
    return flops_fwd, counter.get_total_flops(), out


@dataclass
class _Layer:
    """One layer kind of a 1-block meta model: its root modules, how to run it, and its input."""

    roots: dict[str, nn.Module]  # node-name prefix -> module whose operators are traced
    run: Callable[[torch.Tensor], torch.Tensor]
    input: torch.Tensor
    tied: set[int]  # ids of parameters stored in another layer (tied LM head -> embedding)


def _check(spec: ModelSpec, micro_batch: int, seq_len: int, dtype_bytes: int) -> None:
    require(micro_batch > 0, f"micro_batch must be positive, got {micro_batch}")
    require(dtype_bytes in (1, 2, 4, 8), f"dtype_bytes must be 1, 2, 4 or 8, got {dtype_bytes}")
    if spec.is_vit:
        require(seq_len == spec.seq_len,
                f"model '{spec.name}': a ViT's sequence is fixed by its image: seq_len must be {spec.seq_len}, got {seq_len}")
    else:
        require(0 < seq_len <= spec.max_seq_len,
                f"model '{spec.name}': seq_len must be between 1 and max_seq_len {spec.max_seq_len}, got {seq_len}")


def _layer(model: TransformerModel, kind: str, micro_batch: int, seq_len: int) -> _Layer:
    spec = model.spec
    require(kind in layer_kinds(spec),
            f"model '{spec.name}' has no layer kind '{kind}'; its kinds: {', '.join(layer_kinds(spec))}")
    meta = torch.device("meta")
    hidden = torch.empty(micro_batch, seq_len, spec.hidden_size, device=meta, requires_grad=True)
    if kind == "embedding":
        if spec.is_vit:
            images = torch.empty(micro_batch, spec.num_channels, spec.image_size, spec.image_size, device=meta)
            return _Layer({"embed": model.embed}, model.embed, images, set())
        tokens = torch.zeros(micro_batch, seq_len, dtype=torch.long, device=meta)
        return _Layer({"embed": model.embed}, model.embed, tokens, set())
    if kind == "head":
        embed_params = {id(p) for p in model.embed.parameters()}
        return _Layer({"norm": model.norm, "head": model.head}, lambda x: model.head(model.norm(x)), hidden,
                      embed_params)
    return _Layer({"": model.layers[0]}, model.layers[0], hidden, set())


def _param_counts(layer: _Layer) -> tuple[int, int]:
    """(parameters stored in this layer, parameters used here but stored in another layer)."""
    params = {id(p): p for root in layer.roots.values() for p in root.parameters()}
    own = sum(p.numel() for key, p in params.items() if key not in layer.tied)
    tied = sum(p.numel() for key, p in params.items() if key in layer.tied)
    return own, tied


# ---- layer graph -------------------------------------------------------------------------------

def trace_layer_graph(spec: ModelSpec, micro_batch: int, seq_len: int, dtype_bytes: int = 2) -> nx.DiGraph:
    """Chain graph embedding -> block.0 -> ... -> block.{L-1} -> head for one micro-batch.

    Node attributes: kind (LAYER_KINDS), index (position in execution order: embedding 0, block.i
    i+1, head L+1), params, param_bytes (parameters stored in this layer; a tied LM head's weight
    is counted in the embedding), tied_param_bytes (weights used here but stored in another layer:
    a pipeline stage holding the head but not the embedding keeps a copy, as Megatron-LM does),
    flops_fwd, flops_bwd (per micro-batch), activation_bytes (the layer's output tensor).
    Edge attribute: bytes (the hidden states passed on). Graph attributes: model, micro_batch,
    seq_len, dtype_bytes, order (node names in execution order).
    """
    _check(spec, micro_batch, seq_len, dtype_bytes)
    model = build_model(spec, "meta", num_layers=1)
    traced = {}
    for kind in layer_kinds(spec):
        layer = _layer(model, kind, micro_batch, seq_len)
        flops_fwd, flops_bwd, out = _measure_flops(layer.run, (layer.input,))
        own, tied = _param_counts(layer)
        traced[kind] = dict(kind=kind, params=own, param_bytes=own * dtype_bytes, tied_param_bytes=tied * dtype_bytes,
                            flops_fwd=flops_fwd, flops_bwd=flops_bwd, activation_bytes=tensor_bytes(out, dtype_bytes))
    kinds = ["embedding"] + [block_kind(spec)] * spec.num_layers + ["head"]
    names = ["embedding"] + [f"block.{i}" for i in range(spec.num_layers)] + ["head"]
    graph = nx.DiGraph(model=spec.name, micro_batch=micro_batch, seq_len=seq_len, dtype_bytes=dtype_bytes,
                       order=names)
    for index, (name, kind) in enumerate(zip(names, kinds)):
        graph.add_node(name, index=index, **traced[kind])
    for src, dst in zip(names, names[1:]):
        graph.add_edge(src, dst, bytes=graph.nodes[src]["activation_bytes"])
    return graph


# ---- operator graph ------------------------------------------------------------------------------

def _op_kind(module: nn.Module) -> str | None:
    for types, op in _OP_OF_MODULE:
        if isinstance(module, types):
            return op
    return None


def _op_modules(root: nn.Module, prefix: str) -> list[tuple[str, nn.Module, str]]:
    """(name, module, op) of the outermost operator modules under root, in definition order."""
    op = _op_kind(root)
    if op is not None:
        return [(prefix, root, op)]
    found = []
    for child_name, child in root.named_children():
        found += _op_modules(child, f"{prefix}.{child_name}" if prefix else child_name)
    return found


def _weight_shape(module: nn.Module, op: str, spec: ModelSpec) -> tuple[int, ...] | None:
    """nn.Linear/Conv2d/Embedding/norm: their `weight` shape as torch stores it ((out, in) for Linear);
    router: its gate (num_experts, hidden); experts: (num_experts, ffn_hidden, hidden), each expert
    holding gate and up (ffn, hidden) and down (hidden, ffn); ViT positions: (seq, hidden)."""
    if op == "router":
        return tuple(module.gate.weight.shape)
    if op == "experts":
        return (spec.num_experts, spec.ffn_hidden_size, spec.hidden_size)
    if isinstance(module, ClassTokenAndPositions):
        return tuple(module.pos.shape[1:])
    weight = getattr(module, "weight", None)
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) else None


def _fresh(value: object) -> object:
    """A new meta leaf shaped like `value` (keeping requires_grad), so one operator runs alone."""
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta").requires_grad_(value.requires_grad)
    return value


def trace_op_graph(spec: ModelSpec, kind: str, micro_batch: int, seq_len: int, dtype_bytes: int = 2) -> nx.DiGraph:
    """Operator graph of one layer of `kind` (see `layer_kinds(spec)`) for one micro-batch.

    Nodes are named by module path: in a block "attn_norm", "attn.q_proj", "attn.k_proj",
    "attn.v_proj", "attn.core", "attn.o_proj", "attn_add", "mlp_norm", then "mlp.fc1", "mlp.act",
    "mlp.fc2" (gpt, vit) or "mlp.gate_proj", "mlp.up_proj", "mlp.act", "mlp.mul", "mlp.down_proj"
    (llama) or "mlp.router", "mlp.experts" (mixtral), and "mlp_add"; "embed.tok", "embed.pos",
    "embed.add" (gpt), "embed.patch", "embed.cls_pos" (vit); "norm", "head".
    Node attributes: op (OP_KINDS), flops_fwd, flops_bwd (each operator measured alone), params,
    param_bytes, tied_param_bytes, out_bytes (all outputs), out_shape (first output),
    weight_shape (or None). Edge attribute: bytes of the tensors flowing along it (residual
    connections included). Graph attributes: kind, model, micro_batch, seq_len, dtype_bytes,
    input_bytes, input_nodes (operators reading the layer's input), output_node.
    """
    _check(spec, micro_batch, seq_len, dtype_bytes)
    require(kind in LAYER_KINDS, f"unknown layer kind '{kind}'; valid: {', '.join(LAYER_KINDS)}")
    model = build_model(spec, "meta", num_layers=1)
    layer = _layer(model, kind, micro_batch, seq_len)

    calls: list[tuple[str, nn.Module, str, tuple, object]] = []
    handles = []
    for prefix, root in layer.roots.items():
        for name, module, op in _op_modules(root, prefix):
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name, op=op: calls.append((name, mod, op, args, out))))
    try:
        out = layer.run(layer.input)
    finally:
        for handle in handles:
            handle.remove()

    graph = nx.DiGraph(kind=kind, model=spec.name, micro_batch=micro_batch, seq_len=seq_len, dtype_bytes=dtype_bytes,
                       input_bytes=tensor_bytes(layer.input, dtype_bytes), input_nodes=[], output_node=None)
    producer: dict[int, str] = {}  # id of an operator's output tensor -> operator name (tensors kept alive in `calls`)
    for name, module, op, args, result in calls:
        flops_fwd, flops_bwd, _ = _measure_flops(module, tuple(_fresh(a) for a in args))
        params = {id(p): p for p in module.parameters()}
        tied = sum(p.numel() for key, p in params.items() if key in layer.tied)
        own = sum(p.numel() for p in params.values()) - tied
        outs = _tensors(result)
        graph.add_node(name, op=op, flops_fwd=flops_fwd, flops_bwd=flops_bwd, params=own,
                       param_bytes=own * dtype_bytes, tied_param_bytes=tied * dtype_bytes,
                       out_bytes=sum(tensor_bytes(t, dtype_bytes) for t in outs), out_shape=tuple(outs[0].shape),
                       weight_shape=_weight_shape(module, op, spec))
        for arg in _tensors(args):
            if id(arg) in producer:
                src = producer[id(arg)]
                previous = graph.edges[src, name]["bytes"] if graph.has_edge(src, name) else 0
                graph.add_edge(src, name, bytes=previous + tensor_bytes(arg, dtype_bytes))
            elif arg is layer.input and name not in graph.graph["input_nodes"]:
                graph.graph["input_nodes"].append(name)
        for t in outs:
            producer[id(t)] = name
    graph.graph["output_node"] = producer.get(id(out))
    return graph


# ---- sums --------------------------------------------------------------------------------------

def forward_flops(graph: nx.DiGraph) -> int:
    """Forward FLOPs summed over the nodes (per micro-batch)."""
    return sum(data["flops_fwd"] for _, data in graph.nodes(data=True))


def total_flops(graph: nx.DiGraph) -> int:
    """Forward + backward FLOPs summed over the nodes (per micro-batch, no recomputation)."""
    return sum(data["flops_fwd"] + data["flops_bwd"] for _, data in graph.nodes(data=True))


def total_params(graph: nx.DiGraph) -> int:
    """Parameters summed over the nodes (tied weights once)."""
    return sum(data["params"] for _, data in graph.nodes(data=True))
