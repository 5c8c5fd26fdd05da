"""The pipeline: a step's time from its ranks' times (`step_time`), and the schedule as timed events per rank.

Pure functions. `step_time` is the one composition of per-rank times into a step, used by `predict` and by the
stage DP (solvers/inter_op.py): the closed form m * t_max + (sum_i t_i - t_max) / v (Narayanan et al. SC'21
sec. 2.2; Alpa eq. 2 for v = 1), at least the simulated interleaved schedule where one is given, plus the
slowest rank's tail (its exposed gradient sync and optimizer step).

The schedule (GPipe, 1F1B and interleaved 1F1B), also used to draw the timeline of a plan (planner/pictures.py,
planner/cost/timeline.py), in two parts:

1. Operation order per rank, as the frameworks run it:
   - GPipe (Huang et al. 2019; torch.distributed.pipelining ScheduleGPipe): all m forwards, then
     all m backwards, micro-batches in order.
   - 1F1B (Narayanan et al. SC'21 sec. 2.2.1; Megatron-LM forward_backward_pipelining_without_
     interleaving): rank i runs min(p - i - 1, m) warm-up forwards, then alternates one forward and
     one backward, then drains the remaining backwards.
   - Interleaved 1F1B with v model chunks per rank (SC'21 sec. 2.2.2; Megatron-Core
     forward_backward_pipelining_with_interleaving): m*v chunk-micro-batches; rank i warms up with
     min(2*(p - i - 1) + (v - 1)*p, m*v) forwards; the k-th forward runs chunk (k mod p*v) // p on
     micro-batch (k // (p*v))*p + k mod p, the k-th backward the mirrored chunk v - 1 - that.
     (The same counts as planner/cost/memory.py's in-flight activations.)
2. A dependency simulation: chunk c of rank i is virtual stage s = c*p + i; the forward of
   micro-batch j on stage s waits for its forward on s - 1, the backward waits for the backward on
   s + 1 (the last virtual stage's for its own forward); each rank runs its operations in order,
   starting each as soon as the rank is free and its input has arrived.

Durations come from the cost model's per-rank terms (`stage_op_times`), so for even stages the simulated pipeline
length equals the closed form m*t + (p - 1)*t/v (tests/test_schedule.py checks it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Sequence

from planner.core.cluster import Cluster
from planner.core.errors import require
from planner.core.job import SCHEDULES, ParallelConfig
from planner.core.model import ModelSpec
from planner.core.profile import Profile
from planner.cost.layer import embedding_time, head_time

PHASES = ("forward", "backward", "recompute", "p2p", "grad_sync", "optimizer", "bubble")


@dataclass(frozen=True)
class StageOpTimes:
    """Seconds of one model chunk's work for one micro-batch on one GPU of a pipeline rank."""

    rank: int
    forward_s: float  # compute and the intra-layer collectives (TP, CP ring, expert all-to-all) of the forward
    backward_s: float  # the same for the backward (and exposed per-micro-batch ZeRO traffic)
    recompute_s: float  # the forward re-run before the backward under activation recomputation
    p2p_s: float  # one exchange of activations or gradients with the neighbouring stage

    def per_microbatch_s(self, vpp: int) -> float:
        """The rank's time per micro-batch over all its chunks: the cost model's t_i."""
        return vpp * (self.forward_s + self.backward_s + self.recompute_s + 2 * self.p2p_s)


@dataclass(frozen=True)
class Op:
    kind: str  # "F" forward or "B" backward
    microbatch: int
    chunk: int


