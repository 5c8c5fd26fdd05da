"""Plan quality on real GPUs (issue 7): distplan's plans against practitioners' baselines, on one machine.

Per case (model, sequence, global batch) on the GPUs of this node: solve with the profile measured here
(`--engine torch`), keep the top plan and its next 3 alternatives, build the four baselines a practitioner
would run (plain DDP; DeepSpeed ZeRO-2; FSDP2 full sharding; Megatron's heuristic), each at its best
micro-batch that fits under the cost model, run every plan with `planner.runner.launch.run_plan`, and report
measured vs predicted tokens/s and memory, distplan over the best baseline, and the Spearman rank
correlation of predicted vs measured order. Targets (issue 7) are checked per case by `summarize`.

    python3 benchmarks/campaign.py --cases gpt2-xl-small,llama-3-8b-small --profile-dir DIR --out OUT --budget-s 540
    python3 benchmarks/campaign.py --cases tiny --out OUT --dry-run          # plans + predictions only (CPU)
    python3 benchmarks/campaign.py --merge OUT1/rows.json OUT2/rows.json --out OUT   # one report of several calls

The pure parts (CASES, baseline_configs, spearman, summarize, write_markdown) do no I/O beyond what their
names say; main() is the only place that prints.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]  # the repository
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from planner.core.errors import DistplanError  # noqa: E402
from planner.core.job import ParallelConfig, validate_config  # noqa: E402
from planner.cost.predict import predict  # noqa: E402

# ---- targets (issue 7) ----------------------------------------------------------------------------------
STEP_TOL_ALL = 0.10  # predicted step time within 10% for every plan that ran
STEP_TOL_CHOSEN = 0.05  # ... and 5% for distplan's chosen plan
MEMORY_TOL = 0.10  # predicted peak memory within 10%
SPEARMAN_MIN = 0.9  # rank correlation of predicted vs measured order, per case
SPEEDUP_ONE_CASE = 1.10  # distplan >= 10% faster than the best baseline in at least one case

# the 4-layer GPT of the CPU campaign's case
TINY_YAML = {"version": 1, "family": "gpt", "num_layers": 4, "hidden_size": 128, "ffn_hidden_size": 512,
             "num_heads": 4, "num_kv_heads": 4, "vocab_size": 256, "max_seq_len": 64, "tie_embeddings": True,
             "default_global_batch": 8}


@dataclass(frozen=True)
class Case:
    model: str  # zoo name, or "tiny" (TINY_YAML written at run time)
    seq_len: int
    global_batch: int
    notes: str
    steps: int = 6  # measured steps / warm-up steps per run (large batches use fewer: device time)
    warmup: int = 2


# Sized for 2x H200 (141 GB): one case's 8-9 runs fit one 10-minute device call (see device_campaign.sh).
CASES: dict[str, Case] = {
    "gpt2-xl-small": Case("gpt2-xl", 1024, 32, "gpt2-xl, small global batch (32 x 1024 tokens)"),
    "gpt2-xl-large": Case("gpt2-xl", 1024, 256, "gpt2-xl, large global batch (256 x 1024 tokens)", 3, 1),
    "llama-3-8b-small": Case("llama-3-8b", 4096, 8, "llama-3-8b at 4096 tokens, small global batch"),
    "llama-3-8b-large": Case("llama-3-8b", 4096, 32, "llama-3-8b at 4096 tokens, large global batch", 2, 1),
    "llama-2-13b-small": Case("llama-2-13b", 4096, 8, "13B: plain DDP does not fit 2x141 GB (16 B/param = 208 GB)"),
    "llama-2-13b-large": Case("llama-2-13b", 4096, 32, "13B, large global batch; DDP does not fit", 2, 1),
    "tiny": Case("tiny", 32, 8, "4-layer hidden-128 GPT (CPU test of the harness)", 2, 1),
    # one GPU (issue 7's 1xH100/H200): distplan chooses micro-batch, recompute and optimizer offload where the
    # baselines take their defaults; llama-3-8b's 16 B/param (120 GiB) fits a 141 GB H200 only just, not an H100
    "gpt2-xl-1gpu": Case("gpt2-xl", 1024, 32, "gpt2-xl on one GPU (32 x 1024 tokens)", 3, 1),
    "llama-3-8b-1gpu": Case("llama-3-8b", 2048, 16, "llama-3-8b at 2048 tokens on one GPU: the model states alone "
                            "take 120 GiB", 2, 1),
    # four GPUs of one node (issue 8 at the size lent when nvidia-h200-x8 is not: nvidia-h200-x4)
    "llama-3-8b-4gpu": Case("llama-3-8b", 4096, 16, "llama-3-8b at 4096 tokens on 4 GPUs", 2, 1),
    "llama-2-13b-4gpu": Case("llama-2-13b", 4096, 16, "13B at 4096 tokens on 4 GPUs", 2, 1),
    # one 8-GPU node (issue 8: nvidia-h200-x8; run with --gpus 8, one case per 10-minute call)
    "llama-3-8b-8gpu": Case("llama-3-8b", 4096, 32, "llama-3-8b at 4096 tokens on 8 GPUs", 2, 1),
    "llama-2-13b-8gpu": Case("llama-2-13b", 4096, 32, "13B at 4096 tokens on 8 GPUs", 2, 1),
    "llama-2-70b-40l-8gpu": Case("llama-2-70b-40l", 4096, 16, "llama-2-70b with 40 of 80 layers (34.8B; stated): "
                                 "556 GB of model states, so DDP and ZeRO-1/2 do not fit 8 x 141 GB", 2, 1),
}


@dataclass(frozen=True)
class PlanSpec:
    name: str
    role: str  # distplan | alternative | baseline
    engine: str  # torch | deepspeed | megatron
    plan_path: str
    predicted_step_time_s: float
    predicted_tokens_per_s: float
    predicted_memory_gib: float
    config: str


# ---- baselines -----------------------------------------------------------------------------------------

def _powers_of_two_dividing(n: int) -> list[int]:
    return [2**k for k in range(0, 31) if 2**k <= n and n % 2**k == 0]


def best_micro_batch(model, cluster, cfg: ParallelConfig, profile, engine: str = "any") -> tuple[ParallelConfig, object] | None:
    """`cfg` at the micro-batch (a power of two dividing global_batch/dp) with the least predicted step time
    among those that fit (ties: the larger), as `engine` runs it; None when none fits."""
    best = None
    for mb in _powers_of_two_dividing(cfg.global_batch_size // cfg.dp):
        c = replace(cfg, micro_batch_size=mb)
        try:
            validate_config(model, c, c.gpus)
        except DistplanError:
            continue
        pred = predict(model, cluster, c, profile, engine=engine)
        if pred.fits and (best is None or pred.step_time_s <= best[1].step_time_s):
            best = (c, pred)
    return best


def megatron_heuristic(model, cluster, gpus: int, global_batch: int, seq_len: int, profile,
                       engine: str = "megatron", transformer_engine: bool = False):
    """Megatron's rule of thumb: the smallest tp (dividing the heads and the GPUs per node) that fits, pipeline
    only if still needed, the rest data parallel; distributed optimizer (ZeRO-1); no recompute (Megatron's
    default), selective only when nothing fits without. Without Transformer Engine (`engine` megatron, local
    layer spec) attention is unfused and there is no sequence parallelism. Returns (cfg, pred) or None."""
    flash = transformer_engine or engine != "megatron"
    node = min(gpus, cluster.gpus_per_node)
    tps = [t for t in range(1, node + 1) if node % t == 0 and model.num_heads % t == 0 and gpus % t == 0]
    top = tps[-1]  # tp fills the node before any pipeline stage is added
    layouts = [(tp, 1) for tp in tps] + [(top, p) for p in range(2, gpus // top + 1)
                                         if (gpus // top) % p == 0 and p <= model.num_layers]
    for recompute in ("none", "selective"):
        for tp, pp in layouts:
            cfg = ParallelConfig(dp=gpus // (tp * pp), tp=tp, pp=pp, zero_stage=1, global_batch_size=global_batch,
                                 seq_len=seq_len, recompute=recompute, flash_attention=flash,
                                 sequence_parallel=tp > 1 and flash)
            if global_batch % cfg.dp:
                continue
            found = best_micro_batch(model, cluster, cfg, profile, engine)
            if found is not None:
                return found
    return None


BASELINES = {  # name -> (engine, zero stage) for the data-parallel baselines
    "ddp": ("torch", 0),
    "deepspeed-zero2": ("deepspeed", 2),
    "fsdp2-full": ("torch", 3),
}


def baseline_configs(model, cluster, gpus: int, global_batch: int, seq_len: int, profile,
                     megatron_engine: str = "megatron", transformer_engine: bool = False) -> dict:
    """name -> (engine, cfg, pred) for the four practitioner baselines, or name -> str (why it cannot run).

    The data-parallel baselines run without recompute, and with full activation checkpointing (what a
    practitioner switches on after an out-of-memory, torchtitan's and DeepSpeed's usual remedy) only where
    nothing fits without."""
    out: dict = {}
    for name, (engine, zero) in BASELINES.items():
        cfg = ParallelConfig(dp=gpus, zero_stage=zero, global_batch_size=global_batch, seq_len=seq_len)
        found = None
        for recompute in ("none", "full"):
            if found is None and global_batch % gpus == 0:
                found = best_micro_batch(model, cluster, replace(cfg, recompute=recompute), profile, engine)
        if found is None:
            lean = predict(model, cluster, replace(cfg, micro_batch_size=1, recompute="full"), profile, engine=engine)
            out[name] = (f"does not fit at micro-batch 1, even with full recompute: {lean.peak_memory_gib:.1f} GiB predicted, "
                         f"{lean.over_capacity_gib:.1f} GiB over the {lean.capacity_gib:.1f} GiB usable with allocator slack")
        else:
            out[name] = (engine, *found)
    found = megatron_heuristic(model, cluster, gpus, global_batch, seq_len, profile, megatron_engine, transformer_engine)
    out["megatron-heuristic"] = (megatron_engine, *found) if found else "no tp/pp/dp layout fits"
    return out


# ---- plans of a case ------------------------------------------------------------------------------------

def _model_arg(case: Case, out_dir: Path) -> str:
    if case.model != "tiny":
        return case.model
    path = out_dir / "tiny.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(TINY_YAML, sort_keys=False))
    return str(path)


def _summary(cfg: ParallelConfig) -> str:
    return (f"dp{cfg.dp} tp{cfg.tp} pp{cfg.pp}{f' v{cfg.vpp}' if cfg.vpp > 1 else ''} zero{cfg.zero_stage} "
            f"mb{cfg.micro_batch_size}x{cfg.num_microbatches} {cfg.schedule} rc={cfg.recompute}"
            f"{' sp' if cfg.sequence_parallel else ''}{'' if cfg.flash_attention else ' unfused-attn'}"
            f"{' offload' if cfg.offload_optimizer else ''}")


def _pipeline_ok(engine: str, cfg: ParallelConfig) -> bool:
    """torch.distributed.pipelining's micro-batch rule (planner.cost.engines.torch_pipeline_ok) for torch plans."""
    from planner.cost.engines import torch_pipeline_ok

    return engine != "torch" or torch_pipeline_ok(cfg)


