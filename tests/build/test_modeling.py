"""planner.build.modeling: parameter counts against ModelSpec and SC'21; real training behaviour on CPU."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from planner.core.errors import DistplanError
from planner.core.model import ModelSpec, load_model, zoo_names
from planner.build.modeling import AttentionCore, apply_rotary, build_model, lm_loss, tokens_per_expert

from conftest import TINY_VOCAB, tiny

VOCAB = TINY_VOCAB




def sample_input(spec: ModelSpec, batch: int = 3, seq: int = 16) -> torch.Tensor:
    if spec.is_vit:
        return torch.randn(batch, spec.num_channels, spec.image_size, spec.image_size)
    return torch.randint(0, spec.vocab_size, (batch, seq))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


# ---- parameter counts --------------------------------------------------------------------------

@pytest.mark.parametrize("name", zoo_names())
def test_meta_param_count_equals_spec(name):
    spec = load_model(name)
    model = build_model(spec)
    assert all(p.is_meta for p in model.parameters())
    assert n_params(model) == spec.total_params()


def test_qwen2_q_k_v_biases_are_built_and_counted():
    spec = load_model(str(Path(__file__).parents[1] / "core" / "hf_configs" / "qwen2.5-7b.json"))
    model = build_model(spec)
    attn = model.layers[0].attn
    assert all(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj)) and attn.o_proj.bias is None
    assert n_params(model) == spec.total_params()


@pytest.mark.parametrize("name", [n for n in zoo_names() if load_model(n).family == "gpt"])
def test_gpt_param_count_matches_sc21(name):
    """Narayanan et al. SC'21: P = 12 l h^2 (1 + 13/(12h) + (V+s)/(12 l h))."""
    spec = load_model(name)
    l, h, V, s = spec.num_layers, spec.hidden_size, spec.vocab_size, spec.max_seq_len
    sc21 = 12 * l * h**2 * (1 + 13 / (12 * h) + (V + s) / (12 * l * h))
    assert n_params(build_model(spec)) == pytest.approx(sc21, rel=0.01)


def test_num_layers_and_dtype_and_tying():
    spec = load_model("gpt2")
    model = build_model(spec, dtype=torch.bfloat16, num_layers=3)
    assert len(model.layers) == 3
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.head.weight is model.embed.tok.weight
    assert not build_model(tiny("llama"), "cpu").tied
    with pytest.raises(DistplanError, match="num_layers"):
        build_model(spec, num_layers=0)


# ---- real weights on CPU -----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt", "llama", "mixtral", "vit"])
def test_forward_loss_backward(family):
    spec = tiny(family)
    torch.manual_seed(0)
    model = build_model(spec, "cpu")
    assert n_params(model) == spec.total_params()
    x = sample_input(spec)
    logits = model(x)
    expected = (3, VOCAB) if spec.is_vit else (3, 16, VOCAB)
    assert logits.shape == expected
    targets = torch.randint(0, VOCAB, expected[:-1])
    loss = model.loss(logits, targets)
    # N(0, 0.02) weights give near-uniform predictions: the loss starts at about ln(V).
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(math.log(VOCAB), abs=0.15)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if spec.tie_embeddings:
        assert model.head.weight is model.embed.tok.weight


def test_same_seed_same_weights():
    spec = tiny("mixtral")
    torch.manual_seed(7)
    a = build_model(spec, "cpu").state_dict()
    torch.manual_seed(7)
    b = build_model(spec, "cpu").state_dict()
    torch.manual_seed(8)
    c = build_model(spec, "cpu").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attn.q_proj.weight"], c["layers.0.attn.q_proj.weight"])


def test_init_is_gpt2_style():
    torch.manual_seed(0)
    spec = load_model("gpt2")
    model = build_model(spec, "cpu", num_layers=2)
    assert model.embed.tok.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.layers[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.02)
    # residual projections scaled by 1/sqrt(2 * layers) (Radford et al. 2019, Sec. 2.3)
    assert model.layers[0].mlp.fc2.weight.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.02)
    assert torch.count_nonzero(model.layers[0].attn.q_proj.bias) == 0
    assert torch.equal(model.layers[0].attn_norm.weight, torch.ones(spec.hidden_size))


