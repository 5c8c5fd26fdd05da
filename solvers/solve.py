"""`solve`: the Alpa-style planner end to end (outer search -> stage DP -> intra-op ILP -> Plan).

Pure and deterministic: the same inputs give a byte-identical plan (everything is sorted, ties are
broken on a canonical configuration key, CP-SAT runs one worker with a fixed seed). Only a time limit
that is hit makes the result depend on the clock, and then the plan and `stats` say so.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from planner.core.cluster import Cluster, check_gpu_count
from planner.core.errors import DistplanError, require
from planner.core.job import MAX_GLOBAL_BATCH, MAX_SEQ_LEN, ParallelConfig, validate_config
from planner.core.model import ModelSpec
from planner.core.plan import Plan, make_plan
from planner.core.prediction import Prediction
from planner.cost.predict import predict
from planner.core.profile import Profile
from planner.core.cluster import gpu_family
from planner.cost.engines import engine_model, forced_settings
from planner.cost.memory import states_fit
from solvers.explain import (alternative_entry, leanest_message, no_configuration_reason, rationale, unchecked_lines,
                             why_lost_ranked)
from solvers.inter_op import best_layer_split
from solvers.milp import BACKENDS
from solvers.advice import NEAR_SCAN, SearchSettings, batch_advice, has_configuration, usable_gpu_counts
from solvers.candidates import candidate_rows
from solvers.search import NO_CONSTRAINTS, Constraints, run_search, search_space
from solvers.sharding import KindSharding, shard_layers, sharding_dict, sharding_rationale

MAX_GPUS_TRIED = 2**20  # the "fewest GPUs that would fit" search stops here
MAX_TOP_K = 100  # runners-up kept: the branch and bound keeps top_k + 1 meshes, so a larger k prunes little


@dataclass(frozen=True)
class Alternative:
    config: ParallelConfig
    prediction: Prediction
    why_lost: str


@dataclass(frozen=True)
class SolveResult:
    plan: Plan  # the chosen plan (rationale, alternatives and ILP sharding inside), ready for save_plan
    prediction: Prediction  # predict() of plan.parallel
    alternatives: tuple[Alternative, ...]  # the best plan of each of the next top_k meshes (+ a faster one that does not fit)
    sharding: tuple[KindSharding, ...]  # the intra-op ILP's solution per layer kind
    stats: dict  # candidates, evaluated_with_stage_dp, pruned_by_bound, timed_out, search_seconds, ilp_seconds, seconds
    warnings: tuple[str, ...] = ()  # what the user should know beyond the plan (fewer GPUs used, a batch too small)
    candidates: tuple[dict, ...] = ()  # with candidates=True: every configuration considered (solvers.candidates)


def check_inputs(model: ModelSpec, cluster: Cluster, gpus: int, global_batch: int, seq_len: int, top_k: int,
                 time_limit_s: float | None, ilp_backend: str, profile: Profile | None) -> None:
    """Everything `estimate` rejects about these inputs, plus the solver's own options."""
    check_gpu_count(cluster, gpus)
    require(isinstance(global_batch, int) and 1 <= global_batch <= MAX_GLOBAL_BATCH,
            f"--global-batch must be a positive integer of at most {MAX_GLOBAL_BATCH}, got {global_batch}")
    require(isinstance(seq_len, int) and 1 <= seq_len <= MAX_SEQ_LEN,
            f"--seq-len must be a positive integer of at most {MAX_SEQ_LEN}, got {seq_len}")
    if model.is_vit:
        require(seq_len == model.seq_len, f"{model.name} is a ViT: its sequence is {model.seq_len} patches, got --seq-len {seq_len}")
    validate_config(model, ParallelConfig(global_batch_size=global_batch, seq_len=seq_len))  # sequence vs positions
    require(model.is_vit or seq_len <= model.max_seq_len,
            f"--seq-len {seq_len} exceeds the {model.max_seq_len}-token context of {model.name} (the solver traces "
            "its layers at the training sequence length)")
    require(isinstance(top_k, int) and 0 <= top_k <= MAX_TOP_K, f"--top-k must be >= 0 and at most {MAX_TOP_K}, got {top_k}")
    require(time_limit_s is None or (math.isfinite(time_limit_s) and time_limit_s > 0),
            f"--time-limit must be positive seconds (a finite number), got {time_limit_s}")
    require(ilp_backend in BACKENDS, f"--ilp-backend '{ilp_backend}' is unknown; valid: {', '.join(BACKENDS)}")
    if profile is not None and gpu_family(profile.gpu_name) != gpu_family(cluster.gpu.name):
        raise DistplanError(f"profile was measured on '{profile.gpu_name}' but cluster '{cluster.name}' has "
                            f"'{cluster.gpu.name}': profile the cluster's GPUs or pass a cluster of the profiled GPU")


