"""The measured per-block overhead of sharded data parallelism (miss 1 of benchmarks/results/run_2xh200.md):
Profile.sharding round-trips, predict() charges exactly layers x micro-batches x overhead where a profile
measured it (in place of the bandwidth terms), and nothing changes where it did not."""

from dataclasses import replace

import pytest

from planner.core.cluster import load_cluster
from planner.core.errors import DistplanError
from planner.core.job import ParallelConfig, validate_config
from planner.core.model import load_model
from planner.cost.predict import predict
from planner.core.profile import PROFILE_VERSION, LinearFit, Profile, ShardingFit, profile_to_dict, save_profile
from planner.cost.profiled import load_profile, profile_from_dict
from profilers.sharding import fit_sharding

# the H100 preset without its kernel database: the database's measured AdamW rate brings in the torch engine's own
# optimizer copies (predict._optimizer_s), which these tests of the sharding overhead leave out
CLUSTER = replace(load_cluster("dgx-h100-80gb"), kernel_database="", kernels=None)
MODEL = load_model("gpt2-xl")
BASE = Profile(gpu_name="NVIDIA H100 80GB HBM3", device="cuda", model="gpt2-xl", seq_len=1024, dtype="bf16")
FITS = (ShardingFit(2, True, LinearFit(3e-3, 1e-7)), ShardingFit(2, False, LinearFit(2e-3, 0.0)))


def cfg(**par):
    c = ParallelConfig(**{"dp": 2, "seq_len": 1024, "global_batch_size": 16, "micro_batch_size": 4, **par})
    validate_config(MODEL, c, c.gpus)
    return c


@pytest.mark.parametrize("zero,reshard", [(3, True), (2, False)])
def test_the_measured_overhead_replaces_the_bandwidth_terms(zero, reshard):
    """zero_comm is exactly layers x micro-batches x the measured per-block overhead: the wrapped stacks ran the
    real collectives beside the compute, so the overlap model's exposed collective time is not added on top
    (llama-3-8b FSDP2 on 2xH200 ran 8.9% under a prediction that counted both)."""
    c = cfg(zero_stage=zero)
    before = predict(MODEL, CLUSTER, c, BASE)
    after = predict(MODEL, CLUSTER, c, replace(BASE, sharding=FITS))
    per_block = {(f.group_size, f.reshard_after_forward): f.overhead(4 * 1024) for f in FITS}[(2, reshard)]
    expected = MODEL.num_layers * c.num_microbatches * per_block
    bandwidth = dict(before.breakdown)["zero_comm"]
    assert bandwidth > 0  # the bandwidth model charges something without the measurement
    assert dict(after.breakdown)["zero_comm"] == pytest.approx(expected, rel=1e-9)
    assert after.step_time_s - before.step_time_s == pytest.approx(expected - bandwidth, rel=1e-9)
    assert dict(after.sources)["sharding.per_layer.n2"] == "profile"
    assert "sharding.per_layer.n2" not in dict(before.sources)


def test_zero1_only_when_the_engine_runs_it_as_fsdp2():
    c = cfg(zero_stage=1)
    prof = replace(BASE, sharding=FITS)
    plain = predict(MODEL, CLUSTER, c, prof)
    assert plain.to_dict() == predict(MODEL, CLUSTER, c, BASE).to_dict() | {"sources": plain.to_dict()["sources"]}
    torch_engine = predict(MODEL, CLUSTER, c, prof, engine="torch")
    expected = MODEL.num_layers * c.num_microbatches * FITS[1].overhead(4096)
    # beyond the measured overhead only the gradient bucket differs (EngineModel.grad_bucket_params)
    sync = dict(torch_engine.breakdown)["dp_grad_sync"] - dict(plain.breakdown)["dp_grad_sync"]
    assert torch_engine.step_time_s - plain.step_time_s - sync == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("par", [{"zero_stage": 3}, {"zero_stage": 2}, {"zero_stage": 1}, {"zero_stage": 0},
                                 {"dp": 1, "pp": 2, "zero_stage": 1}])
