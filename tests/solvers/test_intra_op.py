"""The intra-op sharding ILP: Megatron rediscovered, its TP cost equal to the cost model's, both backends agree."""

import pytest

from planner.core.cluster import load_cluster
from planner.cost.terms import CommModel
from planner.cost.layer import block_time
from planner.build.graph import trace_op_graph
from planner.core.job import ParallelConfig
from planner.core.model import load_model
from solvers.intra_op import (IntraOpProblem, build_problem, conversion_costs, evaluate, megatron_assignment,
                              solve_intra_op)

H100 = load_cluster("dgx-h100-80gb")
MATMUL_ROLES = {"attn.q_proj": "column-split", "attn.k_proj": "column-split", "attn.v_proj": "column-split",
                "attn.core": "column-split", "attn.o_proj": "row-split", "mlp.fc1": "column-split",
                "mlp.act": "column-split", "mlp.fc2": "row-split", "mlp.gate_proj": "column-split",
                "mlp.up_proj": "column-split", "mlp.mul": "column-split", "mlp.down_proj": "row-split"}

_graphs: dict = {}


def graph(name: str, kind: str = "block", mb: int = 1, seq: int | None = None):
    spec = load_model(name)
    key = (name, kind, mb, seq or spec.seq_len)
    if key not in _graphs:
        _graphs[key] = trace_op_graph(spec, kind, mb, seq or spec.seq_len)
    return spec, _graphs[key]


def tight_problem(name: str, dp: int, tp: int, m: int, seq: int | None = None, slack: float = 1.02) -> IntraOpProblem:
    """A budget just above the memory of Megatron's sharding: weights must be split over tp."""
    spec, g = graph(name, seq=seq)
    probe = build_problem(g, spec, H100, None, dp=dp, tp=tp, microbatches=m, memory_budget_bytes=float("inf"))
    need = max(evaluate(probe, megatron_assignment(probe, sp)).memory_bytes for sp in (False, True))
    return build_problem(g, spec, H100, None, dp=dp, tp=tp, microbatches=m, memory_budget_bytes=need * slack)


@pytest.mark.parametrize("name,dp,tp,seq", [("gpt3-175b", 1, 8, 2048), ("llama-2-7b", 1, 8, 4096),
                                            ("gpt2-medium", 4, 4, 1024), ("llama-2-70b", 2, 8, 4096)])
def test_ilp_rediscovers_megatron_column_then_row(name, dp, tp, seq):
    sol = solve_intra_op(tight_problem(name, dp, tp, m=8, seq=seq))
    got = dict(sol.assignment)
    for op, strategy in got.items():
        if op in MATMUL_ROLES:
            assert strategy == MATMUL_ROLES[op], (op, strategy)
        else:  # norms, residual adds, the layer input: replicated, or sequence-split (= sequence parallelism)
            assert strategy in ("replicate", "sequence-split"), (op, strategy)
    assert sol.cost.memory_bytes <= sol_budget(name, dp, tp, seq)


def sol_budget(name, dp, tp, seq):
    return tight_problem(name, dp, tp, m=8, seq=seq).memory_budget_bytes


@pytest.mark.parametrize("name,tp,sp,recompute,mb,cp", [("gpt2-medium", 4, False, "none", 2, 1), ("llama-2-7b", 8, False, "full", 1, 1),
                                                        ("llama-2-7b", 8, True, "none", 1, 1), ("gpt3-175b", 8, True, "full", 1, 2),
                                                        ("llama-2-70b", 8, False, "none", 2, 2)])
def test_megatron_tp_comm_equals_block_time(name, tp, sp, recompute, mb, cp):
    spec, g = graph(name, mb=mb)
    prob = build_problem(g, spec, H100, None, dp=2 * cp, tp=tp, microbatches=4, memory_budget_bytes=float("inf"),
                         recompute=recompute, cp=cp)
    ilp = evaluate(prob, megatron_assignment(prob, sp)).comm_s
    cfg = ParallelConfig(dp=2, tp=tp, cp=cp, micro_batch_size=mb, seq_len=spec.seq_len, sequence_parallel=sp,
                         recompute=recompute, global_batch_size=64)
    assert ilp == pytest.approx(block_time(spec, H100, cfg, CommModel(H100, None), None).tp_comm, rel=1e-12)


