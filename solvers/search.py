"""Outer search: parallel degrees, micro-batching, schedule, ZeRO, recompute; branch and bound.

For a global batch B and N GPUs the search enumerates every configuration of the space below, orders
them by a lower bound on their step time, and evaluates them in that order with the inter-op stage DP
(`solvers.inter_op.best_layer_split`: the best layer split that fits, timed by `planner.cost.predict`),
until the bound of the next one cannot beat the (k+1)-th best mesh found (branch and bound; exact).

The space, and the rules that prune it (each an exact dominance in the cost model or a hardware rule):
- tp: divides N, the node size and the attention heads (KV heads: one divides the other): a TP group
  never straddles nodes, so its all-reduces stay on NVLink (Megatron-LM's rule).
- cp: powers of two dividing seq/2 that leave each rank >= 512 tokens (shorter chunks make the KV
  ring latency-bound); any when no plan fits otherwise. It splits activations like dp but not the batch.
- ep: divisors of the experts dividing dp*cp (MoE).
- pp: divides N/(tp*cp), at most the layer count, and N/pp GPUs form one of Alpa's submesh shapes.
- micro-batch: powers of two up to MAX_MICRO_BATCH dividing B/dp.
- schedule: 1F1B; interleaved with v in 2..8 virtual stages (v divides the layers, m % pp == 0). GPipe
  has 1F1B's bubble in this model and keeps all m micro-batches in flight (1F1B: min(p - i, m)), so it
  is never better and is not evaluated (the oracle enumerates it and confirms).
- ZeRO 1-3, each with and without optimizer offload (ZeRO-0 is dominated when dp*cp > 1: ZeRO-1 has
  the same gradient traffic, a smaller optimizer step and less memory; with dp*cp = 1 stages 1 and 2
  equal 0, so 0, 3 and the offloads remain); recompute none/full (and selective when
  attention is unfused: with flash attention selective recompute equals none); sequence parallel with tp > 1.
Lower bound (valid for any layer split): planner.cost.bounds.step_lower_bound, from the per-rank times
predict sums.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from planner.core.cluster import Cluster
from planner.core.job import ParallelConfig, with_changes
from planner.core.model import ModelSpec
from planner.core.prediction import Prediction
from planner.core.profile import Profile
from planner.cost.bounds import QuickBound, step_lower_bound
from planner.cost.engines import engine_model, modelled, runnable
from planner.cost.memory import states_fit
from planner.cost.predict import predict
from solvers.inter_op import best_layer_split, stage_submesh_ok

MAX_MICRO_BATCH = 64  # largest micro-batch tried: a bound on the search, the runners take any size
MAX_VPP = 8  # most model chunks per rank tried: the bubble shrinks as 1/v, the sends grow as 2v (SC'21 sec. 2.2.2)
MIN_CP_CHUNK = 512  # context parallelism keeps >= 512 tokens per rank unless nothing fits otherwise
# (ZeRO stage, optimizer offload): with one data-parallel rank stages 1 and 2 equal stage 0 (nothing to
# partition); stage 3 differs in its buffers, offload in where the optimizer runs
ZERO_ONE_RANK = ((0, False), (3, False), (1, True), (3, True))
ZERO_MANY_RANKS = ((1, False), (2, False), (3, False), (1, True), (2, True), (3, True))
ZERO_ALL = ((0, False), (1, False), (2, False), (3, False), (1, True), (2, True), (3, True))
KEY_FIELDS = ("dp", "tp", "pp", "cp", "ep", "vpp", "schedule", "sequence_parallel", "zero_stage",
              "offload_optimizer", "micro_batch_size", "recompute")


@dataclass(frozen=True)
class Evaluated:
    """A configuration with its best layer split and its prediction."""

    config: ParallelConfig
    prediction: Prediction


@dataclass(frozen=True)
class Considered:
    """What the search did with one configuration of its space (for `distplan solve --candidates`)."""

    config: ParallelConfig  # with the layer split the stage DP chose, where it ran
    lower_bound_s: float
    status: str  # one of STATUSES
    step_time_s: float | None = None  # the stage DP's step time ("fits")
    bound_to_beat_s: float | None = None  # the step time the lower bound could not beat ("pruned", "mesh_pruned")


# what the search did with a configuration: evaluated and fits; evaluated, states or every layer split over memory;
# not evaluated: its bound could not beat the (k+1)-th best mesh, or its own mesh's best; the time limit came first
STATUSES = ("fits", "states_do_not_fit", "no_split_fits", "pruned", "mesh_pruned", "timed_out")


@dataclass(frozen=True)
class SearchOutcome:
    best: tuple[Evaluated, ...]  # best per mesh (dp, tp, pp, cp, ep), fastest first; at most top_k + 1
    fastest_unfit: Evaluated | None  # the lowest-bound candidate that fits no split (for "why not")
    candidates: int = 0
    evaluated: int = 0
    timed_out: bool = False
    widened_cp: bool = False
    stats: dict = field(default_factory=dict, hash=False)
    considered: tuple[Considered, ...] = field(default=(), hash=False)  # every configuration of the space, in order


def _divisors(n: int) -> list[int]:
    """Divisors of n in ascending order, in O(sqrt n) steps."""
    small, large, d = [], [], 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def _pow2_upto(n: int) -> list[int]:
    out, k = [], 1
    while k <= n:
        out.append(k)
        k *= 2
    return out


@dataclass(frozen=True)
class Constraints:
    """Values the search may use, per axis (None: every value the search would consider). `distplan solve --tp 1,2,4
    --pp 1 --zero 1,3 --max-micro-batch 8 ...` pins what an engineer's stack supports. An axis pinned by the user
    also lifts the search's own shortcuts on it: ZeRO-0 (dominated by ZeRO-1 when dp*cp > 1), GPipe (dominated by
    1F1B), selective recompute under flash attention (equal to none), context-parallel chunks under MIN_CP_CHUNK."""

    dp: tuple[int, ...] | None = None
    tp: tuple[int, ...] | None = None
    pp: tuple[int, ...] | None = None
    cp: tuple[int, ...] | None = None
    ep: tuple[int, ...] | None = None
    vpp: tuple[int, ...] | None = None
    micro_batch: tuple[int, ...] | None = None
    max_micro_batch: int | None = None
    zero: tuple[int, ...] | None = None
    offload_optimizer: tuple[bool, ...] | None = None
    recompute: tuple[str, ...] | None = None
    schedule: tuple[str, ...] | None = None
    sequence_parallel: tuple[bool, ...] | None = None

    def given(self) -> dict[str, object]:
        """The pinned axes, by field name."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__ if getattr(self, f) is not None}

    def describe(self) -> str:
        """The pinned axes as solve's options, e.g. '--tp 1,2,4 --zero 1,3' ('' when nothing is pinned)."""
        def text(v) -> str:
            if isinstance(v, tuple):
                return ",".join(("yes" if x else "no") if isinstance(x, bool) else str(x) for x in v)
            return str(v)
        return " ".join(f"--{f.replace('_', '-')} {text(v)}" for f, v in self.given().items())

    def admits(self, cfg: ParallelConfig) -> bool:
        pairs = (("dp", cfg.dp), ("tp", cfg.tp), ("pp", cfg.pp), ("cp", cfg.cp), ("ep", cfg.ep), ("vpp", cfg.vpp),
                 ("micro_batch", cfg.micro_batch_size), ("zero", cfg.zero_stage),
                 ("offload_optimizer", cfg.offload_optimizer), ("recompute", cfg.recompute),
                 ("schedule", cfg.schedule), ("sequence_parallel", cfg.sequence_parallel))
        if any(getattr(self, name) is not None and value not in getattr(self, name) for name, value in pairs):
            return False
        return self.max_micro_batch is None or cfg.micro_batch_size <= self.max_micro_batch


