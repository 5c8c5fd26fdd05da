"""profilers.compute: TP shards have Megatron's shapes, timing on CPU, out-of-memory marks sizes infeasible."""

import pytest
import torch

from planner.core.model import ModelSpec, load_model
from profilers.compute import (ComputeSettings, build_layer, layer_kinds, make_inputs, profile_compute, profile_layer,
                               tp_degrees)
from profilers.run import fit_compute

CPU = torch.device("cpu")
FAST = ComputeSettings(micro_batches=(1, 2, 4), warmup=1, repeats=2, point_budget_s=1.0)


def tiny(family="gpt", **kw) -> ModelSpec:
    base = dict(name=f"tiny-{family}", family=family, num_layers=2, hidden_size=64, ffn_hidden_size=128, num_heads=4,
                num_kv_heads=4 if family == "gpt" else 2, vocab_size=1000, max_seq_len=64)
    if family == "mixtral":
        base.update(num_experts=4, top_k=2)
    return ModelSpec(**{**base, **kw})


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("family", ["gpt", "llama", "mixtral"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_block_shard_holds_one_tp_share_of_the_matmul_weights(family, tp):
    spec = tiny(family)
    block = build_layer(spec, "moe_block" if spec.is_moe else "block", tp, CPU, torch.float32)
    h, f, d = spec.hidden_size, spec.ffn_hidden_size, spec.head_dim
    attn = block.attn
    assert attn.q_proj.weight.shape == (h // tp, h) and attn.o_proj.weight.shape == (h, h // tp)
    assert attn.k_proj.weight.shape == (max(1, spec.num_kv_heads // tp) * d, h)  # GQA: at least one KV head
    x = torch.randn(2, 16, h, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None


def test_llama_3_8b_shard_weights_are_one_eighth():
    """llama-3-8b at tp=8: q/o and the MLP split 8 ways; its 8 KV heads give one per rank."""
    spec = load_model("llama-3-8b")
    full = build_layer(spec, "block", 1, torch.device("meta"), torch.bfloat16)
    shard = build_layer(spec, "block", 8, torch.device("meta"), torch.bfloat16)
    norms = 2 * spec.hidden_size
    assert n_params(shard) - norms == (n_params(full) - norms) // 8


def test_embedding_and_head_are_vocab_parallel():
    spec = tiny()
    emb = build_layer(spec, "embedding", 4, CPU, torch.float32)
    head = build_layer(spec, "head", 4, CPU, torch.float32)
    assert emb.tok.weight.shape == (250, 64) and head.head.weight.shape == (250, 64)
    (x, targets), grad = make_inputs(spec, "head", 4, 2, 16, CPU, torch.float32)
    assert grad is None and int(targets.max()) < 250
    assert head(x, targets).dim() == 0


def test_tp_degrees_divide_heads_and_ffn():
    assert tp_degrees(load_model("gpt2-xl"), 8) == [1]  # 25 heads
    assert tp_degrees(load_model("llama-3-8b"), 8) == [1, 2, 4, 8]
    assert tp_degrees(load_model("gpt2"), 2) == [1, 2]


def test_profile_layer_on_cpu_measures_every_micro_batch():
    spec = tiny()
    r = profile_layer(spec, "block", 2, 32, CPU, torch.float32, FAST)
    assert [p["micro_batch"] for p in r["points"]] == [1, 2, 4] and r["oom_micro_batch"] == 0
    for p in r["points"]:
        assert p["fwd_s"] > 0 and p["bwd_s"] > 0 and p["recompute_s"] >= 0 and p["repeats"] >= 1
    # saved activations grow with tokens (linear up to the allocator's rounding)
    acts = [p["activation_bytes"] / p["tokens"] for p in r["points"]]
    assert max(acts) / min(acts) < 1.2 and acts[0] > 0


def _oom_from(limit: int, error=torch.OutOfMemoryError):
    calls = []

    def fake_time(layer, inputs_fn, settings, device, recompute):
        args, _ = inputs_fn()
        mb = args[0].shape[0]
        calls.append(mb)
        if mb >= limit:
            raise error("CUDA out of memory. Tried to allocate 20.00 GiB")
        return {"fwd_s": 1e-3 * mb, "bwd_s": 2e-3 * mb, "repeats": 1, "activation_bytes": 1000 * mb}

    return fake_time, calls


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError,
                                   lambda m: RuntimeError(f"DefaultCPUAllocator: can't allocate memory: {m}")])
def test_out_of_memory_marks_the_size_infeasible_and_stops(error):
    fake, calls = _oom_from(4, error)
    settings = ComputeSettings(micro_batches=(1, 2, 4, 8), warmup=0, repeats=1)
    r = profile_layer(tiny(), "head", 1, 16, CPU, torch.float32, settings, time_fn=fake)
    assert calls == [1, 2, 4]  # 8 is not tried after 4 ran out of memory
    assert [p["micro_batch"] for p in r["points"]] == [1, 2]
    assert r["oom_micro_batch"] == 4 and "out of memory" in r["error"]
    fits, _ = fit_compute([r])
    assert fits[0].oom_micro_batch == 4 and fits[0].fwd(32) == pytest.approx(2e-3)


def test_other_errors_still_raise():
    def broken(*_):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        profile_layer(tiny(), "block", 1, 16, CPU, torch.float32, FAST, time_fn=broken)


def test_cpu_memory_cap_skips_sizes_that_would_not_fit():
    spec = tiny()
    weights = sum(p.numel() * 4 for p in build_layer(spec, "block", 1, CPU, torch.float32).parameters())
    capped = ComputeSettings(micro_batches=(1, 2, 4), warmup=0, repeats=1, recompute=False,
                             memory_cap_bytes=2 * weights + 1000)
    r = profile_layer(spec, "block", 1, 32, CPU, torch.float32, capped)
    assert [p["micro_batch"] for p in r["points"]] == [1] and r["oom_micro_batch"] == 2
    assert "memory cap" in r["error"]


def test_profile_compute_covers_every_kind_and_fits_reproduce_points():
    spec = tiny("llama")
    results = profile_compute(spec, 32, [1, 2], CPU, torch.float32, FAST)
    kinds = layer_kinds(spec) + ("attention_unfused",)
    assert {(r["kind"], r["tp"]) for r in results} == {(k, t) for k in kinds for t in (1, 2)}
    fits, errors = fit_compute(results)
    assert len(fits) == 8
    for f in fits:
        # CPU timings under load are noisy: a fit is never negative and never zero everywhere
        assert f.fwd(32) > 0 and f.bwd(32) > 0 and f.fwd.slope_s >= 0 and f.bwd.slope_s >= 0
        assert f.peak_activation_bytes_per_token > 0
        if f.kind != "block":
            assert f.recompute is None  # only blocks are recomputed
    for r in results:
        pts = r["points"]
        f = next(f for f in fits if (f.kind, f.tp) == (r["kind"], r["tp"]))
        worst = max(abs(f.fwd(p["tokens"]) - p["fwd_s"]) / p["fwd_s"] for p in pts)
        assert worst == pytest.approx(errors[f"{r['kind']}.tp{r['tp']}"]["fwd"])


def test_unfused_attention_core_is_causal_attention():
    """The profiled unfused core (Megatron's local-spec arithmetic) computes what SDPA's causal attention does."""
    from profilers.compute import UnfusedAttentionCore

    spec = tiny("gpt")
    core = UnfusedAttentionCore(spec, 1)
    x = torch.randn(2, 16, spec.hidden_size)
    b, s, heads, d = 2, 16, spec.num_heads, spec.head_dim
    q = x.view(b, s, heads, d).transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(b, s, heads * d)
    assert torch.allclose(core(x), ref, atol=1e-5)
