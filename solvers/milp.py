"""A 0-1 integer program in plain data, and the backends that solve it.

`solvers.intra_op.formulate` builds one `Milp`; each backend module (solvers/ilp_ortools.py: OR-Tools CP-SAT,
solvers/ilp_pulp.py: PuLP + CBC) takes it and returns the 0/1 value of every variable and the objective at the
optimum, so both solve exactly the same program and must agree on the optimum objective.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("ortools", "pulp")


@dataclass(frozen=True)
class Milp:
    """min sum objective s.t. constraints, every variable 0 or 1; integer coefficients only (CP-SAT takes no others)."""

    names: tuple[str, ...]
    objective: tuple[tuple[int, int], ...]  # (variable, integer coefficient)
    constraints: tuple[tuple[str, tuple[tuple[int, int], ...], str, int], ...]  # (label, terms, sense, rhs)