def _lean_configs(model: ModelSpec, cluster: Cluster, gpus: int, global_batch: int, seq_len: int, flash: bool,
                  overlap: bool, constraints: Constraints = NO_CONSTRAINTS) -> list[ParallelConfig]:
    """Per mesh, its most memory-frugal settings the constraints admit: ZeRO-3 + offload, full recompute,
    micro-batch 1, SP, most ep (the frugal end of each pinned axis where the user pinned one)."""
    c = constraints
    frugal = (min(c.micro_batch) if c.micro_batch else 1,
              next(r for r in ("full", "selective", "none") if c.recompute is None or r in c.recompute),
              max(c.zero) if c.zero else 3, c.offload_optimizer is None or True in c.offload_optimizer)
    best: dict[tuple, ParallelConfig] = {}
    for cfg in search_space(model, cluster, gpus, global_batch, seq_len, flash_attention=flash,
                            overlap_grad_reduce=overlap, wide_cp=True, constraints=c):
        if (cfg.micro_batch_size, cfg.recompute, cfg.zero_stage, cfg.offload_optimizer) != frugal or cfg.vpp != 1:
            continue
        if cfg.tp > 1 and not cfg.sequence_parallel and (c.sequence_parallel is None or True in c.sequence_parallel):
            continue
        mesh = (cfg.dp, cfg.tp, cfg.pp, cfg.cp)
        if mesh not in best or cfg.ep > best[mesh].ep:
            best[mesh] = cfg
    return [best[k] for k in sorted(best)]


def _fits_somehow(model, cluster, gpus, global_batch, seq_len, profile, flash, overlap,
                  constraints: Constraints = NO_CONSTRAINTS) -> bool:
    return any(states_fit(model, cluster, c) and best_layer_split(model, cluster, c, profile) is not None
               for c in _lean_configs(model, cluster, gpus, global_batch, seq_len, flash, overlap, constraints))


def no_fit_error(model: ModelSpec, cluster: Cluster, gpus: int, global_batch: int, seq_len: int,
                 profile: Profile | None, flash: bool, overlap: bool,
                 constraints: Constraints = NO_CONSTRAINTS) -> DistplanError:
    """Why nothing fits on `gpus` GPUs, and the fewest GPUs that would fit (powers of two, then multiples
    of the node size in powers of two)."""
    leans = _lean_configs(model, cluster, gpus, global_batch, seq_len, flash, overlap, constraints)
    lean = None
    if leans:
        preds = [(predict(model, cluster, c, profile), c) for c in leans]
        pred, cfg = min(preds, key=lambda pc: (pc[0].peak_memory_gib + (pc[0].host_memory_gib if pc[0].host_is_device
                                                                         else 0.0), leans.index(pc[1])))
        lean = (cfg, pred)
    gpn = cluster.gpus_per_node
    limit = cluster.max_nodes * gpn if cluster.max_nodes else MAX_GPUS_TRIED
    sizes = sorted({2**k for k in range(0, 21) if 2**k < gpn} | {gpn * 2**k for k in range(0, 21)})
    fewest = next((n for n in sizes if gpus < n <= limit and
                   _fits_somehow(model, cluster, n, global_batch, seq_len, profile, flash, overlap, constraints)), None)
    message = leanest_message(model, cluster, gpus, lean, fewest, limit)
    return DistplanError(message + (f" (under {constraints.describe()})" if constraints.given() else ""))


