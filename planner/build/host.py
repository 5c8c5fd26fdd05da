"""The host's share of each training process. Torch-free: the run launcher imports it before any rank starts."""

from __future__ import annotations

import os


def host_threads_per_rank(ranks: int) -> int:
    """CPU threads each of `ranks` processes on one host gets (`distplan run`'s OMP_NUM_THREADS; the profiler times
    the offloaded AdamW step with it): the host's cores shared evenly, at least one."""
    return max(1, (os.cpu_count() or 1) // max(1, ranks))
