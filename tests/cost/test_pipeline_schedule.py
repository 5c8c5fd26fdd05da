"""The pipeline schedule against its references: Megatron-LM's operation order and the cost model's formula."""

import pytest
from review_plans import review_plan

from planner.core.errors import DistplanError
from planner.core.job import ParallelConfig
from planner.cost.memory import inflight_microbatch_chunks
from planner.cost.predict import predict
from planner.cost.pipeline import Op, StageOpTimes, op_order, simulate, stage_op_times
from planner.cost.timeline import plan_schedule, rank_terms


def ops(*items):
    """'F0.1' -> forward of micro-batch 0, chunk 1."""
    return [Op(s[0], int(s[1:].split(".")[0]), int(s.split(".")[1]) if "." in s else 0) for s in items]


# ---- order ------------------------------------------------------------------------------------------


def test_1f1b_matches_megatron_warmup_steady_cooldown():
    # Megatron forward_backward_pipelining_without_interleaving, p=4, m=6: rank i warms up with p-i-1 forwards
    assert op_order("1f1b", 4, 1, 6, 0) == ops("F0", "F1", "F2", "F3", "B0", "F4", "B1", "F5", "B2", "B3", "B4", "B5")
    assert op_order("1f1b", 4, 1, 6, 2) == ops("F0", "F1", "B0", "F2", "B1", "F3", "B2", "F4", "B3", "F5", "B4", "B5")
    assert op_order("1f1b", 4, 1, 6, 3) == ops("F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3", "F4", "B4", "F5", "B5")
    for p, m in ((4, 8), (8, 3), (2, 16)):
        for i in range(p):
            order = op_order("1f1b", p, 1, m, i)
            warm = min(p - i - 1, m)
            assert [o.kind for o in order[:warm]] == ["F"] * warm
            assert [o.kind for o in order[len(order) - warm:]] == ["B"] * warm


def test_gpipe_runs_all_forwards_then_all_backwards():
    assert op_order("gpipe", 3, 1, 3, 1) == ops("F0", "F1", "F2", "B0", "B1", "B2")


def test_interleaved_matches_megatron_chunk_and_microbatch_rules():
    # Megatron-Core forward_backward_pipelining_with_interleaving, p=2, v=2, m=4 (worked by hand):
    # the k-th forward runs chunk (k mod 4) // 2 on micro-batch (k // 4)*2 + k mod 2; backward mirrors the chunk
    assert op_order("interleaved", 2, 2, 4, 0) == ops(
        "F0.0", "F1.0", "F0.1", "F1.1", "F2.0", "B0.1", "F3.0", "B1.1", "F2.1", "B0.0", "F3.1", "B1.0",
        "B2.1", "B3.1", "B2.0", "B3.0")
    assert op_order("interleaved", 2, 2, 4, 1) == ops(
        "F0.0", "F1.0", "F0.1", "B0.1", "F1.1", "B1.1", "F2.0", "B0.0", "F3.0", "B1.0", "F2.1", "B2.1",
        "F3.1", "B3.1", "B2.0", "B3.0")
    for p, v, m in ((4, 2, 8), (4, 3, 4), (8, 2, 16)):
        for i in range(p):
            order = op_order("interleaved", p, v, m, i)
            warm = min(2 * (p - i - 1) + (v - 1) * p, m * v)
            assert [o.kind for o in order[:warm]] == ["F"] * warm
            assert sorted((o.microbatch, o.chunk) for o in order if o.kind == "F") == [(j, c) for j in range(m) for c in range(v)]


@pytest.mark.parametrize("kind,p,v,m", [("1f1b", 4, 1, 8), ("1f1b", 4, 1, 2), ("gpipe", 4, 1, 6),
                                        ("interleaved", 4, 2, 8), ("interleaved", 4, 3, 4)])
def test_peak_inflight_activations_agree_with_the_memory_model(kind, p, v, m):
    cfg = ParallelConfig(pp=p, vpp=v, schedule=kind, global_batch_size=m)
    for i in range(p):
        held = peak = 0
        for o in op_order(kind, p, v, m, i):
            held += 1 if o.kind == "F" else -1
            peak = max(peak, held)
        assert peak == inflight_microbatch_chunks(cfg, i)


