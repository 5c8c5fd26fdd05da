"""`distplan solve` requests: resolve names and files into the objects `solvers.solve` takes.

Kept apart from `solve` so that the solver stays a pure function of objects; this module reads the
model, cluster and profile files (the CLI makes one call to `run_solve`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from planner.cluster import load_cluster
from planner.errors import require
from planner.estimate import job_profile, resolve_cluster
from planner.model import load_model
from solvers.solve import SolveResult, solve

DEFAULT_CLUSTER = "dgx-h100-80gb"


@dataclass(frozen=True)
class SolveRequest:
    model: str
    gpus: int
    cluster: str | None = None  # None: the dgx-h100-80gb preset, or the profiled GPU's preset with --profile
    profile: str | None = None
    global_batch: int | None = None
    seq_len: int | None = None
    top_k: int = 3
    time_limit_s: float | None = None
    ilp_backend: str = "ortools"
    engine: str = "any"  # keep only plans this `distplan run` engine executes
    transformer_engine: bool = False  # --te: megatron runs with Transformer Engine (fused attention)
    profile_fallback: bool = False  # a profile of another model shape: price its layers from the preset
    calibration: str | None = None  # calibration file: the factors of this engine, GPU, shape and profile apply

    def command(self) -> str:
        """The command line that reproduces this request (written into the plan's header)."""
        parts = ["distplan solve", f"--model {self.model}", f"--gpus {self.gpus}"]
        parts += [f"--cluster {self.cluster}"] if self.cluster else []
        parts += [f"--profile {self.profile}"] if self.profile else []
        parts += [f"--global-batch {self.global_batch}"] if self.global_batch else []
        parts += [f"--seq-len {self.seq_len}"] if self.seq_len else []
        parts += [f"--top-k {self.top_k}"] if self.top_k != 3 else []
        parts += [f"--time-limit {self.time_limit_s:g}"] if self.time_limit_s is not None else []
        parts += [f"--ilp-backend {self.ilp_backend}"] if self.ilp_backend != "ortools" else []
        parts += [f"--engine {self.engine}"] if self.engine != "any" else []
        parts += ["--te"] if self.transformer_engine else []
        parts += ["--profile-fallback"] if self.profile_fallback else []
        parts += [f"--calibration {self.calibration}"] if self.calibration else []
        return " ".join(parts)


def run_solve(req: SolveRequest, progress: Callable[[int, int], None] | None = None) -> SolveResult:
    model = load_model(req.model)
    require(isinstance(req.gpus, int) and req.gpus > 0, f"--gpus must be a positive integer, got {req.gpus}")
    if req.profile is None:
        cluster, prof = load_cluster(req.cluster or DEFAULT_CLUSTER), None
    else:
        cluster, prof = resolve_cluster(req.cluster or "", req.profile)
    job = job_profile(prof, req.profile, model, req.seq_len or model.seq_len, cluster, engine=req.engine,
                      fallback=req.profile_fallback, calibration=req.calibration)
    result = solve(model, cluster, req.gpus, job.profile, global_batch=req.global_batch, seq_len=req.seq_len,
                   top_k=req.top_k, time_limit_s=req.time_limit_s, ilp_backend=req.ilp_backend, progress=progress,
                   command=req.command(), engine=req.engine, transformer_engine=req.transformer_engine)
    if not job.notes:
        return result
    plan = replace(result.plan, provenance={**result.plan.provenance, "notes": list(job.notes)})
    return replace(result, plan=plan)
