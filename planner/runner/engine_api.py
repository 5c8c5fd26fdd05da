"""The contract between the run launcher/worker and the engines (torch, deepspeed, megatron).

A worker process (one per rank, started by torchrun or by the launcher's spawn) initialises
torch.distributed, builds `RunOptions` and `DistInfo`, calls the plan's engine
`train(plan, opts, dist) -> RankResult`, and gathers every rank's result on rank 0, which writes the
report. Engines only train and measure; they never write the report or print tables.

Data contract (numerics check): step k consumes global batch k = `global_batch_size` sequences
from `planner.runner.data`; data-parallel rank r, micro-batch j of that step takes sequences
[(j * dp + r) * mb, (j * dp + r + 1) * mb) of it, so a single-process run over the same global
batch computes the same loss (the mean over the global batch) up to floating-point error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from planner.plan import Plan


@dataclass(frozen=True)
class RunOptions:
    engine: str = "torch"  # key of planner.runner.engines.ENGINES
    steps: int = 10  # measured steps
    warmup: int = 3  # steps run before measuring (not timed)
    seed: int = 1234  # weights and synthetic data
    data_path: str | None = None  # tokenized binary file (uint16 or uint32 tokens); None -> synthetic
    data_dtype: str = "uint16"
    dtype: str = "bf16"  # compute dtype: bf16 on CUDA; the worker may use fp32 on CPU (stated in the report)
    lr: float = 1e-4
    timeout_s: float = 600.0  # a rank that does not finish by then is reported as hung


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: str  # "cuda:<i>" or "cpu"
    backend: str  # "nccl" or "gloo"


@dataclass(frozen=True)
class RankResult:
    rank: int
    pp_rank: int  # pipeline stage this rank belongs to
    step_times_s: tuple[float, ...]  # measured steps only (after warm-up), wall time per optimizer step
    losses: tuple[float, ...]  # loss of every step (warm-up included), as seen by this rank (NaN if it has none)
    peak_allocated_bytes: int  # torch.cuda.max_memory_allocated (CPU: 0 unless measured)
    peak_reserved_bytes: int  # torch.cuda.max_memory_reserved
    device: str
    dtype: str
    notes: tuple[str, ...] = ()  # e.g. how ZeRO stages mapped onto FSDP2 / DDP
    extra: dict = field(default_factory=dict, hash=False, compare=False)


class Engine(Protocol):
    def __call__(self, plan: Plan, opts: RunOptions, dist: DistInfo) -> RankResult: ...


EngineFn = Callable[[Plan, RunOptions, DistInfo], RankResult]
