"""The outer search and `solve`: at least as good as the exhaustive oracle, at least the published SC'21
configurations, deterministic, memory-safe, honest about time limits and about models that do not fit."""

import pytest

from planner.core.cluster import load_cluster
from planner.core.errors import DistplanError
from planner.core.prediction import FRAGMENTATION
from planner.core.model import load_model
from planner.core.plan import load_plan, plan_to_yaml, save_plan
from planner.cost.predict import predict
from planner.core.profile import Profile
from planner.core.published import sc21_table1
from solvers import solve
from solvers.oracle import oracle
from solvers.search import run_search

H100 = load_cluster("dgx-h100-80gb")
A100 = load_cluster("dgx-a100-80gb")
GRID = [(m, n) for m in ("gpt2", "gpt2-medium", "llama-2-7b") for n in (1, 2, 4, 8, 16)]


def fake_clock(step: float):
    now = [0.0]

    def clock():
        now[0] += step
        return now[0]

    return clock


@pytest.mark.parametrize("name,gpus", GRID)
def test_solver_at_least_as_good_as_the_oracle(name, gpus):
    model = load_model(name)
    best_uniform = oracle(model, H100, gpus, model.default_global_batch, model.seq_len)
    found = run_search(model, H100, gpus, model.default_global_batch, model.seq_len, top_k=0)
    assert best_uniform.config is not None and found.best
    pred = found.best[0].prediction
    assert pred.fits
    assert pred.step_time_s <= best_uniform.prediction.step_time_s * (1 + 1e-12)


@pytest.mark.parametrize("case", sc21_table1(), ids=lambda c: f"{c.params_billion}B@{c.gpus}")
def test_solver_at_least_the_published_sc21_configuration(case):
    """Same cost model, same cluster, same global batch, same fixed settings (unfused attention, gradient
    reduce after backward) as the published run: the solver's plan is at least as fast."""
    published = predict(case.model, A100, case.config)
    found = run_search(case.model, A100, case.gpus, case.config.global_batch_size, case.config.seq_len, top_k=0,
                       flash_attention=False, overlap_grad_reduce=False)
    pred = found.best[0].prediction
    assert pred.fits
    assert pred.tokens_per_s >= published.tokens_per_s


def test_same_inputs_give_a_byte_identical_plan(tmp_path):
    model = load_model("llama-2-7b")
    a = solve(model, H100, 16, top_k=2)
    b = solve(model, H100, 16, top_k=2, clock=fake_clock(0.5))  # how long things take must not matter
    assert plan_to_yaml(a.plan) == plan_to_yaml(b.plan)
    save_plan(a.plan, tmp_path / "plan.yaml")
    assert plan_to_yaml(load_plan(tmp_path / "plan.yaml")) == plan_to_yaml(a.plan)
    c = solve(model, H100, 16, top_k=2, ilp_backend="pulp")
    assert c.plan.parallel == a.plan.parallel
    assert [s.solution.objective for s in c.sharding] == [s.solution.objective for s in a.sharding]


@pytest.mark.parametrize("name,cluster,gpus", [("llama-2-13b", H100, 8), ("gpt3-175b", A100, 64), ("mixtral-8x7b", H100, 16)])
def test_memory_respected_on_every_chosen_stage(name, cluster, gpus):
    model = load_model(name)
    result = solve(model, cluster, gpus, top_k=3)
    preds = [result.prediction] + [a.prediction for a in result.alternatives if a.prediction.fits]
    for pred in preds:
        for stage in pred.stages:
            assert stage.memory_gib * (1 + FRAGMENTATION) <= pred.capacity_gib
    assert result.prediction == predict(model, cluster, result.plan.parallel)  # the plan's numbers are predict()'s
    for alt in result.alternatives:
        assert alt.why_lost.startswith(("slower by", "does not fit"))
    kind = "moe_block" if model.is_moe else "block"
    assert set(result.plan.sharding) == {"embedding", kind, "head"}
    names = {"replicate", "column-split", "row-split", "sequence-split", "batch-split", "expert-split"}
    assert all(s in names for ops in result.plan.sharding.values() for s in ops.values())
    assert sum("intra-op ILP" in line for line in result.plan.rationale) == 3
    if result.plan.parallel.tp > 1:  # sharded weights: the ILP keeps Megatron's column-split Q, K, V and fc1
        block = result.plan.sharding[kind]
        assert {block[op] for op in ("attn.q_proj", "attn.k_proj", "attn.v_proj")} == {"column-split"}


def test_no_plan_fits_names_the_fewest_gpus():
    with pytest.raises(DistplanError, match=r"gpt3-175b fits on no plan of 8 GPUs: even the leanest plan .* "
                                            r"the fewest GPUs that would fit is \d+"):
        solve(load_model("gpt3-175b"), H100, 8)


def test_time_limit_returns_the_best_so_far_and_says_so():
    model = load_model("gpt3-175b")
    result = solve(model, H100, 1024, time_limit_s=5.0, clock=fake_clock(0.01))
    assert result.stats["timed_out"] is True
    assert any("time limit" in line for line in result.plan.rationale)
    assert result.prediction.fits
    with pytest.raises(DistplanError, match="ran out before any plan was found"):
        solve(model, H100, 1024, time_limit_s=0.5, clock=fake_clock(1.0))


@pytest.mark.parametrize("kwargs,needle", [
    ({"top_k": -1}, "--top-k must be >= 0"),
    ({"time_limit_s": 0}, "--time-limit must be positive"),
    ({"ilp_backend": "gurobi"}, "--ilp-backend 'gurobi' is unknown"),
    ({"global_batch": 0}, "--global-batch must be a positive integer"),
    ({"seq_len": 4096}, "exceeds the 1024 learned positions"),
    ({"seq_len": 8192, "model": "llama-2-7b"}, "exceeds the 4096-token context of llama-2-7b"),
])
def test_bad_options_are_rejected(kwargs, needle):
    model = load_model(kwargs.pop("model", "gpt2"))
    with pytest.raises(DistplanError, match=needle):
        solve(model, H100, 8, **kwargs)


def test_profile_of_another_gpu_is_rejected():
    prof = Profile(gpu_name="NVIDIA A100-SXM4-80GB", device="cuda", model="gpt2", seq_len=1024, dtype="bf16")
    with pytest.raises(DistplanError, match="profile was measured on 'NVIDIA A100-SXM4-80GB'"):
        solve(load_model("gpt2"), H100, 8, prof)
