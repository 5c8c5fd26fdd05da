"""Profiles against clusters: GPU-type matching, the cluster a profile implies, and `estimate --profile`."""

from pathlib import Path

import pytest

from conftest import parse_json
from planner.core.cluster import check_gpu_count, load_cluster
from planner.core.errors import DistplanError
from planner.core.model import load_model
from planner.core.profile import CollectiveFit, ComputeFit, LinearFit, Profile, profile_to_dict, save_profile
from planner.cost.profiled import cluster_for_profile, load_profile, profile_from_dict
from planner.core.cluster import gpu_family
from planner.core.model import model_shape

SEQ = 1024
GPT2 = model_shape(load_model("gpt2"))


def gpu_profile(gpu_name="NVIDIA H100 80GB HBM3", memory_gib=79.1, slope=4e-7) -> Profile:
    """A profile as `distplan profile` writes it for gpt2 on 8 GPUs (numbers made up but plausible)."""
    compute = tuple(
        ComputeFit(kind=k, tp=t, fwd=LinearFit(5e-5, s / t), bwd=LinearFit(1e-4, 2 * s / t),
                   peak_activation_bytes_per_token=30000.0 / t, recompute=LinearFit(5e-5, s / t) if k == "block" else None,
                   oom_micro_batch=16 if k == "head" else 0)
        for k, s in (("embedding", slope / 20), ("block", slope), ("head", 3 * slope)) for t in (1, 2, 4, 8))
    colls = tuple(CollectiveFit(op, n, 20e-6, 150.0) for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
                  for n in (2, 4, 8)) + (CollectiveFit("p2p", 2, 10e-6, 300.0),)
    return Profile(gpu_name=gpu_name, device="cuda", model="gpt2", seq_len=SEQ, dtype="bf16", model_shape=GPT2,
                   compute=compute,
                   collectives=colls, matmul_tflops=700.0, hbm_bandwidth_gb_s=2900.0,
                   matmul_tflops_by_gflop=((2.1, 300.0), (17.2, 600.0), (137.4, 690.0), (1099.5, 700.0)),
                   host_bandwidth_gb_s=50.0, overlap_slowdown=0.07, device_count=8, memory_gib=memory_gib,
                   facts={"wall_time_s": 100.0}, raw={"compute": []})


def cpu_profile() -> Profile:
    return Profile(gpu_name="Intel(R) Xeon(R) Processor", device="cpu", model="gpt2", seq_len=SEQ, dtype="bf16",
                   model_shape=GPT2,
                   compute=gpu_profile().compute, collectives=(CollectiveFit("all_reduce", 2, 1e-4, 2.0),
                                                              CollectiveFit("p2p", 2, 5e-5, 4.0)),
                   matmul_tflops=0.5, hbm_bandwidth_gb_s=10.0, matmul_tflops_by_gflop=((0.03, 0.2), (2.1, 0.5)),
                   overlap_slowdown=0.8, device_count=2, memory_gib=11.0)


@pytest.mark.parametrize("a,b", [("NVIDIA H200", "H200-SXM-141GB"), ("NVIDIA H100 80GB HBM3", "H100-SXM-80GB"),
                                 ("NVIDIA A100-SXM4-80GB", "A100-SXM-80GB")])
def test_gpu_family_matches_vendor_and_preset_names(a, b):
    assert gpu_family(a) == gpu_family(b)
    assert gpu_family("NVIDIA H200") != gpu_family("H100-SXM-80GB")


def test_round_trip_keeps_new_fields(tmp_path):
    p = gpu_profile()
    save_profile(p, tmp_path / "p.yaml")
    q = load_profile(tmp_path / "p.yaml")
    assert q == p  # facts and raw are not compared; everything the cost model reads is
    assert profile_from_dict(profile_to_dict(q), "again") == p
    assert q.compute_fit("block", 2).recompute == LinearFit(5e-5, 2e-7)
    assert q.compute_fit("head", 1).oom_micro_batch == 16


