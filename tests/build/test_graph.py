"""planner.build.graph: traced FLOPs and bytes against ModelSpec and SC'21; graph structure; op-graph consistency."""

import time

import pytest

from planner.core.errors import DistplanError
from planner.build.graph import (LAYER_KINDS, OP_KINDS, block_kind, forward_flops, layer_kinds, total_flops,
                                 total_params, trace_layer_graph, trace_op_graph)
from planner.core.model import load_model, zoo_names

from conftest import tiny

DECODERS = [n for n in zoo_names() if not load_model(n).is_vit]


def tiny_seq(spec):
    return spec.seq_len if spec.is_vit else 16


# ---- layer graph -----------------------------------------------------------------------------

def test_layer_graph_is_a_chain_in_execution_order():
    spec = load_model("gpt2")
    b, s = 2, 128
    g = trace_layer_graph(spec, micro_batch=b, seq_len=s, dtype_bytes=2)
    names = ["embedding"] + [f"block.{i}" for i in range(spec.num_layers)] + ["head"]
    assert list(g.nodes) == names == g.graph["order"]
    assert list(g.edges) == list(zip(names, names[1:]))
    assert [g.nodes[n]["index"] for n in names] == list(range(len(names)))
    assert [g.nodes[n]["kind"] for n in names] == ["embedding"] + ["block"] * spec.num_layers + ["head"]
    hidden_bytes = b * s * spec.hidden_size * 2
    assert all(data["bytes"] == hidden_bytes for _, _, data in g.edges(data=True))
    assert g.nodes["head"]["activation_bytes"] == b * s * spec.vocab_size * 2
    # the tied LM head is stored with the embedding; a stage holding only the head keeps a copy
    assert g.nodes["head"]["param_bytes"] == 2 * spec.hidden_size * 2
    assert g.nodes["head"]["tied_param_bytes"] == spec.vocab_size * spec.hidden_size * 2
    assert g.nodes["block.0"]["param_bytes"] == spec.block_params() * 2


@pytest.mark.parametrize("name", zoo_names())
def test_layer_graph_params_sum_to_spec(name):
    spec = load_model(name)
    g = trace_layer_graph(spec, 1, spec.seq_len)
    assert total_params(g) == spec.total_params()
    assert set(nx_kinds(g)) == set(layer_kinds(spec)) <= set(LAYER_KINDS)


def nx_kinds(g):
    return [data["kind"] for _, data in g.nodes(data=True)]


@pytest.mark.parametrize("name", DECODERS)
def test_traced_flops_equal_spec_training_flops(name):
    """Both count 2 FLOPs/MAC of every matmul, full seq x seq attention, backward = 2x forward: equal exactly."""
    spec = load_model(name)
    batch, seq = spec.default_global_batch, spec.seq_len
    g = trace_layer_graph(spec, 1, seq)
    assert total_flops(g) * batch == pytest.approx(spec.training_flops(batch, seq), rel=1e-9)


@pytest.mark.parametrize("name", ["gpt2-xl", "gpt3-175b"])
def test_gpt_flops_match_sc21(name):
    """Narayanan et al. SC'21 eq. (3): 72 B s l h^2 (1 + s/(6h) + V/(12 l h)) per iteration, no recompute."""
    spec = load_model(name)
    B, s, l, h, V = spec.default_global_batch, spec.seq_len, spec.num_layers, spec.hidden_size, spec.vocab_size
    sc21 = 72 * B * s * l * h**2 * (1 + s / (6 * h) + V / (12 * l * h))
    assert total_flops(trace_layer_graph(spec, 1, s)) * B == pytest.approx(sc21, rel=0.02)


def test_flops_scale_with_micro_batch():
    spec = load_model("llama-2-7b")
    one, four = trace_layer_graph(spec, 1, 512), trace_layer_graph(spec, 4, 512)
    assert total_flops(four) == 4 * total_flops(one)
    assert four.nodes["block.3"]["activation_bytes"] == 4 * one.nodes["block.3"]["activation_bytes"]


def test_trace_gpt3_175b_is_fast():
    spec = load_model("gpt3-175b")
    start = time.perf_counter()
    g = trace_layer_graph(spec, micro_batch=1, seq_len=2048)
    assert time.perf_counter() - start < 2.0
    assert g.number_of_nodes() == 98


