"""Megatron-core's own layer as a profiled kind (profilers/megatron_layer.py) and how the cost model uses it
for the megatron engine's unfused plans (planner.cost.layer.megatron_layer_delta_s)."""

from dataclasses import replace

import pytest
import torch

from planner.core.cluster import load_cluster
from planner.core.job import ParallelConfig, validate_config
from planner.core.model import load_model
from planner.cost.predict import predict
from planner.core.profile import (MEGATRON_BLOCK_KIND, MEGATRON_HEAD_KIND, UNFUSED_ATTENTION_KIND, ComputeFit,
                                  LinearFit, Profile, save_profile)
from planner.cost.profiled import load_profile
from profilers import megatron_layer

CLUSTER = load_cluster("dgx-h100-80gb")
MODEL = load_model("gpt2-xl")
SEQ = 1024


def fit(kind: str, fwd: float, bwd: float, tp: int = 1) -> ComputeFit:
    """A fit of `fwd`/`bwd` seconds per 1000 tokens (proportional), with points at 1024..16384 tokens."""
    pts = tuple((x, (("fwd", fwd * x / 1000), ("bwd", bwd * x / 1000))) for x in (1024.0, 4096.0, 16384.0))
    return ComputeFit(kind=kind, tp=tp, fwd=LinearFit(0.0, fwd / 1000), bwd=LinearFit(0.0, bwd / 1000), points=pts)


BLOCK = (fit("block", 1e-3, 2e-3), fit("block", 0.55e-3, 1.1e-3, tp=2), fit(UNFUSED_ATTENTION_KIND, 0.9e-3, 1.8e-3),
         fit(UNFUSED_ATTENTION_KIND, 0.45e-3, 0.9e-3, tp=2))
BASE = Profile(gpu_name="NVIDIA H100 80GB HBM3", device="cuda", model="gpt2-xl", seq_len=SEQ, dtype="bf16", compute=BLOCK)
WITH_MEGATRON = replace(BASE, compute=BLOCK + (fit(MEGATRON_BLOCK_KIND, 1.4e-3, 2.6e-3),))


def cfg(**par) -> ParallelConfig:
    c = ParallelConfig(**{"seq_len": SEQ, "global_batch_size": 8, "micro_batch_size": 4, "flash_attention": False,
                          "zero_stage": 1, **par})
    validate_config(MODEL, c, c.gpus)
    return c


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_engine_takes_megatrons_measured_layer(tp):
    """tp 1: a block costs what megatron's layer measured; tp 2: distplan's tp-2 block plus half the measured
    difference at tp 1 (llama-3-8b: 32 heads)."""
    from planner.cost.terms import CommModel
    from planner.cost.layer import block_time

    model = load_model("llama-3-8b")
    c = ParallelConfig(tp=tp, seq_len=SEQ, global_batch_size=8, micro_batch_size=4, flash_attention=False)
    validate_config(model, c, c.gpus)
    lt = block_time(model, CLUSTER, c, CommModel(CLUSTER, WITH_MEGATRON), WITH_MEGATRON, "megatron")
    block = {1: (1e-3, 2e-3), 2: (0.55e-3, 1.1e-3)}[tp]
    per_1000 = 4 * SEQ / 1000
    assert lt.fwd == pytest.approx((block[0] + (1.4e-3 - 1e-3) / tp) * per_1000, rel=1e-9)
    assert lt.bwd == pytest.approx((block[1] + (2.6e-3 - 2e-3) / tp) * per_1000, rel=1e-9)
    pred = predict(model, CLUSTER, c, WITH_MEGATRON, engine="megatron")
    assert dict(pred.sources)["compute.megatron_layer"] == "profile (megatron-core's layer, tp 1)"


