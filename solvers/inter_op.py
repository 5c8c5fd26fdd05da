"""Inter-operator parallelism: pipeline stages over contiguous layer ranges (Alpa, Zheng et al. OSDI'22, sec. 5).

Alpa slices the cluster into submeshes of shapes (1,1), (1,2), (1,4), ..., (1,M), (2,M), ..., (N,M)
(M GPUs per node, N nodes) and runs a DP over layer ranges x submeshes minimising the pipeline latency

    T* = min over stages [ sum_i t_i + (B - 1) * max_i t_i ]                     (Alpa eq. 2, 1F1B/GPipe)

enumerating the bottleneck t_max in ascending order and stopping once (B - 1) * t_max alone exceeds the
best latency found (Alpa sec. 5.2). distplan keeps that algorithm with two deliberate differences:

1. One logical mesh for every stage. The runners (Megatron-LM, DeepSpeed, torchrun) build one (dp, tp)
   process grid for all pipeline ranks, so every stage gets the same submesh shape (N/pp GPUs, which must
   be one of Alpa's shapes, `stage_submesh_ok`) and the same logical mesh; the DP chooses where to cut
   the layers, unevenly where that pays (`ParallelConfig.layer_split`).
2. The latency is exactly what `planner.cost.predict` charges: with t_i from `planner.cost.predict.rank_timer`
   (embedding on the first rank, LM head on the last, ZeRO traffic, ...), v virtual stages per rank,
   `planner.cost.pipeline.step_time`:
       step = m * t_max + (sum_i t_i - t_max) / v + max_i tail_i
   (v = 1 is Alpa's formula; tail = the rank's exposed gradient sync + optimizer step). With v > 1 predict also
   simulates the interleaved schedule; the DP ranks splits by the closed form and the chosen split is re-timed
   by predict.
   Every stage's memory, `planner.cost.memory.stage_memory` (which counts the micro-batches the schedule keeps
   in flight on that rank: 1F1B min(p - i, m); GPipe m; interleaved Megatron's count), must pass the cost
   model's one fit rule, `planner.cost.memory.fits`.

For a cap tau on t_max (and theta on the tail) each rank may hold l layers with t_i(l) <= tau,
tail_i(l) <= theta and fitting memory: an interval, as t_i and tail_i are convex in l. A split exists
iff the intervals' ends bracket the layer count; among those the layers go greedily to the rank whose
t_i grows least (optimal for sum_i t_i of convex t_i). For each tau the caps theta between the least
feasible tail and the tail of the uncapped split are tried (up to MAX_TAIL_CAPS of them), which trades
sum_i t_i / v against the tail. The even split is always evaluated too, so the result is never worse.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from planner.core.cluster import Cluster
from planner.core.job import ParallelConfig, with_changes
from planner.cost.memory import fit_budget_bytes, fits, inflight_microbatch_chunks, stage_memory
from planner.core.model import ModelSpec
from planner.cost.pipeline import step_time
from planner.cost.predict import predict, rank_timer
from planner.core.profile import Profile

MAX_TAU_STEPS = 48  # bottleneck values tried past the smallest feasible one (each step is exact, this bounds time)
MAX_TAIL_CAPS = 24  # tail caps tried per bottleneck value (all of them when there are fewer)


@dataclass(frozen=True)
class StageSplit:
    layer_split: tuple[int, ...]  # () when the even split (ParallelConfig's default) is the best
    step_time_s: float  # predict()'s step time of this split
    per_rank_s: tuple[float, ...]  # t_i per micro-batch


def submesh_shapes(nodes: int, gpus_per_node: int) -> list[tuple[int, int]]:
    """Alpa's submesh shapes: (1, 1), (1, 2), (1, 4), ..., (1, M), then (2, M), ..., (N, M)."""
    shapes, k = [], 1
    while k < gpus_per_node:
        shapes.append((1, k))
        k *= 2
    return shapes + [(n, gpus_per_node) for n in range(1, nodes + 1)]