# ---- operator graph --------------------------------------------------------------------------

def test_gpt_block_op_graph():
    spec = load_model("gpt2")
    b, s, h, f = 2, 64, spec.hidden_size, spec.ffn_hidden_size
    g = trace_op_graph(spec, "block", b, s, dtype_bytes=2)
    assert list(g.nodes) == ["attn_norm", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.core", "attn.o_proj",
                             "attn_add", "mlp_norm", "mlp.fc1", "mlp.act", "mlp.fc2", "mlp_add"]
    weights = {n: d["weight_shape"] for n, d in g.nodes(data=True) if d["op"] == "matmul"}
    assert weights == {"attn.q_proj": (h, h), "attn.k_proj": (h, h), "attn.v_proj": (h, h), "attn.o_proj": (h, h),
                       "mlp.fc1": (f, h), "mlp.fc2": (h, f)}
    for proj in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
        assert g.has_edge("attn_norm", proj) and g.has_edge(proj, "attn.core")
    assert g.has_edge("attn.core", "attn.o_proj") and g.has_edge("attn.o_proj", "attn_add")
    assert g.has_edge("attn_add", "mlp_add")  # residual connection
    assert g.graph["input_nodes"] == ["attn_norm", "attn_add"] and g.graph["output_node"] == "mlp_add"
    assert g.edges["mlp.fc1", "mlp.act"]["bytes"] == b * s * f * 2
    assert g.nodes["mlp.fc1"]["out_shape"] == (b, s, f)
    assert g.nodes["attn.core"]["op"] == "attention" and g.nodes["mlp.act"]["op"] == "elementwise"
    assert {d["op"] for _, d in g.nodes(data=True)} <= set(OP_KINDS)
    # matmul forward FLOPs = 2 * tokens * weight elements
    assert g.nodes["mlp.fc1"]["flops_fwd"] == 2 * b * s * f * h
    # the attention core is counted over the full s x s scores (causal masking not exploited), as in SC'21
    assert g.nodes["attn.core"]["flops_fwd"] == 4 * b * s * s * h


@pytest.mark.parametrize("family", ["gpt", "llama", "mixtral", "vit"])
def test_backward_is_twice_forward_for_matmuls(family):
    spec = tiny(family)
    for kind in layer_kinds(spec):
        g = trace_op_graph(spec, kind, 2, tiny_seq(spec))
        for name, d in g.nodes(data=True):
            if d["op"] in ("matmul", "attention", "router", "experts") and name != "embed.patch":
                assert d["flops_bwd"] == pytest.approx(2 * d["flops_fwd"], rel=0.05), name
            elif name == "embed.patch":  # the images need no gradient: only the weight gradient, 1x
                assert d["flops_bwd"] == d["flops_fwd"] > 0
            else:
                assert d["flops_fwd"] == d["flops_bwd"] == 0, name  # the counter skips elementwise ops


@pytest.mark.parametrize("family", ["gpt", "llama", "mixtral", "vit"])
def test_op_graphs_add_up_to_layer_nodes(family):
    spec = tiny(family)
    layers = trace_layer_graph(spec, 2, tiny_seq(spec))
    for kind in layer_kinds(spec):
        ops = trace_op_graph(spec, kind, 2, tiny_seq(spec))
        node = next(d for _, d in layers.nodes(data=True) if d["kind"] == kind)
        assert forward_flops(ops) == node["flops_fwd"]
        assert total_flops(ops) == node["flops_fwd"] + node["flops_bwd"]
        assert total_params(ops) == node["params"]
        assert sum(d["tied_param_bytes"] for _, d in ops.nodes(data=True)) == node["tied_param_bytes"]
        assert ops.nodes[ops.graph["output_node"]]["out_bytes"] == node["activation_bytes"]


@pytest.mark.parametrize("name", ["llama-3-8b", "mixtral-8x7b"])
def test_op_flops_match_spec_per_operator(name):
    spec = load_model(name)
    b, s = 1, 256
    g = trace_op_graph(spec, block_kind(spec), b, s)
    per_token = {k: v * b * s for k, v in spec.block_matmul_flops_per_token(s).items()}
    fwd = {n: d["flops_fwd"] for n, d in g.nodes(data=True)}
    assert fwd["attn.q_proj"] + fwd["attn.k_proj"] + fwd["attn.v_proj"] == per_token["qkv"]
    assert fwd["attn.core"] == per_token["attn_core"] and fwd["attn.o_proj"] == per_token["attn_out"]
    if spec.is_moe:
        assert fwd["mlp.router"] == per_token["router"] and fwd["mlp.experts"] == per_token["mlp"]
    else:
        assert fwd["mlp.gate_proj"] + fwd["mlp.up_proj"] + fwd["mlp.down_proj"] == per_token["mlp"]


