"""Torch modules of a model (on the meta device or a real one) and their parallelisation, shared by the runner and
the profilers."""
