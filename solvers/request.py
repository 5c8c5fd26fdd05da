"""`distplan solve` requests: resolve names and files into the objects `solvers.solve` takes.

Kept apart from `solve` so that the solver stays a pure function of objects; this module reads the
model, cluster and profile files (the CLI makes one call to `run_solve`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from planner.core.cluster import load_cluster
from planner.core.errors import DistplanError, require
from planner.cost.profiled import job_profile, resolve_cluster
from planner.core.job import RECOMPUTE, SCHEDULES
from planner.core.model import load_model
from solvers.search import MAX_MICRO_BATCH, NO_CONSTRAINTS, Constraints
from solvers.solve import SolveResult, solve

INT_AXES = ("dp", "tp", "pp", "cp", "ep", "vpp", "micro_batch")
MAX_DEGREE = 1 << 24  # a parallel degree above 16M GPUs is a typo (the largest published runs use 16k-100k GPUs)
BOOLS = {"yes": True, "true": True, "on": True, "1": True, "no": False, "false": False, "off": False, "0": False}

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
    constraints: Constraints = NO_CONSTRAINTS  # the values each axis may take (parse_constraints)
    candidates: bool = False  # also return every configuration considered
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
        parts += [f"--engine {self.engine}"] if self.engine != "any" else []  # the option's default: not an engine branch
        parts += ["--te"] if self.transformer_engine else []
        parts += [self.constraints.describe()] if self.constraints.given() else []
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
                   command=req.command(), engine=req.engine, transformer_engine=req.transformer_engine,
                   constraints=req.constraints, candidates=req.candidates)
    if not job.notes:
        return result
    plan = replace(result.plan, provenance={**result.plan.provenance, "notes": list(job.notes)})
    return replace(result, plan=plan)


def _values(option: str, text: str, parse, valid: str) -> tuple:
    items = [x.strip() for x in text.split(",")]
    try:
        values = tuple(parse(x) for x in items)
    except (ValueError, KeyError):
        raise DistplanError(f"--{option} '{text}' must be a comma-separated list of {valid}") from None
    require(values and len(set(values)) == len(values), f"--{option} '{text}' must list distinct values of {valid}")
    return values


def _degree(x: str) -> int:
    n = int(x)
    if not 1 <= n <= MAX_DEGREE:
        raise ValueError(x)
    return n


def parse_constraints(**options: str | int | None) -> Constraints:
    """Constraints from solve's options as typed (`tp="1,2,4"`, `zero="1,3"`, `max_micro_batch=8`, ...); None or a
    missing option leaves its axis free. DistplanError names the option, the value and what would be valid."""
    known = set(Constraints.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    require(not unknown, f"unknown constraint(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    out = {}
    for name, text in options.items():
        if text is None:
            continue
        option = name.replace("_", "-")
        if name == "max_micro_batch":
            require(isinstance(text, int) and not isinstance(text, bool) and 1 <= text <= MAX_MICRO_BATCH,
                    f"--max-micro-batch {text!r} must be an integer in [1, {MAX_MICRO_BATCH}]")
            out[name] = text
        elif name in INT_AXES:
            out[name] = _values(option, str(text), _degree, f"integers in [1, {MAX_DEGREE}], e.g. 1,2,4")
        elif name == "zero":
            out[name] = _values(option, str(text), lambda x: {"0": 0, "1": 1, "2": 2, "3": 3}[x], "ZeRO stages 0-3, e.g. 1,3")
        elif name in ("offload_optimizer", "sequence_parallel"):
            out[name] = _values(option, str(text), lambda x: BOOLS[x.lower()], "yes/no, e.g. no or yes,no")
        elif name == "recompute":
            out[name] = _values(option, str(text), lambda x: {r: r for r in RECOMPUTE}[x], f"{', '.join(RECOMPUTE)}")
        elif name == "schedule":
            out[name] = _values(option, str(text), lambda x: {r: r for r in SCHEDULES}[x], f"{', '.join(SCHEDULES)}")
    c = Constraints(**out)
    if c.micro_batch is not None and c.max_micro_batch is not None:
        require(any(m <= c.max_micro_batch for m in c.micro_batch),
                f"--micro-batch {','.join(map(str, c.micro_batch))} has no value <= --max-micro-batch {c.max_micro_batch}")
    return c
