"""The memory model's peak over a step's moments (planner.cost.memory.StageMemory.phases) against runs measured on
2xH200 (benchmarks/results/campaign_2xh200.md, session 3), each with the profile those runs were planned with."""

from pathlib import Path

import pytest

from planner.core.cluster import load_cluster
from planner.core.job import ParallelConfig
from planner.core.prediction import GIB
from planner.cost.memory import grads_in_forward, stage_memory
from planner.core.model import load_model
from planner.cost.predict import predict
from planner.cost.profiled import cluster_for_profile
from planner.cost.profiled import load_profile

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "profile_2xh200"
H200 = load_cluster("h200-141gb")


def _13b(**par) -> tuple:
    model = load_model("llama-2-13b")
    cfg = ParallelConfig(**{"global_batch_size": 8, "seq_len": 4096, **par})
    return model, cfg, load_profile(RESULTS / "profile-llama-2-13b-s4096-quick-2xh200.yaml")


def test_deepspeed_zero2_step_holds_the_fp32_gradient_partition():
    # DeepSpeed ZeRO-2, llama-2-13b, dp2, full recompute, mb 2x2: ran out of memory in the optimizer step
    # allocating 24.24 GiB (the fp32 copy of this rank's gradient partition) with 121.28 GiB allocated
    model, cfg, prof = _13b(dp=2, zero_stage=2, micro_batch_size=2, recompute="full")
    mem = stage_memory(model, cfg, 0, model.num_layers, prof, engine="deepspeed")
    params = sum(stage_params_total(model))
    assert 4 * params / 2 / GIB == pytest.approx(24.24, rel=0.01)  # the buffer it failed to allocate
    assert mem.peak_phase == "step"
    assert mem.total / GIB == pytest.approx(121.28 + 24.24, rel=0.02)
    assert not predict(model, H200, cfg, prof, engine="deepspeed").fits
    # the torch engine (FSDP2) has no such copy: its step is not its peak. Its two micro-batches accumulate
    # unsharded bf16 gradients (2 bytes per parameter, 24.24 GiB) where DeepSpeed keeps a 12.12 GiB partition
    # plus the 36.36 GiB step copies
    torch_mem = stage_memory(model, cfg, 0, model.num_layers, prof, engine="torch")
    assert torch_mem.gradients / GIB == pytest.approx(2 * params / GIB, rel=1e-6) == pytest.approx(24.24, rel=0.01)
    assert torch_mem.peak_phase != "step" and torch_mem.total < mem.total - 15 * GIB


def stage_params_total(model) -> tuple[float, float]:
    return (model.num_layers * model.block_params() + model.embedding_params() + model.head_params(), 0.0)


def test_fsdp2_full_recompute_without_accumulation_peaks_before_gradients_exist():
    # FSDP2 ZeRO-3, llama-2-13b, dp2, full recompute, mb 4x1 (one micro-batch per step): 102.95 GiB measured;
    # the old sum of every term predicted 115.7 (-11.1%)
    model, cfg, prof = _13b(dp=2, zero_stage=3, micro_batch_size=4, recompute="full")
    mem = stage_memory(model, cfg, 0, model.num_layers, prof, engine="torch")
    assert not mem.grads_in_forward
    assert mem.total / GIB == pytest.approx(102.95, rel=0.05)
    old_sum = sum(getattr(mem, k) for k in ("weights", "gradients", "optimizer", "activations", "logits", "buffers",
                                            "recompute"))
    assert old_sum / GIB == pytest.approx(115.7, rel=0.02)  # what the sum predicted when it ran
    # two micro-batches per step: the second one's forward runs with the first one's gradients
    acc = stage_memory(model, ParallelConfig(**{**cfg.__dict__, "micro_batch_size": 2}), 0, model.num_layers, prof,
                       engine="torch")
    assert acc.grads_in_forward