def stage_submesh_ok(gpus: int, pp: int, gpus_per_node: int) -> bool:
    """Whether `pp` stages of gpus/pp GPUs each are stages on Alpa submeshes of the cluster."""
    per = gpus // pp
    nodes = max(1, -(-gpus // gpus_per_node))
    return gpus % pp == 0 and any(n * m == per for n, m in submesh_shapes(nodes, gpus_per_node))


def best_layer_split(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig,
                     profile: Profile | None = None, *, engine: str = "any") -> StageSplit | None:
    """The layer split of `cfg` (its layer_split ignored) with the least predicted step time whose every
    stage fits in memory; None when no split fits. `engine` as in planner.cost.predict.rank_timer."""
    L, pp, v, m = model.num_layers, cfg.pp, cfg.vpp, cfg.num_microbatches
    cfg = with_changes(cfg, layer_split=())
    timer = rank_timer(model, cluster, cfg, profile, engine=engine)
    counts = list(range(v, L - (pp - 1) * v + 1, v))  # layers a rank may hold: multiples of v, every rank >= v
    if not counts:
        return None

    # memory: affine in the layer count for a given rank; ranks differ by in-flight count and first/last
    mem_cache: dict[tuple, int] = {}

    def max_fitting(rank: int) -> int:
        key = (inflight_microbatch_chunks(cfg, rank), rank == 0, rank == pp - 1)
        if key not in mem_cache:
            mem_cache[key] = _largest_fitting(model, cluster, cfg, rank, counts, profile, engine) or 0
        return mem_cache[key]

    hi_mem = [max_fitting(r) for r in range(pp)]
    if min(hi_mem) < v:
        return None

    # time and tail per rank class: first, middle (all alike), last
    def cls(rank: int) -> int:
        return 0 if rank == 0 else (2 if rank == pp - 1 else 1)

    rep = {0: 0, 1: 1, 2: pp - 1}
    classes = sorted({cls(r) for r in range(pp)})
    times: dict[int, dict[int, float]] = {c: {} for c in classes}
    parts: dict[int, dict[int, tuple[float, float]]] = {c: {} for c in classes}  # (sync, optimizer)
    tails: dict[int, dict[int, float]] = {c: {} for c in classes}  # their sum

    def fill(c: int, n: int) -> None:
        if n not in times[c]:
            rt = timer(rep[c], n)
            times[c][n], parts[c][n] = rt.time_per_microbatch_s, (rt.sync_s, rt.optimizer_s)
            tails[c][n] = rt.sync_s + rt.optimizer_s

    def evaluate(split: list[int]) -> float:
        for r, n in enumerate(split):
            fill(cls(r), n)
        return step_time([times[cls(r)][n] for r, n in enumerate(split)],
                         [parts[cls(r)][n] for r, n in enumerate(split)], m, v).step_s

    best: tuple[float, int, list[int]] | None = None  # (step, 0 for the even split, split)
    even = list(cfg.layers_per_stage(L))
    if all(n % v == 0 and v <= n <= hi_mem[r] for r, n in enumerate(even)):
        best = (evaluate(even), 0, even)
    # a split whose bottleneck exceeds tau_cut loses to the even split on (m - 1/v) * t_max alone,
    # so per class t_i is only needed up to the first count past tau_cut (t_i is convex in the count)
    tau_cut = best[0] / (m - 1 / v) if best is not None and m * v > 1 else float("inf")
    top = max(hi_mem)
    for c in classes:
        for n in counts:
            if n > top:
                break
            fill(c, n)
            if times[c][n] > tau_cut and n > v and times[c][n] > times[c][n - v]:
                break

    def ranges_for(tau: float, theta: float) -> list[tuple[int, int]] | None:
        """Per rank, the interval of layer counts under both caps (convex t_i and tail_i: an interval)."""
        per_class = {}
        for c in classes:
            ok = [n for n in sorted(times[c]) if times[c][n] <= tau and tails[c][n] <= theta]
            per_class[c] = (ok[0], ok[-1]) if ok else None
        out = []
        for r in range(pp):
            iv = per_class[cls(r)]
            if iv is None or min(iv[1], hi_mem[r]) < iv[0]:
                return None
            out.append((iv[0], min(iv[1], hi_mem[r])))
        if not sum(a for a, _ in out) <= L <= sum(b for _, b in out):
            return None
        return out

    def split_for(ranges: list[tuple[int, int]]) -> list[int]:
        split = [a for a, _ in ranges]
        heap = [(times[cls(r)][split[r] + v] - times[cls(r)][split[r]], r) for r in range(pp) if split[r] + v <= ranges[r][1]]
        heapq.heapify(heap)
        while sum(split) < L:  # greedy on the smallest growth of t_i (ties: lowest rank)
            _, r = heapq.heappop(heap)
            split[r] += v
            if split[r] + v <= ranges[r][1]:
                heapq.heappush(heap, (times[cls(r)][split[r] + v] - times[cls(r)][split[r]], r))
        return split

    taus = sorted({t for r in range(pp) for n, t in times[cls(r)].items() if n <= hi_mem[r]})
    tail_values = sorted({t for r in range(pp) for n, t in tails[cls(r)].items() if n <= hi_mem[r]})
    inf = float("inf")
    lo, hi = 0, len(taus) - 1
    if ranges_for(taus[hi], inf) is None:
        return _result(best, even, times, cls)
    while lo < hi:  # the smallest feasible bottleneck
        mid = (lo + hi) // 2
        if ranges_for(taus[mid], inf) is None:
            lo = mid + 1
        else:
            hi = mid
    floor_sum = sum(min(times[cls(r)].values()) for r in range(pp)) / v
    floor_tail = min(tail_values)
    for tau in taus[lo: lo + MAX_TAU_STEPS]:
        if best is not None and (m - 1 / v) * tau + floor_sum + floor_tail >= best[0]:
            break  # Alpa's early stop: the bottleneck term alone already loses
        free = ranges_for(tau, inf)
        if free is None:
            continue
        split = split_for(free)  # the least sum of t_i under tau; its tail is the largest worth capping
        top_tail = max(tails[cls(r)][n] for r, n in enumerate(split))
        a, b = 0, len(tail_values) - 1  # the smallest tail cap that still leaves a split under tau
        while a < b:
            mid = (a + b) // 2
            if ranges_for(tau, tail_values[mid]) is None:
                a = mid + 1
            else:
                b = mid
        # trading sum t_i against the tail: every cap between the smallest and the free split's tail
        caps = [t for t in tail_values[a:] if t < top_tail]
        if len(caps) > MAX_TAIL_CAPS:
            caps = [caps[i * (len(caps) - 1) // (MAX_TAIL_CAPS - 1)] for i in range(MAX_TAIL_CAPS)]
        for ranges in [free] + [ranges_for(tau, t) for t in caps]:
            if ranges is not None:
                split = split_for(ranges)
                key = (evaluate(split), 1, split)
                if best is None or key < best:
                    best = key
    result = _result(best, even, times, cls)
    if result is not None and v > 1:
        # interleaved: the DP ranks splits by the closed form; predict() times the chosen one by simulating the
        # schedule with the head and embedding on their own chunks (planner.cost.pipeline.interleaved_pipeline_s)
        chosen = with_changes(cfg, layer_split=result.layer_split)
        step = predict(model, cluster, chosen, profile, engine=engine).step_time_s
        result = StageSplit(layer_split=result.layer_split, step_time_s=step, per_rank_s=result.per_rank_s)
    return result


def _result(best, even, times, cls) -> StageSplit | None:
    if best is None:
        return None
    step, _, split = best
    per = tuple(times[cls(r)][n] for r, n in enumerate(split))
    return StageSplit(layer_split=() if split == even else tuple(split), step_time_s=step, per_rank_s=per)


def _largest_fitting(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig, rank: int, counts: list[int],
                     profile: Profile | None = None, engine: str = "any") -> int | None:
    """The largest layer count in `counts` whose stage memory on `rank` fits (planner.cost.memory.fits; memory grows
    with layers).

    Stage memory is the largest of a few affine functions of the layer count (planner.cost.memory.stage_memory's
    phases), so convex: the line through 0 and 1 layers lies below it beyond 1 and its answer is an upper
    bound; a third evaluation confirms it with the exact function (a binary search runs if it disagrees)."""
    def peak(n: int) -> float:
        return stage_memory(model, cfg, rank, n, profile, engine).total

    def ok(n: int) -> bool:
        return fits(cluster, model, cfg, peak(n), engine)

    base = peak(0)
    per = peak(1) - base
    if per > 0:
        cap_bytes = fit_budget_bytes(cluster, model, cfg, engine)
        idx = sum(1 for n in counts if n <= (cap_bytes - base) / per) - 1
        if idx >= 0 and ok(counts[idx]):
            return counts[idx]
    if not ok(counts[0]):
        return None
    lo, hi = 0, len(counts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(counts[mid]):
            lo = mid
        else:
            hi = mid - 1
    return counts[lo]
