"""The torch engine's pipelining runtime cost per operation (profilers/pipeline.py): solving a measured step for
it, fitting it, the profile round trip, and predict() charging it in place of the p2p bandwidth term for the
torch engine's pipelines only."""

from dataclasses import replace

import pytest

from planner.core.cluster import load_cluster
from planner.core.job import ParallelConfig, validate_config
from planner.core.model import load_model
from planner.cost.predict import predict
from planner.core.profile import LinearFit, PipelineFit, Profile, profile_to_dict, save_profile
from planner.cost.profiled import load_profile, profile_from_dict, with_derived
from planner.cost.pipeline import StageOpTimes, span_s
from profilers.pipeline import MICROBATCHES, VPP, fit_pipeline, solve_action_s

CLUSTER = load_cluster("dgx-h100-80gb")
MODEL = load_model("llama-3-8b")
BASE = Profile(gpu_name="NVIDIA H100 80GB HBM3", device="cuda", model="llama-3-8b", seq_len=4096, dtype="bf16")
# 1.2 ms per operation at 64 MiB (llama-3-8b at micro-batch 2 x 4096 tokens), 0.5 ms at 32 MiB
FITS = (PipelineFit("interleaved", 2, LinearFit(-0.2e-3, 1.4e-3 / 2**26), max_bytes=2**26),
        PipelineFit("1f1b", 2, LinearFit(0.5e-3, 0.0), max_bytes=2**26))


def cfg(**par):
    c = ParallelConfig(**{"pp": 2, "seq_len": 4096, "global_batch_size": 8, "micro_batch_size": 2, **par})
    validate_config(MODEL, c, c.gpus)
    return c


@pytest.mark.parametrize("kind", ["1f1b", "interleaved"])
def test_solve_recovers_the_per_operation_cost_of_a_simulated_step(kind):
    vpp = VPP if kind == "interleaved" else 1
    fwd, bwd, a = 0.010, 0.021, 0.0013
    stages = [StageOpTimes(rank=r, forward_s=fwd + a, backward_s=bwd + a, recompute_s=0.0, p2p_s=0.0) for r in range(2)]
    step = span_s(kind, 2, vpp, MICROBATCHES, stages, {})
    assert solve_action_s(kind, step, fwd, bwd) == pytest.approx(a, rel=1e-6)
    assert solve_action_s(kind, 0.5 * step, fwd, bwd) == 0.0  # faster than the compute alone: nothing to charge


def test_fit_is_a_line_in_bytes_per_schedule_and_holds_a_falling_line():
    pts = [{"impl": "pipeline", "schedule": "interleaved", "bytes": b, "action_s": a} for b, a in ((2**25, 0.5e-3), (2**26, 1.2e-3))]
    pts += [{"impl": "pipeline", "schedule": "1f1b", "bytes": b, "action_s": a} for b, a in ((2**25, 0.6e-3), (2**26, -1e-4))]
    fits = {f.schedule: f for f in fit_pipeline(pts)}
    assert fits["interleaved"].action_s(2**25) == pytest.approx(0.5e-3) and fits["interleaved"].action_s(2**26) == pytest.approx(1.2e-3)
    assert fits["interleaved"].action_s(2**27) == pytest.approx(2.6e-3)  # a rising line extrapolates
    assert fits["1f1b"].action_s(2**26) == 0.0  # the negative point counts as 0
    assert fits["1f1b"].action_s(2**27) == 0.0  # and the falling line is held past the largest size