def test_mismatched_gpu_type_is_refused_naming_both():
    with pytest.raises(DistplanError) as exc:
        cluster_for_profile(gpu_profile("NVIDIA H200", 139.8), load_cluster("dgx-h100-80gb"))
    msg = str(exc.value)
    assert "NVIDIA H200" in msg and "H100-SXM-80GB" in msg and "h200-141gb" in msg


def test_matching_cluster_takes_the_measured_numbers():
    preset = load_cluster("dgx-h100-80gb")
    c = cluster_for_profile(gpu_profile(), preset)
    assert c.name == "dgx-h100-80gb+profile"
    assert c.gpu.peak_bf16_tflops == preset.gpu.peak_bf16_tflops  # datasheet peak kept: MFU keeps its meaning
    assert c.efficiency.matmul_fraction(1099.5) == pytest.approx(700.0 / 989.4)
    assert c.efficiency.memory_bound_fraction == pytest.approx(2900.0 / 3350.0)
    assert c.efficiency.overlap_slowdown == 0.07 and c.gpu.memory_gib == 79.1
    assert c.link("inter_node") == preset.link("inter_node")  # not measured: the preset's, as the profile says


def test_no_cluster_picks_the_preset_of_the_profiled_gpu():
    assert cluster_for_profile(gpu_profile("NVIDIA H200", 139.8), None).name == "h200-141gb+profile"
    unknown = cluster_for_profile(gpu_profile("NVIDIA L40S", 44.4), None)
    assert unknown.name == "measured-cuda" and unknown.max_nodes == 1  # no inter-node network known


def test_cpu_profile_describes_its_own_machine():
    c = cluster_for_profile(cpu_profile(), load_cluster("dgx-h100-80gb"))
    assert c.name == "measured-cpu" and c.gpus_per_node == 2 and c.gpu.peak_bf16_tflops == 0.5
    assert c.link("intra_node").bandwidth_gb_s == 2.0 and c.link("intra_node").latency_us == pytest.approx(100.0)
    check_gpu_count(c, 2)
    with pytest.raises(DistplanError, match="exceeds cluster"):
        check_gpu_count(c, 4)


def test_estimate_with_profile_uses_the_measured_numbers(cli, tmp_path):
    path = tmp_path / "h100.yaml"
    prof = gpu_profile()
    save_profile(prof, path)
    args = ("estimate", "-m", "gpt2", "-n", 8, "--global-batch", 64, "--format", "json")
    base = parse_json(cli(*args))
    measured = parse_json(cli(*args, "--profile", path))
    assert measured["step_time_s"] != pytest.approx(base["step_time_s"], rel=1e-3)
    assert measured["cluster"] == "dgx-h100-80gb+profile"
    assert measured["sources"]["compute.block.tp1"] == "profile"
    assert base["sources"]["compute.block.tp1"].startswith("kernel database NVIDIA H100")  # the preset's database
    # the forward term is exactly the fitted layer times: m * (12 blocks + embedding + head)
    tokens, m = SEQ, 64 // 8
    fwd = 12 * prof.compute_fit("block", 1).fwd(tokens) + prof.compute_fit("embedding", 1).fwd(tokens) \
        + prof.compute_fit("head", 1).fwd(tokens)
    assert measured["breakdown"]["compute_fwd"] == pytest.approx(m * fwd, rel=1e-9)
    # a slower measured GPU predicts a slower step
    save_profile(gpu_profile(slope=8e-7), path)
    slower = parse_json(cli(*args, "--profile", path))
    assert slower["step_time_s"] > measured["step_time_s"]


def test_estimate_profile_of_another_gpu_is_a_clear_error(cli, tmp_path):
    path = tmp_path / "h200.yaml"
    save_profile(gpu_profile("NVIDIA H200", 139.8), path)
    r = cli("estimate", "-m", "gpt2", "-n", 8, "-c", "dgx-h100-80gb", "--profile", path)
    assert r.exit_code == 2 and "NVIDIA H200" in r.stderr and "H100-SXM-80GB" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # without --cluster the profiled GPU's preset is used
    ok = parse_json(cli("estimate", "-m", "gpt2", "-n", 8, "--profile", path, "--format", "json"))
    assert ok["cluster"] == "h200-141gb+profile"


