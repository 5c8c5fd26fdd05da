"""Whether a profile applies to a job: the one rule estimate, solve, run and the benchmarks apply.

A profile's layer fits are times of one layer of the model it measured, at its sequence length. A job of
another shape (hidden size, heads, KV heads, FFN width, vocabulary, experts, image and patch sizes) or
another sequence length does other work per layer: gpt2-xl's block does ~4.3x gpt2's, so gpt2's fits priced
gpt2-xl's forward at 3.0x gpt2's, the layer ratio alone (issue 22). So `profile_for_job`:
  - same shape and sequence length: the profile as it is;
  - otherwise a DistplanError naming both shapes, or with `fallback` (the CLI's --profile-fallback) the
    profile without its model-specific measurements (`without_model_specific`): every compute fit (the
    megatron layer and head among them), the stack factor and the sharding / TP / DDP per-block fits go, and
    the matmul sweep, copy bandwidth, collectives, host link, optimizer rates per parameter and the
    pipeline's per-operation costs (per byte sent) stay; the prediction's sources say which is which.
The number of layers is not part of the shape: a fit is per layer.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from planner.core.calibration import apply_calibration
from planner.core.cluster import Cluster, gpu_family, load_cluster
from planner.core.errors import DistplanError, require
from planner.core.model import ModelSpec, describe_shape, model_shape
from planner.core.profile import (PROFILE_VERSION, CollectiveFit, Profile, StackFit, describe_profile, parse_profile,
                                  read_profile)

FALLBACK_FLAG = "--profile-fallback"


def mismatch(profile: Profile, model: ModelSpec, seq_len: int) -> str | None:
    """Why `profile`'s model-specific measurements do not apply to `model` at `seq_len`, or None where they do
    (or where the profile no longer holds any: without_model_specific)."""
    shape = model_shape(model)
    if profile.model_specific_dropped or (profile.model_shape == shape and profile.seq_len == seq_len):
        return None
    job = describe_shape(model.name, shape, seq_len)
    if not profile.model_shape:
        return (f"measured {profile.model} at seq {profile.seq_len} without recording its shape (written before "
                f"profiles did, and '{profile.model}' is not a zoo model); the job is {job}")
    return f"measured {describe_profile(profile)}; the job is {job}"


def profile_for_job(profile: Profile | None, model: ModelSpec, seq_len: int, *, fallback: bool = False,
                    source: str = "") -> Profile | None:
    """The profile to price `model` at `seq_len` with (see the module docstring); `source`: the file, for the error."""
    if profile is None:
        return None
    why = mismatch(profile, model, seq_len)
    if why is None:
        return profile
    if not fallback:
        same_shape = profile.model_shape == model_shape(model)
        hint = f"profile it at --seq-len {seq_len}" if same_shape else "profile this model"
        raise DistplanError(f"profile {source + ' ' if source else ''}{why}: {hint}, or pass {FALLBACK_FLAG} to "
                            "price its layers from the preset")
    return without_model_specific(profile)


def without_model_specific(profile: Profile) -> Profile:
    """`profile` less what it measured of its model's layers: compute fits of every kind, the stack factor and
    the per-block sharding, DDP and TP fits (with the raw points they derive from). Kept: the matmul sweep, copy
    and host bandwidth, collectives (fits and raw points), the optimizer rates per parameter, the overlap
    slowdown, memory and device count, and the pipeline's per-operation costs (per byte sent)."""
    raw = profile.raw if isinstance(profile.raw, dict) else {}
    comm = raw.get("communication") if isinstance(raw.get("communication"), dict) else {}
    kept = {k: v for k, v in comm.items() if k in ("points", "pipeline", "overlap", "inter_node", "unmeasured")}
    return replace(profile, compute=(), sharding=(), model_specific_dropped=True, stack=None,
                   derived=tuple((k, v) for k, v in profile.derived if k != "stack_factor"),
                   raw={"communication": kept, **({"ceilings": raw["ceilings"]} if "ceilings" in raw else {})})


