"""Explicit engine registry (house rule 7: nothing registers itself on import).

Each engine is imported lazily, so that a missing framework (deepspeed, megatron-core) is a clear
error only when its engine is asked for.
"""

from __future__ import annotations

import importlib

from planner.core.errors import DistplanError
from planner.cost import engines as engine_table

# engine name -> (module, function): every row of the engine table that names a runner
ENGINES = {name: (row.runner, "train") for name, row in engine_table.ENGINES.items() if row.runner is not None}


def get_engine(name: str):
    if name not in ENGINES:
        raise DistplanError(f"engine '{name}' is unknown; valid: {', '.join(ENGINES)}")
    module, fn = ENGINES[name]
    return getattr(importlib.import_module(module), fn)