def test_without_a_measurement_the_prediction_is_unchanged(par):
    """No profile, a profile without the field, or the field at another group size: the same sharding and compute
    terms (the torch engine's memory differs from "any" by design: planner.cost.memory.stage_memory; so does its
    gradient bucket, DDP's 25 MB against one block: EngineModel.grad_bucket_params)."""
    c = cfg(**par)
    for prof in (None, BASE):
        ref = predict(MODEL, CLUSTER, c, prof).to_dict()
        got = predict(MODEL, CLUSTER, c, prof, engine="torch").to_dict()
        same = lambda d: {k: v for k, v in d["breakdown"].items()
                          if k not in ("dp_grad_sync", "zero_comm" if c.zero_stage == 2 else "")}
        assert same(got) == same(ref)
    other_n = replace(BASE, sharding=(ShardingFit(4, True, LinearFit(1.0, 0.0)), ShardingFit(4, False, LinearFit(1.0, 0.0))))
    got = predict(MODEL, CLUSTER, c, other_n).to_dict()
    ref = predict(MODEL, CLUSTER, c, BASE).to_dict()
    assert {k: v for k, v in got.items() if k != "sources"} == {k: v for k, v in ref.items() if k != "sources"}


def test_profile_round_trips_with_and_without_sharding(tmp_path):
    d = profile_to_dict(BASE)
    assert "sharding" not in d and profile_from_dict(d, "x").sharding == ()  # older profiles: unchanged
    prof = replace(BASE, sharding=FITS)
    save_profile(prof, tmp_path / "p.yaml")
    back = load_profile(tmp_path / "p.yaml")
    assert back.sharding == FITS and profile_to_dict(back)["version"] == PROFILE_VERSION
    assert back.sharding_overhead_s(2, True, 1000) == pytest.approx(3e-3 + 1e-4)
    assert back.sharding_overhead_s(8, True, 1000) is None


def test_fit_of_raw_points_is_non_negative():
    pts = [{"group_size": 2, "reshard_after_forward": True, "tokens": t, "overhead_s": o}
           for t, o in ((100, 1e-3), (200, 1.5e-3))]
    pts += [{"group_size": 2, "reshard_after_forward": False, "tokens": t, "overhead_s": o}
            for t, o in ((100, -2e-4), (200, 4e-4))]  # noise around zero
    fits = {(f.group_size, f.reshard_after_forward): f.overhead for f in fit_sharding(pts)}
    assert fits[(2, True)](100) == pytest.approx(1e-3, rel=1e-6) and fits[(2, True)](200) == pytest.approx(1.5e-3, rel=1e-6)
    assert fits[(2, False)] == LinearFit(2e-4, 0.0)  # negative difference counts as 0; the mean as a constant


ACCUM = (ShardingFit(2, True, LinearFit(3e-3, 0.0), edge=LinearFit(2e-3, 0.0), accumulate=LinearFit(1e-3, 0.0),
                    accumulate_edge=LinearFit(5e-4, 0.0)),
         ShardingFit(2, False, LinearFit(2e-3, 0.0), accumulate=LinearFit(0.0, 0.0)))


@pytest.mark.parametrize("zero", [3, 1])
def test_torch_engine_charges_accumulating_micro_batches_their_own_measured_cost(zero):
    """FSDP2 reduce-scatters on the last micro-batch of a step only: m - 1 micro-batches pay the measured
    accumulating cost, one the synchronising cost (llama-3-8b ZeRO-3 at 1 x 4 ran 13% under m x the latter)."""
    c = cfg(zero_stage=zero)  # 4 micro-batches of 4
    m, layers = c.num_microbatches, MODEL.num_layers
    got = dict(predict(MODEL, CLUSTER, c, replace(BASE, sharding=ACCUM), engine="torch").breakdown)["zero_comm"]
    if zero == 3:
        expected = layers * (3e-3 + (m - 1) * 1e-3) + (2e-3 + (m - 1) * 5e-4)
    else:
        expected = layers * 2e-3  # ZeRO-1 runs as FSDP2 without resharding; accumulating costs 0 here
    assert got == pytest.approx(expected, rel=1e-9)
    # without the accumulating line (older profiles) every micro-batch pays the synchronising cost, as before
    sync_only = tuple(replace(f, accumulate=None, accumulate_edge=None) for f in ACCUM)
    got = dict(predict(MODEL, CLUSTER, c, replace(BASE, sharding=sync_only), engine="torch").breakdown)["zero_comm"]
    assert got == pytest.approx(m * (layers * sync_only[zero == 1].overhead(0) + (2e-3 if zero == 3 else 0.0)), rel=1e-9)


