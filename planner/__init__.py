"""distplan: an automatic parallelism planner for training large models.

Layers, each importing only those before it (docs/architecture.md; tests/test_architecture.py checks it):
planner.core (types, schemas, file io), planner.cost (the cost model), planner.build (torch modules and
their parallelisation); solvers/ and profilers/ sit on them; the CLI, estimate, show/render, planner.runner
and emitters/ are the roof. This file imports planner.core.version only.
"""

from planner.core.version import __version__

__all__ = ["__version__"]