def dropped_note(profile: Profile) -> str:
    """The sources' line for a profile whose model-specific measurements were dropped."""
    return (f"preset: compute fits, stack factor, sharding/DDP/TP per-block fits and megatron layer/head (profile "
            f"measured {describe_profile(profile)}); profile: matmul sweep, copy and host bandwidth, collectives, optimizer "
            "rate, pipeline per-operation costs")


# ---- the cluster a profile describes ------------------------------------------------------------


def _matching_preset(profile: Profile) -> Cluster | None:
    """The cluster preset whose GPU is the profile's chip, the closest in memory if several are."""
    from planner.core.cluster import cluster_names, load_cluster

    family = gpu_family(profile.gpu_name)
    matches = [c for c in map(load_cluster, cluster_names()) if gpu_family(c.gpu.name) == family]
    return min(matches, key=lambda c: abs(c.gpu.memory_gib - profile.memory_gib), default=None)


def _link_from_fit(fit: CollectiveFit):
    from planner.core.cluster import Link

    return Link(latency_us=fit.latency_s * 1e6, bandwidth_gb_s=fit.bus_bandwidth_gb_s)


def _measured_curve(profile: Profile, peak_tflops: float) -> tuple[tuple[float, float], ...]:
    """Efficiency points (GFLOP per matmul, fraction of `peak_tflops`) from the measured matmul sweep."""
    return tuple((g, min(1.0, t / peak_tflops)) for g, t in profile.matmul_tflops_by_gflop if t > 0)


def measured_cluster(profile: Profile) -> Cluster:
    """A Cluster describing the profiled machine alone, every number measured.

    peak = the best measured matmul rate (so MFU is relative to that, not to a datasheet); HBM = the
    measured device copy bandwidth (memory-bound kernels reach all of it, fraction 1); links = the
    fitted collectives (intra-node: all-reduce bus bandwidth of the largest group measured); collective
    and matmul fractions = 1 except the measured small-matmul shortfall. Nodes: one, unless the
    inter-node tier was measured (the inter-node network of an unprofiled cluster is unknown).
    Attention runs at 0.5 of the measured matmul rate where no layer fit covers it: not measured here;
    FlashAttention-2 forward reaches 50-73% of A100 peak (Dao 2023, Fig. 4), the low end is taken.
    """
    from planner.core.cluster import GPU, COLLECTIVES, Cluster, Efficiency, Link

    require(profile.device_count > 0 and profile.matmul_tflops > 0 and profile.hbm_bandwidth_gb_s > 0
            and profile.memory_gib > 0,
            f"profile of '{profile.gpu_name}' lacks device_count, matmul_tflops, hbm_bandwidth_gb_s or memory_gib; "
            "re-run `distplan profile`")
    fits = sorted((c for c in profile.collectives if c.op == "all_reduce"), key=lambda c: c.group_size)
    fits = fits or sorted(profile.collectives, key=lambda c: c.group_size)
    # one device: no collective measured and none needed inside the node; the link is never used
    intra = _link_from_fit(fits[-1]) if fits else Link(latency_us=0.0, bandwidth_gb_s=profile.hbm_bandwidth_gb_s)
    inter = _link_from_fit(profile.inter_node) if profile.inter_node else intra
    host_bw = profile.host_bandwidth_gb_s or intra.bandwidth_gb_s
    host = Link(latency_us=intra.latency_us, bandwidth_gb_s=host_bw)
    curve = _measured_curve(profile, profile.matmul_tflops) or ((1e-3, 1.0),)
    eff = Efficiency(matmul_gflop_fraction=curve, memory_bound_fraction=1.0, attention_fraction=0.5,
                     collective_fraction=tuple((c, 1.0) for c in COLLECTIVES),
                     overlap_slowdown=profile.overlap_slowdown if profile.overlap_slowdown is not None else 0.0)
    gpu = GPU(name=profile.gpu_name, peak_bf16_tflops=profile.matmul_tflops, memory_gib=profile.memory_gib,
              hbm_bandwidth_gb_s=profile.hbm_bandwidth_gb_s, reserved_memory_gib=0.0 if profile.device == "cpu" else 1.0)
    return with_host_memory(Cluster(name=f"measured-{profile.device}", gpu=gpu, gpus_per_node=profile.device_count,
                                    links=(("intra_node", intra), ("inter_node", inter), ("host", host)),
                                    efficiency=eff, max_nodes=0 if profile.inter_node else 1,
                                    host_is_device=profile.device == "cpu"), profile)