def same_mesh_alternatives(model, cluster, chosen: ParallelConfig, profile, engine: str, k: int,
                           taken: list[ParallelConfig]) -> list[tuple[ParallelConfig, object, str]]:
    """The `k` next plans on the chosen plan's mesh (dp, tp, pp, cp, ep), for a machine with fewer meshes than
    alternatives (one GPU has one; solve's alternatives are one per mesh). As solve takes the best plan of each
    mesh, this takes the best of each memory strategy (recompute, optimizer offload) other than the chosen plan's,
    then the best of each further micro-batch size (plans with one data-parallel rank differ little by ZeRO stage,
    and the next micro-batch of one strategy is often within noise of the last). Only plans that fit, none of the
    chosen one's or `taken`'s (micro-batch, recompute, offload). (config, prediction, why it lost), in that order."""
    from solvers.explain import why_lost
    from solvers.search import search_space

    def key(c: ParallelConfig) -> tuple:
        return (c.micro_batch_size, c.recompute, c.offload_optimizer)

    best = predict(model, cluster, chosen, profile, engine=engine)
    mesh = (chosen.dp, chosen.tp, chosen.pp, chosen.cp, chosen.ep)
    seen = {key(chosen), *map(key, taken)}
    found: dict[tuple, tuple] = {}  # (micro-batch, recompute, offload) -> its fastest plan
    for cfg in search_space(model, cluster, chosen.gpus, chosen.global_batch_size, chosen.seq_len,
                            flash_attention=chosen.flash_attention, engine=engine):
        if (cfg.dp, cfg.tp, cfg.pp, cfg.cp, cfg.ep) != mesh or key(cfg) in seen:
            continue
        pred = predict(model, cluster, cfg, profile, engine=engine)
        if pred.fits and (key(cfg) not in found or pred.step_time_s < found[key(cfg)][1].step_time_s):
            found[key(cfg)] = (cfg, pred)
    ranked = sorted(found.values(), key=lambda t: t[1].step_time_s)
    strategies = {(c.recompute, c.offload_optimizer) for c in [chosen, *taken]}
    first = []  # the best plan of each memory strategy not yet taken
    for cfg, pred in ranked:
        if (cfg.recompute, cfg.offload_optimizer) not in strategies:
            strategies.add((cfg.recompute, cfg.offload_optimizer))
            first.append((cfg, pred))
    picked = (first + [t for t in ranked if t not in first])[:k]
    return [(cfg, pred, why_lost(best, pred)) for cfg, pred in picked]


