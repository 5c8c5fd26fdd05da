"""The intra-op ILP applied to a chosen configuration: one ILP per layer kind on the plan's logical mesh.

Identical transformer blocks are traced and solved once (one `trace_op_graph` per layer kind, the
block's output layout tied to its input layout). The mesh is the stage's (dp*cp) x tp grid; the
memory budget of a layer is what the runners' Megatron sharding uses under the ILP's own accounting
plus an equal share of the free memory of the fullest stage holding that kind (stage memory from
`planner.cost.memory.stage_memory`, so the runners' sharding is always feasible and the ILP may trade the
headroom for speed). The solutions go into `Plan.sharding` for review; the plan's prediction stays
`planner.cost.predict` of the configuration, which is what the runners execute.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.core.cluster import Cluster
from planner.build.graph import layer_kinds, trace_op_graph
from planner.core.job import ParallelConfig
from planner.cost.memory import fit_budget_bytes, inflight_microbatch_chunks, stage_memory
from planner.core.model import ModelSpec
from planner.core.prediction import Prediction
from planner.core.profile import Profile
from solvers.intra_op import IntraOpSolution, build_problem, evaluate, megatron_assignment, solve_intra_op

BACKEND_NAMES = {"ortools": "CP-SAT", "pulp": "CBC"}


@dataclass(frozen=True)
class KindSharding:
    kind: str
    solution: IntraOpSolution
    megatron: dict  # the runners' sharding of the same operators
    megatron_step_s: float  # its cost under the ILP's terms


def _headroom_bytes(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig, rank: int, layers: int) -> float:
    return max(0.0, fit_budget_bytes(cluster, model, cfg) - stage_memory(model, cfg, rank, layers).total)


def shard_layers(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig, pred: Prediction, profile: Profile | None,
                 backend: str, time_limit_s: float | None = None) -> list[KindSharding]:
    """Solve the ILP of every layer kind of `model` for `cfg` (see module doc)."""
    counts = cfg.layers_per_stage(model.num_layers)
    fullest = max(range(cfg.pp), key=lambda r: (pred.stages[r].memory.total, -r))
    block_kind = layer_kinds(model)[1]
    out = []
    for kind in layer_kinds(model):
        rank = 0 if kind == "embedding" else (cfg.pp - 1 if kind == "head" else fullest)
        share = counts[rank] if kind == block_kind else 1
        copies = 1.0 if cfg.recompute == "full" else inflight_microbatch_chunks(cfg, rank) / cfg.vpp
        graph = trace_op_graph(model, kind, cfg.micro_batch_size, cfg.seq_len)
        common = dict(dp=cfg.dp * cfg.cp, tp=cfg.tp, microbatches=cfg.num_microbatches, zero_stage=cfg.zero_stage,
                      recompute=cfg.recompute, flash_attention=cfg.flash_attention, activation_copies=copies, cp=cfg.cp)
        probe = build_problem(graph, model, cluster, profile, memory_budget_bytes=float("inf"), **common)
        megatron = megatron_assignment(probe, cfg.sequence_parallel)
        budget = evaluate(probe, megatron).memory_bytes + _headroom_bytes(model, cluster, cfg, rank, counts[rank]) / share
        problem = build_problem(graph, model, cluster, profile, memory_budget_bytes=budget, **common)
        solution = solve_intra_op(problem, backend, time_limit_s)
        if solution is None:  # rounding to KiB can only bite when the headroom is ~0: fall back to the runners' sharding
            solution = IntraOpSolution(kind, problem.dp, problem.tp, tuple(megatron.items()), evaluate(problem, megatron),
                                       backend, -1)
        out.append(KindSharding(kind, solution, megatron, evaluate(problem, megatron).step_s))
    return out


def sharding_dict(shardings: list[KindSharding]) -> dict:
    """Plan.sharding: per layer kind, operator -> strategy (the layer input of a block is `input`)."""
    return {s.kind: dict(s.solution.assignment) for s in shardings}


def sharding_rationale(shardings: list[KindSharding], cfg: ParallelConfig) -> list[str]:
    lines = []
    for s in shardings:
        sol = s.solution
        how = BACKEND_NAMES.get(sol.backend, sol.backend)
        head = f"intra-op ILP ({how}) for the {s.kind} on the {sol.dp} x {sol.tp} (dp x tp) mesh"
        if sol.tp == 1:
            lines.append(f"{head}: tp=1, every operator whole on each GPU (data parallel)")
            continue
        diff = sorted(op for op, strat in sol.assignment if s.megatron.get(op) != strat)
        style = ("Megatron's column-then-row split" if s.kind != "embedding" else "Megatron's vocabulary-parallel table") \
            + (" with sequence parallelism" if cfg.sequence_parallel else "")
        if not diff:
            lines.append(f"{head}: {style}, exactly what the runners execute")
        else:
            gain = 100 * (1 - sol.cost.step_s / s.megatron_step_s) if s.megatron_step_s > 0 else 0.0
            shown = ", ".join(f"{op}={dict(sol.assignment)[op]}" for op in diff[:6]) + (" ..." if len(diff) > 6 else "")
            lines.append(f"{head}: differs on {len(diff)} operator(s) ({shown}) from {style}, which the runners "
                         f"execute and the prediction assumes; {gain:.1f}% cheaper under the ILP's terms")
    return lines
