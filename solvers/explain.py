"""Why the solver chose its plan: rationale lines, why each alternative lost, why nothing fits.

Pure functions producing plain text and dicts for the plan file; every number comes from
`planner.cost.predict` / `planner.cost.memory` of the configurations involved.
"""

from __future__ import annotations

from dataclasses import replace

from planner.core.cluster import Cluster
from planner.core.prediction import GIB
from planner.cost.memory import fits, stage_memory
from planner.cost import mechanisms
from planner.core.model import ModelSpec
from planner.core.job import ParallelConfig
from planner.core.prediction import Prediction

TERM_NAMES = {"compute_fwd": "forward compute", "compute_bwd": "backward compute", "recompute": "recomputation",
              "tp_comm": "tensor-parallel communication", "cp_ep_comm": "context/expert-parallel communication",
              "pp_p2p": "pipeline send/receive", "zero_comm": "ZeRO parameter/gradient traffic",
              "pipeline_bubble": "pipeline bubble", "dp_grad_sync": "gradient sync", "optimizer": "optimizer step"}


def describe(cfg: ParallelConfig) -> str:
    """One-line summary of a configuration."""
    parts = [f"dp={cfg.dp}", f"tp={cfg.tp}", f"pp={cfg.pp}"]
    parts += [f"cp={cfg.cp}"] if cfg.cp > 1 else []
    parts += [f"ep={cfg.ep}"] if cfg.ep > 1 else []
    sched = f"interleaved v={cfg.vpp}" if cfg.schedule == "interleaved" else cfg.schedule
    parts += [f"mb={cfg.micro_batch_size}x{cfg.num_microbatches}", sched if cfg.pp > 1 else "", f"ZeRO-{cfg.zero_stage}"
              + ("+offload" if cfg.offload_optimizer else ""), f"recompute={cfg.recompute}"]
    parts += ["sp"] if cfg.sequence_parallel else []
    parts += [f"split={','.join(map(str, cfg.layer_split))}"] if cfg.layer_split else []
    return " ".join(p for p in parts if p)


def _rounded(x: float) -> float:
    return float(f"{x:.6g}")


def why_lost(best: Prediction, alt: Prediction) -> str:
    """'slower by X%: <largest differing breakdown term> +Y s', or why it does not fit."""
    pct = 100 * (alt.step_time_s / best.step_time_s - 1)
    if not alt.fits:
        faster = f"; it would be {-pct:.1f}% faster" if pct < 0 else f"; it would also be {pct:.1f}% slower"
        if not alt.host_fits:
            return f"does not fit: {alt.misfit()}{faster}"
        return (f"does not fit: needs {alt.peak_memory_gib:.1f} GiB per GPU (+{100 * alt.allocator_slack:.0f}% allocator slack) "
                f"of {alt.capacity_gib:.1f} GiB usable{faster}")
    a, b = dict(alt.breakdown), dict(best.breakdown)
    term = max(sorted(a), key=lambda k: a[k] - b[k])
    if a[term] - b[term] <= 0:
        return f"slower by {pct:.2f}% (equal within rounding)" if pct >= 0 else "faster but outranked"
    return f"slower by {pct:.1f}%: {TERM_NAMES[term]} +{a[term] - b[term]:.3f} s per step"


def why_lost_ranked(best: Prediction, alt: Prediction, best_expected: Prediction, alt_expected: Prediction) -> str:
    """why_lost on the pessimistic estimates the search ranked by (`best`, `alt`), and where the expected estimates
    (`*_expected`) would have preferred the alternative, that it relies on mechanisms nobody has checked."""
    why = why_lost(best, alt)
    if alt_expected.fits and alt_expected.unchecked and alt_expected.step_time_s < best_expected.step_time_s:
        pct = 100 * (1 - alt_expected.step_time_s / best_expected.step_time_s)
        why += (f"; on the expected estimate it would be {pct:.1f}% faster, relying on unchecked "
                f"{', '.join(alt_expected.unchecked)}")
    return why


def unchecked_lines(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig, pred: Prediction,
                    alternatives, engine: str = "any") -> list[str]:
    """Rationale lines on the mechanisms nobody has checked: the plan's own (its expected and pessimistic step), and
    the runners-up the expected estimate would have preferred, with the measurement that would settle each."""
    lines = []
    if pred.unchecked:
        found = {m.name: m for m in mechanisms.unchecked(model, cluster, cfg, engine)}
        lines.append(f"this plan relies on unchecked {', '.join(pred.unchecked)}: {pred.step_time_s:.3f} s per step "
                     f"expected, {pred.pessimistic_step_time_s:.3f} s at their bounds; to settle: "
                     + "; ".join(found[n].settle for n in pred.unchecked))
    for alt in alternatives:
        p = alt.prediction
        if p.fits and p.unchecked and p.step_time_s < pred.step_time_s:
            found = {m.name: m for m in mechanisms.unchecked(model, cluster, alt.config, engine)}
            lines.append(f"ranked by the pessimistic estimate: {describe(alt.config)} would be "
                         f"{100 * (1 - p.step_time_s / pred.step_time_s):.1f}% faster on the expected one but relies on "
                         f"unchecked {', '.join(p.unchecked)} ({p.pessimistic_step_time_s:.3f} s at their bounds); to "
                         "settle: " + "; ".join(found[n].settle for n in p.unchecked))
    return lines


