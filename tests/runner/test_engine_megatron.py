"""The megatron engine on a machine without CUDA or megatron-core: the clear refusal (exit 2), and the pure
plan -> Megatron mapping (TransformerConfig / GPTModel keyword arguments, pipeline layout, vocabulary
padding, parser arguments) and the layout-invariant weight draw, checked against expected values."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from emitters.megatron import megatron_argv, pipeline_split
from planner.core.cluster import load_cluster
from planner.core.errors import DistplanError
from planner.core.job import ParallelConfig, validate_config
from planner.core.model import ModelSpec, load_model
from planner.core.plan import make_plan, save_plan
from planner.cost.predict import predict
from planner.build.megatron import padded_vocab_size
from planner.runner.engines import megatron_engine as me

TINY = ModelSpec(name="tiny-gpt", family="gpt", num_layers=4, hidden_size=64, ffn_hidden_size=128, num_heads=4,
                 num_kv_heads=4, vocab_size=128, max_seq_len=64, tie_embeddings=True)


def make(spec=TINY, **par):
    par = {"seq_len": 16, "global_batch_size": 8, "micro_batch_size": 2, **par}
    cfg = ParallelConfig(**par)
    validate_config(spec, cfg, cfg.gpus)
    cluster = load_cluster("dgx-h100-80gb")
    return make_plan(spec, cluster, cfg.gpus, cfg, predict(spec, cluster, cfg), provenance={"command": "test"})


# ---- refusal on a machine without GPUs ------------------------------------------------------------

def test_cpu_machine_gets_the_cuda_error_through_the_cli(tmp_path, cli):
    save_plan(make(dp=2), tmp_path / "plan.yaml")
    result = cli("run", tmp_path / "plan.yaml", "--engine", "megatron")
    assert result.exit_code == 2
    assert "engine 'megatron' needs CUDA GPUs; this machine has none" in result.stderr
    assert "Traceback" not in result.output


def test_cuda_is_checked_before_anything_else():
    with pytest.raises(DistplanError, match=r"^engine 'megatron' needs CUDA GPUs; this machine has none$"):
        me.check_supported(make(tp=2), "cpu")


def test_train_refuses_on_cpu_before_touching_megatron():
    from planner.runner.engine_api import DistInfo, RunOptions

    with pytest.raises(DistplanError, match="needs CUDA GPUs"):
        me.train(make(), RunOptions(engine="megatron"), DistInfo(0, 1, 0, "cpu", "gloo"))


def test_missing_megatron_core_and_local_spec_limits(monkeypatch):
    monkeypatch.setattr(me, "_has", lambda module: False)
    with pytest.raises(DistplanError, match="needs megatron-core: pip install megatron-core"):
        me.check_supported(make(), "cuda")
    monkeypatch.setattr(me, "_has", lambda module: True)
    me.check_supported(make(tp=2, pp=2), "cuda")  # fine with the local spec
    with pytest.raises(DistplanError, match="sequence parallel needs Transformer Engine's or Apex's norms"):
        me.check_supported(make(tp=2, sequence_parallel=True), "cuda")
    with pytest.raises(DistplanError, match="context parallel cp=2 needs Transformer Engine's attention"):
        me.check_supported(make(dp=2, cp=2), "cuda")
    with pytest.raises(DistplanError, match="optimizer offload needs Transformer Engine's FusedAdam"):
        me.check_supported(make(dp=2, zero_stage=1, offload_optimizer=True), "cuda")
    with pytest.raises(DistplanError, match="ep=2 with tp=2: Megatron requires sequence parallelism"):
        me.check_supported(make(load_model("mixtral-8x7b"), dp=2, tp=2, ep=2, seq_len=64, global_batch_size=4,
                                micro_batch_size=1), "cuda")
    with pytest.raises(DistplanError, match="ViT"):
        me.check_supported(make(load_model("vit-huge"), seq_len=257, global_batch_size=2, micro_batch_size=1), "cuda")


# ---- plan -> TransformerConfig / GPTModel keyword arguments -----------------------------------------

def test_gpt_maps_to_learned_positions_layernorm_gelu_and_a_tied_head():
    plan = make(load_model("gpt2-large"), dp=2, tp=2, pp=2, zero_stage=1, recompute="selective", seq_len=1024,
                global_batch_size=16, micro_batch_size=1, layer_split=(17, 19))
    kw = me.config_kwargs(plan, "bf16")
    assert {k: kw[k] for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                               "kv_channels")} == {"num_layers": 36, "hidden_size": 1280, "ffn_hidden_size": 5120,
                                                   "num_attention_heads": 20, "num_query_groups": 20, "kv_channels": 64}
    assert (kw["normalization"], kw["activation_func"], kw["gated_linear_unit"], kw["add_bias_linear"]) == ("LayerNorm", "gelu", False, True)
    assert (kw["tensor_model_parallel_size"], kw["pipeline_model_parallel_size"], kw["virtual_pipeline_model_parallel_size"]) == (2, 2, None)
    assert kw["pipeline_model_parallel_layout"] == "E" + "t" * 17 + "|" + "t" * 19 + "L"
    assert (kw["recompute_granularity"], kw["recompute_modules"]) == ("selective", ["core_attn"])
    assert kw["bf16"] and kw["params_dtype"] == "bf16" and kw["hidden_dropout"] == kw["attention_dropout"] == 0.0
    assert not any(kw[k] for k in ("persist_layer_norm", "gradient_accumulation_fusion", "apply_rope_fusion", "masked_softmax_fusion"))
    # softmax in the scores' dtype, as Megatron-LM's arguments leave it (the emitted ones do not turn it on);
    # TransformerConfig's own default (fp32) made the profiled lone layer store 3x the scores and run slower
    assert kw["attention_softmax_in_fp32"] is False and "--attention-softmax-in-fp32" not in megatron_argv(plan)
    assert "attention_softmax_in_fp32" in me.CHECKED_FIELDS
    assert "num_moe_experts" not in kw
    mk = me.model_kwargs(plan)
    assert mk == {"vocab_size": 50304, "max_sequence_length": 1024, "position_embedding_type": "learned_absolute",
                  "share_embeddings_and_output_weights": True, "rotary_base": 10000, "parallel_output": True}


def test_llama_maps_to_rope_rmsnorm_swiglu_and_gqa():
    plan = make(load_model("llama-3-8b"), tp=8, recompute="full", seq_len=2048, global_batch_size=8, micro_batch_size=1)
    kw = me.config_kwargs(plan, "bf16")
    assert (kw["normalization"], kw["activation_func"], kw["gated_linear_unit"], kw["add_bias_linear"]) == ("RMSNorm", "silu", True, False)
    assert (kw["num_attention_heads"], kw["num_query_groups"], kw["ffn_hidden_size"]) == (32, 8, 14336)
    assert (kw["recompute_granularity"], kw["recompute_method"], kw["recompute_num_layers"]) == ("full", "uniform", 1)
    assert kw["pipeline_model_parallel_layout"] is None
    mk = me.model_kwargs(plan)
    assert (mk["position_embedding_type"], mk["share_embeddings_and_output_weights"], mk["vocab_size"]) == ("rope", False, 128256)


def test_mixtral_maps_to_moe():
    plan = make(load_model("mixtral-8x7b"), dp=4, ep=4, pp=2, seq_len=1024, global_batch_size=8, micro_batch_size=1)
    kw = me.config_kwargs(plan, "fp32")
    assert (kw["num_moe_experts"], kw["moe_router_topk"], kw["moe_ffn_hidden_size"]) == (8, 2, 14336)
    assert (kw["expert_model_parallel_size"], kw["moe_token_dispatcher_type"], kw["moe_aux_loss_coeff"]) == (4, "alltoall", 0.0)
    assert kw["moe_grouped_gemm"] is False and kw["bf16"] is False and kw["params_dtype"] == "fp32"


def test_interleaved_pipeline_layout_follows_megatrons_virtual_stage_order():
    plan = make(dp=1, pp=2, vpp=2, schedule="interleaved", layer_split=(2, 2))
    assert me.pipeline_layout(plan) is None  # even: vpp alone places it
    assert me.config_kwargs(plan, "fp32")["virtual_pipeline_model_parallel_size"] == 2
    spec = ModelSpec(**{**TINY.__dict__, "num_layers": 20})
    plan = make(spec, pp=4, vpp=2, schedule="interleaved", layer_split=(2, 4, 6, 8), global_batch_size=16)
    # virtual stage v*pp + r = chunk v of rank r holds layer_split[r] / vpp blocks; the emitter writes the same
    assert me.pipeline_layout(plan) == "Et|tt|ttt|tttt|t|tt|ttt|ttttL"
    assert pipeline_split(plan)[1] == [["--pipeline-model-parallel-layout", "Et*1|t*2|t*3|t*4|t*1|t*2|t*3|t*4L"]]


@pytest.mark.parametrize("vocab,tp,padded", [(50257, 1, 50304), (50257, 2, 50304), (50257, 8, 50304), (50257, 3, 50304),
                                             (128, 4, 128), (32000, 1, 32000), (129, 256, 256)])
def test_vocabulary_padding_is_the_same_for_every_tp_dividing_128(vocab, tp, padded):
    assert padded_vocab_size(vocab, tp) == padded
    assert padded_vocab_size(vocab, tp) % tp == 0


def test_parser_arguments_are_the_emitted_ones_minus_megatron_fsdp_plus_the_local_spec():
    plan = make(dp=2, zero_stage=3)
    emitted = megatron_argv(plan)
    assert "--use-megatron-fsdp" in emitted
    argv = me.parser_argv(plan, emitted, 1e-4, 7)
    assert "--use-megatron-fsdp" not in argv and "--data-parallel-sharding-strategy" not in argv
    assert "optim_grads_params" not in argv and "--ckpt-format" not in argv
    assert "--use-distributed-optimizer" in argv  # ZeRO-2/3 run as Megatron's distributed optimizer
    assert argv[argv.index("--transformer-impl") + 1] == "local" and "--no-rope-fusion" in argv
    assert argv[argv.index("--num-layers") + 1] == "4" and argv[argv.index("--seed") + 1] == "7"
    assert argv[-2:] == ["--clip-grad", "0.0"]


def test_reference_plan_is_single_process_with_the_same_batches():
    ref = me.reference_plan(make(dp=2, tp=2, pp=2, zero_stage=1, layer_split=(1, 3), global_batch_size=16))
    p = ref.parallel
    assert (ref.gpus, p.dp, p.tp, p.pp, p.zero_stage, p.layer_split) == (1, 1, 1, 1, 0, ())
    assert (p.global_batch_size, p.micro_batch_size, p.num_microbatches) == (16, 2, 8)
    validate_config(ref.model, p, ref.gpus)


# ---- weights by name: any tp / pp layout holds the same model ---------------------------------------

class _Linear(nn.Module):
    def __init__(self, rows, cols, tp, dim=None, bias=True):
        super().__init__()
        shape = [rows, cols]
        if dim is not None:
            shape[dim] //= tp
        self.weight = nn.Parameter(torch.empty(shape))
        if dim is not None:
            self.weight.tensor_model_parallel, self.weight.partition_dim = True, dim
        self.bias = nn.Parameter(torch.empty(shape[0] if dim == 0 else rows)) if bias else None


class _Layer(nn.Module):
    """The parameter names and TP attributes of megatron-core's local-spec TransformerLayer (SwiGLU)."""

    def __init__(self, number, h, f, tp):
        super().__init__()
        self.layer_number = number
        self.input_layernorm = nn.LayerNorm(h)
        self.self_attention = nn.Module()
        self.self_attention.linear_qkv = _Linear(3 * h, h, tp, dim=0)
        self.self_attention.linear_proj = _Linear(h, h, tp, dim=1)
        self.pre_mlp_layernorm = nn.LayerNorm(h)
        self.mlp = nn.Module()
        self.mlp.linear_fc1 = _Linear(2 * f, h, tp, dim=0, bias=False)
        self.mlp.linear_fc2 = _Linear(h, f, tp, dim=1, bias=False)


