"""The cost model against published references: ZeRO memory, Korthikanti activations, SC'21 Table 1."""

from dataclasses import replace

import pytest

from planner.core.cluster import load_cluster
from planner.core.job import ParallelConfig
from planner.cost.memory import activation_bytes_per_layer, inflight_microbatch_chunks, zero_model_state_bytes
from planner.core.model import load_model
from planner.cost.predict import predict
from planner.core.published import model_yaml, published, sc21_gpt, sc21_table1

from conftest import parse_json


# ---- ZeRO (Rajbhandari et al. SC'20): 7.5B parameters on 64 GPUs ----------------------------------
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_formula(stage):
    ref = published()["zero_model_state_memory"]
    got_gb = zero_model_state_bytes(ref["params"], ref["dp"], stage) / 1e9
    assert got_gb == pytest.approx(ref["gb_per_gpu"][stage], rel=0.05)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_memory_through_distplan_estimate(cli, tmp_path, stage):
    """The 7.5B GPT of SC'21 Table 1 (7.47B parameters) on 64 GPUs, model states per GPU, via the CLI."""
    ref = published()["zero_model_state_memory"]
    path = tmp_path / "gpt-7.5b.yaml"
    path.write_text(model_yaml(sc21_gpt(7.5, 32, 4096, 36)))
    out = parse_json(cli("estimate", "--model", path, "--cluster", "dgx-a100-80gb", "--gpus", 64, "--zero", stage,
                         "--global-batch", 64, "--seq-len", 2048, "--format", "json"), exit_codes=(0, 2))
    assert out["fits"] is (stage > 0)  # 120 GB of model states do not fit an 80 GB A100
    mem = out["stages"][0]["model_states_gib"]
    states_gb = (mem["weights"] + mem["gradients"] + mem["optimizer"]) * 1024**3 / 1e9
    assert states_gb == pytest.approx(ref["gb_per_gpu"][stage], rel=0.10)


# ---- Korthikanti et al. 2022, Table 2 (GPT, unfused attention) ------------------------------------
def _korthikanti(s, b, h, a, t, mode):
    return {
        "none_t1": s * b * h * (34 + 5 * a * s / h),
        "tp": s * b * h * (10 + 24 / t + 5 * a * s / (h * t)),
        "tp_sp": s * b * h * (34 / t + 5 * a * s / (h * t)),
        "tp_selective": s * b * h * (10 + 24 / t),
        "tp_sp_selective": s * b * h * 34 / t,
        "full": s * b * h * 2,
    }[mode]


@pytest.mark.parametrize("mode,tp,sp,recompute", [
    ("none_t1", 1, False, "none"), ("tp", 8, False, "none"), ("tp_sp", 8, True, "none"),
    ("tp_selective", 8, False, "selective"), ("tp_sp_selective", 8, True, "selective"), ("full", 8, False, "full"),
])
def test_activation_memory_matches_korthikanti(mode, tp, sp, recompute):
    m = replace(load_model("gpt3-175b"), dropout=0.1)  # the paper's GPT runs used dropout (its masks are in 34sbh)
    s, b = 2048, 2
    cfg = ParallelConfig(tp=tp, sequence_parallel=sp, recompute=recompute, flash_attention=False, seq_len=s, micro_batch_size=b)
    got = activation_bytes_per_layer(m, cfg, b, s)
    assert got == pytest.approx(_korthikanti(s, b, m.hidden_size, m.num_heads, tp, mode), rel=1e-9)


def test_first_1f1b_stage_holds_p_microbatches():
    # Korthikanti sec. 4.2.3: with 1F1B the first stage keeps p micro-batches in flight, so L layers' worth
    cfg = ParallelConfig(pp=8, dp=1, global_batch_size=64, micro_batch_size=1)
    assert [inflight_microbatch_chunks(cfg, r) for r in range(8)] == [8, 7, 6, 5, 4, 3, 2, 1]
    inter = ParallelConfig(pp=4, vpp=2, schedule="interleaved", global_batch_size=64)
    # interleaved: L/p * (1 + (p-1)/(p*v)) * p layers' worth on the first rank -> chunks = p*v + p - 1
    assert inflight_microbatch_chunks(inter, 0) == 4 * 2 + 4 - 1
    assert inflight_microbatch_chunks(ParallelConfig(pp=4, schedule="gpipe", global_batch_size=32), 0) == 32