def campaign_plans(case: Case, profile_path: str | None, out_dir: str | Path, gpus: int = 2, cluster: str | None = None,
                   engine_for_distplan: str = "torch", alternatives: int = 3, megatron_engine: str = "megatron",
                   transformer_engine: bool = False, baselines: bool = True) -> tuple[list[PlanSpec], list[dict]]:
    """Plan files of one case under out_dir: distplan's top plan, its next `alternatives`, the baselines (none with
    `baselines=False`: an engine-coverage run of distplan's plans alone, issue 6).
    Returns (plans, skipped) where skipped rows say why a plan was not made (does not fit, not runnable)."""
    from planner.core.plan import make_plan, save_plan
    from planner.cost.profiled import load_profile, profile_for_job
    from planner.cost.engines import runnable
    from solvers.request import SolveRequest, run_solve

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_arg = _model_arg(case, out_dir)
    req = SolveRequest(model=model_arg, gpus=gpus, cluster=cluster, profile=profile_path, global_batch=case.global_batch,
                       seq_len=case.seq_len, top_k=alternatives, engine=engine_for_distplan)
    result = run_solve(req)
    model, cluster = result.plan.model, result.plan.cluster
    # the cluster above already has its numbers; run_solve refused the profile had it measured another shape
    profile = (profile_for_job(load_profile(profile_path), model, result.plan.parallel.seq_len, source=profile_path)
               if profile_path else None)

    plans, skipped = [], []

    def add(name, role, engine, cfg, pred, plan):
        path = out_dir / f"{name}.yaml"
        save_plan(plan, path)
        peak = max(s.memory_gib for s in pred.stages)
        plans.append(PlanSpec(name, role, engine, str(path), pred.step_time_s, pred.tokens_per_s, peak, _summary(cfg)))

    add("distplan", "distplan", engine_for_distplan, result.plan.parallel, result.prediction, result.plan)
    alts = [(alt.config, alt.prediction, alt.why_lost) for alt in result.alternatives]
    fitting = [a for a in alts if a[1].fits]  # solve adds a faster plan that does not fit, for its explanation
    if len(fitting) < alternatives:  # fewer meshes than alternatives (one GPU has one): the next plans on the chosen one
        fitting += same_mesh_alternatives(model, cluster, result.plan.parallel, profile, engine_for_distplan,
                                          alternatives - len(fitting), [c for c, _, _ in fitting])
    alts = fitting + [a for a in alts if not a[1].fits]  # the one that does not fit is reported, after them
    for i, (alt_cfg, alt_pred, why_lost) in enumerate(alts, 1):
        name = f"alt{i}"
        if not alt_pred.fits or not _pipeline_ok(engine_for_distplan, alt_cfg):
            why = "predicted not to fit" if not alt_pred.fits else "torch pipelining refuses its micro-batch count"
            skipped.append({"name": name, "role": "alternative", "config": _summary(alt_cfg), "why": why})
            continue
        plan = make_plan(model, cluster, gpus, alt_cfg, alt_pred, rationale=[f"alternative {i}: {why_lost}"],
                         provenance={"command": req.command(), "profile": profile_path})
        add(name, "alternative", engine_for_distplan, alt_cfg, alt_pred, plan)
    if not baselines:
        return plans, skipped
    for name, got in baseline_configs(model, cluster, gpus, case.global_batch, case.seq_len, profile,
                                      megatron_engine, transformer_engine).items():
        if isinstance(got, str):
            skipped.append({"name": name, "role": "baseline", "config": "", "why": got})
            continue
        engine, cfg, pred = got
        if not runnable(engine, cfg) or not _pipeline_ok(engine, cfg):
            skipped.append({"name": name, "role": "baseline", "config": _summary(cfg), "why": f"engine {engine} cannot run it"})
            continue
        plan = make_plan(model, cluster, gpus, cfg, pred, rationale=[f"baseline {name} (issue 7), best fitting micro-batch"],
                         provenance={"command": f"benchmarks/campaign.py baseline {name}", "profile": profile_path})
        add(name, "baseline", engine, cfg, pred, plan)
    return plans, skipped


# ---- running ------------------------------------------------------------------------------------------


def run_key(spec: PlanSpec) -> tuple[str, str]:
    """(engine, digest of the program it runs): two plans with one key are one run. The torch engine without
    data parallelism and without offload builds the same program at every ZeRO stage (nothing to shard: the
    runner's note "dp=1: no data parallelism"); on one H200 FSDP2's baseline at ZeRO-3 and DDP's at ZeRO-0 were that
    one program, measured twice 0.03% and 0.45% apart (benchmarks/results/campaign_1xh200.md)."""
    from planner.cost.engines import torch_engine_fsdp
    from planner.core.plan import load_plan

    plan = load_plan(spec.plan_path)
    cfg = plan.parallel
    if spec.engine == "torch" and cfg.dp * cfg.cp == 1 and not torch_engine_fsdp(cfg):
        plan = replace(plan, parallel=replace(cfg, zero_stage=0))
    return spec.engine, plan.digest()


# process start, model build and engine set-up per run, before the case's first run has measured its own
# (55-90 s walls for gpt2-xl including 8 steps and a --check-numerics reference: benchmarks/results/run_2xh200/)
STARTUP_S = {"cpu": 8.0, "cuda": 45.0}
# the run's steps budgeted at this multiple of their predicted time (predictions are within ~10%); a
# --check-numerics run also runs a single-process reference, budgeted as much again
STEP_MARGIN = 1.3


def startup_estimate(reports: list[dict], default: float) -> float:
    """Seconds a run spends outside its timed steps, from this case's runs so far: the largest wall time less
    (warm-up + measured steps) x median step time; `default` before any run has measured one."""
    seen = [r["wall_time_s"] - (r["steps"] + r["warmup"]) * r["measured_step_time_s"] for r in reports
            if r.get("wall_time_s") and r.get("measured_step_time_s") and not r.get("numerics")]
    return max(seen) if seen else default


def budget_need(startup_s: float, steps: int, warmup: int, predicted_step_s: float, check_numerics: bool) -> float:
    """Wall seconds to budget for one run: start-up plus its steps at STEP_MARGIN x predicted, twice with
    --check-numerics (the single-process reference runs the same steps)."""
    return startup_s + (2.0 if check_numerics else 1.0) * STEP_MARGIN * (steps + warmup) * predicted_step_s


