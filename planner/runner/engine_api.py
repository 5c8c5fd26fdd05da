"""The contract between the run launcher/worker and the engines (torch, deepspeed, megatron).

A worker process (one per rank, started by torchrun or by the launcher's spawn) initialises
torch.distributed, builds `RunOptions` and `DistInfo`, calls the plan's engine
`train(plan, opts, dist) -> RankResult`, and gathers every rank's result on rank 0, which writes the
report. Engines only train and measure; they never write the report or print tables.

Data contract (numerics check): step k consumes global batch k = `global_batch_size` sequences
from `planner.runner.data`; data-parallel rank r, micro-batch j of that step takes sequences
[(j * dp + r) * mb, (j * dp + r + 1) * mb) of it, so a single-process run over the same global
batch computes the same loss (the mean over the global batch) up to floating-point error.
`planner.runner.data.DataSource(...).global_batch(k)` yields it and `data.local_batch` cuts rank r's share.

Weights contract (numerics check): engines initialise with
`planner.build.parallelize.init_weights_by_name(module, spec, seed)`, which draws every tensor from its
model-level name, so any pipeline cut or shard holds the single-process model's values.

Progress contract: engines call `mark_step(k)` as this run's step k (warm-up included, from 0) begins, so that a
rank that dies (SIGKILL, OOM killer) is reported with the step it died in.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from planner.core.plan import Plan


@dataclass(frozen=True)
class RunOptions:
    engine: str = "torch"  # key of planner.runner.engines.ENGINES
    steps: int = 10  # measured steps (this invocation's; a resumed run trains warmup + steps more)
    warmup: int = 3  # steps run before measuring (not timed; they train like the others)
    seed: int = 1234  # weights and synthetic data
    data_path: str | None = None  # tokenized binary file (uint16 or uint32 tokens); None -> synthetic
    data_dtype: str = "uint16"
    dtype: str = "auto"  # compute dtype bf16 or fp32; "auto": bf16 on CUDA, fp32 on CPU (resolved before engines see it)
    lr: float = 1e-4
    timeout_s: float = 600.0  # a rank that does not finish by then is reported as hung
    trace: bool = False  # torch engine: profile one extra step (planner/runner/trace.py; sets DISTPLAN_TRACE=1)
    memory_peak: bool = False  # torch engine on CUDA: what is live at one extra step's peak (runner/memory_peak.py)
    checkpoint_dir: str | None = None  # torch engine: DCP checkpoints in DIR/step-<k> (planner/runner/checkpoint.py)
    checkpoint_every: int | None = None  # save every N optimizer steps; None: after the run's last step
    resume: bool = False  # continue from checkpoint_dir's latest checkpoint (its step + 1, same data and RNGs)


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


# ---- progress (the launcher reads it to say where a dead rank was) ----------------------------------
PROGRESS_ENV = "DISTPLAN_PROGRESS_FILE"  # set by the launcher: this rank's heartbeat file
TEST_KILL_ENV = "DISTPLAN_TEST_KILL"  # tests only: "RANK:STEP" makes that rank SIGKILL itself as the step begins,
#                                       "RANK:STEP:hang" makes it hang there (its peers block in the next collective)
_current = {"step": -1}


def mark_step(step: int) -> None:
    """Record that `step` begins on this rank (in memory, and in the launcher's heartbeat file if any)."""
    _current["step"] = step
    path = os.environ.get(PROGRESS_ENV)
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(str(step))
        os.replace(tmp, path)
    kill = os.environ.get(TEST_KILL_ENV, "").split(":")
    if kill[:2] == [os.environ.get("RANK", "0"), str(step)]:
        if kill[2:] == ["hang"]:
            while True:
                time.sleep(3600)
        os.kill(os.getpid(), signal.SIGKILL)


def current_step() -> int:
    """The step this rank last began (-1: none yet, e.g. still building the model)."""
    return _current["step"]