def test_unknown_schedule_and_bad_sizes_are_user_errors():
    with pytest.raises(DistplanError, match="schedule 'zigzag' is unknown"):
        op_order("zigzag", 4, 1, 8, 0)
    with pytest.raises(DistplanError, match="divisible by its rounds"):
        op_order("interleaved", 4, 2, 9, 0)  # rounds of 4: 9 // 4 = 2 rounds do not divide 9 (torch refuses it too)
    # fewer micro-batches than ranks, or a count pp does not divide: one round of m (torch runs these)
    for m in (2, 6):
        ops = op_order("interleaved", 4, 2, m, 0)
        assert sorted((o.kind, o.microbatch, o.chunk) for o in ops) == sorted(
            (k, j, c) for k in "FB" for j in range(m) for c in range(2))


# ---- timing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,p,v,m", [("1f1b", 4, 1, 8), ("1f1b", 8, 1, 3), ("gpipe", 4, 1, 8), ("1f1b", 1, 1, 4),
                                        ("interleaved", 4, 2, 8), ("interleaved", 4, 4, 16), ("interleaved", 8, 2, 8)])
@pytest.mark.parametrize("times", [(1.0, 2.0, 0.0, 0.0), (1.0, 2.0, 1.0, 0.05)])
def test_even_stages_take_the_cost_models_pipeline_time(kind, p, v, m, times):
    """Simulated pipeline = m*t + (p - 1)*t/v (planner/cost/layer.py; SC'21 sec. 2.2) for equal stages."""
    stages = [StageOpTimes(i, *times) for i in range(p)]
    sched = simulate(kind, p, v, m, stages, grad_sync_s=0.3, optimizer_s=0.2)
    t = stages[0].per_microbatch_s(v)
    assert sched.pipeline_s == pytest.approx(m * t + (p - 1) * t / v, rel=0.01)
    assert sched.step_s == pytest.approx(sched.pipeline_s + 0.5, rel=1e-9)


def test_events_respect_dependencies_and_never_overlap_on_a_rank():
    p, v, m = 4, 2, 8
    sched = simulate("interleaved", p, v, m, [StageOpTimes(i, 1.0 + 0.1 * i, 2.0, 0.5, 0.1) for i in range(p)])
    fwd_end = {}  # (micro-batch, virtual stage) -> end of the forward and its p2p
    for r in range(p):
        evs = sched.rank_events(r, ("forward", "backward", "recompute", "p2p", "grad_sync", "optimizer"))
        assert all(a.end_s <= b.start_s + 1e-12 for a, b in zip(evs, evs[1:]))
        for a, b in zip(evs, evs[1:]):
            if a.phase == "forward" and b.phase == "p2p":
                fwd_end[(a.microbatch, a.chunk * p + r)] = b.end_s
    for e in sched.events:
        if e.phase == "forward" and e.chunk * p + e.rank > 0:
            assert e.start_s >= fwd_end[(e.microbatch, e.chunk * p + e.rank - 1)] - 1e-12
    busy = sum(e.duration_s for e in sched.events if e.phase not in ("bubble",))
    assert busy + sum(sched.bubble_s(r) for r in range(p)) == pytest.approx(p * sched.step_s)


def test_op_times_add_up_to_the_predictions_stage_times():
    plan = review_plan(model="llama-2-7b", pp=4, vpp=2, schedule="interleaved", recompute="full", tp=2, dp=1,
                       sequence_parallel=True)
    pred = predict(plan.model, plan.cluster, plan.parallel)
    times = stage_op_times(plan.parallel, rank_terms(plan.model, plan.cluster, plan.parallel))
    for st, sp in zip(times, pred.stages):
        assert st.per_microbatch_s(plan.parallel.vpp) == pytest.approx(sp.time_per_microbatch_s, rel=1e-9)
        assert st.recompute_s > 0 and st.p2p_s > 0


@pytest.mark.parametrize("kw", [dict(schedule="1f1b"), dict(schedule="gpipe"),
                                dict(schedule="interleaved", vpp=2, recompute="full"),
                                dict(schedule="1f1b", zero_stage=2)])
def test_plan_timeline_step_matches_the_plans_prediction(kw):
    plan = review_plan(**kw)
    sched = plan_schedule(plan)
    assert sched.step_s == pytest.approx(plan.prediction["step_time_s"], rel=0.01)
    br = plan.prediction["breakdown"]
    assert sched.step_s - sched.pipeline_s == pytest.approx(br["dp_grad_sync"] + br["optimizer"], rel=1e-3)