def test_megatron_tp2_unfused_selective_does_not_fit():
    # megatron-core tp2 llama-2-13b, selective recompute, unfused attention, mb 2x4: out of memory at 134.68 GiB
    # allocated, asking for one more 1.25 GiB score tensor (b * heads/tp * s^2 bf16); predicted then 130.2 GiB
    model, cfg, prof = _13b(tp=2, zero_stage=1, micro_batch_size=2, recompute="selective", flash_attention=False)
    assert 2 * 20 * 4096**2 * 2 / GIB == pytest.approx(1.25, rel=0.01)
    pred = predict(model, H200, cfg, prof, engine="megatron")
    assert pred.peak_memory_gib > 130.2 + 2.5 and not pred.fits


@pytest.mark.parametrize("engine", ["torch", "deepspeed", "megatron", "any"])
def test_grads_in_forward_rules(engine):
    one = ParallelConfig(dp=2, zero_stage=3, micro_batch_size=4, global_batch_size=8)
    ddp = ParallelConfig(dp=2, zero_stage=0, micro_batch_size=4, global_batch_size=8)
    pp = ParallelConfig(pp=2, micro_batch_size=1, global_batch_size=8)  # 8 micro-batches, rank 0 holds 2
    gpipe = ParallelConfig(pp=2, micro_batch_size=1, global_batch_size=8, schedule="gpipe")
    persistent = engine != "torch"  # megatron's and DeepSpeed's gradient buffers outlive the step
    assert grads_in_forward(one, 0, engine) is persistent
    assert grads_in_forward(ddp, 0, engine) is True  # DDP's bucket views are the gradients
    assert grads_in_forward(pp, 0, engine) is True
    assert grads_in_forward(gpipe, 0, engine) is persistent  # all forwards before the first backward


def test_breakdown_at_peak_sums_to_total():
    model, cfg, prof = _13b(dp=2, zero_stage=3, micro_batch_size=4, recompute="full")
    for engine in ("torch", "deepspeed"):
        mem = stage_memory(model, cfg, 0, model.num_layers, prof, engine=engine)
        assert sum(mem.as_gib().values()) == pytest.approx(mem.total / GIB, rel=1e-9)
        assert max(mem.phases().values()) == mem.total


def test_megatron_llama_stores_the_measured_block_plus_analytic_scores():
    # megatron-core, llama-3-8b at 4096 tokens, dp2 ZeRO-1, micro-batch 1x4, no recompute, unfused attention:
    # out of memory mid-forward (softmax) at 135.67 GiB allocated asking for 1 GiB more; predicted then 130.7 GiB
    # with Korthikanti's count. The profile's llama block stores 1.6x that count (RMSNorm, rotary, SwiGLU);
    # megatron's layers store as much, plus 2 bytes per attention score.
    model = load_model("llama-3-8b")
    prof = load_profile(RESULTS / "profile-llama-3-8b-s4096-quick-2xh200.yaml")
    cfg = ParallelConfig(dp=2, zero_stage=1, micro_batch_size=1, global_batch_size=8, seq_len=4096, flash_attention=False)
    pred = predict(model, H200, cfg, prof, engine="megatron")
    assert pred.peak_memory_gib > 135.67 + 1.0 and not pred.fits
    # gpt2-xl's measured block matches the count (ratio 1.00): megatron's gpt2-xl memory stays as it was (57.4 GiB
    # predicted, 57.8 measured at micro-batch 8x2)
    gpt = load_model("gpt2-xl")
    gprof = load_profile(RESULTS / "profile-gpt2-xl-2xh200.yaml")
    gcfg = ParallelConfig(dp=2, zero_stage=1, micro_batch_size=8, global_batch_size=32, seq_len=1024, flash_attention=False)
    assert predict(gpt, H200, gcfg, gprof, engine="megatron").peak_memory_gib == pytest.approx(57.8, rel=0.03)


