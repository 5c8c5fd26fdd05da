"""megatron-core's TransformerConfig and GPTModel keywords for a zoo model: the megatron engine builds its model
from them (planner/runner/engines/megatron_engine.py) and the profiler its one-layer chunk
(profilers/megatron_layer.py), so the two run the same layer.

Pure (no megatron-core needed): activation and dtypes are given by name, `resolve_config` turns them into the
objects TransformerConfig takes.
"""

from __future__ import annotations

import math

import torch

from planner.core.job import ParallelConfig
from planner.core.model import ModelSpec

VOCAB_MULTIPLE = 128  # Megatron-LM's --make-vocab-size-divisible-by default
INIT_STD = 0.02  # Megatron's --init-method-std default and GPT-2's


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary padded to a multiple of lcm(VOCAB_MULTIPLE, tp) (Megatron: VOCAB_MULTIPLE * tp), so that every
    tp <= 128 holds the same padded table."""
    multiple = math.lcm(VOCAB_MULTIPLE, tp)
    return -(-vocab_size // multiple) * multiple


def layer_config_kwargs(m: ModelSpec, cfg: ParallelConfig, dtype: str,
                        pipeline_model_parallel_layout: str | None = None) -> dict:
    """TransformerConfig keyword arguments of a model spec and a ParallelConfig (activation and dtypes by name)."""
    kw = {
        "num_layers": m.num_layers, "hidden_size": m.hidden_size, "ffn_hidden_size": m.ffn_hidden_size,
        "num_attention_heads": m.num_heads, "num_query_groups": m.num_kv_heads, "kv_channels": m.head_dim,
        "tensor_model_parallel_size": cfg.tp, "pipeline_model_parallel_size": cfg.pp,
        "virtual_pipeline_model_parallel_size": cfg.vpp if cfg.vpp > 1 else None,
        "context_parallel_size": cfg.cp, "expert_model_parallel_size": cfg.ep, "sequence_parallel": cfg.sequence_parallel,
        "normalization": "LayerNorm" if m.learned_positions else "RMSNorm", "layernorm_epsilon": 1e-5,
        "add_bias_linear": m.uses_bias, "add_qkv_bias": m.qkv_bias, "gated_linear_unit": m.gated_mlp, "activation_func": "silu" if m.gated_mlp else "gelu",
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "init_method_std": INIT_STD,
        "bf16": dtype == "bf16", "params_dtype": dtype, "pipeline_dtype": dtype,
        "pipeline_model_parallel_layout": pipeline_model_parallel_layout,
        "transformer_impl": "local", "persist_layer_norm": False, "bias_activation_fusion": False,
        "masked_softmax_fusion": False, "bias_dropout_fusion": False, "apply_rope_fusion": False,
        # off: Megatron-LM's argument default, which the emitted arguments keep (TransformerConfig's own is on);
        # on, megatron-core's layer keeps 6 bytes per attention score instead of 2 and runs slower
        # (benchmarks/results/campaign_2xh200.md)
        "attention_softmax_in_fp32": False,
        "gradient_accumulation_fusion": False, "deallocate_pipeline_outputs": True,
        "recompute_granularity": None, "recompute_method": None, "recompute_num_layers": None,
    }
    if cfg.recompute == "selective":
        kw.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif cfg.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if m.is_moe:
        kw.update(num_moe_experts=m.num_experts, moe_router_topk=m.top_k, moe_ffn_hidden_size=m.ffn_hidden_size,
                  moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=0.0, moe_grouped_gemm=False)
    return kw


def spec_model_kwargs(m: ModelSpec, tp: int) -> dict:
    """GPTModel keyword arguments besides config, layer spec and pre/post process, at tensor-parallel degree `tp`."""
    return {"vocab_size": padded_vocab_size(m.vocab_size, tp), "max_sequence_length": m.max_seq_len,
            "position_embedding_type": "learned_absolute" if m.learned_positions else "rope",
            "share_embeddings_and_output_weights": m.tie_embeddings, "rotary_base": 10000,
            "parallel_output": True}


def resolve_config(kw: dict) -> dict:
    """`kw` with the activation function and the dtypes as the objects TransformerConfig takes."""
    import torch.nn.functional as F

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    kw = dict(kw)
    kw["activation_func"] = {"silu": F.silu, "gelu": F.gelu}[kw["activation_func"]]
    kw["params_dtype"], kw["pipeline_dtype"] = dtypes[kw["params_dtype"]], dtypes[kw["pipeline_dtype"]]
    return kw