def _with_measurements(cluster: Cluster, profile: Profile) -> Cluster:
    """The preset with what the profile measured put in: memory size, the matmul efficiency curve,
    the memory-bound fraction (achieved copy over datasheet bandwidth), the overlap slowdown and the
    inter-node link where measured. The datasheet peak stays, so MFU keeps its usual meaning."""
    from dataclasses import replace

    from planner.core.cluster import Link

    gpu, eff, links = cluster.gpu, cluster.efficiency, dict(cluster.links)
    if profile.memory_gib > 0:
        gpu = replace(gpu, memory_gib=profile.memory_gib)
    curve = _measured_curve(profile, gpu.peak_bf16_tflops)
    if curve:
        eff = replace(eff, matmul_gflop_fraction=curve)
    if profile.hbm_bandwidth_gb_s > 0:
        eff = replace(eff, memory_bound_fraction=min(1.0, profile.hbm_bandwidth_gb_s / gpu.hbm_bandwidth_gb_s))
    if profile.overlap_slowdown is not None:
        eff = replace(eff, overlap_slowdown=float(profile.overlap_slowdown))
    if profile.inter_node is not None:
        links["inter_node"] = _link_from_fit(profile.inter_node)
    if profile.host_bandwidth_gb_s > 0:
        links["host"] = Link(latency_us=links["host"].latency_us, bandwidth_gb_s=profile.host_bandwidth_gb_s)
    return with_host_memory(replace(cluster, name=f"{cluster.name}+profile", gpu=gpu, efficiency=eff,
                                    links=tuple((t, links[t]) for t, _ in cluster.links)), profile)


def measured_host_memory_gib_per_gpu(profile: Profile) -> float:
    """The profiled host's CPU memory per GPU (facts host_memory_gib / gpu_count); 0 where not recorded or on a CPU
    profile (there the devices' memory is the host's already). The 2xH200 machines have 252 GiB for their 2 GPUs,
    half a DGX H200's 256 GiB per GPU: a 13B ZeRO-1 offload plan that fits the preset's host was OOM-killed there."""
    facts = profile.facts or {}
    host, gpus = facts.get("host_memory_gib"), facts.get("gpu_count")
    if profile.device == "cpu" or not isinstance(host, (int, float)) or not isinstance(gpus, int) or gpus <= 0:
        return 0.0
    return float(host) / gpus


def with_host_memory(cluster: Cluster, profile: Profile) -> Cluster:
    """`cluster` with the profiled host's CPU memory per GPU on each of its nodes, where the profile recorded it."""
    host = measured_host_memory_gib_per_gpu(profile)
    return replace(cluster, host_memory_gib=host * cluster.gpus_per_node) if host else cluster


def cluster_for_profile(profile: Profile, cluster: Cluster | None) -> Cluster:
    """The cluster to plan on when a profile is given (`resolve_cluster` calls this).

    - A CPU profile describes its own machine: the result is `measured_cluster(profile)` whatever
      `cluster` is (the CLI always passes its default preset).
    - A GPU profile and a cluster: the cluster's GPU must be the profiled chip (`gpu_family`), else a
      DistplanError names both and the presets that match; the result is the cluster with the
      measured numbers put in (`_with_measurements`).
    - A GPU profile and no cluster (`--profile` without `--cluster`): the preset of the profiled chip
      (closest in memory), with the measured numbers; with no such preset, the measured machine alone.
    """
    if profile.device == "cpu":
        return measured_cluster(profile)
    family = gpu_family(profile.gpu_name)
    if cluster is None:
        preset = _matching_preset(profile)
        return _with_measurements(preset, profile) if preset is not None else measured_cluster(profile)
    if gpu_family(cluster.gpu.name) != family:
        from planner.core.cluster import cluster_names, load_cluster

        same = [n for n in cluster_names() if gpu_family(load_cluster(n).gpu.name) == family]
        hint = f"; presets with {family}: {', '.join(same)}" if same else "; omit --cluster to plan on the profiled machine"
        raise DistplanError(f"profile measured GPU '{profile.gpu_name}' ({family}) but cluster '{cluster.name}' has "
                            f"'{cluster.gpu.name}' ({gpu_family(cluster.gpu.name)}): profile the cluster's GPUs or "
                            f"pass a cluster of the profiled GPU{hint}")
    return _with_measurements(cluster, profile)