def _row(case_name: str, case: Case, spec: PlanSpec, report: dict | None, status: str, why: str = "",
         reused: bool = False) -> dict:
    tokens = case.global_batch * case.seq_len
    row = {"case": case_name, **asdict(spec), "status": status, "why": why, "measured_step_time_s": None,
           "measured_tokens_per_s": None, "step_time_error": None, "peak_allocated_gib": None, "memory_error": None,
           "oom": False, "wall_s": None}
    if report is None:
        return row
    row["predicted_step_time_s"] = report["predicted_step_time_s"]  # re-predicted with the profile by run_plan
    row["predicted_tokens_per_s"] = tokens / report["predicted_step_time_s"]
    meas = report.get("measured_step_time_s")
    if meas:
        row.update(measured_step_time_s=meas, measured_tokens_per_s=tokens / meas, step_time_error=report["step_time_error"])
    stages = report.get("stages") or []
    if stages:
        row["predicted_memory_gib"] = max(s["predicted_memory_gib"] for s in stages)
    errs = [s["memory_error"] for s in stages if s.get("memory_error") is not None]
    if errs:
        row["memory_error"] = max(errs, key=abs)
        row["peak_allocated_gib"] = max(s["peak_allocated_gib"] for s in stages if s.get("peak_allocated_gib") is not None)
    fails = report.get("failures") or []
    row["oom"] = any(f.get("kind") == "oom" or "out of memory" in str(f.get("reason", "")).lower() for f in fails)
    if fails:
        first = next((f for f in fails if f.get("primary")), fails[0])
        row["status"], row["why"] = ("oom" if row["oom"] else "failed"), f"rank {first['rank']}: {first['reason']}"[:300]
    row["wall_s"] = report.get("wall_time_s")
    if reused:
        # another plan's run of the same program (run_key: at dp = 1 every ZeRO stage of the torch engine is DDP's):
        # the measurement is that run's, the prediction this plan's own (its memory model may differ, ZeRO-3's
        # gathered layers), and the errors against it
        row["predicted_step_time_s"], row["predicted_memory_gib"] = spec.predicted_step_time_s, spec.predicted_memory_gib
        row["predicted_tokens_per_s"] = tokens / spec.predicted_step_time_s
        if meas:
            row["step_time_error"] = meas / spec.predicted_step_time_s - 1
        if row.get("peak_allocated_gib") is not None and spec.predicted_memory_gib:
            row["memory_error"] = row["peak_allocated_gib"] / spec.predicted_memory_gib - 1
    num = report.get("numerics") or {}
    if num.get("checked"):  # --check-numerics: the parallel losses against the single-process reference
        row["numerics"] = {k: num.get(k) for k in ("passed", "dtype", "max_rel_error")}
    row["hints"] = _hints(report, _stage_times(spec.plan_path))
    return row


# micro-batches of one step that differ by more than this (slowest over fastest) point at the host or the allocator: the
# GPU's own compute repeats within 1-4%; a DTensor tp2 run spread 23% (benchmarks/results/campaign_2xh200.md)
MICROBATCH_JITTER = 0.15


def _stage_times(plan_path: str | None) -> dict[int, float] | None:
    """pipeline rank -> the plan's predicted seconds per micro-batch on it (prediction.stages), or None."""
    try:
        from planner.core.plan import load_plan

        stages = load_plan(plan_path).prediction.get("stages") or []
        return {int(s["rank"]): float(s["time_per_microbatch_s"]) for s in stages}
    except Exception:  # noqa: BLE001 - a hint only: no plan file, or an older plan without stage times
        return None


def _hints(report: dict, stage_times: dict[int, float] | None = None) -> list[str]:
    """What the report's per-rank measurements say about a miss: allocator retries (memory pressure) and, for
    pipelines, the share of the step outside the chunks' compute and the optimizer (the schedule's own cost) and,
    with the plan's predicted per-micro-batch stage times, the chunks' compute against them (the stage's work: its
    layers, plus the small p2p time the prediction adds per micro-batch)."""
    ranks = report.get("ranks") or []
    out = []
    retries = max((r.get("alloc_retries") or 0 for r in ranks), default=0)
    if retries:
        out.append(f"allocator retries {retries} (rank max)")
    shares = []
    for r in ranks:
        chunks, step = r.get("chunk_compute_s"), r.get("median_step_time_s")
        if chunks and step:
            shares.append((1 - (chunks["fwd"] + chunks["bwd"] + (r.get("optimizer_s") or 0.0)) / step, r["pp_rank"]))
    if shares:
        share, stage = max(shares)
        out.append(f"pipeline schedule {100 * share:.0f}% of the step on stage {stage} (outside chunk compute and optimizer)")
    spread = [(max(mb) / min(mb) - 1, r["rank"]) for r in ranks if (mb := r.get("microbatch_s")) and len(mb) >= 3
              and min(mb) > 0]
    if spread and max(spread)[0] > MICROBATCH_JITTER:
        width, rank = max(spread)
        mbs = next(r["microbatch_s"] for r in ranks if r["rank"] == rank)
        out.append(f"micro-batch times vary {min(mbs):.3g}-{max(mbs):.3g} s on rank {rank} (+{100 * width:.0f}%): "
                   f"host-bound or memory pressure, not the GPU's steady compute")
    host = [(sum(r["chunk_host_s"].values()) / sum(r["chunk_compute_s"].values()), r["pp_rank"]) for r in ranks
            if r.get("chunk_host_s") and r.get("chunk_compute_s") and sum(r["chunk_compute_s"].values()) > 0]
    if host:
        out.append("chunk host time over chunk GPU time: " + ", ".join(f"{h:.2f} (stage {st})" for h, st in host))
    mb = re.search(r"mb=\d+x(\d+)", str(report.get("config", "")))  # report.config: "... mb=1x8 ..."
    m = int(mb.group(1)) if mb else 0
    if stage_times and m:
        errs = [(r["chunk_compute_s"]["fwd"] + r["chunk_compute_s"]["bwd"]) / (m * stage_times[r["pp_rank"]]) - 1
                for r in ranks if r.get("chunk_compute_s") and stage_times.get(r.get("pp_rank"))]
        if errs:
            out.append("chunk compute against the predicted stage time: " + ", ".join(f"{100 * e:+.1f}%" for e in errs))
    traced = [(r["rank"], r["trace"]) for r in ranks if r.get("trace") and r["trace"].get("wall_s")]
    if traced:  # DISTPLAN_TRACE=1 (planner/runner/trace.py): the GPU's kernels over one extra, profiled step
        rank, t = max(traced, key=lambda rt: rt[1]["idle_s"] / rt[1]["wall_s"])
        cats = ", ".join(f"{k} {v:.3g}" for k, v in sorted(t["by_category_s"].items(), key=lambda kv: -kv[1]))
        out.append(f"traced step on rank {rank}: {t['wall_s']:.3g} s, GPU idle {100 * t['idle_s'] / t['wall_s']:.0f}%, "
                   f"compute kernels busy {t['compute_busy_s']:.3g} s (kernel seconds: {cats})")
    return out