def test_accumulating_lines_fit_and_round_trip(tmp_path):
    """Raw points with "sync" False (profilers/sharding.measure) give the accumulate lines; save/load keeps them."""
    pts = []
    for sync, per, edge in ((True, 4e-3, 1e-3), (False, 1e-3, 2e-4)):
        for t in (4096, 8192):
            for blocks in (1, 4):
                pts.append({"group_size": 2, "reshard_after_forward": True, "blocks": blocks, "tokens": t,
                            "sync": sync, "overhead_s": edge + blocks * per})
    (fit,) = fit_sharding(pts)
    assert fit.per_block_s(4096) == pytest.approx(4e-3) and fit.edge_s(4096) == pytest.approx(1e-3)
    assert fit.per_block_s(4096, sync=False) == pytest.approx(1e-3) and fit.edge_s(8192, sync=False) == pytest.approx(2e-4)
    save_profile(replace(BASE, sharding=(fit,)), tmp_path / "p.yaml")
    back = load_profile(tmp_path / "p.yaml")
    assert back.sharding == (fit,)
    assert back.sharding_overhead_s(2, True, 4096, sync=False) == pytest.approx(1e-3)


def test_solve_for_the_torch_engine_charges_zero1_as_fsdp2():
    """`solve --engine torch` times ZeRO-1 as the torch engine runs it (FSDP2), so plans and predictions agree."""
    from solvers import solve

    prof = replace(BASE, sharding=(ShardingFit(2, True, LinearFit(0.05, 0.0)), ShardingFit(2, False, LinearFit(0.05, 0.0))))
    result = solve(MODEL, CLUSTER, 2, prof, global_batch=16, engine="torch")
    plan_cfg = result.plan.parallel
    assert result.prediction.to_dict() == predict(MODEL, CLUSTER, plan_cfg, prof, engine="torch").to_dict()
    # 50 ms per block and micro-batch makes sharded data parallelism lose to plain DDP or a pipeline
    assert not (plan_cfg.dp > 1 and plan_cfg.zero_stage >= 1)


# ---- DeepSpeed ZeRO-2's own overhead (profilers/sharding.measure_deepspeed) --------------------------------

DS_FIT = ShardingFit(2, False, LinearFit(4e-3, 0.0), edge=LinearFit(1e-3, 0.0), impl="deepspeed",
                     step_s_per_param=2e-11, step_edge_s=5e-3)


@pytest.mark.parametrize("microbatches", [1, 4])
def test_deepspeed_engine_charges_deepspeeds_measured_overhead(microbatches):
    """ZeRO-2 under the deepspeed engine: per micro-batch layers x DeepSpeed's per-block overhead + its edge (in place
    of the bandwidth model's reduce-scatter), and once per step its measured step part in place of the bandwidth model's weight all-gather."""
    c = cfg(zero_stage=2, global_batch_size=8 * microbatches)
    both = replace(BASE, sharding=FITS + (DS_FIT,))
    ds = predict(MODEL, CLUSTER, c, both, engine="deepspeed")
    bare = predict(MODEL, CLUSTER, c, BASE, engine="deepspeed")
    per_mb = MODEL.num_layers * DS_FIT.overhead(4096) + DS_FIT.edge(4096)
    assert dict(bare.breakdown)["zero_comm"] > 0  # the bandwidth model's reduce-scatter, replaced by the measurement
    assert dict(ds.breakdown)["zero_comm"] == pytest.approx(microbatches * per_mb, rel=1e-9)
    step_part = MODEL.total_params() * DS_FIT.step_s_per_param + DS_FIT.step_edge_s
    assert dict(ds.breakdown)["dp_grad_sync"] == pytest.approx(step_part, rel=1e-6)
    assert dict(ds.sources)["sharding.step.n2"] == "profile (deepspeed)"
    # the torch engine (and "any") keep FSDP2's measurement: DeepSpeed's fit changes nothing for them
    for engine in ("torch", "any"):
        assert predict(MODEL, CLUSTER, c, both, engine=engine).to_dict() == \
            predict(MODEL, CLUSTER, c, replace(BASE, sharding=FITS), engine=engine).to_dict()