H200_PROFILES = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "profile_2xh200"


def test_measured_h200_profile_changes_the_prediction(cli):
    """The llama-3-8b profile measured on 2 x H200 (benchmarks/results/profile_2xh200): estimate on
    those GPUs takes its layer and collective fits, and the forward term is exactly the fitted times."""
    path = H200_PROFILES / "profile-llama-3-8b-2xh200.yaml"
    prof = load_profile(path)
    assert prof.gpu_name == "NVIDIA H200" and prof.device == "cuda" and prof.device_count == 2
    args = ("estimate", "-m", "llama-3-8b", "-n", 2, "--tp", 2, "--global-batch", 16, "--format", "json")
    preset = parse_json(cli(*args, "-c", "h200-141gb"))
    measured = parse_json(cli(*args, "--profile", path))
    assert measured["cluster"] == "h200-141gb+profile"
    assert all(measured["sources"][k] == "profile" for k in ("compute.block.tp2", "compute.head.tp2", "comm.all_reduce.n2"))
    assert abs(measured["step_time_s"] / preset["step_time_s"] - 1) > 0.05
    tokens, m, layers = prof.seq_len, 16, 32
    # micro-batch 1 = seq_len tokens is a measured point: the cost model charges that point's time
    raw = {(r["kind"], r["tp"]): r["points"] for r in prof.raw["compute"]}
    at = {kind: next(p["fwd_s"] for p in raw[(kind, 2)] if p["tokens"] == tokens) for kind in ("block", "embedding", "head")}
    assert all(prof.compute_fit(kind, 2).time_s("fwd", tokens) == t for kind, t in at.items())
    fwd = layers * at["block"] + at["embedding"] + at["head"]
    assert measured["breakdown"]["compute_fwd"] == pytest.approx(m * fwd, rel=1e-9)
    # the same profile on the default cluster (H100) is refused
    r = cli(*args, "-c", "dgx-h100-80gb", "--profile", path)
    assert r.exit_code == 2 and "NVIDIA H200" in r.stderr


def test_measured_profiles_record_oom_and_fit_quality():
    oom = load_profile(H200_PROFILES / "profile-llama-3-8b-oom-2xh200.yaml")
    assert oom.compute_fit("head", 1).oom_micro_batch == 16 and oom.compute_fit("head", 2).oom_micro_batch == 0
    assert "out of memory" in oom.facts["infeasible"]["head.tp1"]
    full = load_profile(H200_PROFILES / "profile-llama-3-8b-2xh200.yaml")
    errors = full.raw["fit_max_relative_error"]["compute"]
    assert max(e["fwd"] for k, e in errors.items() if k.startswith(("block", "head"))) < 0.05


def test_compute_curve_uses_the_measured_points_not_the_line():
    """gpt2-xl's block on 2xH200 (launch-bound at small micro-batches): the line through all points has half
    the compute-bound slope; time_s reproduces every point, interpolates between them, and scales the
    largest point by tokens above the range (the measured step at micro-batch 16 agreed within 3%)."""
    from planner.core.profile import LinearFit, ComputeFit, compute_points

    raw = [{"tokens": 1024, "fwd_s": 6.32e-4, "bwd_s": 1.698e-3}, {"tokens": 2048, "fwd_s": 6.82e-4, "bwd_s": 1.656e-3},
           {"tokens": 4096, "fwd_s": 8.04e-4, "bwd_s": 1.487e-3}, {"tokens": 8192, "fwd_s": 1.095e-3, "bwd_s": 2.242e-3}]
    fit = ComputeFit(kind="block", tp=1, fwd=LinearFit(5.57e-4, 6.4e-8), bwd=LinearFit(1.48e-3, 6.38e-8),
                     points=compute_points(raw))
    for p in raw:
        assert fit.time_s("fwd", p["tokens"]) == p["fwd_s"]
    assert fit.time_s("fwd", 3072) == pytest.approx((6.82e-4 + 8.04e-4) / 2)
    assert fit.time_s("fwd", 16384) == pytest.approx(2 * 1.095e-3) and fit.fwd(16384) < 0.75 * 2 * 1.095e-3
    # backward measured lower at 2048/4096 than at 1024 (launch noise): the curve never decreases
    assert fit.time_s("bwd", 4096) == fit.time_s("bwd", 1024) == 1.698e-3
    # no recompute measured and no line: None (the cost model then charges a forward)
    assert fit.time_s("recompute", 4096) is None
    # below the range: between the proportional share of the smallest point and that point
    assert 6.32e-4 / 2 <= fit.time_s("fwd", 512) <= 6.32e-4
    # without points (a hand-written profile) the line
    assert ComputeFit(kind="block", tp=1, fwd=LinearFit(1e-3, 1e-7), bwd=LinearFit(0, 0)).time_s("fwd", 1e4) == pytest.approx(2e-3)