def test_megatron_layer_replaces_the_unfused_core_correction_exactly():
    """Per layer and micro-batch the megatron engine's forward is block + (megatron - block) = megatron's layer."""
    c = cfg()
    tokens = 4 * SEQ
    meg = predict(MODEL, CLUSTER, c, WITH_MEGATRON, engine="megatron")
    plain = predict(MODEL, CLUSTER, c, WITH_MEGATRON, engine="torch")  # same layout, unfused-core correction
    per_layer_meg = 1.4e-3 * tokens / 1000
    # the torch engine's unfused block: block + (measured unfused core - analytic flash core)
    from planner.cost.terms import CommModel
    from planner.cost.layer import block_time
    lt_meg = block_time(MODEL, CLUSTER, c, CommModel(CLUSTER, WITH_MEGATRON), WITH_MEGATRON, "megatron")
    lt_any = block_time(MODEL, CLUSTER, c, CommModel(CLUSTER, WITH_MEGATRON), WITH_MEGATRON, "torch")
    assert lt_meg.fwd == pytest.approx(per_layer_meg, rel=1e-9)
    assert lt_meg.bwd == pytest.approx(2.6e-3 * tokens / 1000, rel=1e-9)
    assert lt_any.fwd != pytest.approx(lt_meg.fwd)
    diff = (lt_any.fwd + lt_any.bwd - lt_meg.fwd - lt_meg.bwd) * MODEL.num_layers * c.num_microbatches
    # beyond the layers, the engines' gradient buckets (EngineModel.grad_bucket_params) and optimizer copies differ:
    # the torch engine casts fp32 masters around the kernel database's AdamW step (EngineModel.master_weight_casts)
    sync = sum(dict(plain.breakdown)[k] - dict(meg.breakdown)[k] for k in ("dp_grad_sync", "optimizer"))
    assert plain.step_time_s - meg.step_time_s - sync == pytest.approx(diff, rel=1e-6)


@pytest.mark.parametrize("prof,engine,flash", [(BASE, "megatron", False), (WITH_MEGATRON, "torch", False),
                                               (WITH_MEGATRON, "megatron", True), (replace(WITH_MEGATRON, seq_len=2048), "megatron", False)])
def test_unchanged_where_megatrons_layer_does_not_apply(prof, engine, flash):
    """Not measured, another engine, flash attention (Transformer Engine), or another sequence length: the
    same block time as without the kind."""
    from planner.cost.terms import CommModel
    from planner.cost.layer import block_time

    c = cfg(flash_attention=flash)
    got = block_time(MODEL, CLUSTER, c, CommModel(CLUSTER, prof), prof, engine)
    ref_prof = replace(prof, compute=BLOCK)
    ref = block_time(MODEL, CLUSTER, c, CommModel(CLUSTER, ref_prof), ref_prof, engine)
    assert got == ref


def test_sources_say_whether_megatrons_layer_was_measured():
    c = cfg()
    assert dict(predict(MODEL, CLUSTER, c, BASE, engine="megatron").sources)["compute.megatron_layer"] == \
        "not measured: block + unfused attention core"
    assert "compute.megatron_layer" not in dict(predict(MODEL, CLUSTER, c, BASE, engine="torch").sources)


def test_kind_round_trips_through_the_profile_file(tmp_path):
    save_profile(WITH_MEGATRON, tmp_path / "p.yaml")
    back = load_profile(tmp_path / "p.yaml")
    assert back.compute_fit(MEGATRON_BLOCK_KIND, 1) == WITH_MEGATRON.compute_fit(MEGATRON_BLOCK_KIND, 1)


def test_cpu_profile_records_why_megatrons_layer_was_not_measured():
    """Off CUDA (CI) the kind is not measured, and the result says why instead of failing the profile."""
    spec = load_model("gpt2")
    why = megatron_layer.available(spec, torch.device("cpu"))
    assert why == "megatron-core trains on CUDA only"
    out = megatron_layer.profile(spec, 64, torch.device("cpu"), torch.float32, None, lambda _: None)
    assert out == {"kind": MEGATRON_BLOCK_KIND, "tp": 1, "points": [], "oom_micro_batch": 0, "error": why}
    moe = load_model("mixtral-8x7b")
    assert "MoE" in megatron_layer.available(moe, torch.device("cuda"))


def test_megatron_engine_memory_keeps_the_analytic_count():
    """megatron-core's layer measured alone stored 1.8x what it stores in the model (campaign of 2026-11-22):
    its activations do not scale the megatron engine's memory, which stays the analytic unfused count."""
    from planner.cost.memory import activation_scale, stage_memory

    model = load_model("llama-3-8b")
    c = ParallelConfig(tp=2, seq_len=SEQ, global_batch_size=8, micro_batch_size=2, flash_attention=False)
    validate_config(model, c, c.gpus)
    meg = replace(fit(MEGATRON_BLOCK_KIND, 1.4e-3, 2.6e-3), peak_activation_bytes_per_token=1e6)
    prof = replace(BASE, compute=BLOCK + (meg,))
    assert activation_scale(model, c, prof, "megatron") == 1.0
    assert stage_memory(model, c, 0, 32, prof, "megatron") == stage_memory(model, c, 0, 32, None, "megatron")


