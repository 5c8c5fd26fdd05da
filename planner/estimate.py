"""`distplan estimate`: resolve names and files, build the configuration, validate it, predict."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from planner.core.cluster import Cluster, check_gpu_count, load_cluster
from planner.core.errors import DistplanError, require
from planner.core.job import MAX_DEGREE, MAX_GLOBAL_BATCH, MAX_SEQ_LEN, ParallelConfig, validate_config
from planner.core.model import ModelSpec, load_model
from planner.core.prediction import Prediction
from planner.cost.predict import predict
from planner.core.profile import Profile
from planner.cost.profiled import load_profile


@dataclass(frozen=True)
class EstimateRequest:
    model: str
    cluster: str
    gpus: int
    tp: int = 1
    pp: int = 1
    dp: int | None = None
    cp: int = 1
    ep: int = 1
    vpp: int = 1
    micro_batch: int = 1
    global_batch: int | None = None
    seq_len: int | None = None
    schedule: str = "1f1b"
    recompute: str = "none"
    sequence_parallel: bool = False
    zero: int = 0
    offload_optimizer: bool = False
    layer_split: str | None = None
    flash_attention: bool = True
    overlap_grad_reduce: bool = True
    profile: str | None = None
    engine: str = "any"  # who runs it: its measured costs apply (FSDP2's, DeepSpeed's, megatron-core's layer)
    profile_fallback: bool = False  # a profile of another model shape: price its layers from the preset (profile_job)
    calibration: str | None = None  # calibration file: the factors of this engine, GPU, shape and profile apply


@dataclass(frozen=True)
class EstimateResult:
    model: ModelSpec
    cluster: Cluster
    config: ParallelConfig
    prediction: Prediction
    profile_path: str | None
    engine: str = "any"
    notes: tuple[str, ...] = ()  # what the profile and the calibration file contributed (JobProfile.notes)
    calibration_path: str | None = None

    def to_json(self) -> dict:
        return {"model": self.model.name, "cluster": self.cluster.name, "gpus": self.config.gpus, "engine": self.engine,
                "parallel": self.config.to_dict(), "num_microbatches": self.config.num_microbatches,
                **self.prediction.to_dict(), "profile": self.profile_path,
                **({"calibration": self.calibration_path} if self.calibration_path else {}),
                **({"notes": list(self.notes)} if self.notes else {})}


def parse_layer_split(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise DistplanError(f"--layer-split '{text}' must be comma-separated integers, e.g. 19,21,21,19") from None


def resolve_cluster(cluster: str, profile_path: str | None) -> tuple[Cluster, Profile | None]:
    """The cluster to plan on, and the profile whose measurements replace its preset numbers."""
    if profile_path is None:
        return load_cluster(cluster), None
    from planner.cost.profiled import cluster_for_profile  # written with the profiler

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
    """`profile` for `model` at `seq_len` (planner.cost.profiled.profile_for_job: refused if it measured another
    shape, unless `fallback`), then the factors of `calibration` for this `engine`, GPU (`gpu_name`, default the
    cluster's), shape and profile file (planner.core.calibration.apply_calibration). Estimate, solve and run call this."""
    from planner.core.calibration import apply_calibration
    from planner.cost.profiled import FALLBACK_FLAG, migration_note, profile_for_job
    from planner.core.profile import describe_profile

    require(not fallback or profile_path is not None, f"{FALLBACK_FLAG} needs --profile PATH (the profile to fall back from)")
    prof = profile_for_job(profile, model, seq_len, fallback=fallback, source=str(profile_path))
    notes = [line for line in [migration_note(prof, profile_path) if prof is not None else None] if line]
    if prof is not None and prof.model_specific_dropped:
        notes.append(f"profile: {profile_path} measured {describe_profile(prof)}: its layer fits, stack factor and per-block "
                     "sharding/TP fits do not apply; those terms come from the preset (see sources)")
    prof, line = apply_calibration(prof, calibration, engine=engine, gpu_name=gpu_name or cluster.gpu.name,
                                   model=model, seq_len=seq_len, profile_path=profile_path)
    return JobProfile(prof, tuple(notes + ([line] if line else [])))


def run_estimate(req: EstimateRequest) -> EstimateResult:
    for name, value, most in (("--seq-len", req.seq_len, MAX_SEQ_LEN), ("--global-batch", req.global_batch, MAX_GLOBAL_BATCH),
                              ("--dp", req.dp, MAX_DEGREE)):
        require(value is None or 1 <= value <= most, f"{name} must be a positive integer of at most {most}, got {value}")
    model = load_model(req.model)
    cluster, prof = resolve_cluster(req.cluster, req.profile)
    require(isinstance(req.gpus, int) and req.gpus > 0, f"--gpus must be a positive integer, got {req.gpus}")
    check_gpu_count(cluster, req.gpus)
    for name in ("tp", "pp", "cp", "ep", "vpp", "micro_batch"):
        most = MAX_GLOBAL_BATCH if name == "micro_batch" else MAX_DEGREE
        require(1 <= getattr(req, name) <= most, f"--{name.replace('_', '-')} must be >= 1 and at most {most}, "
                                                 f"got {getattr(req, name)}")
    denom = req.tp * req.pp * req.cp
    if req.dp is None:
        require(req.gpus % denom == 0,
                f"--gpus {req.gpus} is not divisible by tp*pp*cp = {req.tp}*{req.pp}*{req.cp} = {denom}")
        dp = req.gpus // denom
    else:
        dp = req.dp
    seq_len = model.seq_len if req.seq_len is None else req.seq_len
    global_batch = model.default_global_batch if req.global_batch is None else req.global_batch
    cfg = ParallelConfig(dp=dp, tp=req.tp, pp=req.pp, cp=req.cp, ep=req.ep, vpp=req.vpp,
                         sequence_parallel=req.sequence_parallel, zero_stage=req.zero,
                         offload_optimizer=req.offload_optimizer, micro_batch_size=req.micro_batch,
                         global_batch_size=global_batch, seq_len=seq_len, schedule=req.schedule,
                         recompute=req.recompute, layer_split=parse_layer_split(req.layer_split),
                         flash_attention=req.flash_attention, overlap_grad_reduce=req.overlap_grad_reduce)
    validate_config(model, cfg, req.gpus)
    job = job_profile(prof, req.profile, model, seq_len, cluster, engine=req.engine, fallback=req.profile_fallback,
                      calibration=req.calibration)
    from planner.cost.engines import ENGINE_LIMITS, runnable  # runnable refuses an unknown engine, naming the valid ones

    shape = (f"tp={cfg.tp} pp={cfg.pp} cp={cfg.cp} ep={cfg.ep} vpp={cfg.vpp} schedule={cfg.schedule} "
             f"zero={cfg.zero_stage}{' offload' if cfg.offload_optimizer else ''}{' sp' if cfg.sequence_parallel else ''}")
    require(runnable(req.engine, cfg), f"--engine {req.engine} does not run {shape} ({req.engine}: "
            f"{ENGINE_LIMITS.get(req.engine, '')}); --engine any prices it anyway")
    return EstimateResult(model=model, cluster=cluster, config=cfg,
                          prediction=predict(model, cluster, cfg, job.profile, engine=req.engine),
                          profile_path=req.profile, engine=req.engine, notes=job.notes,
                          calibration_path=req.calibration)


def plan_from_estimate(result: EstimateResult, command: str):
    """The hand-fixed configuration as a Plan file (rationale says it was not searched)."""
    from planner.core.plan import make_plan

    return make_plan(result.model, result.cluster, result.config.gpus, result.config, result.prediction,
                     rationale=["configuration fixed by hand (distplan estimate); not searched by the solver"],
                     provenance={"command": command, "profile": result.profile_path,
                                 **({"calibration": result.calibration_path} if result.calibration_path else {}),
                                 **({"notes": list(result.notes)} if result.notes else {})})