def test_llama_block_op_graph_gqa_and_swiglu():
    spec = load_model("llama-3-8b")
    g = trace_op_graph(spec, "block", 1, 128)
    h, f, kv = spec.hidden_size, spec.ffn_hidden_size, spec.kv_dim
    assert g.nodes["attn.k_proj"]["weight_shape"] == (kv, h) and g.nodes["attn.v_proj"]["weight_shape"] == (kv, h)
    assert g.nodes["attn_norm"]["op"] == "norm" and g.nodes["attn_norm"]["param_bytes"] == h * 2
    for src, dst in [("mlp.gate_proj", "mlp.act"), ("mlp.act", "mlp.mul"), ("mlp.up_proj", "mlp.mul"),
                     ("mlp.mul", "mlp.down_proj"), ("mlp.down_proj", "mlp_add")]:
        assert g.has_edge(src, dst), (src, dst)
    assert g.nodes["mlp.down_proj"]["weight_shape"] == (h, f)


def test_mixtral_moe_block_op_graph():
    spec = load_model("mixtral-8x7b")
    b, s = 1, 128
    g = trace_op_graph(spec, "moe_block", b, s)
    h, f, E, k = spec.hidden_size, spec.ffn_hidden_size, spec.num_experts, spec.top_k
    assert g.nodes["mlp.router"]["op"] == "router" and g.nodes["mlp.router"]["weight_shape"] == (E, h)
    assert g.nodes["mlp.experts"]["op"] == "experts" and g.nodes["mlp.experts"]["weight_shape"] == (E, f, h)
    assert g.nodes["mlp.experts"]["param_bytes"] == spec.expert_params_per_block() * 2
    assert g.has_edge("mlp_norm", "mlp.router") and g.has_edge("mlp_norm", "mlp.experts")
    # routing weights (2 bytes each) and expert indices (int64) for top_k slots per token
    assert g.edges["mlp.router", "mlp.experts"]["bytes"] == b * s * k * (2 + 8)
    assert g.nodes["mlp.experts"]["flops_fwd"] == b * s * k * 3 * 2 * h * f  # balanced routing on meta


def test_embedding_and_head_op_graphs():
    spec = load_model("gpt2")
    emb = trace_op_graph(spec, "embedding", 1, 32)
    assert list(emb.nodes) == ["embed.tok", "embed.pos", "embed.add"]
    assert emb.nodes["embed.tok"]["op"] == "embedding" and emb.nodes["embed.tok"]["weight_shape"] == (50257, 768)
    assert emb.graph["input_nodes"] == ["embed.tok"] and emb.graph["input_bytes"] == 32 * 8  # int64 token ids
    head = trace_op_graph(spec, "head", 1, 32)
    assert list(head.edges) == [("norm", "head")]
    assert head.nodes["head"]["weight_shape"] == (50257, 768) and head.nodes["head"]["param_bytes"] == 0
    assert head.nodes["head"]["tied_param_bytes"] == 50257 * 768 * 2
    vit = load_model("vit-huge")
    assert trace_op_graph(vit, "head", 1, vit.seq_len).nodes["head"]["out_shape"] == (1, vit.vocab_size)


def test_bad_arguments_raise_distplan_error():
    gpt, vit = load_model("gpt2"), load_model("vit-huge")
    with pytest.raises(DistplanError, match="layer kind"):
        trace_op_graph(gpt, "moe_block", 1, 16)
    with pytest.raises(DistplanError, match="unknown layer kind"):
        trace_op_graph(gpt, "decoder", 1, 16)
    with pytest.raises(DistplanError, match="max_seq_len"):
        trace_layer_graph(gpt, 1, 4096)
    with pytest.raises(DistplanError, match="seq_len must be 257"):
        trace_layer_graph(vit, 1, 256)
    with pytest.raises(DistplanError, match="micro_batch"):
        trace_layer_graph(gpt, 0, 16)