@pytest.mark.parametrize("tp", [1, 2])
def test_selective_recompute_repeats_megatrons_unfused_core_not_the_flash_share(tp):
    """Megatron's selective recompute runs its unfused attention core forward again: the flash core's share of the
    block plus megatron's measured extra (its layer minus distplan's block, all in the core), / tp. Charging only
    the flash share under-predicted llama-2-13b tp2 selective by 12% on 2xH200 (campaign of 2026-11-22)."""
    from planner.cost.terms import CommModel
    from planner.cost.layer import block_time

    model = load_model("llama-3-8b")  # 32 heads: tp 2 divides them
    c = ParallelConfig(tp=tp, seq_len=SEQ, global_batch_size=8, micro_batch_size=4, flash_attention=False)
    validate_config(model, c, c.gpus)
    comm = CommModel(CLUSTER, WITH_MEGATRON)
    none = block_time(model, CLUSTER, c, comm, WITH_MEGATRON, "megatron")
    sel = block_time(model, CLUSTER, replace(c, recompute="selective"), comm, WITH_MEGATRON, "megatron")
    mm = model.block_matmul_flops_per_token(SEQ)
    block_fwd = {1: 1e-3, 2: 0.55e-3}[tp] * 4 * SEQ / 1000
    flash_share = block_fwd * mm["attn_core"] / sum(mm.values())
    extra = (1.4e-3 - 1e-3) / tp * 4 * SEQ / 1000
    assert sel.recompute == pytest.approx(flash_share + extra, rel=1e-9)
    assert (sel.fwd, sel.bwd) == (none.fwd, none.bwd) and none.recompute == 0.0


WITH_HEAD = replace(WITH_MEGATRON, compute=WITH_MEGATRON.compute + (fit("head", 2e-3, 4e-3), fit("head", 1e-3, 2e-3, tp=2),
                                                                    fit(MEGATRON_HEAD_KIND, 2.9e-3, 5.6e-3)))


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_engine_takes_megatrons_measured_head(tp):
    """The megatron engine's head is megatron's measured last stage (one layer, norm, output layer, loss) less its
    measured layer, over tp (vocabulary-parallel); the other engines keep distplan's head, and a profile without
    megatron's last stage keeps distplan's head for megatron too."""
    from planner.cost.layer import head_time

    model = load_model("llama-3-8b")  # 32 heads: tp 2 divides them
    c = ParallelConfig(tp=tp, seq_len=SEQ, global_batch_size=8, micro_batch_size=4, flash_attention=False, zero_stage=1)
    validate_config(model, c, c.gpus)
    per_1000 = 4 * SEQ / 1000
    fwd, bwd = head_time(model, CLUSTER, c, WITH_HEAD, "megatron")
    assert fwd == pytest.approx((2.9e-3 - 1.4e-3) / tp * per_1000, rel=1e-9)
    assert bwd == pytest.approx((5.6e-3 - 2.6e-3) / tp * per_1000, rel=1e-9)
    ours = {1: (2e-3, 4e-3), 2: (1e-3, 2e-3)}[tp]
    assert head_time(model, CLUSTER, c, WITH_HEAD, "torch") == pytest.approx(tuple(x * per_1000 for x in ours))
    assert head_time(model, CLUSTER, c, replace(WITH_HEAD, compute=WITH_HEAD.compute[:-1]), "megatron") == \
        pytest.approx(tuple(x * per_1000 for x in ours))
    src = dict(predict(model, CLUSTER, c, WITH_HEAD, engine="megatron").sources)
    assert src["compute.megatron_head"] == "profile (megatron-core's head and loss, tp 1)"
    assert dict(predict(model, CLUSTER, c, WITH_MEGATRON, engine="megatron").sources)["compute.megatron_head"] == \
        "not measured: distplan's head"


def test_cpu_profile_records_why_megatrons_head_was_not_measured():
    spec = load_model("gpt2")
    out = megatron_layer.profile_head(spec, 64, torch.device("cpu"), torch.float32, None, lambda _: None)
    assert out == {"kind": MEGATRON_HEAD_KIND, "tp": 1, "points": [], "oom_micro_batch": 0,
                   "error": "megatron-core trains on CUDA only"}


def test_megatron_head_inputs_are_megatrons_layout_and_labels():
    from profilers.compute import make_inputs

    spec = load_model("gpt2")
    (x, labels), grad = make_inputs(spec, MEGATRON_HEAD_KIND, 1, 3, 16, torch.device("cpu"), torch.float32)
    assert x.shape == (16, 3, spec.hidden_size) and x.requires_grad and grad is None
    assert labels.shape == (3, 16) and labels.dtype == torch.int64 and int(labels.max()) < spec.vocab_size
