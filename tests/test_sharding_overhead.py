"""The measured per-block overhead of sharded data parallelism (miss 1 of benchmarks/results/run_2xh200.md):
Profile.sharding round-trips, predict() charges exactly layers x micro-batches x overhead where a profile
measured it, and nothing changes where it did not."""

from dataclasses import replace

import pytest

from planner.cluster import load_cluster
from planner.job import ParallelConfig, validate_config
from planner.model import load_model
from planner.predict import predict
from planner.profile import LinearFit, Profile, ShardingFit, load_profile, profile_from_dict, profile_to_dict, save_profile
from profilers.sharding import fit_sharding

CLUSTER = load_cluster("dgx-h100-80gb")
MODEL = load_model("gpt2-xl")
BASE = Profile(gpu_name="NVIDIA H100 80GB HBM3", device="cuda", model="gpt2-xl", seq_len=1024, dtype="bf16")
FITS = (ShardingFit(2, True, LinearFit(3e-3, 1e-7)), ShardingFit(2, False, LinearFit(2e-3, 0.0)))


def cfg(**par):
    c = ParallelConfig(**{"dp": 2, "seq_len": 1024, "global_batch_size": 16, "micro_batch_size": 4, **par})
    validate_config(MODEL, c, c.gpus)
    return c


@pytest.mark.parametrize("zero,reshard", [(3, True), (2, False)])
def test_adds_layers_times_microbatches_times_the_measured_overhead(zero, reshard):
    c = cfg(zero_stage=zero)
    before = predict(MODEL, CLUSTER, c, BASE)
    after = predict(MODEL, CLUSTER, c, replace(BASE, sharding=FITS))
    per_block = {(f.group_size, f.reshard_after_forward): f.overhead(4 * 1024) for f in FITS}[(2, reshard)]
    expected = MODEL.num_layers * c.num_microbatches * per_block
    assert after.step_time_s - before.step_time_s == pytest.approx(expected, rel=1e-9)
    assert dict(after.breakdown)["zero_comm"] - dict(before.breakdown)["zero_comm"] == pytest.approx(expected, rel=1e-9)
    assert dict(after.sources)["sharding.per_layer.n2"] == "profile"
    assert "sharding.per_layer.n2" not in dict(before.sources)


def test_zero1_only_when_the_engine_runs_it_as_fsdp2():
    c = cfg(zero_stage=1)
    prof = replace(BASE, sharding=FITS)
    plain = predict(MODEL, CLUSTER, c, prof)
    assert plain.to_dict() == predict(MODEL, CLUSTER, c, BASE).to_dict() | {"sources": plain.to_dict()["sources"]}
    torch_engine = predict(MODEL, CLUSTER, c, prof, zero1_as_fsdp=True)
    expected = MODEL.num_layers * c.num_microbatches * FITS[1].overhead(4096)
    assert torch_engine.step_time_s - plain.step_time_s == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("par", [{"zero_stage": 3}, {"zero_stage": 2}, {"zero_stage": 1}, {"zero_stage": 0},
                                 {"dp": 1, "pp": 2, "zero_stage": 1}])
def test_without_a_measurement_the_prediction_is_unchanged(par):
    """No profile, a profile without the field, or the field at another group size: the same bytes."""
    c = cfg(**par)
    for prof in (None, BASE):
        ref = predict(MODEL, CLUSTER, c, prof).to_dict()
        assert predict(MODEL, CLUSTER, c, prof, zero1_as_fsdp=True).to_dict() == ref
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
    assert back.sharding == FITS and profile_to_dict(back)["version"] == 1
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


def test_solve_for_the_torch_engine_charges_zero1_as_fsdp2():
    """`solve --engine torch` times ZeRO-1 as the torch engine runs it (FSDP2), so plans and predictions agree."""
    from solvers import solve

    prof = replace(BASE, sharding=(ShardingFit(2, True, LinearFit(0.05, 0.0)), ShardingFit(2, False, LinearFit(0.05, 0.0))))
    result = solve(MODEL, CLUSTER, 2, prof, global_batch=16, engine="torch")
    plan_cfg = result.plan.parallel
    assert result.prediction.to_dict() == predict(MODEL, CLUSTER, plan_cfg, prof, zero1_as_fsdp=True).to_dict()
    # 50 ms per block and micro-batch makes sharded data parallelism lose to plain DDP or a pipeline
    assert not (plan_cfg.dp > 1 and plan_cfg.zero_stage >= 1)
