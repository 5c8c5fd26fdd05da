"""CP-SAT backend of the intra-op ILP (OR-Tools, Perron & Didier).

CP-SAT takes integer coefficients only: `solvers.intra_op.formulate` has already scaled seconds to
whole nanoseconds (times a tie-break factor) and bytes to whole bytes. One worker and a fixed seed make
the search deterministic; the optimum is unique up to the tie-break, so the answer does not depend on it.
"""

from __future__ import annotations

from ortools.sat.python import cp_model

from solvers.milp import Milp

SEED = 0


def solve_milp(milp: Milp, time_limit_s: float | None = None) -> tuple[tuple[int, ...], int] | None:
    """(0/1 value of every variable, objective) at the optimum; None if infeasible.

    With a time limit that stops the search early, the best feasible solution found is returned.
    """
    model = cp_model.CpModel()
    xs = [model.new_bool_var(f"v{i}") for i in range(len(milp.names))]
    for _label, terms, sense, rhs in milp.constraints:
        expr = sum(c * xs[i] for i, c in terms)
        if sense == "<=":
            model.add(expr <= rhs)
        elif sense == ">=":
            model.add(expr >= rhs)
        else:
            model.add(expr == rhs)
    model.minimize(sum(c * xs[i] for i, c in milp.objective))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = SEED
    if time_limit_s is not None:
        solver.parameters.max_time_in_seconds = max(time_limit_s, 0.01)
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    values = tuple(int(solver.value(x)) for x in xs)
    return values, int(round(solver.objective_value))