def test_torch_engine_tp_keeps_the_whole_vocabulary_of_logits_per_rank():
    """The torch engine's TP head gathers full logits on each rank (apply_tp), Megatron's are vocabulary-parallel:
    llama-3-8b tp2 at micro-batch 8 x 4096 tokens (call 17) peaked 20.4 GiB over the 1/tp logits."""
    from planner.core.job import ParallelConfig
    from planner.cost.memory import LOGIT_BYTES, LOGIT_BYTES_TEMPORARY, stage_memory
    from planner.core.model import load_model

    model = load_model("llama-3-8b")
    cfg = ParallelConfig(tp=2, micro_batch_size=8, global_batch_size=8, seq_len=4096, recompute="full")
    full = LOGIT_BYTES * 8 * 4096 * model.vocab_size
    # without a pipeline the torch engine's logits are the loss call's temporary (12 bytes, not 14)
    assert stage_memory(model, cfg, 0, 32, engine="torch").logits == pytest.approx(full * LOGIT_BYTES_TEMPORARY / LOGIT_BYTES)
    assert stage_memory(model, cfg, 0, 32, engine="megatron").logits == pytest.approx(full / 2)
    # a pipeline's last stage keeps its output (the logits) for backward: all 14 bytes
    piped = ParallelConfig(tp=2, pp=2, micro_batch_size=8, global_batch_size=16, seq_len=4096, recompute="full")
    assert stage_memory(model, piped, 1, 16, engine="torch").logits == pytest.approx(full)


def test_logits_of_a_loss_temporary_match_one_h200():
    """gpt2-xl at 32 x 1024 tokens on one H200 (campaign_1xh200, call 5), the torch engine without a pipeline:
    with full recompute and optimizer offload the peak is the logits' (the end of the forward), 26.25 GiB
    allocated; the 14-byte logits term put it at 29.2 GiB (-10.1%), the loss temporary's 12 bytes within 1%."""
    gpt = load_model("gpt2-xl")
    prof = load_profile(ROOT / "benchmarks/results/campaign_1xh200/call5-gpt2xl/profiles/profile-gpt2-xl-s1024.yaml")
    h200 = cluster_for_profile(prof, load_cluster("h200-141gb"))
    cfg = ParallelConfig(dp=1, zero_stage=1, micro_batch_size=32, global_batch_size=32, seq_len=1024,
                         recompute="full", offload_optimizer=True)
    assert predict(gpt, h200, cfg, prof, engine="torch").peak_memory_gib == pytest.approx(26.25, rel=0.01)


def test_torch_pipelining_keeps_a_receive_buffer_per_micro_batch():
    """torch.distributed.pipelining allocates, per stage and for every step, an input buffer per micro-batch (not the
    first stage) and an output-gradient buffer per micro-batch (not the last). llama-3-8b pp2 v4 interleaved with
    full recompute at 2 x 16 (4096 tokens) peaked at 71.5 and 82.5 GiB on its two ranks (2xH200, call 28), 6.8-7.1
    GiB over the prediction without them: each rank holds 7 such buffers x 16 micro-batches x 64 MiB."""
    from planner.cost.memory import torch_pipeline_recv_bytes

    model = load_model("llama-3-8b")
    cfg = ParallelConfig(pp=2, vpp=4, schedule="interleaved", micro_batch_size=2, global_batch_size=32, seq_len=4096,
                         recompute="full")
    act = 2 * 2 * 4096 * model.hidden_size
    assert [torch_pipeline_recv_bytes(model, cfg, r) for r in (0, 1)] == [7 * 16 * act, 7 * 16 * act]
    one_f_one_b = ParallelConfig(pp=4, micro_batch_size=2, global_batch_size=32, seq_len=4096)
    assert [torch_pipeline_recv_bytes(model, one_f_one_b, r) / (16 * act) for r in range(4)] == [1, 2, 2, 1]
    assert torch_pipeline_recv_bytes(model, ParallelConfig(micro_batch_size=2, global_batch_size=32), 0) == 0
    prof = load_profile(RESULTS / "profile-llama-3-8b-s4096-quick-2xh200.yaml")
    measured = {0: 71.5, 1: 82.5}
    for st in predict(model, H200, cfg, prof, engine="torch").stages:
        assert st.memory_gib == pytest.approx(measured[st.rank], rel=0.02)
        # the megatron engine has no such buffers
        assert stage_memory(model, cfg, st.rank, 16, prof, engine="megatron").buffers < st.memory.buffers