@pytest.mark.parametrize("name,kind,dp,tp,m,slack", [("gpt2", "block", 1, 8, 64, 1.3), ("gpt2", "block", 2, 4, 1, None),
                                                     ("mixtral-8x7b", "moe_block", 1, 8, 8, 1.02),
                                                     ("llama-2-7b", "block", 1, 8, 8, 1.02), ("llama-2-7b", "head", 2, 4, 8, None),
                                                     ("gpt2-medium", "embedding", 1, 4, 8, None)])
def test_cpsat_and_pulp_agree(name, kind, dp, tp, m, slack):
    spec, g = graph(name, kind)
    prob = build_problem(g, spec, H100, None, dp=dp, tp=tp, microbatches=m, memory_budget_bytes=float("inf"))
    if slack is not None:
        need = max(evaluate(prob, megatron_assignment(prob, sp)).memory_bytes for sp in (False, True))
        prob = build_problem(g, spec, H100, None, dp=dp, tp=tp, microbatches=m, memory_budget_bytes=need * slack)
    a, b = solve_intra_op(prob, "ortools"), solve_intra_op(prob, "pulp")
    assert a.objective == b.objective  # the same optimum of the same integer program
    assert a.cost.step_s == pytest.approx(b.cost.step_s, rel=1e-9)
    if (name, kind) == ("llama-2-7b", "block"):  # no symmetric ties there: the same assignment too
        assert a.assignment == b.assignment


def test_memory_budget_respected_and_infeasible_is_none():
    spec, g = graph("llama-2-7b")
    roomy = build_problem(g, spec, H100, None, dp=1, tp=8, microbatches=8, memory_budget_bytes=float("inf"))
    free = solve_intra_op(roomy)
    for frac in (0.9, 0.5):
        budget = free.cost.memory_bytes * frac
        prob = build_problem(g, spec, H100, None, dp=1, tp=8, microbatches=8, memory_budget_bytes=budget)
        sol = solve_intra_op(prob)
        if sol is not None:
            assert sol.cost.memory_bytes <= budget
            assert sol.cost.step_s >= free.cost.step_s - 1e-12
    starved = build_problem(g, spec, H100, None, dp=1, tp=8, microbatches=8, memory_budget_bytes=1e6)
    assert solve_intra_op(starved) is None
    assert solve_intra_op(starved, "pulp") is None


def test_single_gpu_mesh_replicates_everything():
    spec, g = graph("gpt2")
    sol = solve_intra_op(build_problem(g, spec, H100, None, dp=4, tp=1, microbatches=2, memory_budget_bytes=float("inf")))
    assert {s for _, s in sol.assignment} == {"replicate"}
    assert sol.cost.comm_s == 0.0


def test_resharding_uses_the_cost_models_collectives():
    comm = CommModel(H100, None)
    table = {(a, b): c for a, b, c in conversion_costs(comm, 8, 64e6)}
    assert table[("P", "R")] == comm.time_s("all_reduce", 8, 1, 64e6)
    assert table[("P", "S")] == comm.time_s("reduce_scatter", 8, 1, 64e6)
    assert table[("S", "R")] == comm.time_s("all_gather", 8, 1, 64e6)
    assert table[("S", "C")] == comm.time_s("all_to_all", 8, 1, 8e6)
    assert ("R", "S") not in table and ("S", "P") not in table  # local slices and zero fills are free


def test_unknown_backend_is_rejected():
    from planner.core.errors import DistplanError

    spec, g = graph("gpt2")
    prob = build_problem(g, spec, H100, None, dp=1, tp=2, microbatches=1, memory_budget_bytes=float("inf"))
    with pytest.raises(DistplanError, match="--ilp-backend 'gurobi' is unknown"):
        solve_intra_op(prob, "gurobi")