def test_deepspeed_engine_zero3_charges_deepspeeds_zero3_measurement():
    """ZeRO-3 under the deepspeed engine: DeepSpeed's own ZeRO-3 fit (reshard True) per micro-batch and its step part
    once per step; without it FSDP2's ZeRO-3 fit stands in, as before."""
    z3 = replace(DS_FIT, reshard_after_forward=True, overhead=LinearFit(9e-3, 0.0), step_s_per_param=3e-11)
    c = cfg(zero_stage=3, global_batch_size=32)
    got = predict(MODEL, CLUSTER, c, replace(BASE, sharding=FITS + (DS_FIT, z3)), engine="deepspeed")
    m = c.num_microbatches
    assert dict(got.breakdown)["zero_comm"] == pytest.approx(m * (MODEL.num_layers * 9e-3 + 1e-3), rel=1e-9)
    assert dict(got.breakdown)["dp_grad_sync"] == pytest.approx(MODEL.total_params() * 3e-11 + 5e-3, rel=1e-6)
    assert dict(got.sources)["sharding.per_layer.n2"] == "profile (deepspeed)"
    fallback = predict(MODEL, CLUSTER, c, replace(BASE, sharding=FITS + (DS_FIT,)), engine="deepspeed")
    assert dict(fallback.breakdown)["zero_comm"] == pytest.approx(m * MODEL.num_layers * FITS[0].overhead(4096))
    assert dict(fallback.sources)["sharding.per_layer.n2"] == "profile (fsdp2's: deepspeed not measured)"


def test_deepspeed_engine_without_its_measurement_uses_fsdp2s_and_says_so():
    c = cfg(zero_stage=2)
    prof = replace(BASE, sharding=FITS)
    ds = predict(MODEL, CLUSTER, c, prof, engine="deepspeed")
    assert ds.step_time_s == pytest.approx(predict(MODEL, CLUSTER, c, prof).step_time_s, rel=1e-12)
    assert dict(ds.sources)["sharding.per_layer.n2"] == "profile (fsdp2's: deepspeed not measured)"


def test_deepspeed_fit_round_trips_and_older_entries_read_as_fsdp2(tmp_path):
    prof = replace(BASE, sharding=FITS + (DS_FIT,))
    save_profile(prof, tmp_path / "p.yaml")
    back = load_profile(tmp_path / "p.yaml")
    assert back.sharding == prof.sharding
    assert [s.get("impl") for s in profile_to_dict(back)["sharding"]] == [None, None, "deepspeed"]
    assert back.sharding_step_s(2, 1e9, "deepspeed") == pytest.approx(2e-11 * 1e9 + 5e-3)
    assert back.sharding_step_s(2, 1e9, "fsdp2") is None
    bad = profile_to_dict(prof)
    bad["sharding"][2]["impl"] = "horovod"
    from planner.core.errors import DistplanError
    with pytest.raises(DistplanError, match="sharding impl 'horovod' is not one of fsdp2, deepspeed"):
        profile_from_dict(bad, "p.yaml")