# ---- the profile a job is priced with (estimate, solve and run) ---------------------------------


def resolve_cluster(cluster: str, profile_path: str | None) -> tuple[Cluster, Profile | None]:
    """The cluster to plan on, and the profile whose measurements replace its preset numbers."""
    if profile_path is None:
        return load_cluster(cluster), None
    prof = load_profile(profile_path)
    return cluster_for_profile(prof, load_cluster(cluster) if cluster else None), prof


@dataclass(frozen=True)
class JobProfile:
    """The profile a job is priced with: `profile_for_job`'s verdict, with the calibration factors that apply."""

    profile: Profile | None
    notes: tuple[str, ...]  # one line each: model-specific measurements dropped, calibration applied or not


def job_profile(profile: Profile | None, profile_path: str | Path | None, model: ModelSpec, seq_len: int,
                cluster: Cluster, *, engine: str, fallback: bool = False, calibration: str | Path | None = None,
                gpu_name: str | None = None) -> JobProfile:
    """`profile` for `model` at `seq_len` (profile_for_job: refused if it measured another
    shape, unless `fallback`), then the factors of `calibration` for this `engine`, GPU (`gpu_name`, default the
    cluster's), shape and profile file (planner.core.calibration.apply_calibration). Estimate, solve and run call this."""
    require(not fallback or profile_path is not None, f"{FALLBACK_FLAG} needs --profile PATH (the profile to fall back from)")
    prof = profile_for_job(profile, model, seq_len, fallback=fallback, source=str(profile_path))
    notes = [line for line in [migration_note(prof, profile_path) if prof is not None else None] if line]
    if prof is not None and prof.model_specific_dropped:
        notes.append(f"profile: {profile_path} measured {describe_profile(prof)}: its layer fits, stack factor and per-block "
                     "sharding/TP fits do not apply; those terms come from the preset (see sources)")
    prof, line = apply_calibration(prof, calibration, engine=engine, gpu_name=gpu_name or cluster.gpu.name,
                                   model=model, seq_len=seq_len, profile_path=profile_path)
    return JobProfile(prof, tuple(notes + ([line] if line else [])))


# ---- what a profile derives from its measurements, and the migration of older files -------------------------------

HOST_BOUND_SHARE = 0.99  # a lone block whose GPU time is at least this share of its fit (max(GPU, host)) is GPU-bound
STACK_FROM = ("raw.communication.sharding's plain stacks over raw.compute's block at tp 1 "
              "(planner.cost.profiled.stack_fit)")
STACK_MEASURED = f"derived by the profiler from {STACK_FROM}"
STACK_MIGRATED = f"derived on load from {STACK_FROM}: the version-1 file predates stored derived values"