def run_case(case_name: str, profile_path: str | None, out_dir: str | Path, steps: int | None = None,
             warmup: int | None = None, time_budget_s: float = 540.0, gpus: int = 2, dry_run: bool = False,
             check_numerics: bool = False, clock=time.monotonic, log=lambda msg: None, repeat: int = 1,
             measured: dict | None = None, **plan_kw) -> list[dict]:
    """Make the plans of one case and run each (distplan, baselines, then alternatives) within the budget.

    `repeat` > 1: then run again the plans measured within REPEAT_NEAR of another plan (`close_plans`), in alternating
    order, while the budget lasts; a row's measured step time is the median of its runs (`measured_runs_s`), and the
    case's run-to-run spread is in `summarize`. Plans within a few percent of each other (gpt2-xl-large's
    data-parallel layouts: 2%) are ordered by that spread.

    `measured` ((case, engine, config) -> (row, call), from `measured_runs`): a plan an earlier call of this machine
    ran is not run again; its row carries that measurement beside today's prediction (`measured_in`), as the merge
    does for a plan skipped for time, so a re-run after a fix spends its time on the plans it has not measured."""

    start = clock()
    case = CASES[case_name]
    steps, warmup = steps or case.steps, case.warmup if warmup is None else warmup
    out_dir = Path(out_dir) / case_name
    plans, skipped = campaign_plans(case, profile_path, out_dir, gpus=gpus, **plan_kw)
    rows = [{"case": case_name, "name": s["name"], "role": s["role"], "engine": "", "plan_path": "", "config": s["config"],
             "status": "not-made", "why": s["why"]} for s in skipped]
    order = {"distplan": 0, "baseline": 1, "alternative": 2}
    device = "cuda" if not dry_run and _cuda() else "cpu"
    done: dict[tuple, dict] = {}  # (engine, plan digest) -> report already measured in this case
    ran: dict[tuple, tuple[PlanSpec, dict]] = {}  # (engine, plan digest) -> the plan and the row that measured it
    reused: list[tuple[dict, tuple]] = []  # rows that took another row's run, and its key

    def left() -> float:
        return time_budget_s - (clock() - start)

    for spec in sorted(plans, key=lambda p: order[p.role]):
        log(f"{case_name}/{spec.name} ({spec.engine}): {spec.config}; predicted {spec.predicted_step_time_s:.4g} s, "
            f"{spec.predicted_memory_gib:.1f} GiB")
        if dry_run:
            rows.append(_row(case_name, case, spec, None, "dry-run"))
            continue
        key = run_key(spec)
        if measured and (case_name, spec.engine, spec.config) in measured:
            rows.append(_carried(_row(case_name, case, spec, None, "skipped", "measured earlier (--measured)"), measured))
            log(f"  -> measured in {rows[-1]['measured_in']}: {rows[-1]['measured_step_time_s']} s, not run again")
            continue
        if key in done:
            rows.append(_row(case_name, case, spec, done[key], "ran", "same program as an earlier run: reused",
                             reused=True))
            reused.append((rows[-1], key))
            continue
        need = budget_need(startup_estimate(list(done.values()), STARTUP_S[device]), steps, warmup,
                           spec.predicted_step_time_s, check_numerics)
        if need > left():
            rows.append(_row(case_name, case, spec, None, "skipped", f"budget: needs ~{need:.0f} s, {left():.0f} s left"))
            continue
        try:
            rep = _run_once(spec, steps, warmup, left(), out_dir / f"{spec.name}.report.yaml", profile_path,
                            check_numerics)
            done[key] = rep
            rows.append(_row(case_name, case, spec, rep, "ran"))
            if rows[-1]["status"] == "ran":
                ran[key] = (spec, rows[-1])
        except DistplanError as exc:
            rows.append(_row(case_name, case, spec, None, "refused", str(exc)[:300]))
        log(f"  -> {rows[-1]['status']} measured {rows[-1].get('measured_step_time_s')} {rows[-1]['why']}")

    near = close_plans({key: row["measured_step_time_s"] for key, (_, row) in ran.items()})
    if repeat > 1:
        log(f"repeats: {len(near)} of {len(ran)} plans measured within {100 * REPEAT_NEAR:.0f}% of another")
    for k in range(1, repeat):  # the repeats, in reverse order on odd passes, within the budget
        startup = startup_estimate(list(done.values()), STARTUP_S[device])
        for spec, row in (reversed([ran[key] for key in near]) if k % 2 else [ran[key] for key in near]):
            tag = f"  repeat {k + 1} of {case_name}/{spec.name}"
            if budget_need(startup, steps, warmup, spec.predicted_step_time_s, False) > left():
                log(f"{tag}: skipped (budget, {left():.0f} s left)")
                continue
            try:
                rep = _run_once(spec, steps, warmup, left(), out_dir / f"{spec.name}.run{k + 1}.report.yaml",
                                profile_path, False)
            except DistplanError as exc:
                log(f"{tag}: refused ({str(exc)[:120]})")
                continue
            if rep.get("measured_step_time_s") and not rep.get("failures"):
                add_repeat(row, rep["measured_step_time_s"], case)
            log(f"{tag}: measured {rep.get('measured_step_time_s')}")
    for row, key in reused:  # a row that reused another's run takes its repeats too
        if key in ran:
            src = ran[key][1]
            row.update({k: src[k] for k in ("measured_runs_s", "measured_step_time_s", "measured_tokens_per_s",
                                            "step_time_error") if k in src})
    return rows


def _run_once(spec: PlanSpec, steps: int, warmup: int, left_s: float, report_path: Path, profile_path: str | None,
              check_numerics: bool) -> dict:
    """One `distplan run` of the plan within `left_s` seconds; its report (raises DistplanError where refused)."""
    from planner.runner.engine_api import RunOptions
    from planner.runner.launch import run_plan

    opts = RunOptions(engine=spec.engine, steps=steps, warmup=warmup, timeout_s=max(5.0, left_s - 5.0))
    run_plan(spec.plan_path, opts, out_path=report_path, tolerance=STEP_TOL_ALL, check_numerics=check_numerics,
             profile_path=profile_path)
    return yaml.safe_load(report_path.read_text())


# --repeat runs again only the plans measured within this of another plan, whose order run-to-run noise can flip
# (plans 2% apart, one moved 2% between runs: benchmarks/results/campaign_2xh200.md)
REPEAT_NEAR = 0.05


def close_plans(measured: dict, near: float | None = None) -> list:
    """The keys of `measured` (key -> measured step time, in run order) whose time the slower of it and another
    plan's exceeds by at most `near` (default REPEAT_NEAR)."""
    near = REPEAT_NEAR if near is None else near
    return [k for k, t in measured.items()
            if any(j != k and max(t, u) / min(t, u) - 1 <= near for j, u in measured.items())]