class _GPT(nn.Module):
    def __init__(self, first_layer, layers, tp, pre, post, h=8, f=16, vocab=32):
        super().__init__()
        self.config = SimpleNamespace(gated_linear_unit=True, num_moe_experts=None)
        self.share_embeddings_and_output_weights = True
        if pre:
            self.embedding = nn.Module()
            self.embedding.word_embeddings = _Linear(vocab, h, tp, dim=0, bias=False)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(_Layer(first_layer + i + 1, h, f, tp) for i in range(layers))
        if post:
            self.decoder.final_layernorm = nn.LayerNorm(h)
            self.output_layer = _Linear(vocab, h, tp, dim=0, bias=False)


def _ps(tp_rank, tp):
    return SimpleNamespace(get_tensor_model_parallel_rank=lambda: tp_rank, get_tensor_model_parallel_world_size=lambda: tp,
                           get_expert_tensor_parallel_rank=lambda: tp_rank, get_expert_tensor_parallel_world_size=lambda: tp,
                           get_expert_model_parallel_rank=lambda: 0, get_expert_model_parallel_world_size=lambda: 1)


def _params(model):
    return dict(model.named_parameters())


def test_weights_are_the_same_for_every_tp_and_pp_layout():
    full = _GPT(0, 4, 1, pre=True, post=True)
    me.init_weights_by_name(full, 5, 4, _ps(0, 1))
    ref = _params(full)
    # tp = 2: shards concatenate to the tp = 1 tensors; SwiGLU fc1 rank r holds [gate_r; up_r]
    shards = [_GPT(0, 4, 2, pre=True, post=True) for _ in range(2)]
    for r, s in enumerate(shards):
        me.init_weights_by_name(s, 5, 4, _ps(r, 2))
    a, b = (_params(s) for s in shards)
    name = "decoder.layers.1.self_attention.linear_qkv.weight"
    assert torch.equal(torch.cat([a[name], b[name]], 0), ref[name])
    name = "decoder.layers.1.self_attention.linear_proj.weight"
    assert torch.equal(torch.cat([a[name], b[name]], 1), ref[name])
    name = "decoder.layers.2.mlp.linear_fc1.weight"
    gate, up = ref[name].chunk(2, 0)
    assert torch.equal(a[name], torch.cat([gate.chunk(2, 0)[0], up.chunk(2, 0)[0]], 0))
    assert torch.equal(b[name], torch.cat([gate.chunk(2, 0)[1], up.chunk(2, 0)[1]], 0))
    assert torch.equal(torch.cat([a["embedding.word_embeddings.weight"], b["embedding.word_embeddings.weight"]], 0),
                       ref["embedding.word_embeddings.weight"])
    # pp = 2, stage 1: its local layer 0 is global layer 2; the tied head draws the embedding's values
    stage1 = _GPT(2, 2, 1, pre=False, post=True)
    me.init_weights_by_name(stage1, 5, 4, _ps(0, 1))
    s1 = _params(stage1)
    assert torch.equal(s1["decoder.layers.0.mlp.linear_fc2.weight"], ref["decoder.layers.2.mlp.linear_fc2.weight"])
    assert torch.equal(s1["output_layer.weight"], ref["embedding.word_embeddings.weight"])
    # distributions: residual projections scaled by 1/sqrt(2 * layers), norms 1, biases 0
    assert torch.all(ref["decoder.layers.0.input_layernorm.weight"] == 1)
    assert torch.all(ref["decoder.layers.0.self_attention.linear_qkv.bias"] == 0)
    qkv, proj = ref["decoder.layers.0.self_attention.linear_qkv.weight"], ref["decoder.layers.0.mlp.linear_fc2.weight"]
    assert qkv.std().item() == pytest.approx(0.02, rel=0.3)
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.3)


