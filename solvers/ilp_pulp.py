"""PuLP + CBC backend of the intra-op ILP: the second solver that must agree with CP-SAT.

The same integer program (`solvers.milp.Milp`) is handed to CBC with no relative or absolute gap
allowed, one thread and CBC's fixed default seed, so the optimum objective equals CP-SAT's exactly.
"""

from __future__ import annotations

import warnings

import pulp

from solvers.milp import Milp


def solve_milp(milp: Milp, time_limit_s: float | None = None) -> tuple[tuple[int, ...], int] | None:
    """(0/1 value of every variable, objective) at the optimum; None if infeasible."""
    prob = pulp.LpProblem("intra_op", pulp.LpMinimize)
    if hasattr(prob, "add_variable"):  # PuLP >= 3.3 (the PuLP 4 API)
        xs = [prob.add_variable(f"v{i}", 0, 1, cat="Binary") for i in range(len(milp.names))]
    else:
        xs = [pulp.LpVariable(f"v{i}", 0, 1, cat="Binary") for i in range(len(milp.names))]
    prob += pulp.lpSum(c * xs[i] for i, c in milp.objective)
    for k, (_label, terms, sense, rhs) in enumerate(milp.constraints):
        expr = pulp.lpSum(c * xs[i] for i, c in terms)
        if sense == "<=":
            prob += (expr <= rhs, f"c{k}")
        elif sense == ">=":
            prob += (expr >= rhs, f"c{k}")
        else:
            prob += (expr == rhs, f"c{k}")
    kwargs = {"msg": False, "threads": 1, "gapRel": 0.0, "gapAbs": 0.0}
    if time_limit_s is not None:
        kwargs["timeLimit"] = max(time_limit_s, 0.01)
    with warnings.catch_warnings():  # PuLP 3.3 deprecates its bundled CBC in favour of COIN_CMD + pulp[cbc]
        warnings.simplefilter("ignore", DeprecationWarning)
        solver = pulp.PULP_CBC_CMD(**kwargs)
    status = prob.solve(solver)
    if pulp.LpStatus[status] != "Optimal":
        return None
    values = tuple(int(round(x.value() or 0)) for x in xs)
    objective = sum(c * values[i] for i, c in milp.objective)
    return values, int(objective)