def stack_fit(profile: Profile) -> StackFit | None:
    """Distplan's block inside a stack, on every GPU at once, over the same block alone (StackFit), from the
    profile's raw measurements; None where it measured no stack (or only malformed ones).

    The compute fits time one block at a time on one GPU while the others idle. The sharding profiler's plain
    stacks (profilers/sharding.py: 4-8 blocks, forward + backward, every rank at once, the slowest rank's time, no
    data parallelism; a world of one on one device) run the same block as a model does. At compute-bound sizes a
    block in the stack took 4-13% longer than alone on 2x H200, as the runs did (benchmarks/results/
    profile_2xh200.md, "A block in a stack"). Where the lone block is host-bound (its fit is max(GPU, host)), a
    stack runs faster per block than it, as a model does: the host's fixed cost per call overlaps the GPU's work of
    the blocks before (benchmarks/results/campaign_1xh200.md). So: at token counts where the lone block's GPU time
    is its fit (from the smallest raw compute point that is GPU-bound up), the factor at the largest token count
    (the median over the stacks' modes there, at least 1: llama-3-8b's runs at micro-batch 1 x 4096 on 2x H200
    matched it, not the factor its short stacks measured at 4096 tokens); below, where the host's time is the fit,
    the median of the stacks at that token count, at least the GPU's share of the fit (a block cannot beat its GPU
    time); between the two, StackFit.factor interpolates.
    """
    raw = profile.raw if isinstance(profile.raw, dict) else {}
    comm = raw.get("communication") if isinstance(raw.get("communication"), dict) else {}
    points = [p for p in comm.get("sharding") or [] if isinstance(p, dict) and p.get("blocks", 1) > 1
              and not str(p.get("impl", "")).startswith(("tp", "fsdp2-tp"))]  # their plain blocks are tp shards
    fit = profile.compute_fit("block", 1)
    if not points or fit is None:
        return None
    alone = lambda t: fit.time_s("fwd", t) + fit.time_s("bwd", t)  # noqa: E731
    share = {}  # tokens -> the GPU's share of the lone block's fit, where the raw compute points have it
    for entry in raw.get("compute") or []:
        if isinstance(entry, dict) and entry.get("kind") == "block" and entry.get("tp") == 1:
            for q in entry.get("points") or []:
                t = float(q["tokens"]) if isinstance(q, dict) and "gpu_fwd_s" in q and "gpu_bwd_s" in q else 0.0
                if t and alone(t) > 0:
                    share[t] = (float(q["gpu_fwd_s"]) + float(q["gpu_bwd_s"])) / alone(t)
    try:
        ratios = {t: statistics.median(float(p["plain_s"]) / int(p["blocks"]) / alone(t) for p in points
                                       if float(p["tokens"]) == t)
                  for t in sorted({float(p["tokens"]) for p in points}) if alone(t) > 0}
    except (KeyError, TypeError, ValueError, ZeroDivisionError, statistics.StatisticsError):
        return None  # malformed raw points: no factor, the fits alone apply
    if not ratios:
        return None
    compute_bound = max(1.0, ratios[max(ratios)])
    gpu_from = min([t for t, g in share.items() if g >= HOST_BOUND_SHARE] or [0.0])
    host = tuple((t, max(share.get(t, 0.0), r)) for t, r in ratios.items() if t < gpu_from)
    return StackFit(compute_bound=compute_bound, gpu_bound_from_tokens=gpu_from, host_bound=host,
                    gpu_share=tuple(sorted(share.items())))


def with_derived(profile: Profile, note: str = STACK_MEASURED) -> Profile:
    """`profile` with its stack factor derived from its measurements (stack_fit) and `note` saying how."""
    stack = stack_fit(profile)
    notes = tuple((k, v) for k, v in profile.derived if k != "stack_factor")
    return replace(profile, stack=stack, derived=notes + ((("stack_factor", note),) if stack is not None else ()))


def migrated(profile: Profile) -> Profile:
    """`profile` as the current version holds it: one read from a version-1 file gets its stack factor derived
    once, on load, from its raw measurements (the function the profiler uses), and `derived` says so."""
    return profile if profile.file_version == PROFILE_VERSION else with_derived(profile, STACK_MIGRATED)


def profile_from_dict(d: object, source: str) -> Profile:
    """A profile from its file's dict form, of any version that loads, migrated (planner.core.profile.parse_profile)."""
    return migrated(parse_profile(d, source))


def load_profile(path: str | Path) -> Profile:
    """A profile file, of any version that loads, migrated: the door estimate, solve, run and the benchmarks use."""
    return migrated(read_profile(path))


def migration_note(profile: Profile, source: str | Path | None = None) -> str | None:
    """One line on what was derived on load from an older profile file, or None for a current one."""
    if profile.file_version == PROFILE_VERSION or not profile.derived:
        return None
    what = "; ".join(f"{k} {v}" for k, v in profile.derived)
    return f"profile: {source or 'the profile'} is a version-{profile.file_version} file: {what}"