def test_deepspeed_step_split_reproduces_the_measured_step_extra():
    """extra(k) = boundary - micro - params / n x AdamW rate is split exactly into a per-parameter rate and a
    constant; the per-micro-batch overhead into per-block + edge lines, as for FSDP2."""
    rate, n, per_param, const = 3e-9, 2, 4e-10, 2e-3
    pts = []
    for blocks, params in ((1, 1e6), (4, 4e6)):
        for tokens in (1024, 4096):
            micro = 0.01 + tokens * 1e-6
            boundary = micro + params / n * rate + per_param * params + const
            pts.append({"impl": "deepspeed", "group_size": n, "reshard_after_forward": False, "blocks": blocks,
                        "tokens": tokens, "params": params, "plain_s": 0.005, "micro_s": micro,
                        "boundary_s": boundary, "overhead_s": micro - 0.005 + blocks * 1e-4})
    (fit,) = fit_sharding(pts, rate)
    assert fit.impl == "deepspeed"
    assert fit.step_s_per_param == pytest.approx(per_param, rel=1e-6) and fit.step_edge_s == pytest.approx(const, rel=1e-6)
    for p in pts:
        got = fit.edge(p["tokens"]) + p["blocks"] * fit.overhead(p["tokens"])
        assert got == pytest.approx(p["overhead_s"], rel=1e-9)


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_measured_over_gloo(tmp_path):
    """measure_deepspeed runs deepspeed.initialize (ZeRO-2 and ZeRO-3, the emitted buckets) on 2 gloo processes:
    points at both stacks and both micro-batches, timed, and fits with a non-negative step part."""
    import yaml

    from profilers import comm
    from profilers.sharding import DEEPSPEED_ZERO2_STACK, STACK, ShardingSettings

    pytest.importorskip("deepspeed")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"family": "gpt", "num_layers": 2, "hidden_size": 128, "ffn_hidden_size": 512,
                                    "num_heads": 4, "num_kv_heads": 4, "vocab_size": 256, "max_seq_len": 64}))
    ss = ShardingSettings(model=str(path), seq_len=32, micro_batches=(1, 4), warmup=1, trials=2, deepspeed=True)
    cs = comm.CommSettings(sizes_bytes=(65536,), group_sizes=(2,), dtype="fp32", warmup=1, trials=2,
                           target_loop_s=0.01, max_iters=5, sharding=ss)
    raw = comm.measure_spawned(2, False, cs)
    ds = [p for p in raw["sharding"] if p.get("impl") == "deepspeed"]
    # ZeRO-2 (reshard False) and ZeRO-3 (True), each at both stacks and both micro-batches: ZeRO-2's larger stack is
    # DEEPSPEED_ZERO2_STACK blocks (its figures spread less than with STACK's, session 9), ZeRO-3's STACK
    assert DEEPSPEED_ZERO2_STACK == 8 > STACK
    assert {(p["reshard_after_forward"], p["blocks"], p["micro_batch"]) for p in ds} == {
        (z3, b, m) for z3 in (False, True) for b in (1, STACK if z3 else DEEPSPEED_ZERO2_STACK) for m in (1, 4)}
    assert all(p["micro_s"] > 0 and p["boundary_s"] > 0 and p["plain_s"] > 0 for p in ds)
    one = ds[0]["params"]
    assert all(p["params"] == p["blocks"] * one for p in ds)
    fits = {f.impl: f for f in fit_sharding(raw["sharding"], 1e-9) if not f.reshard_after_forward}
    assert set(fits) == {"fsdp2", "deepspeed", "ddp", "tp", "tp-sp"}  # tp: profilers/tensor_parallel.py
    assert fits["deepspeed"].step_s_per_param >= 0 and fits["deepspeed"].step_edge_s >= 0
    z3 = {f.impl: f for f in fit_sharding(raw["sharding"], 1e-9) if f.reshard_after_forward}
    assert set(z3) == {"fsdp2", "deepspeed"} and z3["deepspeed"].step_s_per_param >= 0


