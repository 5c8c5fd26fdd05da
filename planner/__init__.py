"""distplan: an automatic parallelism planner for training large models.

The `planner` package holds the data types passed between stages, the one cost model,
the plan file, the runner and the CLI. See ARCHITECTURE notes in README.md.
"""

__version__ = "0.1.0"