def solve(model: ModelSpec, cluster: Cluster, gpus: int, profile: Profile | None = None, *,
          global_batch: int | None = None, seq_len: int | None = None, top_k: int = 3,
          time_limit_s: float | None = None, ilp_backend: str = "ortools", flash_attention: bool = True,
          overlap_grad_reduce: bool = True, progress: Callable[[int, int], None] | None = None,
          command: str | None = None, clock: Callable[[], float] = time.monotonic, engine: str = "any",
          transformer_engine: bool = False, constraints: Constraints = NO_CONSTRAINTS, candidates: bool = False,
          advise: bool = True) -> SolveResult:
    """The fastest plan of `model` on `gpus` GPUs of `cluster` that fits in memory.

    global_batch / seq_len default to the model's. `top_k` runners-up (best of other meshes) are kept
    with why each lost. `time_limit_s` bounds the search: the best plan found so far is returned and the
    plan says so; DistplanError when nothing was found in time. `progress(done, total)` is called as
    candidates are evaluated. flash_attention / overlap_grad_reduce are fixed settings, not searched.
    `engine` keeps only plans that `distplan run --engine` can execute (planner/cost/engines.py); "any" keeps all.
    The engine's forced settings override the arguments (planner.cost.engines.forced_settings: megatron without
    `transformer_engine` plans unfused attention, flash_attention=False). `constraints` pin the values each axis
    may take (solvers.search.Constraints). `candidates`: also return every configuration considered
    (solvers.candidates). `advise`: where no configuration uses exactly `gpus` GPUs, plan on the nearest usable
    count below and say so; where the batch is too small for the GPUs, say which batch would use them
    (solvers.advice; the plan's `warnings`).
    """
    start = clock()
    global_batch = model.default_global_batch if global_batch is None else global_batch
    seq_len = model.seq_len if seq_len is None else seq_len
    check_inputs(model, cluster, gpus, global_batch, seq_len, top_k, time_limit_s, ilp_backend, profile)
    engine_model(engine)  # an unknown engine is refused, naming the valid ones
    flash_attention = bool(forced_settings(engine, transformer_engine).get("flash_attention", flash_attention))
    settings = SearchSettings(model, cluster, profile, seq_len, flash_attention, overlap_grad_reduce, engine, constraints)
    warnings: list[str] = []
    gpus_asked = gpus
    if not has_configuration(settings, gpus, global_batch):
        _check_constraints(settings, gpus, global_batch)
        below, above = usable_gpu_counts(settings, gpus, global_batch)
        near = ", ".join(str(n) for n in (below, above) if n is not None) or f"none within {NEAR_SCAN} counts"
        why = no_configuration_reason(model, cluster) + (f", under {constraints.describe()}" if constraints.given() else "")
        if below is None or not advise:
            raise DistplanError(f"model {model.name} has no valid configuration on {gpus} GPUs ({why}); GPU counts near "
                                f"{gpus} with one: {near}")
        warnings.append(f"no configuration uses all {gpus} GPUs ({why}): this plan uses {below} of them; GPU counts "
                        f"near {gpus} with a valid configuration: {near}")
        gpus = below
    # ranked by the pessimistic estimate (planner/cost/mechanisms.py): no plan wins on a mechanism nobody checked
    outcome = run_search(model, cluster.pessimistic(), gpus, global_batch, seq_len, profile, top_k=top_k,
                         time_limit_s=time_limit_s,
                         flash_attention=flash_attention, overlap_grad_reduce=overlap_grad_reduce, progress=progress,
                         clock=clock, engine=engine, constraints=constraints)
    stats = dict(outcome.stats, time_limit_s=time_limit_s)
    if not outcome.best:
        if outcome.timed_out:
            raise DistplanError(f"--time-limit {time_limit_s:g} s ran out before any plan was found "
                                f"({outcome.evaluated} of {outcome.candidates} candidates evaluated); allow more time")
        raise no_fit_error(model, cluster, gpus, global_batch, seq_len, profile, flash_attention, overlap_grad_reduce,
                           constraints)

    best = outcome.best[0]
    cfg, ranked = best.config, best.prediction
    validate_config(model, cfg, gpus)
    pred = predict(model, cluster, cfg, profile, engine=engine)  # the expected estimate, its pessimistic one inside

    def alternative(e) -> Alternative:
        expected = predict(model, cluster, e.config, profile, engine=engine)
        return Alternative(e.config, expected, why_lost_ranked(ranked, e.prediction, pred, expected))

    alternatives = [alternative(e) for e in outcome.best[1:top_k + 1]]
    unfit = outcome.fastest_unfit
    if unfit is not None and unfit.prediction.step_time_s < ranked.step_time_s:
        alternatives.append(alternative(unfit))

    ilp_start = clock()
    remaining = None if time_limit_s is None else max(1.0, time_limit_s - (ilp_start - start))
    shardings = shard_layers(model, cluster, cfg, pred, profile, ilp_backend, remaining)
    stats["ilp_seconds"] = clock() - ilp_start
    runner_up = (alternatives[0].config, alternatives[0].prediction) if alternatives and alternatives[0].prediction.fits else None
    if advise:
        advice = batch_advice(settings, gpus, global_batch, pred)
        warnings += [advice] if advice else []
    lines = rationale(model, cluster, gpus, cfg, pred, runner_up, stats, sharding_rationale(shardings, cfg))
    lines = [f"warning: {w}" for w in warnings] + lines + unchecked_lines(model, cluster, cfg, pred, alternatives, engine)
    if constraints.given():
        lines.append(f"the search was limited to {constraints.describe()}")
    provenance = {"command": command or (f"distplan solve --model {model.name} --gpus {gpus_asked} --cluster {cluster.name} "
                                         f"--global-batch {global_batch} --seq-len {seq_len} --ilp-backend {ilp_backend}"),
                  **({"gpus_requested": gpus_asked} if gpus_asked != gpus else {}),
                  "solver": {"ilp_backend": ilp_backend, "candidates": outcome.candidates,
                             "evaluated_with_stage_dp": outcome.evaluated, "timed_out": outcome.timed_out,
                             "flash_attention": flash_attention, "overlap_grad_reduce": overlap_grad_reduce,
                             **({"constraints": constraints.describe()} if constraints.given() else {})}}
    plan = make_plan(model, cluster, gpus, cfg, pred, rationale=lines,
                     alternatives=[alternative_entry(a.config, a.prediction, a.why_lost) for a in alternatives],
                     sharding=sharding_dict(shardings), provenance=provenance)
    rows = candidate_rows(model, cluster, profile, outcome, cfg, pred, engine) if candidates else ()
    stats["seconds"] = clock() - start
    return SolveResult(plan=plan, prediction=pred, alternatives=tuple(alternatives), sharding=tuple(shardings), stats=stats,
                       warnings=tuple(warnings), candidates=tuple(rows))