def test_a_longer_shape_grows_the_cost_per_operation_in_proportion_held_past_the_longest():
    """Call 18 (2xH200, llama-3-8b): interleaved 0.204 ms per operation at v2 x 4 (16 per rank), 0.558 ms at v4 x 8
    (64) with micro-batch 1: 2.7x, 3.6% per operation more; the longer shape runs at the smallest micro-batch only
    and the growth applies to the line at every size; held past 64."""
    pts = [{"impl": "pipeline", "schedule": "interleaved", "vpp": v, "microbatches": m, "bytes": b, "action_s": a}
           for v, m, b, a in ((2, 4, 2**25, 0.204e-3), (4, 8, 2**25, 0.558e-3), (2, 4, 2**27, 0.817e-3))]
    pts.append({"impl": "pipeline", "schedule": "1f1b", "vpp": 1, "microbatches": 4, "bytes": 2**25, "action_s": 0.1e-3})
    fits = {f.schedule: f for f in fit_pipeline(pts)}
    f = fits["interleaved"]
    growth = (0.558 / 0.204 - 1) / 48
    assert (f.base_ops, f.max_ops) == (16, 64) and f.growth_per_op == pytest.approx(growth)
    assert f.action_s(2**25) == pytest.approx(0.204e-3)  # no count: the base shape's
    assert f.action_s(2**25, 64) == pytest.approx(0.558e-3)
    assert f.action_s(2**27, 64) == pytest.approx(0.817e-3 * (1 + 48 * growth))  # the same proportion at 128 MiB
    assert f.action_s(2**25, 40) == pytest.approx(0.204e-3 * (1 + 24 * growth))
    assert f.action_s(2**25, 256) == pytest.approx(0.558e-3)  # held at the longest shape measured
    assert fits["1f1b"].base_ops == 0 and fits["1f1b"].action_s(2**25, 64) == pytest.approx(0.1e-3)  # one shape
    # a base cost of about 0 gives no ratio
    flat = [{**p, "action_s": 0.0 if p["vpp"] == 2 else p["action_s"]} for p in pts if p["schedule"] == "interleaved"]
    assert fit_pipeline(flat)[0].growth_per_op == 0.0
    # the fit round-trips, and predict charges the plan's own operations per rank
    prof = replace(BASE, pipeline=tuple(fits.values()))
    assert profile_from_dict(profile_to_dict(prof), "x").pipeline == prof.pipeline
    c = cfg(vpp=8, schedule="interleaved", micro_batch_size=1, global_batch_size=4)  # 2 x 8 x 4 = 64 per rank
    got = dict(predict(MODEL, CLUSTER, c, prof, engine="torch").breakdown)["pp_p2p"]
    assert got == pytest.approx(c.num_microbatches * 2 * c.vpp * f.action_s(2**25, 64), rel=1e-9)


def test_an_additive_ops_entry_of_session_7_reads_as_proportional_growth_from_its_raw_points():
    """Call 18's profile wrote ops {base, max, slope_s_per_op}; loading it refits the growth from its raw points."""
    pts = [{"impl": "pipeline", "schedule": "interleaved", "vpp": v, "microbatches": m, "ops_per_rank": 2 * v * m,
            "bytes": 2**25, "action_s": a} for v, m, a in ((2, 4, 0.2e-3), (4, 8, 0.5e-3))]
    d = profile_to_dict(replace(BASE, pipeline=fit_pipeline(pts)))
    d["pipeline"][0]["ops"] = {"base": 16, "max": 64, "slope_s_per_op": 6.25e-6}
    d["raw"] = {"communication": {"pipeline": pts}}
    (fit,) = profile_from_dict(d, "x").pipeline
    assert (fit.base_ops, fit.max_ops) == (16, 64) and fit.growth_per_op == pytest.approx(1.5 / 48)


def test_profile_round_trips_with_the_pipeline_fits(tmp_path):
    prof = replace(BASE, pipeline=FITS)
    save_profile(prof, tmp_path / "p.yaml")
    back = load_profile(tmp_path / "p.yaml")
    assert back.pipeline == FITS
    save_profile(BASE, tmp_path / "q.yaml")
    assert load_profile(tmp_path / "q.yaml").pipeline == ()


@pytest.mark.parametrize("par,kind", [({"vpp": 4, "schedule": "interleaved"}, "interleaved"), ({}, "1f1b")])
def test_the_torch_engines_pipelines_pay_the_measured_cost_per_operation(par, kind):
    """pp_p2p becomes 2 x vpp operations per micro-batch at the measured cost (in place of the bandwidth's
    transfer time); the megatron engine and a profile without the field keep the bandwidth term."""
    c = cfg(**par)
    nbytes = c.micro_batch_size * c.seq_len * MODEL.hidden_size * 2
    prof = replace(BASE, pipeline=FITS)
    op = {f.schedule: f for f in FITS}[kind].action_s(nbytes)
    after = predict(MODEL, CLUSTER, c, prof, engine="torch")
    before = predict(MODEL, CLUSTER, c, BASE, engine="torch")
    assert dict(after.breakdown)["pp_p2p"] == pytest.approx(c.num_microbatches * 2 * c.vpp * op, rel=1e-9)
    assert dict(before.breakdown)["pp_p2p"] < dict(after.breakdown)["pp_p2p"]
    assert after.step_time_s > before.step_time_s
    assert "comm.pipeline_op" in dict(after.sources) and "comm.pipeline_op" not in dict(before.sources)
    megatron = predict(MODEL, CLUSTER, c, prof, engine="megatron")
    assert megatron.to_dict() == predict(MODEL, CLUSTER, c, BASE, engine="megatron").to_dict()