def test_measured_block_activations_scale_the_memory_model():
    """The 2xH200 profiles measured the block's activations with the allocator: gpt2-xl's match Korthikanti's
    count (scale 1.01), llama-3-8b's are 1.60x it; stage memory takes the measured scale, and a campaign run
    of llama-3-8b pp2 v8 (peak 120.7 / 127.5 GiB) is then predicted within 2% (118.9 / 125.6)."""
    from planner.core.job import ParallelConfig
    from planner.cost.memory import activation_bytes_per_layer, activation_scale, stage_memory
    from planner.core.model import load_model

    gpt = load_profile(H200_PROFILES / "profile-gpt2-xl-2xh200.yaml")
    llama = load_profile(H200_PROFILES / "profile-llama-3-8b-s4096-quick-2xh200.yaml")
    g_cfg = ParallelConfig(dp=2, micro_batch_size=16, global_batch_size=32, seq_len=1024)
    l_cfg = ParallelConfig(pp=2, vpp=8, schedule="interleaved", micro_batch_size=2, global_batch_size=8, seq_len=4096)
    assert activation_scale(load_model("gpt2-xl"), g_cfg, gpt) == pytest.approx(1.0, abs=0.02)
    model = load_model("llama-3-8b")
    scale = activation_scale(model, l_cfg, llama)
    block = llama.compute_fit("block", 1)
    assert scale == pytest.approx(block.peak_activation_bytes_per_token * 4096 / activation_bytes_per_layer(model, l_cfg, 1, 4096))
    assert scale == pytest.approx(1.60, abs=0.01)
    # not applied at another sequence length; with unfused attention the same ratio (measured on the fused block)
    # scales everything but the score tensors (memory.scaled_activation_bytes)
    assert activation_scale(model, ParallelConfig(seq_len=8192), llama) == 1.0
    assert activation_scale(model, ParallelConfig(seq_len=4096, flash_attention=False), llama) == pytest.approx(scale)
    with_p = [stage_memory(model, l_cfg, r, 16, llama).total / 2**30 for r in (0, 1)]
    assert with_p == pytest.approx([118.9, 125.6], abs=0.1)
    assert all(abs(p / m - 1) < 0.02 for p, m in zip(with_p, (120.694, 127.483)))
    plain = stage_memory(model, l_cfg, 0, 16)
    assert stage_memory(model, l_cfg, 0, 16, llama).activations == pytest.approx(
        plain.activations + (scale - 1) * activation_bytes_per_layer(model, l_cfg, 2, 4096) * 2 * 17)


def test_a_malformed_number_in_a_profile_is_one_line(cli, tmp_path):
    import yaml

    d = yaml.safe_load((H200_PROFILES / "profile-gpt2-xl-2xh200.yaml").read_text())
    d["optimizer_s_per_param"] = "abc"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    r = cli("estimate", "-m", "gpt2-xl", "-n", 2, "--profile", path)
    assert r.exit_code == 2 and "'optimizer_s_per_param' must be a number >= 0, got 'abc'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
