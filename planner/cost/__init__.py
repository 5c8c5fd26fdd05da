"""The one cost model: terms, layer times, memory, the pipeline, the engines as data, `predict`, and the bounds the
search prunes with. Pure functions over planner.core's types; solve, estimate and verify all call it."""