@pytest.mark.parametrize("family", ["gpt", "llama", "mixtral"])
def test_decoders_are_causal(family):
    spec = tiny(family)
    torch.manual_seed(0)
    model = build_model(spec, "cpu")
    x = sample_input(spec)
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def reference_attention(q, k, v, head_dim, causal, rotary):
    """Vaswani et al. eq. 1 written out with an explicit mask and GQA head sharing."""
    b, s, _ = q.shape
    q, k, v = (t.view(b, s, -1, head_dim).transpose(1, 2) for t in (q, k, v))
    if rotary:
        q, k = apply_rotary(q), apply_rotary(k)
    groups = q.shape[1] // k.shape[1]
    k = torch.stack([k[:, i // groups] for i in range(q.shape[1])], dim=1)
    v = torch.stack([v[:, i // groups] for i in range(q.shape[1])], dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    if causal:
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)


@pytest.mark.parametrize("causal,rotary", [(True, True), (True, False), (False, False)])
def test_attention_core_matches_reference(causal, rotary):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 4 * 8), torch.randn(2, 8, 2 * 8), torch.randn(2, 8, 2 * 8)
    out = AttentionCore(8, causal=causal, rotary=rotary)(q, k, v)
    torch.testing.assert_close(out, reference_attention(q, k, v, 8, causal, rotary))


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_attention_runs_on_column_sharded_heads(family):
    """Megatron-LM split over 2 ranks: q/k/v rows and o_proj columns; partial outputs sum to the full one."""
    spec = tiny(family)
    torch.manual_seed(0)
    attn = build_model(spec, "cpu").layers[0].attn
    x = torch.randn(2, 16, spec.hidden_size)
    full = attn(x)
    partial = []
    for rank in range(2):
        def shard(linear):
            chunk = linear.out_features // 2
            bias = None if linear.bias is None else linear.bias[rank * chunk:(rank + 1) * chunk]
            return F.linear(x, linear.weight[rank * chunk:(rank + 1) * chunk], bias)
        q, k, v = shard(attn.q_proj), shard(attn.k_proj), shard(attn.v_proj)
        local = attn.core(q, k, v)
        cols = spec.hidden_size // 2
        partial.append(F.linear(local, attn.o_proj.weight[:, rank * cols:(rank + 1) * cols]))
    bias = 0 if attn.o_proj.bias is None else attn.o_proj.bias
    torch.testing.assert_close(partial[0] + partial[1] + bias, full)


def test_mixtral_routes_each_token_to_top_k_experts():
    spec = tiny("mixtral")
    torch.manual_seed(0)
    moe = build_model(spec, "cpu").layers[0].mlp
    x = torch.randn(3, 16, spec.hidden_size)
    tokens = x.reshape(-1, spec.hidden_size)
    weights, indices = moe.router(x)
    flat_idx, flat_w = indices.reshape(-1, spec.top_k), weights.reshape(-1, spec.top_k)
    assert all(len(set(row.tolist())) == spec.top_k for row in flat_idx)  # top_k distinct experts
    logits = moe.router.gate(tokens)
    torch.testing.assert_close(flat_w, logits.gather(1, flat_idx).softmax(-1))  # softmax over the top-k logits
    others = logits.scatter(1, flat_idx, float("-inf")).max(1).values
    assert (logits.gather(1, flat_idx).min(1).values >= others).all()  # the chosen experts have the largest logits

    received = []  # which token rows each expert saw, via hooks on the experts
    hooks = [e.register_forward_hook(lambda m, args, out: received.append(args[0])) for e in moe.experts.experts]
    out = moe(x)
    for hook in hooks:
        hook.remove()
    assert sum(r.shape[0] for r in received) == tokens.shape[0] * spec.top_k
    for t in range(tokens.shape[0]):
        seen = sum(int((r == tokens[t]).all(1).any()) for r in received)
        assert seen == spec.top_k

    dense = torch.zeros_like(tokens)  # reference: sum_j w_j * expert_{i_j}(x), token by token
    for t in range(tokens.shape[0]):
        for j in range(spec.top_k):
            dense[t] += flat_w[t, j] * moe.experts.experts[int(flat_idx[t, j])](tokens[t:t + 1])[0]
    torch.testing.assert_close(out.reshape(-1, spec.hidden_size), dense)


def test_tokens_per_expert_balanced_on_meta():
    assert tokens_per_expert(torch.empty(10, dtype=torch.long, device="meta"), 4) == [3, 3, 2, 2]
    assert tokens_per_expert(torch.tensor([0, 2, 2, 3]), 4) == [1, 0, 2, 1]


def test_lm_loss_is_cross_entropy():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, VOCAB), torch.randint(0, VOCAB, (2, 5))
    manual = -logits.log_softmax(-1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(lm_loss(logits, targets), manual)
    cls_logits, labels = torch.randn(4, VOCAB), torch.randint(0, VOCAB, (4,))
    torch.testing.assert_close(lm_loss(cls_logits, labels), F.cross_entropy(cls_logits, labels))


def test_learned_positions_bound_sequence_length():
    spec = tiny("gpt")
    model = build_model(spec, "cpu")
    with pytest.raises(DistplanError, match="learned positions"):
        model(torch.zeros(1, spec.max_seq_len + 1, dtype=torch.long))


def test_bfloat16_on_cpu_trains():
    spec = tiny("llama")
    torch.manual_seed(0)
    model = build_model(spec, "cpu", dtype=torch.bfloat16)
    logits = model(sample_input(spec))
    assert logits.dtype == torch.bfloat16
    lm_loss(logits, torch.randint(0, VOCAB, logits.shape[:-1])).backward()
    assert model.layers[0].attn.q_proj.weight.grad.dtype == torch.bfloat16