def alternative_entry(cfg: ParallelConfig, pred: Prediction, reason: str) -> dict:
    return {"parallel": describe(cfg), "step_time_s": _rounded(pred.step_time_s), "tokens_per_s": _rounded(pred.tokens_per_s),
            "mfu": _rounded(pred.mfu), "peak_memory_gib": _rounded(pred.peak_memory_gib), "fits": pred.fits,
            "why_lost": reason, "config": {k: v for k, v in cfg.to_dict().items() if k not in ("global_batch_size", "seq_len")}}


def _share(pred: Prediction, term: str) -> float:
    return 100 * dict(pred.breakdown)[term] / pred.step_time_s


def rationale(model: ModelSpec, cluster: Cluster, gpus: int, cfg: ParallelConfig, pred: Prediction,
              runner_up: tuple[ParallelConfig, Prediction] | None, stats: dict, ilp_lines: list[str] = ()) -> list[str]:
    """Why this plan, one reason per line; `ilp_lines` (the intra-op ILP's findings) go before the search's."""
    gpn, lines = cluster.gpus_per_node, []
    nodes = max(1, -(-gpus // gpn))
    lines.append(f"{describe(cfg)} on {gpus} x {cluster.gpu.name} ({nodes} node{'s' if nodes > 1 else ''} of {gpn}): "
                 f"{pred.step_time_s:.3f} s per step, {pred.tokens_per_s:,.0f} tokens/s, "
                 f"{pred.model_tflops_per_gpu:.0f} TFLOP/s per GPU, MFU {100 * pred.mfu:.1f}%")
    if cfg.tp > 1:
        lines.append(f"tp={cfg.tp} keeps the tensor-parallel all-reduces on NVLink inside one {gpn}-GPU node "
                     f"({_share(pred, 'tp_comm'):.1f}% of the step)")
    else:
        lines.append("tp=1: the layers fit without tensor parallelism, so no per-layer all-reduces")
    if cfg.pp == 1:
        lines.append("pp=1 avoids a pipeline bubble")
    else:
        inter = f", {cfg.vpp} interleaved chunks per rank shrink it {cfg.vpp}x" if cfg.vpp > 1 else ""
        lines.append(f"pp={cfg.pp}: every plan with fewer pipeline stages is slower or does not fit; the bubble costs "
                     f"{_share(pred, 'pipeline_bubble'):.1f}% of the step{inter}")
    if cfg.layer_split:
        lines.append(f"uneven layer split {list(cfg.layer_split)} (even: {list(replace(cfg, layer_split=()).layers_per_stage(model.num_layers))}) "
                     "balances the stage holding the embedding and the one holding the LM head against the others")
    dpg = cfg.dp * cfg.cp
    fullest = max(pred.stages, key=lambda s: s.memory.total)
    layers = fullest.layers[1] - fullest.layers[0] + 1
    if cfg.zero_stage == 0 and dpg == 1:
        lines.append("no ZeRO: with one data-parallel rank there is nothing to partition")
    elif cfg.zero_stage == 0:
        sharded = stage_memory(model, replace(cfg, zero_stage=1), fullest.rank, layers)
        lines.append(f"no ZeRO (plain data parallelism): each of the {dpg} data-parallel ranks keeps the whole optimizer "
                     f"state ({fullest.memory.optimizer / GIB:.1f} GiB on the fullest stage); it fits, and sharding it "
                     f"(ZeRO-1) would save {(fullest.memory.total - sharded.total) / GIB:.1f} GiB per GPU")
    else:
        plain = stage_memory(model, replace(cfg, zero_stage=0, offload_optimizer=False), fullest.rank, layers)
        saved = (plain.total - fullest.memory.total) / GIB
        what = {1: "optimizer states", 2: "optimizer states and gradients", 3: "optimizer states, gradients and weights"}
        cost = {1: "at no extra communication", 2: "for a reduce-scatter per micro-batch",
                3: f"for parameter all-gathers ({_share(pred, 'zero_comm'):.1f}% of the step)"}
        lines.append(f"ZeRO-{cfg.zero_stage} shards the {what[cfg.zero_stage]} over {dpg} data-parallel ranks, "
                     f"saving {saved:.1f} GiB per GPU {cost[cfg.zero_stage]}"
                     + ("; optimizer on the host (offload) to fit" if cfg.offload_optimizer else ""))
    if cfg.recompute == "none":
        lines.append(f"no activation recomputation: activations fit ({fullest.memory.activations / GIB:.1f} GiB on the fullest stage)")
    else:
        plain = stage_memory(model, replace(cfg, recompute="none"), fullest.rank, layers)
        need = plain.total / GIB * (1 + pred.allocator_slack)
        lines.append(f"{cfg.recompute} recomputation ({_share(pred, 'recompute'):.1f}% of the step): without it the fullest "
                     f"stage would need {need:.1f} GiB of {pred.capacity_gib:.1f} usable" +
                     (", which fits but a faster plan needs the memory"
                      if fits(cluster, model, replace(cfg, recompute="none"), plain.total) else ""))
    if cfg.sequence_parallel:
        lines.append("sequence parallelism shards norms and residual activations over the tp ranks (reduce-scatter/all-gather "
                     "instead of all-reduce)")
    if cfg.cp > 1:
        lines.append(f"cp={cfg.cp} splits each {cfg.seq_len}-token sequence over {cfg.cp} GPUs (ring attention), "
                     f"{_share(pred, 'cp_ep_comm'):.1f}% of the step exposed")
    if cfg.ep > 1:
        lines.append(f"ep={cfg.ep} spreads the {model.num_experts} experts over {cfg.ep} GPUs (all-to-all dispatch)")
    lines.append(f"micro-batch {cfg.micro_batch_size} x {cfg.num_microbatches} micro-batches per step "
                 f"(global batch {cfg.global_batch_size} = {cfg.micro_batch_size} x {cfg.num_microbatches} x dp {cfg.dp})")
    if runner_up is not None:
        alt_cfg, alt_pred = runner_up
        lines.append(f"runner-up {describe(alt_cfg)}: {why_lost(pred, alt_pred)}")
    lines += list(ilp_lines)
    lines.append(f"searched {stats['candidates']} configurations: {stats['evaluated_with_stage_dp']} evaluated with the "
                 f"stage DP, {stats['pruned_by_bound']} pruned by lower bounds")
    if stats.get("timed_out"):
        lines.append(f"the search stopped at the {stats['time_limit_s']:g} s time limit: this is the best plan found so far, "
                     "not necessarily the optimum")
    return lines


def no_configuration_reason(model: ModelSpec, cluster: Cluster) -> str:
    """The rules a GPU count must meet for the search to have a configuration on it."""
    return (f"tp must divide the {model.num_heads} heads and stay within a {cluster.gpus_per_node}-GPU node, pp at most "
            f"{model.num_layers} layers, dp must divide the global batch")


def leanest_message(model: ModelSpec, cluster: Cluster, gpus: int, lean: tuple[ParallelConfig, Prediction] | None,
                    fewest: int | None, limit: int) -> str:
    """The DistplanError text when no plan of `gpus` GPUs fits."""
    head = f"model {model.name} fits on no plan of {gpus} GPUs"
    tail = f"the fewest GPUs that would fit is {fewest}" if fewest else f"no cluster of up to {limit} GPUs fits it either"
    if lean is None:
        why = f"no parallel configuration is valid ({no_configuration_reason(model, cluster)})"
    elif lean[1].over_capacity_gib == 0 and not lean[1].host_fits:  # the GPUs hold it, the host not its offload
        cfg, pred = lean
        why = f"the leanest plan ({describe(cfg)}) fits its GPUs at {pred.peak_memory_gib:.1f} GiB, but its {pred.misfit()}"
    else:
        cfg, pred = lean
        fullest = max(pred.stages, key=lambda s: s.memory.total)
        parts = sorted(fullest.memory.as_gib().items(), key=lambda kv: -kv[1])
        terms = ", ".join(f"{k} {v:.1f}" for k, v in parts if v >= 0.05)
        shared = (f" and {pred.host_memory_gib:.1f} GiB of offloaded optimizer states in the same memory (the device "
                  f"is this host's CPU)" if pred.host_is_device and pred.host_memory_gib > 0 else "")
        why = (f"even the leanest plan ({describe(cfg)}) needs {pred.peak_memory_gib:.1f} GiB on its fullest GPU "
               f"({terms}) + {100 * pred.allocator_slack:.0f}% allocator slack{shared}, above the {pred.capacity_gib:.1f} "
               f"GiB usable on {cluster.gpu.name}")
    return f"{head}: {why}; {tail}"
