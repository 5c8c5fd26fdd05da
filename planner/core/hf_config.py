"""A Hugging Face config.json read as the fields of a ModelSpec, by its `model_type`, never by guess.

Each supported model_type has one reader below. A key that changes the work or the memory of training and that
ModelSpec cannot represent is refused with one line naming the key and its value; keys that change neither are
ignored, each kind named where it is read (token ids, `initializer_range`, norm epsilons, `rope_theta`,
`torch_dtype` and `use_cache` change no shape). An absent optional key takes the default of transformers' own
config class (GPT2Config, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config), so a file reads as
transformers reads it; the shape keys are required.
"""

from __future__ import annotations

from planner.core.errors import DistplanError, require
from planner.core.fields import REQUIRED, flag, integer, number, short, text

SUPPORTED = ("gpt2", "llama", "mistral", "mixtral", "qwen2")  # the model_types read below
_MLA_MOE = ("multi-head latent attention (MLA: kv_lora_rank, q_lora_rank) and shared, fine-grained experts "
            "(n_shared_experts, moe_intermediate_size, first_k_dense_replace) are not modelled")
_QK_NORM = ("its RMSNorm on every query and key head (q_norm, k_norm) is not in distplan's time and memory models "
            "(for Qwen3-8B its saved inputs add about 7% to a block's activations)")
# model_types refused for a reason that names what distplan does not model
REFUSED = {
    "deepseek_v2": _MLA_MOE,
    "deepseek_v3": _MLA_MOE,
    "qwen2_moe": "its shared expert (shared_expert_intermediate_size) beside the routed experts is not modelled",
    "qwen3": _QK_NORM,
    "qwen3_moe": _QK_NORM,
}
# transformers MistralConfig's default window (MixtralConfig's is null: no window)
DEFAULT_SLIDING_WINDOW = {"mistral": 4096, "mixtral": None}


def hf_fields(cfg: object, source: str) -> dict:
    """The ModelSpec fields (all but `name`) of a Hugging Face config.json, or one DistplanError."""
    if not isinstance(cfg, dict):
        raise DistplanError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    supported = f"supported: {', '.join(SUPPORTED)}"
    require("model_type" in cfg, f"{source}: Hugging Face config has no 'model_type'; {supported}")
    model_type = cfg["model_type"]
    if isinstance(model_type, str) and model_type in REFUSED:
        raise DistplanError(f"{source}: model_type '{model_type}' is refused: {REFUSED[model_type]}; {supported}")
    require(isinstance(model_type, str) and model_type in SUPPORTED,
            f"{source}: model_type {short(model_type)} is not supported; {supported}")
    # a quantized checkpoint's weights and matmuls are not the bf16/fp32 ones the cost model prices
    require(cfg.get("quantization_config") is None,
            f"{source}: quantization_config {short(cfg.get('quantization_config'))} is not modelled (distplan prices "
            "unquantized training)")
    return _gpt2(cfg, source) if model_type == "gpt2" else _llama_like(cfg, model_type, source)


def _int(cfg: dict, key: str, source: str, default: object = REQUIRED) -> int:
    require(key in cfg or default is not REQUIRED, f"{source}: Hugging Face config is missing key '{key}'")
    return integer(cfg, key, source, 1, default=default)


def _only(value: object, key: str, modelled: tuple, source: str, why: str) -> None:
    require(value in modelled, f"{source}: {key} {short(value)} is not modelled: {why}")


def _off(cfg: dict, key: str, source: str, why: str) -> None:
    """A true/false key that distplan models only false (absent or null: false, as in transformers)."""
    _only(flag(cfg, key, source, default=False), key, (False,), source, why)


def _zero(cfg: dict, key: str, source: str, why: str) -> None:
    """A probability or noise that distplan models only at 0 (absent or null: 0, as in transformers)."""
    _only(number(cfg, key, source, 0, default=0.0), key, (0,), source, why)