def _check_constraints(s: SearchSettings, gpus: int, global_batch: int) -> None:
    """DistplanError when the user's constraints exclude every configuration the search has on `gpus` GPUs, naming
    the values each pinned axis could take there."""
    c = s.constraints
    if not c.given():
        return
    free = search_space(s.model, s.cluster, gpus, global_batch, s.seq_len, flash_attention=s.flash_attention,
                        overlap_grad_reduce=s.overlap_grad_reduce, wide_cp=True, engine=s.engine)
    if not free:
        return
    field_of = {"dp": "dp", "tp": "tp", "pp": "pp", "cp": "cp", "ep": "ep", "vpp": "vpp", "micro_batch": "micro_batch_size",
                "max_micro_batch": "micro_batch_size", "zero": "zero_stage", "offload_optimizer": "offload_optimizer",
                "recompute": "recompute", "schedule": "schedule", "sequence_parallel": "sequence_parallel"}

    def values(name: str) -> str:
        got = sorted({getattr(cfg, field_of[name]) for cfg in free}, key=str)
        return ",".join(("yes" if v else "no") if isinstance(v, bool) else str(v) for v in got)

    options = "; ".join(f"--{n.replace('_', '-')} {values(n)}" for n in c.given())
    raise DistplanError(f"no configuration of {s.model.name} on {gpus} GPUs satisfies {c.describe()}; the values the "
                        f"search has there: {options}")