def add_repeat(row: dict, seconds: float, case: Case) -> None:
    """Fold one more measured step time into a row: its runs, their median, and the figures derived from it."""
    runs = row.setdefault("measured_runs_s", [row["measured_step_time_s"]])
    runs.append(seconds)
    med = statistics.median(runs)
    row["measured_step_time_s"] = med
    row["measured_tokens_per_s"] = case.global_batch * case.seq_len / med
    row["step_time_error"] = med / row["predicted_step_time_s"] - 1


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# ---- summary --------------------------------------------------------------------------------------------

def average_ranks(xs: list[float]) -> list[float]:
    """Ranks 1..n; tied values share the average of the ranks they span."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rho: Pearson correlation of the average ranks (exact with ties); None when undefined."""
    if len(xs) != len(ys) or len(xs) < 2:
        return None
    rx, ry = average_ranks(xs), average_ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if vx == 0 or vy == 0 else cov / math.sqrt(vx * vy)


def _misses(row: dict) -> list[str]:
    out = []
    tol = STEP_TOL_CHOSEN if row["role"] == "distplan" else STEP_TOL_ALL
    if row.get("oom"):
        out.append("OOM")
    elif row.get("status") in ("failed", "refused"):
        out.append(f"did not run: {row.get('why', '')}")
    if row.get("step_time_error") is not None and abs(row["step_time_error"]) > tol:
        out.append(f"step time {100 * row['step_time_error']:+.1f}% (target {100 * tol:.0f}%)")
    if row.get("memory_error") is not None and abs(row["memory_error"]) > MEMORY_TOL:
        out.append(f"memory {100 * row['memory_error']:+.1f}% (target {100 * MEMORY_TOL:.0f}%)")
    return out


def summarize(rows: list[dict]) -> dict:
    """Per case: distplan over the best baseline (measured tokens/s), Spearman of predicted vs measured
    throughput over the plans that ran, and each target met (True), missed (False) or not measurable (None)."""
    cases = {}
    for name in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == name]
        ran = [r for r in mine if r.get("measured_tokens_per_s")]
        chosen = next((r for r in mine if r["role"] == "distplan"), None)
        base = [r for r in ran if r["role"] == "baseline"]
        best = max(base, key=lambda r: r["measured_tokens_per_s"]) if base else None
        speedup = (chosen["measured_tokens_per_s"] / best["measured_tokens_per_s"]
                   if chosen and chosen.get("measured_tokens_per_s") and best else None)
        rho = spearman([r["predicted_tokens_per_s"] for r in ran], [r["measured_tokens_per_s"] for r in ran])
        step_ok = [abs(r["step_time_error"]) <= (STEP_TOL_CHOSEN if r["role"] == "distplan" else STEP_TOL_ALL)
                   for r in ran if r.get("step_time_error") is not None]
        mem_ok = [abs(r["memory_error"]) <= MEMORY_TOL for r in ran if r.get("memory_error") is not None]
        chosen_oom = bool(chosen and chosen.get("oom"))
        targets = {
            "distplan_ge_best_baseline": None if speedup is None else speedup >= 1.0,
            "step_time_within_target": all(step_ok) if step_ok else None,
            "memory_within_10pct": all(mem_ok) if mem_ok else None,
            "spearman_ge_0.9": None if rho is None else rho >= SPEARMAN_MIN,
            "chosen_plan_no_oom": not chosen_oom if chosen and chosen.get("status") in ("ran", "oom", "failed") else None,
        }
        spreads = [max(r["measured_runs_s"]) / min(r["measured_runs_s"]) - 1 for r in ran if len(r.get("measured_runs_s") or []) > 1]
        cases[name] = {"speedup_over_best_baseline": speedup, "best_baseline": best["name"] if best else None,
                       "spearman": rho, "plans_ran": len(ran), "plans": len(mine), "targets": targets,
                       "run_spread": max(spreads) if spreads else None,
                       "misses": [{"name": r["name"], "role": r["role"], "what": m, "hints": r.get("hints") or []}
                                  for r in mine if (m := _misses(r))]}
    speedups = [c["speedup_over_best_baseline"] for c in cases.values() if c["speedup_over_best_baseline"] is not None]
    overall = {"ge_10pct_faster_in_one_case": (max(speedups) >= SPEEDUP_ONE_CASE) if speedups else None,
               "all_targets_met": _all_met([v for c in cases.values() for v in c["targets"].values()])}
    return {"cases": cases, "overall": overall, "rows": rows}


def _all_met(targets: list[bool | None]) -> bool | None:
    """True where no target is missed and at least one was checked; None where nothing ran to check (a campaign whose
    profile stalled reported 'all per-case targets met: True' over no case at all: benchmarks/results/
    campaign_8xh200.md)."""
    checked = [v for v in targets if v is not None]
    return all(checked) if checked else None


def environment() -> dict:
    """Machine and versions for the report header."""
    from importlib import metadata

    env = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(),
           "host_cpus": __import__("os").cpu_count()}
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["gpu"] = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
            env["cuda"] = torch.version.cuda
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        else:
            env["gpu"] = "none (CPU, gloo)"
    except ImportError:
        env["torch"] = "not installed"
    for pkg in ("deepspeed", "megatron-core", "distplan"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return env


def _fmt(x, spec=".3g", pct=False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.1f}%" if pct else format(x, spec)


def merge_rows(calls: list[list[dict]], names: list[str] | None = None) -> list[dict]:
    """Rows of several calls, in order; a case that a later call ran again keeps only the later call's rows.

    A plan the later call made but skipped for its time budget, whose engine and configuration an earlier call ran
    in the same case, keeps the later call's prediction (today's model) beside that earlier measurement, marked
    `measured_in` (the earlier call's name from `names`, else its position): the same plan on the same kind of
    machine, and without it the case would lose the plans a shorter call could not fit (Spearman over one plan)."""
    by_case: dict[str, list[dict]] = {}
    measured: dict[tuple, tuple[dict, str]] = {}  # (case, engine, config) -> (row, call) of earlier runs
    for i, rows in enumerate(calls):
        call = names[i] if names else f"call {i + 1}"
        for case in dict.fromkeys(r["case"] for r in rows):
            by_case[case] = [_carried(r, measured) for r in rows if r["case"] == case]
        measured.update(_own_runs(rows, call))
    return [r for rows in by_case.values() for r in rows]


def _own_runs(rows: list[dict], call: str) -> dict[tuple, tuple[dict, str]]:
    """(case, engine, config) -> (row, call) of the plans these rows ran themselves (a row carried from an earlier
    call, `measured_in`, is that call's run, not this one's)."""
    return {(r["case"], r.get("engine"), r.get("config")): (r, call) for r in rows
            if r.get("status") == "ran" and r.get("measured_step_time_s") and not r.get("measured_in")}


def _carried(row: dict, measured: dict[tuple, tuple[dict, str]]) -> dict:
    """merge_rows: a budget-skipped row with an earlier measurement of its plan, else the row itself."""
    key = (row["case"], row.get("engine"), row.get("config"))
    carried = str(row.get("why", "")).startswith(("budget", "measured earlier"))
    if row.get("status") != "skipped" or not carried or key not in measured:
        return row
    src, call = measured[key]
    out = {**row, **{k: src[k] for k in ("measured_step_time_s", "measured_tokens_per_s", "peak_allocated_gib",
                                         "measured_runs_s", "wall_s", "hints", "oom") if k in src}}
    pred, pred_mem = row.get("predicted_step_time_s"), row.get("predicted_memory_gib")
    out["step_time_error"] = out["measured_step_time_s"] / pred - 1 if pred else None
    peak = out.get("peak_allocated_gib")
    out["memory_error"] = peak / pred_mem - 1 if peak and pred_mem else src.get("memory_error")
    out.update(status="ran", measured_in=call, why=f"measured in {call}; skipped here ({row['why']})")
    return out


def read_rows(path: str) -> list[dict]:
    """The rows of a campaign call's rows.json; DistplanError naming the file where it is missing or not rows."""
    try:
        rows = json.loads(Path(path).read_text())
    except OSError as exc:
        raise DistplanError(f"{path}: cannot read it ({exc.strerror}); expected a campaign call's rows.json") from None
    except ValueError as exc:
        raise DistplanError(f"{path}: not JSON ({exc}); expected a campaign call's rows.json") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "case" in r for r in rows):
        raise DistplanError(f"{path}: not a list of campaign rows (each with a 'case'); expected a call's rows.json")
    return rows