# ---- Megatron-LM SC'21 Table 1 (A100, full recompute): achieved TFLOP/s per GPU within 10% ----------
@pytest.mark.parametrize("case", sc21_table1(), ids=lambda c: f"{c.params_billion}B")
def test_sc21_table1_through_distplan_estimate(cli, tmp_path, case):
    path = tmp_path / "model.yaml"
    path.write_text(model_yaml(case.model))
    c = case.config
    out = parse_json(cli("estimate", "--model", path, "--cluster", "dgx-a100-80gb", "--gpus", case.gpus, "--tp", c.tp,
                         "--pp", c.pp, "--vpp", c.vpp, "--schedule", c.schedule, "--micro-batch", 1,
                         "--global-batch", c.global_batch_size, "--seq-len", 2048, "--recompute", "full",
                         "--no-flash-attention", "--no-overlap-grad-reduce", "--format", "json"))
    assert out["hardware_tflops_per_gpu"] == pytest.approx(case.achieved_tflops_per_gpu, rel=0.10)
    assert out["fits"] is True


# ---- structural properties that any correct model has ---------------------------------------------
def test_breakdown_sums_to_step_time():
    m, c = load_model("llama-3-70b"), load_cluster("dgx-h100-80gb")
    cfg = ParallelConfig(dp=2, tp=8, pp=4, vpp=2, schedule="interleaved", sequence_parallel=True, zero_stage=1,
                         micro_batch_size=1, global_batch_size=512, seq_len=8192, recompute="selective")
    p = predict(m, c, cfg)
    assert sum(v for _, v in p.breakdown) == pytest.approx(p.step_time_s, rel=1e-9)


def test_more_microbatches_shrink_the_bubble_share():
    m, c = load_model("gpt3-175b"), load_cluster("dgx-a100-80gb")
    small = predict(m, c, ParallelConfig(dp=1, tp=8, pp=16, global_batch_size=16, seq_len=2048, recompute="full"))
    large = predict(m, c, ParallelConfig(dp=1, tp=8, pp=16, global_batch_size=256, seq_len=2048, recompute="full"))
    share = lambda p: dict(p.breakdown)["pipeline_bubble"] / p.step_time_s  # noqa: E731
    # 1F1B bubble fraction (p-1)/(m+p-1): 15/31 at m=16, 15/271 at m=256
    assert share(small) == pytest.approx(15 / 31, rel=0.1)
    assert share(large) == pytest.approx(15 / 271, rel=0.2)


def test_zero3_trades_memory_for_communication():
    m, c = load_model("llama-2-13b"), load_cluster("dgx-h100-80gb")
    base = dict(dp=16, global_batch_size=256, seq_len=4096, micro_batch_size=1)
    z0 = predict(m, c, ParallelConfig(**base, zero_stage=0))
    z3 = predict(m, c, ParallelConfig(**base, zero_stage=3))
    assert z3.peak_memory_gib < z0.peak_memory_gib / 3
    assert z3.step_time_s > z0.step_time_s


def test_recompute_costs_time_and_saves_memory():
    m, c = load_model("llama-3-8b"), load_cluster("dgx-h100-80gb")
    base = dict(dp=8, global_batch_size=64, seq_len=8192, micro_batch_size=1, zero_stage=1)
    none = predict(m, c, ParallelConfig(**base, recompute="none"))
    full = predict(m, c, ParallelConfig(**base, recompute="full"))
    assert full.peak_memory_gib < none.peak_memory_gib
    assert full.step_time_s == pytest.approx(none.step_time_s * 4 / 3, rel=0.1)  # one extra forward of ~3 passes


def test_torch_master_weights_cast_is_charged_where_the_engine_keeps_masters():
    """The torch engine's DDP and pipeline-only layouts cast gradients to fp32 masters and back (12 bytes per
    parameter at the profile's memory-bound rate) beside the AdamW step the profile measured on fp32 params;
    its FSDP2 layouts do not (FSDP2's own casts are in its measured overhead)."""
    from pathlib import Path

    from planner.cost.profiled import cluster_for_profile
    from planner.cost.profiled import load_profile

    prof = load_profile(Path(__file__).resolve().parents[2] / "benchmarks/results/profile_2xh200/profile-gpt2-xl-2xh200.yaml")
    model = load_model("gpt2-xl")
    cluster = cluster_for_profile(prof, load_cluster("h200-141gb"))
    params = model.num_layers * model.block_params() + model.embedding_params() + model.head_params()
    cast_s = params * 12 / (cluster.gpu.hbm_bandwidth_gb_s * 1e9 * cluster.efficiency.memory_bound_fraction)
    for par, charged in (({"dp": 2, "zero_stage": 0}, True), ({"dp": 1, "pp": 2}, True), ({"dp": 2, "zero_stage": 3}, False)):
        cfg = ParallelConfig(global_batch_size=32, micro_batch_size=16, seq_len=1024, **par)
        torch_opt = dict(predict(model, cluster, cfg, prof, engine="torch").breakdown)["optimizer"]
        any_opt = dict(predict(model, cluster, cfg, prof).breakdown)["optimizer"]
        per_rank = 1 / cfg.pp if cfg.pp > 1 else 1.0
        assert torch_opt - any_opt == pytest.approx(cast_s * per_rank if charged else 0.0, rel=0.1, abs=1e-9)