def test_ddp_overhead_replaces_the_bandwidth_model_for_the_torch_engine():
    """The torch engine's DDP (ZeRO-0, tp 1): the measured overhead per block and once, plus the embedding's
    gradient all-reduced after the backward, replace slowdown x all-reduce; other engines keep the model."""
    from planner.cost.terms import BF16, CommModel

    ddp = ShardingFit(2, False, LinearFit(1e-3, 0.0), edge=LinearFit(2e-3, 0.0), impl="ddp")
    prof = replace(BASE, sharding=FITS + (ddp,))
    c = cfg(zero_stage=0)
    torch_pred = predict(MODEL, CLUSTER, c, prof, engine="torch")
    emb = CommModel(CLUSTER, prof).time_s("all_reduce", 2, 1, MODEL.embedding_params() * BF16)
    assert dict(torch_pred.breakdown)["dp_grad_sync"] == pytest.approx(MODEL.num_layers * 1e-3 + 2e-3 + emb, rel=1e-9)
    assert dict(torch_pred.sources)["comm.ddp_overlap.n2"] == "profile (DDP on stacks of blocks)"
    for other in (predict(MODEL, CLUSTER, c, prof), predict(MODEL, CLUSTER, cfg(zero_stage=0), BASE, engine="torch")):
        assert dict(other.breakdown)["dp_grad_sync"] < 0.01 and "comm.ddp_overlap.n2" not in dict(other.sources)


def test_a_data_parallel_group_across_nodes_keeps_the_bandwidth_terms():
    """The stacks measured the group inside one node; where the data-parallel group spans nodes (here 1 GPU per
    node), the cross-node collectives of the bandwidth model are still charged, the measured overhead beside them."""
    one_per_node = replace(CLUSTER, gpus_per_node=1)
    c = cfg(zero_stage=3)
    before = predict(MODEL, one_per_node, c, BASE)
    after = predict(MODEL, one_per_node, c, replace(BASE, sharding=FITS))
    expected = MODEL.num_layers * c.num_microbatches * FITS[0].overhead(4 * 1024)
    assert dict(before.breakdown)["zero_comm"] > 0
    assert dict(after.breakdown)["zero_comm"] - dict(before.breakdown)["zero_comm"] == pytest.approx(expected, rel=1e-9)