def test_global_names_of_layers_and_experts():
    assert me.global_name("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight", {0: 6, 1: 7}, 4) == \
        "decoder.layers.7.mlp.experts.local_experts.7.linear_fc1.weight"
    assert me.global_name("embedding.word_embeddings.weight", {}, 0) == "embedding.word_embeddings.weight"


def test_reported_loss_survives_the_schedules_in_place_scaling():
    # megatron's forward_step divides the returned loss by the micro-batch count in place
    loss, reported = me._loss(torch.full((2, 3), 6.0))
    loss /= 8
    assert reported["lm loss"].item() == 6.0 and loss.item() == 0.75


def test_megatron_torch_optimizer_fallback_is_made_fused():
    """megatron-core without Apex/TE builds torch.optim.AdamW (foreach: a v-sized temporary in the step);
    inside fused_torch_adamw that class defaults to the fused kernel, and the patch is undone on exit."""
    import torch

    from planner.runner.engines.megatron_engine import fused_torch_adamw

    p = torch.nn.Parameter(torch.zeros(4))
    base = torch.optim.AdamW
    with fused_torch_adamw():
        opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.1)
        assert opt.defaults["fused"] is True and isinstance(opt, base)
        explicit = torch.optim.AdamW([p], lr=1e-3, fused=False)
        assert explicit.defaults["fused"] is False
    assert torch.optim.AdamW is base
    with fused_torch_adamw(active=False):
        assert torch.optim.AdamW is base