def _gpt2(cfg: dict, source: str) -> dict:
    """GPT-2 (GPT2Config): pre-LayerNorm, learned positions, tanh-GeLU MLP with biases."""
    h, heads = _int(cfg, "n_embd", source), _int(cfg, "n_head", source)
    _only(text(cfg, "activation_function", source, default="gelu_new"), "activation_function", ("gelu_new",), source,
          "the gpt family's MLP is tanh-GeLU (gelu_new)")
    _off(cfg, "add_cross_attention", source, "a decoder block has no cross-attention")
    # GPT2Config's dropouts default to 0.1; distplan has one probability for attention and hidden states
    drops = {key: number(cfg, key, source, 0, maximum=1, default=0.1)
             for key in ("attn_pdrop", "resid_pdrop", "embd_pdrop")}
    require(len(set(drops.values())) == 1 and max(drops.values()) < 1,
            f"{source}: {', '.join(f'{k} {v:g}' for k, v in drops.items())} are not modelled: distplan has one "
            "dropout probability (below 1) for attention and hidden states")
    # summary_* keys shape GPT2DoubleHeadsModel's classifier, not the LM; scale_attn_* and reorder_and_upcast_attn
    # change the arithmetic of the attention scores, not their shapes
    return dict(family="gpt", num_layers=_int(cfg, "n_layer", source), hidden_size=h,
                ffn_hidden_size=_int(cfg, "n_inner", source, 4 * h), num_heads=heads, num_kv_heads=heads,
                vocab_size=_int(cfg, "vocab_size", source), max_seq_len=_int(cfg, "n_positions", source),
                tie_embeddings=flag(cfg, "tie_word_embeddings", source, default=True), dropout=drops["attn_pdrop"])


def _llama_like(cfg: dict, model_type: str, source: str) -> dict:
    """llama, mistral, mixtral and qwen2: RMSNorm, rotary positions, SwiGLU, grouped-query attention.

    Ignored because they change no shape, FLOP or byte: `rope_scaling` (rescales the rotary frequencies),
    `pretraining_tp` (splits each projection into slices of the same total work), mixtral's `router_aux_loss_coef`
    and `output_router_logits` (the balancing loss over [tokens, experts] is negligible beside the experts), qwen2's
    `sliding_window` and `max_window_layers` while `use_sliding_window` is false (transformers reads them only then).
    """
    h, heads = _int(cfg, "hidden_size", source), _int(cfg, "num_attention_heads", source)
    # LlamaConfig alone defaults num_key_value_heads to num_attention_heads; the others default to numbers of their own
    kv_heads = _int(cfg, "num_key_value_heads", source, heads if model_type == "llama" else REQUIRED)
    max_pos = _int(cfg, "max_position_embeddings", source)
    _only(text(cfg, "hidden_act", source, default="silu"), "hidden_act", ("silu",), source,
          "the llama family's MLP is SwiGLU (silu)")
    _zero(cfg, "attention_dropout", source, "distplan's dropout covers attention and hidden states together, and "
          "these models have no hidden dropout")
    head_dim = cfg.get("head_dim")
    if head_dim is not None:
        integer(cfg, "head_dim", source, 1)
        require(head_dim * heads == h, f"{source}: head_dim {head_dim} is not modelled: distplan's heads are "
                f"hidden_size {h} / num_attention_heads {heads} = {h / heads:g} wide")
    if model_type == "llama":  # LlamaConfig: no biases unless these say so
        _off(cfg, "attention_bias", source, "the llama family's attention projections have no bias")
        _off(cfg, "mlp_bias", source, "the llama family's MLP has no bias")
    if model_type in DEFAULT_SLIDING_WINDOW:
        # written null: no window; absent: the config class's default. A window at least as long as any sequence the
        # model takes is plain causal attention.
        window = DEFAULT_SLIDING_WINDOW[model_type] if "sliding_window" not in cfg else \
            integer(cfg, "sliding_window", source, 1, default=None)
        if window is not None:
            require(window >= max_pos, f"{source}: sliding_window {window} is below max_position_embeddings {max_pos}: "
                    "sliding-window attention is not modelled (distplan's attention is full causal)")
    if model_type == "qwen2":
        _off(cfg, "use_sliding_window", source, f"sliding-window attention (sliding_window "
             f"{short(cfg.get('sliding_window'))}) is not modelled (distplan's attention is full causal)")
    experts, top_k = 1, 1
    if model_type == "mixtral":
        experts, top_k = _int(cfg, "num_local_experts", source), _int(cfg, "num_experts_per_tok", source)
        _zero(cfg, "router_jitter_noise", source, "distplan's router takes its input unperturbed")
    return dict(family="mixtral" if model_type == "mixtral" else "llama", hidden_size=h, num_heads=heads,
                num_layers=_int(cfg, "num_hidden_layers", source),
                ffn_hidden_size=_int(cfg, "intermediate_size", source),
                num_kv_heads=kv_heads, vocab_size=_int(cfg, "vocab_size", source), max_seq_len=max_pos,
                num_experts=experts, top_k=top_k,
                tie_embeddings=flag(cfg, "tie_word_embeddings", source, default=False),
                qkv_bias=model_type == "qwen2")  # Qwen2Attention: q/k/v projections with bias, o_proj without