@dataclass(frozen=True)
class Event:
    rank: int
    phase: str  # one of PHASES
    microbatch: int  # -1 for grad_sync, optimizer and bubble
    chunk: int
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Schedule:
    kind: str
    pp: int
    vpp: int
    num_microbatches: int
    events: tuple[Event, ...]
    pipeline_s: float  # end of the last forward/backward/p2p on any rank
    step_s: float  # end of the last rank's gradient sync and optimizer step
    stretch: float = 1.0  # drawn / simulated pipeline time (fitted() fits a simulation to a plan's prediction)

    def rank_events(self, rank: int, phases: tuple[str, ...] = PHASES) -> list[Event]:
        return [e for e in self.events if e.rank == rank and e.phase in phases]

    def order(self, rank: int) -> list[Op]:
        """The forward/backward operations of `rank` in the order they ran."""
        return [Op("F" if e.phase == "forward" else "B", e.microbatch, e.chunk)
                for e in sorted(self.rank_events(rank, ("forward", "backward")), key=lambda e: e.start_s)]

    def bubble_s(self, rank: int) -> float:
        return sum(e.duration_s for e in self.rank_events(rank, ("bubble",)))

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the step, averaged over ranks (for even stages: the cost model's pipeline_bubble / step)."""
        if self.step_s <= 0:
            return 0.0
        return sum(self.bubble_s(r) for r in range(self.pp)) / (self.pp * self.step_s)


# ---- 0. the step's time -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepTime:
    """One step of a pipeline, as `predict` charges it."""

    pipeline_s: float  # forward/backward span: the closed form, or the simulated schedule where that is longer
    sync_s: float  # exposed gradient sync of the rank with the longest tail
    optimizer_s: float  # optimizer step of that rank
    step_s: float  # pipeline_s + that rank's tail


def step_time(per_rank_s: Sequence[float], tails: Sequence[tuple[float, float]], m: int, v: int,
              simulated_s: float | None = None) -> StepTime:
    """The step of ranks taking `per_rank_s` seconds per micro-batch (t_i) and `tails` (sync, optimizer) seconds
    once per step, over `m` micro-batches with `v` model chunks per rank:
        pipeline = max(m * t_max + (sum_i t_i - t_max) / v, simulated_s),  step = pipeline + max_i tail_i
    (module doc). The tail's first longest rank is reported (ties: the lowest rank)."""
    t_max = max(per_rank_s)
    pipeline = m * t_max + (sum(per_rank_s) - t_max) / v
    if simulated_s is not None:
        pipeline = max(pipeline, simulated_s)
    tail_best, sync_best, opt_best = 0.0, 0.0, 0.0
    for sync, opt in tails:
        if sync + opt > tail_best:
            tail_best, sync_best, opt_best = sync + opt, sync, opt
    return StepTime(pipeline_s=pipeline, sync_s=sync_best, optimizer_s=opt_best, step_s=pipeline + tail_best)


def interleaved_pipeline_s(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig, profile: Profile | None,
                           rank_terms: list[dict[str, float]], engine: str = "any") -> float:
    """The simulated forward/backward span of an interleaved schedule (pp > 1, v > 1) with uneven chunks (the head's,
    the embedding's), whose fixed order idles ranks in the fill, the drain and every round. Past two rounds of pp
    micro-batches each round adds the same time (the schedule repeats), so rounds 2 and 3 are simulated and the
    rest extrapolated: at most 6 * pp^2 * v simulated operations. `rank_terms` as in pipeline_time_s."""
    m, pp = cfg.num_microbatches, cfg.pp

    def span(micro: int) -> float:
        c = cfg if micro == m else replace(cfg, global_batch_size=cfg.micro_batch_size * cfg.dp * micro)
        return pipeline_time_s(model, cluster, c, profile, rank_terms, engine)

    if m <= 3 * pp:
        return span(m)
    two, three = span(2 * pp), span(3 * pp)
    return three + (m - 3 * pp) * (three - two) / pp


# ---- 1. operation order ---------------------------------------------------------------------------


def op_order(kind: str, pp: int, vpp: int, m: int, rank: int) -> list[Op]:
    """Forward/backward operations of pipeline rank `rank` in execution order (see module doc)."""
    require(kind in SCHEDULES, f"schedule '{kind}' is unknown; valid: {', '.join(SCHEDULES)}")
    require(pp >= 1 and vpp >= 1 and m >= 1, f"pp, vpp and micro-batches must be >= 1, got {pp}, {vpp}, {m}")
    require(0 <= rank < pp, f"rank {rank} is outside the pipeline of {pp} ranks")
    if kind == "gpipe":
        return ([Op("F", j, c) for j in range(m) for c in range(vpp)]
                + [Op("B", j, c) for j in range(m) for c in reversed(range(vpp))])
    if kind == "1f1b":
        require(vpp == 1, f"1f1b runs one model chunk per rank; vpp {vpp} needs 'interleaved'")
        warmup = min(pp - rank - 1, m)
        ops = [Op("F", j, 0) for j in range(warmup)]
        for j in range(m - warmup):
            ops += [Op("F", warmup + j, 0), Op("B", j, 0)]
        return ops + [Op("B", j, 0) for j in range(m - warmup, m)]
    # interleaved (Megatron-Core; torch's ScheduleInterleaved1F1B): micro-batches in rounds of g, each
    # round through every chunk; g = pp when pp divides m (Megatron), else torch's m // max(1, m // pp)
    rounds = max(1, m // pp)
    require(m % rounds == 0, f"the interleaved schedule needs micro-batches ({m}) divisible by its rounds ({rounds})")
    g = m // rounds
    total = m * vpp

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % (g * vpp)) // g
        return c if forward else vpp - 1 - c

    def microbatch_of(k: int) -> int:
        return (k // (g * vpp)) * g + k % g

    warmup = min(2 * (pp - rank - 1) + (vpp - 1) * g, total)
    ops = [Op("F", microbatch_of(k), chunk_of(k, True)) for k in range(warmup)]
    for k in range(total - warmup):
        f = k + warmup
        ops += [Op("F", microbatch_of(f), chunk_of(f, True)), Op("B", microbatch_of(k), chunk_of(k, False))]
    return ops + [Op("B", microbatch_of(k), chunk_of(k, False)) for k in range(total - warmup, total)]


# ---- 2. simulation ----------------------------------------------------------------------------------


def simulate(kind: str, pp: int, vpp: int, m: int, stages: list[StageOpTimes] | tuple[StageOpTimes, ...],
             grad_sync_s: float = 0.0, optimizer_s: float = 0.0,
             extras: dict[tuple[int, int], tuple[float, float]] | None = None) -> Schedule:
    """Run every rank's operations in order under the pipeline's data dependencies.

    `extras`: (rank, chunk) -> (forward, backward) seconds that only that chunk pays per micro-batch (the
    embedding in the first chunk, the LM head and loss in the last: end_chunk_extras)."""
    extras = extras or {}
    require(len(stages) == pp, f"need op times for {pp} pipeline ranks, got {len(stages)}")
    starts, free = _run(kind, pp, vpp, m, stages, extras)
    events: list[Event] = []
    for r in range(pp):
        st = stages[r]
        for op, t in zip(op_order(kind, pp, vpp, m, r), starts[r]):
            ef, eb = extras.get((r, op.chunk), (0.0, 0.0))
            parts = ([("forward", st.forward_s + ef)] if op.kind == "F"
                     else [("recompute", st.recompute_s), ("backward", st.backward_s + eb)])
            parts.append(("p2p", st.p2p_s))
            for phase, dur in parts:
                if dur > 0:
                    events.append(Event(r, phase, op.microbatch, op.chunk, t, t + dur))
                    t += dur
    return _with_tail(kind, pp, vpp, m, events, free, grad_sync_s, optimizer_s)


def fitted(schedule: Schedule, pipeline_s: float, grad_sync_s: float, optimizer_s: float) -> Schedule:
    """`schedule` made to last `pipeline_s` until its pipeline ends, then each rank's gradient sync and optimizer
    step: the step then equals pipeline_s + grad_sync_s + optimizer_s exactly.

    A longer `pipeline_s` keeps every operation where the simulation put it and idles each rank for the
    difference before its gradient sync, so each rank's busy time stays its own; a shorter one scales the
    pipeline's times down. `stretch` records pipeline_s / the simulated pipeline time.
    """
    require(schedule.pipeline_s > 0 and pipeline_s > 0,
            f"cannot fit a pipeline of {schedule.pipeline_s} s to {pipeline_s} s (both must be > 0)")
    k = pipeline_s / schedule.pipeline_s
    scale, pad = (1.0, pipeline_s - schedule.pipeline_s) if k >= 1 else (k, 0.0)
    events = [Event(e.rank, e.phase, e.microbatch, e.chunk, e.start_s * scale, e.end_s * scale) for e in schedule.events
              if e.phase not in ("bubble", "grad_sync", "optimizer")]
    free = [0.0] * schedule.pp
    for e in events:
        free[e.rank] = max(free[e.rank], e.end_s)
    out = _with_tail(schedule.kind, schedule.pp, schedule.vpp, schedule.num_microbatches, events,
                     [f + pad for f in free], grad_sync_s, optimizer_s)
    return replace(out, stretch=schedule.stretch * k)


def _with_tail(kind: str, pp: int, vpp: int, m: int, events: list[Event], free: list[float],
               grad_sync_s: float, optimizer_s: float) -> Schedule:
    """The Schedule of pipeline `events` (per rank in start order; `free`: each rank's end) plus, per rank, the
    gradient sync and optimizer step after its last backward and the idle gaps up to the step's end."""
    pipeline = max(free)
    per_rank: list[list[Event]] = [[] for _ in range(pp)]
    for e in events:
        per_rank[e.rank].append(e)
    step = pipeline
    for r in range(pp):  # once per step, after the rank's last backward (the cost model puts it after the pipeline)
        t = free[r]
        for phase, dur in (("grad_sync", grad_sync_s), ("optimizer", optimizer_s)):
            if dur > 0:
                per_rank[r].append(Event(r, phase, -1, 0, t, t + dur))
                t += dur
        step = max(step, t)
    out = list(events)
    for r in range(pp):  # idle gaps within the step
        t, gaps = 0.0, []
        for e in per_rank[r]:
            if e.start_s > t + 1e-12:
                gaps.append(Event(r, "bubble", -1, 0, t, e.start_s))
            t = max(t, e.end_s)
        if step > t + 1e-12:
            gaps.append(Event(r, "bubble", -1, 0, t, step))
        out.extend(gaps + [e for e in per_rank[r] if e.phase in ("grad_sync", "optimizer")])
    out.sort(key=lambda e: (e.rank, e.start_s))
    return Schedule(kind=kind, pp=pp, vpp=vpp, num_microbatches=m, events=tuple(out), pipeline_s=pipeline, step_s=step)


# ---- durations from the cost model ------------------------------------------------------------------


def end_chunk_extras(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig,
                     profile: Profile | None = None, engine: str = "any") -> dict[tuple[int, int], tuple[float, float]]:
    """(rank, chunk) -> (forward, backward) seconds per micro-batch of the embedding (rank 0, chunk 0) and of
    the final norm + LM head + loss (last rank, last chunk): where the runners put them."""
    ef, eb = embedding_time(model, cluster, cfg, profile, engine)
    hf, hb = head_time(model, cluster, cfg, profile, engine)
    out = {(0, 0): (ef, eb)}
    last = (cfg.pp - 1, cfg.vpp - 1)
    f0, b0 = out.get(last, (0.0, 0.0))
    out[last] = (f0 + hf, b0 + hb)
    return out


def pipeline_time_s(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig, profile: Profile | None,
                    rank_terms: list[dict[str, float]], engine: str = "any") -> float:
    """Forward/backward span of one step by simulation, the embedding and head on their own chunks.

    With v > 1 chunks per rank the closed form m*t + (p - 1)*t/v assumes every chunk costs t/v, but the
    head sits in one chunk: for gpt2-xl (head = 12 blocks' worth at micro-batch 16) pp2 v6 m2 on 2xH200
    the closed form said 0.419 s and the run took 0.564 s; this simulation says 0.525 s + optimizer.
    `rank_terms`: every rank's per-micro-batch terms (rank_timer(...).terms), as predict sums them."""
    extras = end_chunk_extras(model, cluster, cfg, profile, engine)
    stages = stage_op_times(cfg, rank_terms, extras=extras)
    return span_s(cfg.schedule, cfg.pp, cfg.vpp, cfg.num_microbatches, stages, extras)


def span_s(kind: str, pp: int, vpp: int, m: int, stages, extras: dict[tuple[int, int], tuple[float, float]]) -> float:
    """simulate(...).pipeline_s without building the timeline (predict calls this per candidate plan)."""
    return max(_run(kind, pp, vpp, m, stages, extras)[1])


def _run(kind: str, pp: int, vpp: int, m: int, stages, extras: dict[tuple[int, int], tuple[float, float]]
         ) -> tuple[list[list[float]], list[float]]:
    """The dependency simulation: every rank runs its operations in op_order, each as soon as the rank is
    free and its input has arrived. Returns the start time of every operation (per rank, in op order) and
    each rank's end. An operation lasts its pass (forward, or recompute + backward, plus the chunk's
    `extras`) and one p2p exchange; its output arrives when it ends."""
    orders = _indexed_orders(kind, pp, vpp, m)
    dur = []  # per rank and chunk: (forward, backward incl. recompute), each with one p2p
    for r, st in enumerate(stages):
        dur.append([(st.forward_s + extras.get((r, c), (0.0, 0.0))[0] + st.p2p_s,
                     st.recompute_s + st.backward_s + extras.get((r, c), (0.0, 0.0))[1] + st.p2p_s) for c in range(vpp)])
    done = [-1.0] * (2 * m * pp * vpp + 1)  # end time per (phase, micro-batch, virtual stage); last slot: "no input"
    done[-1] = 0.0
    free, nxt = [0.0] * pp, [0] * pp
    starts: list[list[float]] = [[] for _ in range(pp)]
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r in range(pp):
            order, i, t_free, d, begun = orders[r], nxt[r], free[r], dur[r], starts[r]
            n = len(order)
            while i < n:
                phase, c, slot, dep = order[i]
                t_dep = done[dep]
                if t_dep < 0:
                    break
                t0 = t_free if t_free > t_dep else t_dep
                begun.append(t0)
                t_free = t0 + d[c][phase]
                done[slot] = t_free
                i += 1
            if i != nxt[r]:
                remaining -= i - nxt[r]
                nxt[r], free[r], progressed = i, t_free, True
        require(progressed, f"{kind} schedule with pp={pp} vpp={vpp} m={m} deadlocked (an internal error)")
    return starts, free


@functools.lru_cache(maxsize=4096)
def _indexed_orders(kind: str, pp: int, vpp: int, m: int) -> tuple[tuple[tuple[int, int, int, int], ...], ...]:
    """Per rank, its operations as (0 forward / 1 backward, chunk, result slot, input slot) for span_s."""
    stages_n, last = pp * vpp, pp * vpp - 1

    def slot(backward: bool, j: int, s: int) -> int:
        return (int(backward) * m + j) * stages_n + s

    none = 2 * m * stages_n
    out = []
    for r in range(pp):
        ops = []
        for o in op_order(kind, pp, vpp, m, r):
            s = o.chunk * pp + r
            if o.kind == "F":
                ops.append((0, o.chunk, slot(False, o.microbatch, s), slot(False, o.microbatch, s - 1) if s > 0 else none))
            else:
                dep = slot(True, o.microbatch, s + 1) if s < last else slot(False, o.microbatch, s)
                ops.append((1, o.chunk, slot(True, o.microbatch, s), dep))
        out.append(tuple(ops))
    return tuple(out)


def stage_op_times(cfg: ParallelConfig, rank_terms: Sequence[dict[str, float]],
                   per_microbatch_s: list[float] | None = None, *,
                   extras: dict[tuple[int, int], tuple[float, float]] | None = None) -> tuple[StageOpTimes, ...]:
    """Per-chunk forward/backward/recompute/p2p seconds of every pipeline rank, as planner/cost/predict.py adds them.

    `rank_terms`: every rank's per-micro-batch terms (planner.cost.predict.rank_timer(...)(rank, layers).terms,
    what predict sums). Intra-layer collectives are folded into the pass that issues them: TP all-reduces (or SP's
    reduce-scatter + all-gather) and the CP/EP exchanges split evenly between forward, backward and,
    with full recomputation, the recomputed forward (Megatron issues the same collectives in each).
    `per_microbatch_s`, the rank times recorded in a plan, calibrates the split to the plan: what the
    split does not name (exposed per-micro-batch ZeRO-2/3 traffic, overlapped with the backward) is
    added to the backward; if the recorded time is smaller (a profile measured faster kernels), all
    parts scale down together. Embedding and head are spread over a rank's chunks, as the closed form
    does, unless `extras` (end_chunk_extras) takes them out to be charged to their own chunks.
    """
    v = cfg.vpp
    passes = 3 if cfg.recompute == "full" else 2
    out = []
    for rank, t in enumerate(rank_terms):
        coll = (t["tp_comm"] + t["cp_ep_comm"]) / passes
        own_f = sum(f for (r, _), (f, _) in (extras or {}).items() if r == rank)
        own_b = sum(b for (r, _), (_, b) in (extras or {}).items() if r == rank)
        fwd = t["compute_fwd"] - own_f + coll
        bwd = t["compute_bwd"] - own_b + coll
        rec = t["recompute"] + (coll if cfg.recompute == "full" else 0.0)
        p2p = t["pp_p2p"] / (2 * v)  # predict charges 2 * v sends per micro-batch (forward and backward, per chunk)
        if per_microbatch_s is not None:
            derived = fwd + bwd + rec + 2 * v * p2p  # the rank's time per micro-batch, less its end-chunk extras
            target = per_microbatch_s[rank] - own_f - own_b
            if target >= derived:
                bwd += target - derived
            elif derived > 0:
                k = max(target, 0.0) / derived
                fwd, bwd, rec, p2p = fwd * k, bwd * k, rec * k, p2p * k
        out.append(StageOpTimes(rank=rank, forward_s=fwd / v, backward_s=bwd / v, recompute_s=rec / v, p2p_s=p2p))
    return tuple(out)