NO_CONSTRAINTS = Constraints()


def meshes(model: ModelSpec, cluster: Cluster, gpus: int, global_batch: int, seq_len: int, *, wide_cp: bool = False,
           constraints: Constraints = NO_CONSTRAINTS) -> list[tuple[int, int, int, int]]:
    """The (dp, tp, pp, cp) meshes of `gpus` GPUs the search considers (module doc), in canonical order."""
    c, L, gpn = constraints, model.num_layers, cluster.gpus_per_node
    tps = [t for t in _divisors(gpus) if gpn % t == 0 and model.num_heads % t == 0
           and (model.num_kv_heads % t == 0 or t % model.num_kv_heads == 0)]
    cps = [1]
    if not model.is_vit:
        cps += [k for k in _pow2_upto(gpus)[1:] if seq_len % (2 * k) == 0
                and (seq_len // k >= MIN_CP_CHUNK or wide_cp or (c.cp is not None and k in c.cp))]
    out = []
    for tp in tps:
        for cp in cps:
            if gpus % (tp * cp):
                continue
            for pp in _divisors(gpus // (tp * cp)):
                dp = gpus // (tp * cp * pp)
                if pp > L or global_batch % dp or not stage_submesh_ok(gpus, pp, gpn):
                    continue
                if all(v is None or x in v for v, x in ((c.dp, dp), (c.tp, tp), (c.pp, pp), (c.cp, cp))):
                    out.append((dp, tp, pp, cp))
    return out


def search_space(model: ModelSpec, cluster: Cluster, gpus: int, global_batch: int, seq_len: int, *,
                 flash_attention: bool = True, overlap_grad_reduce: bool = True, wide_cp: bool = False,
                 engine: str = "any", constraints: Constraints = NO_CONSTRAINTS) -> list[ParallelConfig]:
    """Every configuration the solver considers (module doc) that `engine` can run and `constraints` admit, in
    canonical order."""
    c = constraints
    L = model.num_layers
    out = []
    recomputes = ("none", "full") if flash_attention and c.recompute is None else ("none", "selective", "full")
    micro_batches = sorted(set(c.micro_batch)) if c.micro_batch else _pow2_upto(MAX_MICRO_BATCH)
    for dp, tp, pp, cp in meshes(model, cluster, gpus, global_batch, seq_len, wide_cp=wide_cp, constraints=c):
        eps = [e for e in _divisors(model.num_experts) if (dp * cp) % e == 0] if model.is_moe else [1]
        zeros = ZERO_ONE_RANK if dp * cp == 1 else ZERO_MANY_RANKS
        if c.zero is not None or c.offload_optimizer is not None:
            zeros = ZERO_ALL  # pinned by the user: no shortcut on this axis
        elif dp * cp > 1 and engine_model(engine).zero1_costs_beyond_ddp:
            # the engine's ZeRO-1 is not free next to DDP (the torch engine runs it as FSDP2 with
            # per-layer collectives; DeepSpeed's partitions in buckets), so DDP stays a candidate
            zeros = ((0, False),) + zeros
        for mb in micro_batches:
            if (global_batch // dp) % mb:
                continue
            m = global_batch // (dp * mb)
            scheds = [("1f1b", 1)] + ([("gpipe", 1)] if c.schedule is not None and "gpipe" in c.schedule and pp > 1 else [])
            if pp > 1 and m % pp == 0:
                scheds += [("interleaved", v) for v in range(2, MAX_VPP + 1) if L % v == 0 and L >= pp * v]
            for ep in eps:
                for schedule, vpp in scheds:
                    for sp in ((False, True) if tp > 1 else (False,)):
                        for zero, offload in zeros:
                            for rec in recomputes:
                                out.append(ParallelConfig(
                                    dp=dp, tp=tp, pp=pp, cp=cp, ep=ep, vpp=vpp, sequence_parallel=sp,
                                    zero_stage=zero, offload_optimizer=offload, micro_batch_size=mb,
                                    global_batch_size=global_batch, seq_len=seq_len, schedule=schedule,
                                    recompute=rec, flash_attention=flash_attention,
                                    overlap_grad_reduce=overlap_grad_reduce))
    if c.given():
        out = [cfg for cfg in out if c.admits(cfg)]
    return [cfg for cfg in out if runnable(engine, cfg) and modelled(engine, cfg)]


def config_key(cfg: ParallelConfig) -> tuple:
    return tuple(getattr(cfg, f) for f in KEY_FIELDS)


def mesh_key(cfg: ParallelConfig) -> tuple[int, ...]:
    return (cfg.dp, cfg.tp, cfg.pp, cfg.cp, cfg.ep)


def run_search(model: ModelSpec, cluster: Cluster, gpus: int, global_batch: int, seq_len: int,
               profile: Profile | None = None, *, top_k: int = 3, time_limit_s: float | None = None,
               flash_attention: bool = True, overlap_grad_reduce: bool = True,
               progress: Callable[[int, int], None] | None = None, clock: Callable[[], float] = time.monotonic,
               engine: str = "any", constraints: Constraints = NO_CONSTRAINTS) -> SearchOutcome:
    """Branch and bound over `search_space`; widens context parallelism when nothing fits without it."""
    start = clock()
    outcome = _bnb(model, cluster, gpus, global_batch, seq_len, profile, top_k, time_limit_s, flash_attention,
                   overlap_grad_reduce, progress, clock, start, wide_cp=False, engine=engine, constraints=constraints)
    if not outcome.best and not outcome.timed_out and not model.is_vit:
        wide = _bnb(model, cluster, gpus, global_batch, seq_len, profile, top_k, time_limit_s, flash_attention,
                    overlap_grad_reduce, progress, clock, start, wide_cp=True, engine=engine, constraints=constraints)
        narrow = {config_key(c.config) for c in outcome.considered}
        considered = outcome.considered + tuple(c for c in wide.considered if config_key(c.config) not in narrow)
        outcome = replace(wide, candidates=wide.candidates + outcome.candidates, evaluated=wide.evaluated + outcome.evaluated,
                          widened_cp=True, fastest_unfit=wide.fastest_unfit or outcome.fastest_unfit,
                          considered=considered)
    stats = {"candidates": outcome.candidates, "evaluated_with_stage_dp": outcome.evaluated,
             "pruned_by_bound": outcome.candidates - outcome.evaluated, "timed_out": outcome.timed_out,
             "context_parallel_widened": outcome.widened_cp, "search_seconds": clock() - start}
    return replace(outcome, stats=stats)


def _bnb(model, cluster, gpus, global_batch, seq_len, profile, top_k, time_limit_s, flash, overlap, progress,
         clock, start, wide_cp: bool, engine: str = "any", constraints: Constraints = NO_CONSTRAINTS) -> SearchOutcome:
    space = search_space(model, cluster, gpus, global_batch, seq_len, flash_attention=flash,
                         overlap_grad_reduce=overlap, wide_cp=wide_cp, engine=engine, constraints=constraints)
    # branch and bound in the order of step_lower_bound: a heap ordered by the quick bound, each configuration's
    # step_lower_bound (>= the quick one) computed when it comes first and pushed back, so that a configuration is
    # taken once its step bound is the least of all bounds in the heap
    quick = QuickBound(model, cluster, profile, engine)
    heap = [(quick.bound(c), config_key(c), False, c) for c in space]
    heapq.heapify(heap)
    total = len(heap)
    best_by_mesh: dict[tuple, tuple[float, tuple, ParallelConfig]] = {}
    keep = top_k + 1
    first_unfit: ParallelConfig | None = None
    evaluated, timed_out, taken = 0, False, 0
    considered: list[Considered] = []

    def rest(status: str, kth: float | None = None) -> list[Considered]:
        return [Considered(c, b, status, bound_to_beat_s=kth) for b, _, _, c in sorted(heap, key=lambda t: t[:2])]

    while heap:
        ranked = sorted(best_by_mesh.values(), key=lambda t: (t[0], t[1]))
        kth = ranked[keep - 1][0] if len(ranked) >= keep else float("inf")
        if heap[0][0] >= kth:  # the least bound left: nothing from here on can enter the top k + 1
            considered += rest("pruned", kth)
            break
        lb, key, exact, cfg = heapq.heappop(heap)
        if not exact:
            heapq.heappush(heap, (step_lower_bound(model, cluster, cfg, profile, engine=engine), key, True, cfg))
            continue
        if progress is not None and taken % 64 == 0:
            progress(taken, total)
        taken += 1
        mesh = mesh_key(cfg)
        if mesh in best_by_mesh and lb >= best_by_mesh[mesh][0]:
            considered.append(Considered(cfg, lb, "mesh_pruned", bound_to_beat_s=best_by_mesh[mesh][0]))
            continue
        if time_limit_s is not None and clock() - start > time_limit_s:
            timed_out = True
            heapq.heappush(heap, (lb, key, exact, cfg))
            considered += rest("timed_out")
            break
        evaluated += 1
        if not states_fit(model, cluster, cfg, engine):
            first_unfit = first_unfit or cfg
            considered.append(Considered(cfg, lb, "states_do_not_fit"))
            continue
        split = best_layer_split(model, cluster, cfg, profile, engine=engine)
        if split is None:
            first_unfit = first_unfit or cfg
            considered.append(Considered(cfg, lb, "no_split_fits"))
            continue
        cand = (split.step_time_s, key, with_changes(cfg, layer_split=split.layer_split))
        considered.append(Considered(cand[2], lb, "fits", step_time_s=split.step_time_s))
        if mesh not in best_by_mesh or (cand[0], cand[1]) < (best_by_mesh[mesh][0], best_by_mesh[mesh][1]):
            best_by_mesh[mesh] = cand
    if progress is not None:
        progress(total, total)
    ranked = sorted(best_by_mesh.values(), key=lambda t: (t[0], t[1]))[:keep]
    best = tuple(Evaluated(cfg, predict(model, cluster, cfg, profile, engine=engine)) for _, _, cfg in ranked)
    unfit = (Evaluated(first_unfit, predict(model, cluster, first_unfit, profile, engine=engine))
             if first_unfit else None)
    return SearchOutcome(best=best, fastest_unfit=unfit, candidates=total, evaluated=evaluated, timed_out=timed_out,
                         considered=tuple(considered))
