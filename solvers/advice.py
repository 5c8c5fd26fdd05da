"""What a planner owes its user beyond the plan: GPU counts that can be used, and a batch that uses the GPUs.

Pure functions over the search (`solvers.search`): no printing, no files.
- `usable_gpu_counts`: when no configuration can use exactly the GPUs asked for (1000 GPUs of 8-GPU nodes for
  gpt2-xl: tp must divide its 25 heads, pp at most its 48 layers, dp must divide the global batch), the nearest
  counts below and above on which the search has configurations.
- `batch_advice`: when the chosen plan idles much of its step in the pipeline bubble, whether a larger global batch
  would use the GPUs better, and the smallest such batch (each one priced by the search itself).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.core.cluster import Cluster
from planner.core.model import ModelSpec
from planner.core.prediction import Prediction
from planner.core.profile import Profile
from solvers.search import NO_CONSTRAINTS, Constraints, meshes, run_search, search_space

NEAR_SCAN = 4096  # GPU counts tried on each side of the request before giving up (each a quick mesh enumeration)
# the chosen plan idles at least this share of its step in the pipeline bubble before a larger batch is priced
# (1F1B's bubble (p - 1) / (m + p - 1) reaches 25% at m = 3 (p - 1) micro-batches: Narayanan et al. SC'21 sec. 2.2)
BUBBLE_WARN = 0.25
BATCH_GAIN = 1.25  # a larger batch is worth naming when its plan reaches this multiple of the chosen plan's MFU
NEAR_BEST = 0.9  # the batch named is the smallest power of two whose plan reaches this share of the largest's MFU
MAX_BATCH_DOUBLINGS = 12  # the largest batch priced: at most 2**12 x the one asked for


@dataclass(frozen=True)
class SearchSettings:
    """The fixed inputs of one search, so that advice re-runs it on other GPU counts and batches."""

    model: ModelSpec
    cluster: Cluster
    profile: Profile | None
    seq_len: int
    flash_attention: bool = True
    overlap_grad_reduce: bool = True
    engine: str = "any"
    constraints: Constraints = NO_CONSTRAINTS


def has_configuration(s: SearchSettings, gpus: int, global_batch: int) -> bool:
    """Whether the search has at least one configuration of `gpus` GPUs (context parallelism widened)."""
    if not meshes(s.model, s.cluster, gpus, global_batch, s.seq_len, wide_cp=True, constraints=s.constraints):
        return False
    return bool(search_space(s.model, s.cluster, gpus, global_batch, s.seq_len, flash_attention=s.flash_attention,
                             overlap_grad_reduce=s.overlap_grad_reduce, wide_cp=True, engine=s.engine,
                             constraints=s.constraints))


def _allowed_counts(cluster: Cluster, gpus: int, step: int):
    """GPU counts next to `gpus` in direction `step` (-1 or +1) that a cluster can hold: any count up to one node,
    whole nodes beyond it (planner.core.cluster.check_gpu_count), at most the cluster's size."""
    gpn = cluster.gpus_per_node
    most = cluster.max_nodes * gpn if cluster.max_nodes else None
    n, tried = gpus, 0
    while tried < NEAR_SCAN:
        if step < 0:
            n = n - gpn if n > gpn and n % gpn == 0 else (n // gpn) * gpn if n > gpn else n - 1
        else:
            n = n + 1 if n < gpn else (n // gpn + 1) * gpn
        if n < 1 or (most is not None and n > most):
            return
        tried += 1
        yield n


def usable_gpu_counts(s: SearchSettings, gpus: int, global_batch: int) -> tuple[int | None, int | None]:
    """The nearest GPU counts below and above `gpus` on which the search has a configuration (None: none found
    within NEAR_SCAN counts, or past the cluster's size)."""
    below = next((n for n in _allowed_counts(s.cluster, gpus, -1) if has_configuration(s, n, global_batch)), None)
    above = next((n for n in _allowed_counts(s.cluster, gpus, +1) if has_configuration(s, n, global_batch)), None)
    return below, above


def _best_mfu(s: SearchSettings, gpus: int, global_batch: int) -> tuple[float, str] | None:
    """MFU of the fastest fitting plan at this batch, and its configuration in words (None: no plan fits)."""
    from solvers.explain import describe

    if not has_configuration(s, gpus, global_batch):
        return None
    outcome = run_search(s.model, s.cluster, gpus, global_batch, s.seq_len, s.profile, top_k=0,
                         flash_attention=s.flash_attention, overlap_grad_reduce=s.overlap_grad_reduce, engine=s.engine,
                         constraints=s.constraints)
    if not outcome.best:
        return None
    best = outcome.best[0]
    return best.prediction.mfu, describe(best.config)


def batch_advice(s: SearchSettings, gpus: int, global_batch: int, chosen: Prediction) -> str | None:
    """A warning when the global batch is too small to use the GPUs, naming a batch that would; None otherwise.

    Priced only where the chosen plan idles at least BUBBLE_WARN of its step in the pipeline bubble. The reference
    is the plan at the smallest power-of-two batch >= max(2 x the batch, the GPU count) (every GPU then holds at
    least one sequence, so data parallelism can use them); when its MFU is at least BATCH_GAIN x the chosen plan's,
    the batch named is the smallest power of two between whose plan reaches NEAR_BEST of the reference's MFU."""
    bubble = dict(chosen.breakdown).get("pipeline_bubble", 0.0) / chosen.step_time_s if chosen.step_time_s else 0.0
    if bubble < BUBBLE_WARN:
        return None
    first = 1 << (2 * global_batch - 1).bit_length()  # the smallest power of two >= 2 x the batch
    reference = max(first, 1 << (gpus - 1).bit_length())
    if reference > global_batch << MAX_BATCH_DOUBLINGS:
        return None
    top = _best_mfu(s, gpus, reference)
    if top is None or top[0] < BATCH_GAIN * chosen.mfu:
        return None
    lo, hi, named = first.bit_length() - 1, reference.bit_length() - 1, (reference, top)
    while lo < hi:  # the smallest power of two whose plan reaches NEAR_BEST of the reference's MFU
        mid = (lo + hi) // 2
        got = _best_mfu(s, gpus, 1 << mid)
        if got is not None and got[0] >= NEAR_BEST * top[0]:
            hi, named = mid, (1 << mid, got)
        else:
            lo = mid + 1
    batch, (mfu, config) = named
    return (f"global batch {global_batch} is too small for {gpus} GPUs: the plan idles {100 * bubble:.0f}% of its step "
            f"in the pipeline bubble (MFU {100 * chosen.mfu:.1f}%); at --global-batch {batch} the best plan ({config}) "
            f"reaches MFU {100 * mfu:.1f}%")
