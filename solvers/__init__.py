"""Solvers: Alpa-style automatic parallelism (outer search, inter-op stage DP, intra-op sharding ILP, oracle).

    from solvers import solve
    result = solve(model, cluster, gpus)          # -> SolveResult: plan, prediction, alternatives, sharding, stats

Modules: search (outer search, branch and bound), inter_op (pipeline stage DP), intra_op (sharding ILP,
backend-neutral) with ilp_ortools / ilp_pulp, sharding (the ILP on a chosen plan), explain (rationale),
oracle (exhaustive check), solve (end to end), request (CLI-facing name resolution).
"""

from solvers.solve import Alternative, SolveResult, solve

__all__ = ["solve", "SolveResult", "Alternative"]