# ---- the torch engine's DTensor tensor parallelism (profilers/tensor_parallel.py) ---------------------------

def test_measured_dtensor_tp_replaces_the_tp_all_reduces_for_the_torch_engine_only():
    from planner.core.profile import ShardingFit

    c = cfg(pp=1, tp=2, micro_batch_size=1)
    tp = ShardingFit(2, False, LinearFit(4e-3, 0.0), edge=LinearFit(1e-3, 0.0), impl="tp", max_tokens=16384)
    prof = replace(BASE, sharding=(tp,))
    after = predict(MODEL, CLUSTER, c, prof, engine="torch")
    before = predict(MODEL, CLUSTER, c, BASE, engine="torch")
    expected = c.num_microbatches * (MODEL.num_layers * 4e-3 + 1e-3)
    assert dict(after.breakdown)["tp_comm"] == pytest.approx(expected, rel=1e-9)
    assert 0 < dict(before.breakdown)["tp_comm"] < expected
    assert dict(after.sources)["comm.tp_dtensor.n2"].startswith("profile")
    for engine in ("megatron", "any"):  # megatron-core's own TP, and no engine: the bandwidth model
        assert predict(MODEL, CLUSTER, c, prof, engine=engine).step_time_s == predict(MODEL, CLUSTER, c, BASE, engine=engine).step_time_s
    # sequence parallel: its own measurement where the profile has one, else the plain one (and the sources say so)
    sp = cfg(pp=1, tp=2, micro_batch_size=1, sequence_parallel=True)
    with_plain = predict(MODEL, CLUSTER, sp, prof, engine="torch")
    assert dict(with_plain.breakdown)["tp_comm"] == pytest.approx(expected, rel=1e-9)
    assert "SP not measured" in dict(with_plain.sources)["comm.tp_dtensor.n2"]
    tp_sp = replace(tp, impl="tp-sp", overhead=LinearFit(5e-3, 0.0))
    with_sp = predict(MODEL, CLUSTER, sp, replace(BASE, sharding=(tp, tp_sp)), engine="torch")
    assert dict(with_sp.breakdown)["tp_comm"] == pytest.approx(c.num_microbatches * (MODEL.num_layers * 5e-3 + 1e-3), rel=1e-9)
    assert dict(with_sp.sources)["comm.tp_dtensor.n2"].endswith("with SP)")
    assert predict(MODEL, CLUSTER, c, replace(BASE, sharding=(tp, tp_sp)), engine="torch").step_time_s == after.step_time_s


def test_the_stack_factor_ignores_the_tp_stacks():
    """The tp stacks' plain blocks are tp-2 shards: the block-in-a-stack factor reads the tp-1 stacks only."""
    from planner.core.profile import ComputeFit, profile_to_dict

    block = ComputeFit("block", 1, LinearFit(0.0, 1e-6), LinearFit(0.0, 2e-6))
    pts = [{"group_size": 2, "reshard_after_forward": True, "blocks": 4, "tokens": 1000, "plain_s": 4 * 3e-3 * 1.05}]
    d = profile_to_dict(replace(BASE, compute=(block,)))
    d["raw"] = {"communication": {"sharding": pts}}
    assert with_derived(profile_from_dict(d, "t")).stack_factor() == pytest.approx(1.05)
    d["raw"]["communication"]["sharding"] = pts + [{"impl": "tp", "group_size": 2, "reshard_after_forward": False,
                                                    "blocks": 4, "tokens": 1000, "plain_s": 4 * 3e-3 * 0.6}]
    assert with_derived(profile_from_dict(d, "t")).stack_factor() == pytest.approx(1.05)