def call_number(folder: str) -> float:
    """N of a call's folder `callN-...` (the device calls are numbered in the order they ran); inf without one."""
    m = re.match(r"call(\d+)(?:\D|$)", folder)
    return int(m.group(1)) if m else math.inf


def call_order(rows_files: list[str]) -> list[str]:
    """rows.json files in the order their calls ran: by `call_number` of their folder (a shell glob such as
    campaign_2xh200/call*/rows.json lists call10 before call2), then as given; a folder without N goes last."""
    return [f for _, f in sorted(enumerate(rows_files), key=lambda t: (call_number(Path(t[1]).parent.name), t[0]))]


def measured_runs(rows_files: list[str]) -> dict[tuple, tuple[dict, str]]:
    """(case, engine, config) -> (row, call) of every plan that ran in these rows.json files (the call is the
    file's folder name; a later call's run of a plan replaces an earlier one's, in `call_order`)."""
    out: dict[tuple, tuple[dict, str]] = {}
    for f in call_order(rows_files):
        out.update(_own_runs(read_rows(f), Path(f).parent.name))
    return out


def merged_environment(rows_files: list[str]) -> dict | None:
    """Machine and versions of the run(s) that wrote these rows.json files, read back from the report each run
    wrote beside them (campaign_*.md, "Machine and versions: k v, k v."); None when no report is found."""
    seen = []
    for f in rows_files:
        for md in sorted(Path(f).parent.glob("campaign_*.md")):
            dates = [ln.rsplit("), ", 1)[-1].removesuffix(" UTC") for ln in md.read_text().splitlines()[:1] if "), " in ln]
            for line in md.read_text().splitlines():
                if line.startswith("Machine and versions: "):
                    pairs = line[len("Machine and versions: "):].rstrip(".").split(", ")
                    env = dict(p.split(" ", 1) for p in pairs if " " in p)
                    if dates:
                        env["date_utc"] = dates[0]
                    if env not in seen:
                        seen.append(env)
    if not seen:
        return None
    out = dict(seen[0])
    for env in seen[1:]:  # several calls: keep keys that agree, say where they differ
        for k, v in env.items():
            if out.get(k) != v:
                out[k] = f"{out.get(k)} / {v}"
    return out


