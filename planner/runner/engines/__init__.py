"""Explicit engine registry (house rule 7: nothing registers itself on import).

Each engine is imported lazily, so that a missing framework (deepspeed, megatron-core) is a clear
error only when its engine is asked for.
"""

from __future__ import annotations

import importlib

from planner.core.errors import DistplanError

# engine name -> (module, function)
ENGINES = {
    "torch": ("planner.runner.engines.torch_engine", "train"),
    "deepspeed": ("planner.runner.engines.deepspeed_engine", "train"),
    "megatron": ("planner.runner.engines.megatron_engine", "train"),
}


def get_engine(name: str):
    if name not in ENGINES:
        raise DistplanError(f"engine '{name}' is unknown; valid: {', '.join(ENGINES)}")
    module, fn = ENGINES[name]
    return getattr(importlib.import_module(module), fn)
