"""Hugging Face config.json import (planner.core.hf_config): the published configs of hf_configs/ read by their
model_type, their parameter counts against the model cards and hand computations, and every field distplan does
not model refused in one line that names it."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from planner.core.errors import DistplanError
from planner.core.hf_config import SUPPORTED
from planner.core.model import SHAPE_KEYS, load_model, spec_from_dict, spec_from_hf_config

CONFIGS = Path(__file__).parent / "hf_configs"  # config.json files as published on the Hugging Face Hub


def hf(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def read(cfg: dict):
    return spec_from_hf_config(cfg, "m", "config.json")


def refused(cfg: dict, needle: str) -> str:
    with pytest.raises(DistplanError) as err:
        read(cfg)
    line = str(err.value)
    assert "\n" not in line and needle in line, line
    return line


def shape(spec) -> dict:
    return {k: getattr(spec, k) for k in SHAPE_KEYS + ("num_layers", "max_seq_len", "tie_embeddings", "qkv_bias")}


# ---- the supported model_types --------------------------------------------------------------------------

def test_gpt2_reads_as_the_zoo_gpt2_with_the_configs_dropout():
    spec = load_model(str(CONFIGS / "gpt2.json"))
    assert spec.name == "gpt2" and spec.dropout == 0.1  # attn_pdrop = resid_pdrop = embd_pdrop = 0.1
    assert replace(spec, dropout=0.0) == load_model("gpt2")
    assert spec.total_params() == 124_439_808  # the model card's 124M: 12 * 7,087,872 + 50257*768 + 1024*768 + 2*768


@pytest.mark.parametrize("name", ["llama-3-8b", "mixtral-8x7b"])
def test_llama_and_mixtral_read_as_the_zoo_models(name):
    spec = load_model(str(CONFIGS / f"{name}.json"))
    zoo = load_model(name)
    assert shape(spec) == shape(zoo)
    assert spec.total_params() == zoo.total_params()


def test_mixtral_experts():
    spec = read(hf("mixtral-8x7b"))
    assert (spec.family, spec.num_experts, spec.top_k) == ("mixtral", 8, 2)
    assert spec.total_params() / 1e9 == pytest.approx(46.7, rel=0.01)  # Mistral AI: 46.7B total, 12.9B active
    assert spec.active_params() / 1e9 == pytest.approx(12.9, rel=0.01)


def test_mistral_v03_without_a_window_is_plain_causal_attention():
    spec = read(hf("mistral-7b-v0.3"))  # sliding_window null
    assert (spec.family, spec.num_heads, spec.num_kv_heads, spec.max_seq_len) == ("llama", 32, 8, 32768)
    h, kv, f, layers, vocab = 4096, 8 * 128, 14336, 32, 32768
    block = h * (h + 2 * kv) + h * h + 3 * h * f + 2 * h  # q/k/v, o, gate/up/down, two RMSNorms
    assert spec.total_params() == layers * block + 2 * vocab * h + h == 7_248_023_552  # model card: 7.25B


def test_mistral_window_as_long_as_the_context_is_plain_causal_attention():
    cfg = hf("mistral-7b-v0.1") | {"sliding_window": 32768}
    assert read(cfg).max_seq_len == 32768


def test_qwen2_biases_q_k_v_alone_and_counts_them():
    spec = read(hf("qwen2.5-7b"))
    assert (spec.family, spec.qkv_bias, spec.qkv_biased, spec.uses_bias) == ("llama", True, True, False)
    assert (spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (3584, 28, 4, 128)
    h, kv, f, layers, vocab = 3584, 4 * 128, 18944, 28, 152064
    block = h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * f + 2 * h  # q/k/v with biases, o without, MLP, norms
    assert block - read(hf("qwen2.5-7b") | {"model_type": "llama"}).block_params() == h + 2 * kv  # the biases
    assert spec.total_params() == layers * block + 2 * vocab * h + h == 7_615_616_512  # untied head
    # model card of Qwen/Qwen2.5-7B: 7.61B parameters, 6.53B without the embeddings
    assert spec.total_params() / 1e9 == pytest.approx(7.61, rel=0.01)
    assert (spec.total_params() - 2 * vocab * h) / 1e9 == pytest.approx(6.53, rel=0.01)


def test_qkv_bias_is_a_zoo_key_written_only_when_set():
    qwen = read(hf("qwen2.5-7b"))
    assert qwen.to_dict()["qkv_bias"] is True
    assert spec_from_dict(qwen.to_dict(), "m", "m.yaml") == qwen
    assert "qkv_bias" not in load_model("llama-3-8b").to_dict()  # plan files written before the key stay identical


def test_keys_that_change_no_shape_are_ignored():
    base = read(hf("llama-3-8b"))
    rope = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            "rope_type": "llama3"}  # Llama-3.1-8B's rope_scaling: rescaled rotary frequencies, same shapes
    assert read(hf("llama-3-8b") | {"rope_scaling": rope, "pretraining_tp": 2, "rms_norm_eps": 1e-6}) == base
    assert read(hf("llama-3-8b") | {"head_dim": 128}) == base  # as hidden_size / num_attention_heads


def test_defaults_are_transformers_own():
    llama = hf("llama-3-8b")
    del llama["num_key_value_heads"]
    assert read(llama).num_kv_heads == 32  # LlamaConfig: multi-head attention
    mistral = hf("mistral-7b-v0.3")
    del mistral["num_key_value_heads"]
    refused(mistral, "missing key 'num_key_value_heads'")  # MistralConfig's default (8) is not LlamaConfig's
    mistral = hf("mistral-7b-v0.3")
    del mistral["sliding_window"]
    refused(mistral, "sliding_window 4096 is below max_position_embeddings 32768")  # MistralConfig's default window
    llama = hf("llama-3-8b")
    del llama["max_position_embeddings"]
    refused(llama, "missing key 'max_position_embeddings'")
    gpt2 = hf("gpt2")
    for key in ("attn_pdrop", "resid_pdrop", "embd_pdrop"):
        del gpt2[key]
    assert read(gpt2).dropout == 0.1  # GPT2Config's default


# ---- refused: the model_type ------------------------------------------------------------------------------

def test_deepseek_v3_is_refused_for_mla_and_shared_experts():
    line = refused(hf("deepseek-v3"), "model_type 'deepseek_v3' is refused: multi-head latent attention (MLA")
    assert "n_shared_experts" in line and "supported: gpt2, llama, mistral, mixtral, qwen2" in line


def test_qwen3_is_refused_for_its_query_and_key_norms():
    """Qwen3-8B's head_dim 128 = 4096 / 32 would read, but every layer normalises each query and key head
    (q_norm, k_norm): 2 * 128 parameters, and saved inputs the activation memory model does not count."""
    refused(hf("qwen3-8b"), "model_type 'qwen3' is refused: its RMSNorm on every query and key head (q_norm, k_norm)")
    refused(hf("qwen3-8b") | {"model_type": "qwen3_moe"}, "model_type 'qwen3_moe' is refused")
    refused(hf("qwen2.5-7b") | {"model_type": "qwen2_moe"}, "model_type 'qwen2_moe' is refused: its shared expert")


def test_unknown_model_type_is_refused_even_with_llama_keys():
    line = refused(hf("gemma-2-9b"), "model_type 'gemma2' is not supported; supported: ")
    assert line.endswith(", ".join(SUPPORTED))
    cfg = hf("llama-3-8b")
    del cfg["model_type"]
    refused(cfg, "config.json: Hugging Face config has no 'model_type'; supported: gpt2")
    refused(hf("llama-3-8b") | {"model_type": ["llama"]}, "model_type ['llama'] is not supported")


# ---- refused: one field distplan does not model -------------------------------------------------------------

@pytest.mark.parametrize("name,edit,needle", [
    ("mistral-7b-v0.1", {}, "config.json: sliding_window 4096 is below max_position_embeddings 32768: sliding-window "
     "attention is not modelled"),
    ("mixtral-8x7b", {"sliding_window": 4096}, "sliding_window 4096 is below max_position_embeddings 32768"),
    ("qwen2.5-7b", {"use_sliding_window": True}, "use_sliding_window True is not modelled: sliding-window attention "
     "(sliding_window 131072)"),
    ("llama-3-8b", {"attention_bias": True}, "attention_bias True is not modelled"),
    ("llama-3-8b", {"mlp_bias": True}, "mlp_bias True is not modelled"),
    ("llama-3-8b", {"head_dim": 64}, "head_dim 64 is not modelled: distplan's heads are hidden_size 4096 / "
     "num_attention_heads 32 = 128 wide"),
    ("mistral-7b-v0.3", {"head_dim": 160}, "head_dim 160 is not modelled"),
    ("llama-3-8b", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not modelled"),
    ("llama-3-8b", {"attention_dropout": 0.1}, "attention_dropout 0.1 is not modelled"),
    ("mixtral-8x7b", {"router_jitter_noise": 0.01}, "router_jitter_noise 0.01 is not modelled"),
    ("llama-3-8b", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config {'quant_method': 'fp8'} is "
     "not modelled"),
    ("gpt2", {"activation_function": "relu"}, "activation_function 'relu' is not modelled"),
    ("gpt2", {"add_cross_attention": True}, "add_cross_attention True is not modelled"),
    ("gpt2", {"attn_pdrop": 0.0}, "attn_pdrop 0, resid_pdrop 0.1, embd_pdrop 0.1 are not modelled"),
    ("mixtral-8x7b", {"num_experts_per_tok": None}, "'num_experts_per_tok' must be an integer"),
    ("llama-3-8b", {"attention_bias": "no"}, "'attention_bias' must be true or false, got 'no'"),
])
def test_a_field_distplan_does_not_model_is_refused_by_name(name, edit, needle):
    refused(hf(name) | edit, needle)