def test_stack_variants_take_turns_trial_by_trial():
    """profilers.sharding._time_round_robin: each variant's set-up runs right before each of its runs, and the
    variants alternate, so a drift during the measurement reaches all of them alike."""
    import torch
    from torch import nn

    from profilers.sharding import _time_round_robin

    calls = []

    class Probe(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.w = name, nn.Parameter(torch.ones(1))

        def forward(self, x):
            calls.append(self.name)
            return x * self.w

    a, b = Probe("a"), Probe("b")
    x, grad = torch.ones(2, requires_grad=True), torch.ones(2)
    times = _time_round_robin([(a, lambda: calls.append("setup a")), (b, lambda: calls.append("setup b"))], x, grad,
                              torch.device("cpu"), warmup=1, trials=2)
    assert calls == ["setup a", "a", "setup b", "b"] * 3
    assert len(times) == 2 and all(t > 0 for t in times)


def test_fsdp2_over_tp_shards_round_trips_and_bad_impls_are_refused(tmp_path):
    from planner.core.errors import DistplanError

    fit = ShardingFit(2, False, LinearFit(4e-3, 0.0), edge=LinearFit(1e-3, 0.0), impl="fsdp2-tp2",
                      accumulate=LinearFit(1e-3, 0.0), accumulate_edge=LinearFit(0.0, 0.0))
    save_profile(replace(BASE, sharding=(fit,)), tmp_path / "p.yaml")
    assert load_profile(tmp_path / "p.yaml").sharding == (fit,)
    d = profile_to_dict(replace(BASE, sharding=(fit,)))
    d["sharding"][0]["impl"] = "fsdp2-tpx"
    with pytest.raises(DistplanError, match="fsdp2-tpx"):
        profile_from_dict(d, "p.yaml")
    # the torch engine's dp2 x tp2 ZeRO-1 plan takes it; ZeRO-3 (not measured here) keeps FSDP2's whole-block fit
    model = load_model("llama-3-8b")
    c = ParallelConfig(dp=2, tp=2, seq_len=1024, global_batch_size=16, micro_batch_size=4, zero_stage=1)
    validate_config(model, c, 4)
    prof = replace(BASE, sharding=(fit,) + FITS)
    got = predict(model, CLUSTER, c, prof, engine="torch")
    m = c.num_microbatches
    assert dict(got.breakdown)["zero_comm"] == pytest.approx(model.num_layers * (4e-3 + (m - 1) * 1e-3) + 1e-3)
    z3 = replace(c, zero_stage=3)
    got3 = predict(model, CLUSTER, z3, prof, engine="torch")
    assert dict(got3.breakdown)["zero_comm"] == pytest.approx(m * model.num_layers * FITS[0].overhead(4 * 1024))


def test_a_longer_stack_gives_the_same_lines_from_its_own_block_count():
    """distplan profile --stack-blocks 8: points of stacks of 1 and 8 blocks fit per-block = (overhead(8) -
    overhead(1)) / 7 and the edge, as stacks of 1 and 4 do with / 3; a stack size below 2 is refused (exit 2)."""
    from profilers.run import ProfileRequest, plan_profile

    for k in (4, 8):
        pts = [{"group_size": 2, "reshard_after_forward": False, "blocks": b, "tokens": t, "overhead_s": 1e-3 + b * 2e-4}
               for t in (1024, 16384) for b in (1, k)]
        (fit,) = fit_sharding(pts)
        assert fit.per_block_s(16384) == pytest.approx(2e-4) and fit.edge_s(1024) == pytest.approx(1e-3)
    plan = plan_profile(ProfileRequest(model="gpt2", device="cpu", stack_blocks=8))
    assert plan.comm.sharding.stack == 8
    with pytest.raises(DistplanError, match="--stack-blocks 1"):
        plan_profile(ProfileRequest(model="gpt2", device="cpu", stack_blocks=1))


def test_deepspeed_zero2_stack_length_is_held_to_half_the_gpu():
    """8 blocks where their states (18 B/param) take at most half the GPU; a 70B block's would take 125 GB of an
    H200's 141, so its stack stays at STACK; on a CPU (no device memory to size by) 8."""
    from planner.core.model import load_model
    from profilers.sharding import STACK, ShardingSettings, deepspeed_zero2_blocks

    ss = ShardingSettings(model="gpt2", seq_len=8, micro_batches=(1,))
    h200 = 139.8 * 2**30
    assert deepspeed_zero2_blocks(ss, load_model("llama-3-8b").block_params(), h200) == 8
    assert deepspeed_zero2_blocks(ss, load_model("llama-2-70b-40l").block_params(), h200) == STACK
    assert deepspeed_zero2_blocks(ss, load_model("llama-2-13b").block_params(), 79.6 * 2**30) == 7
    assert deepspeed_zero2_blocks(ss, 10**12, h200) == STACK and deepspeed_zero2_blocks(ss, 10**12, None) == 8
    assert deepspeed_zero2_blocks(replace(ss, stack=12), 1000, h200) == 12  # --stack-blocks above 8 wins


def test_fsdp2_stack_is_eight_blocks_on_gpus_where_they_fit_and_four_on_cpus():
    """FSDP2's / DDP's / ZeRO-3's larger stack: GPU_STACK (8) on GPUs, held to half the GPU like DeepSpeed's but never
    below STACK (4), the CPU profile's (a CPU has no device memory to size by and its tests stay short)."""
    import torch

    from planner.core.model import load_model
    from profilers.run import ProfileRequest, plan_profile
    from profilers.sharding import GPU_STACK, STACK, ShardingSettings, blocks_that_fit, stack_blocks

    h200 = 139.8 * 2**30
    assert GPU_STACK == 8 and STACK == 4
    assert blocks_that_fit(GPU_STACK, STACK, load_model("llama-3-8b").block_params(), h200) == 8
    assert blocks_that_fit(GPU_STACK, STACK, load_model("llama-2-70b-40l").block_params(), h200) == STACK
    assert blocks_that_fit(GPU_STACK, STACK, load_model("llama-2-13b").block_params(), 79.6 * 2**30) == 7
    assert blocks_that_fit(2, STACK, 10**12, h200) == 2  # --stack-blocks 2 asked: never raised to STACK
    ss = ShardingSettings(model="gpt2", seq_len=8, micro_batches=(1,), stack=8)
    assert stack_blocks(ss, 10**12, torch.device("cpu")) == 8  # no device memory to hold it to
    assert plan_profile(ProfileRequest(model="gpt2", device="cpu")).comm.sharding.stack == STACK