def write_markdown(summary: dict, path: str | Path, machine: str, env: dict | None = None, command: str = "") -> None:
    env = env or environment()
    lines = [f"# Plan quality on {machine} (issue 7), {env.get('date_utc', '')} UTC", "",
             "Machine and versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "date_utc") + ".",
             f"Command: `{command}`." if command else "", "",
             f"Targets: distplan >= best baseline per case and >= {100 * (SPEEDUP_ONE_CASE - 1):.0f}% faster in one; "
             f"step time within {100 * STEP_TOL_ALL:.0f}% (chosen {100 * STEP_TOL_CHOSEN:.0f}%); memory within "
             f"{100 * MEMORY_TOL:.0f}%; Spearman >= {SPEARMAN_MIN} per case; no chosen plan OOMs.", "",
             "## Per case", "",
             "| case | distplan / best baseline | best baseline | Spearman | plans ran | run-to-run spread | targets missed |",
             "|---|---|---|---|---|---|---|"]
    for name, c in summary["cases"].items():
        missed = [k for k, v in c["targets"].items() if v is False]
        spread = "-" if c.get("run_spread") is None else f"{100 * c['run_spread']:.1f}%"
        lines.append(f"| {name} | {_fmt(c['speedup_over_best_baseline'])} | {c['best_baseline'] or '-'} | "
                     f"{_fmt(c['spearman'])} | {c['plans_ran']}/{c['plans']} | {spread} | {', '.join(missed) or 'none'} |")
    ov = summary["overall"]
    lines += ["", f"At least one case >= {100 * (SPEEDUP_ONE_CASE - 1):.0f}% faster: {ov['ge_10pct_faster_in_one_case']}; "
              f"all per-case targets met: {ov['all_targets_met']}.", "", "## Every plan", "",
              "| case | plan | role | engine | config | tokens/s predicted | measured | step error | "
              "memory predicted (GiB) | peak allocated | memory error | status |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        status = r["status"] + (f" ({r['why']})" if r.get("why") else "")
        lines.append(f"| {r['case']} | {r['name']} | {r['role']} | {r.get('engine') or '-'} | {r.get('config') or '-'} | "
                     f"{_fmt(r.get('predicted_tokens_per_s'), '.4g')} | {_fmt(r.get('measured_tokens_per_s'), '.4g')} | "
                     f"{_fmt(r.get('step_time_error'), pct=True)} | {_fmt(r.get('predicted_memory_gib'), '.1f')} | "
                     f"{_fmt(r.get('peak_allocated_gib'), '.1f')} | {_fmt(r.get('memory_error'), pct=True)} | {status} |")
    lines += ["", "## Analysis of misses", "", "Each plan outside a target; the cause is filled in by hand after reading "
              "its report YAML and log.", ""]
    misses = [(n, m) for n, c in summary["cases"].items() for m in c["misses"]]
    for case_name, m in misses:
        hints = f" Measured: {'; '.join(m['hints'])}." if m.get("hints") else ""
        lines.append(f"- **{case_name} / {m['name']}** ({m['role']}): {'; '.join(m['what'])}.{hints} Cause: _TODO_")
    if not misses:
        lines.append("- none")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


# ---- profiles and CLI ----------------------------------------------------------------------------------

DEFAULT_PRESET = "dgx-h100-80gb"  # what `distplan solve` plans on without --cluster or --profile


def local_preset(gpu_name: str | None = None) -> str | None:
    """The cluster preset of this machine's GPU (or `gpu_name`), the largest in memory where several match; None
    without a GPU or a matching preset. A case without a profile plans on it (one whose profile timed out planned on
    the H100 preset and predicted 78 GiB usable on 141 GiB GPUs: benchmarks/results/cost_model_notes.md)."""
    from planner.core.cluster import cluster_names, load_cluster
    from planner.core.cluster import gpu_family

    if gpu_name is None:
        if not _cuda():
            return None
        import torch

        gpu_name = torch.cuda.get_device_name(0)
    same = [load_cluster(n) for n in cluster_names() if gpu_family(load_cluster(n).gpu.name) == gpu_family(gpu_name)]
    return max(same, key=lambda c: c.gpu.memory_gib).name if same else None


def find_profile(case: Case, dirs: list[str | Path]) -> str | None:
    """A profile YAML in `dirs` measured for this case's model at its sequence length (first found)."""
    for d in dirs:
        for p in sorted(Path(d).glob("*.yaml")) if Path(d).is_dir() else ():
            try:
                head = yaml.safe_load("\n".join(p.read_text().splitlines()[:8]))
            except (yaml.YAMLError, OSError):
                continue
            if isinstance(head, dict) and head.get("model") == case.model and head.get("seq_len") == case.seq_len:
                return str(p)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="gpt2-xl-small", help=f"comma-separated; known: {', '.join(CASES)}")
    ap.add_argument("--profile-dir", action="append", default=[], help="folder(s) of profile YAMLs (repeatable)")
    ap.add_argument("--out", default="out/campaign")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall seconds for all cases together")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default: the case's)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--gpus", type=int, default=None, help="default: the visible GPUs, or 2 on CPU")
    ap.add_argument("--cluster", default=None, help="cluster preset or YAML (default: the profiled GPU's preset)")
    ap.add_argument("--megatron-engine", default="megatron", choices=("megatron", "torch"))
    ap.add_argument("--distplan-engine", default="torch", choices=("torch", "megatron", "deepspeed"),
                    help="the engine distplan's plan and its alternatives are solved for and run on")
    ap.add_argument("--transformer-engine", action="store_true", help="Megatron baseline with TE (flash attention, SP)")
    ap.add_argument("--no-baselines", action="store_true",
                    help="run distplan's plan and its alternatives only (an engine's coverage, with --distplan-engine)")
    ap.add_argument("--measured", nargs="+", default=None, metavar="ROWS_JSON",
                    help="rows.json files of earlier calls on this machine: plans they ran are not run again; their "
                         "rows carry that measurement beside today's prediction")
    ap.add_argument("--check-numerics", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="run this many times each plan measured within 5%% of "
                    "another (alternating order, within the budget); rows take the median")
    ap.add_argument("--dry-run", action="store_true", help="make the plans and print predictions; run nothing")
    ap.add_argument("--machine", default=None, help="names the report campaign_<machine>.md (default from the GPUs)")
    ap.add_argument("--need-profiles", action="store_true", help="print 'model seq_len' of cases with no profile; exit")
    ap.add_argument("--profiled-cases", action="store_true", help="print the comma-separated cases that have a profile; exit")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="rows.json files of earlier calls: one report of them all (a case a later file has replaces "
                         "that case's rows from earlier files: the re-run after a fix)")
    a = ap.parse_args(argv)
    if a.repeat < 1:
        print(f"error: --repeat {a.repeat}: must be at least 1 (runs per plan)", file=sys.stderr)
        return 2
    try:  # the earlier calls' rows, read before anything runs
        measured = measured_runs(a.measured) if a.measured else None
        merged = [read_rows(f) for f in a.merge] if a.merge else None
    except DistplanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = [c for c in a.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if not names and not a.merge:
        print(f"error: --cases {a.cases!r} names no case; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    if unknown:
        print(f"error: unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    if a.profiled_cases:
        print(",".join(c for c in names if CASES[c].model == "tiny" or find_profile(CASES[c], a.profile_dir)))
        return 0
    if a.need_profiles:
        need = {(CASES[c].model, CASES[c].seq_len) for c in names if CASES[c].model != "tiny" and not find_profile(CASES[c], a.profile_dir)}
        print("\n".join(f"{m} {s}" for m, s in sorted(need)))
        return 0
    env = environment()
    machine = a.machine or (env["gpu"].replace("x NVIDIA ", "x").replace(" ", "-").lower() if _cuda() else "cpu")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if a.merge:
        rows = merge_rows(merged, [Path(f).parent.name for f in a.merge])
        measured_on = merged_environment(a.merge)
        if measured_on:
            env = measured_on  # the machine the rows were measured on, not the one merging them
    else:
        gpus = a.gpus or (__import__("torch").cuda.device_count() if _cuda() else 2)
        start = time.monotonic()
        for name in names:
            prof = find_profile(CASES[name], a.profile_dir)
            cluster = a.cluster or (None if prof else local_preset())
            print(f"== {name}: profile {prof or f'none (cluster preset {cluster or DEFAULT_PRESET})'}", flush=True)
            left = a.budget_s - (time.monotonic() - start)
            try:
                rows += run_case(name, prof, out, a.steps, a.warmup, left, gpus=gpus, dry_run=a.dry_run, cluster=cluster,
                                 check_numerics=a.check_numerics, log=lambda m: print(m, flush=True), repeat=a.repeat,
                                 megatron_engine=a.megatron_engine, transformer_engine=a.transformer_engine,
                                 engine_for_distplan=a.distplan_engine, baselines=not a.no_baselines,
                                 measured=measured)
            except DistplanError as exc:
                print(f"error: {name}: {exc}", file=sys.stderr)
                rows.append({"case": name, "name": "distplan", "role": "distplan", "status": "refused", "why": str(exc)[:300]})
        (out / "rows.json").write_text(json.dumps(rows, indent=1))
    summary = summarize(rows)
    md = out / f"campaign_{machine}.md"
    write_markdown(summary, md, machine, env, "python3 benchmarks/campaign.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    for name, c in summary["cases"].items():
        print(f"{name}: distplan/best baseline {_fmt(c['speedup_over_best_baseline'])}, Spearman {_fmt(c['spearman'])}, "
              f"ran {c['plans_ran']}/{c['plans']}, targets {c['targets']}")
    print(f"wrote {md} and {out / 'rows.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
