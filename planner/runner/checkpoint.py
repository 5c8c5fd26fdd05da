"""Checkpoint and resume of `distplan run` (torch engine): `--checkpoint-dir D --checkpoint-every N --resume`.

Layout: D/step-<k>/ holds the state after k optimizer steps (warm-up steps count: they train too), D/latest
names the newest complete one ("step-<k>"). A checkpoint is written to D/step-<k>.tmp and renamed into place
by rank 0 once every rank has written its part, then `latest` is replaced atomically: a crash mid-save leaves
the previous checkpoint as the latest.

Inside a checkpoint:
- the model and AdamW states as torch.distributed.checkpoint (DCP) shards, taken and put back with
  torch.distributed.checkpoint.state_dict.get_state_dict / set_state_dict, so FSDP2 shards and DTensor TP
  shards are saved by whoever holds them, and pipeline stages save their own modules (the parameter names
  are the full model's, planner.build.parallelize.StageModule, and the optimizer state is flattened to one key
  per parameter, so stages never collide);
- rng-rank<r>.pt: each rank's RNG states (torch CPU, CUDA where present, Python's random, numpy);
- META: the step count k, the run's fingerprint (model, parallel configuration, dtype, seed, data) and the
  engine. The data needs no position of its own: step k's batch is a pure function of (seed, k)
  (planner/runner/data.py), so a run resumed after k steps draws batch k next, as the uninterrupted run did.
  The learning rate is constant (no schedule state).

`check_options` refuses bad combinations before any worker starts (one line, exit 2); `Checkpointer` is what
the engine calls on every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

from planner.core.errors import DistplanError, require
from planner.core.fileio import atomic_write_text
from planner.core.plan import Plan
from planner.cost.engines import ENGINES, engine_model
LATEST = "latest"  # D/latest: the name of the newest complete checkpoint folder
META = "distplan-checkpoint.json"  # inside a checkpoint folder: step, fingerprint, engine
META_VERSION = 1


def fingerprint(plan: Plan, opts) -> dict:
    """What must match for a checkpoint to continue this run: the model, the parallel configuration (shards are
    laid out by it), the dtype, and what decides the data (seed, token file)."""
    d = plan.to_dict()
    return {"model": d["model"], "parallel": d["parallel"], "job": d["job"], "dtype": opts.dtype, "seed": opts.seed,
            "data": opts.data_path, "data_dtype": opts.data_dtype}


def _digest(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _first_difference(a, b, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
    return f"{where} {a!r} in the checkpoint, {b!r} now"


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in `directory` (its `latest` pointer), or None."""
    pointer = Path(directory) / LATEST
    try:
        name = pointer.read_text().strip()
    except OSError:
        return None
    path = Path(directory) / name
    return path if name.startswith("step-") and (path / META).is_file() else None


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        raise DistplanError(f"checkpoint '{path}': cannot read {META} ({type(exc).__name__})") from None
    require(isinstance(meta, dict) and meta.get("version") == META_VERSION and isinstance(meta.get("step"), int),
            f"checkpoint '{path}': {META} is not a version-{META_VERSION} distplan checkpoint")
    return meta


def check_options(plan: Plan, opts, fsdp: bool, check_numerics: bool) -> None:
    """Refuse bad checkpoint options before any worker starts (opts.dtype resolved; `fsdp`: the torch engine runs
    the plan through FSDP2)."""
    asked = opts.checkpoint_dir is not None or opts.checkpoint_every is not None or opts.resume
    if not asked:
        return
    able = [name for name, row in ENGINES.items() if row.checkpoints]
    require(engine_model(opts.engine).checkpoints,
            f"--checkpoint-dir / --checkpoint-every / --resume are supported by the {', '.join(able)} "
            f"engine only; engine is {opts.engine!r}")
    require(opts.checkpoint_every is None or opts.checkpoint_every >= 1,
            f"--checkpoint-every {opts.checkpoint_every} is out of range; valid: a number of optimizer steps >= 1")
    require(opts.checkpoint_dir is not None,
            "--resume needs --checkpoint-dir D (the folder to resume from)" if opts.resume
            else "--checkpoint-every needs --checkpoint-dir D (where to save)")
    require(str(opts.checkpoint_dir).strip() != "", "--checkpoint-dir '' is empty; name a folder")
    directory = Path(opts.checkpoint_dir)
    require(not directory.exists() or directory.is_dir(), f"--checkpoint-dir '{directory}' is a file; name a folder")
    require(opts.dtype != "bf16" or fsdp, "checkpoints of bf16 runs without FSDP2 (DDP or no data parallelism: fp32 "
            "masters in MasterWeightsOptimizer) are not supported; use --dtype fp32 or a ZeRO >= 1 plan")
    if not opts.resume:
        return
    require(not check_numerics, "--check-numerics compares losses from step 0 with a single-process run; "
            "it cannot check a resumed run (check the run that starts from step 0)")
    path = latest(directory)
    require(path is not None, f"--resume: no checkpoint in '{directory}' (no '{LATEST}' pointing at a complete "
            f"step-<k> folder); run without --resume first")
    meta = read_meta(path)
    mine = fingerprint(plan, opts)
    require(meta.get("fingerprint") == _digest(mine),
            f"--resume: checkpoint '{path}' is of another run: {_first_difference(meta.get('run', {}), mine)}")


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _options():
    """Optimizer state flattened to one key per parameter and setting (`state.<name>.exp_avg`,
    `param_groups.<name>.lr`, torchtitan's choice): pipeline stages hold different parameters, and a nested
    `param_groups` list would be one key on every rank, which DCP saves once (rank 0's) as if replicated."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


class Checkpointer:
    """One rank's side of checkpointing: every rank calls `save` and `resume` together (they are collective)."""

    def __init__(self, plan: Plan, opts, rank: int, modules: list, optimizer):
        import torch.nn as nn

        self.dir = Path(opts.checkpoint_dir)
        self.every = opts.checkpoint_every
        self.rank = rank
        # one module per rank, or this rank's virtual pipeline chunks together (names stay unique: model-level)
        self.model = modules[0] if len(modules) == 1 else nn.ModuleList(modules)
        self.optimizer = optimizer
        self.fingerprint = fingerprint(plan, opts)
        self.saved: list[int] = []
        self.save_s = 0.0
        self.resumed_from: int | None = None

    def due(self, done: int, last: int) -> bool:
        """Save after `done` optimizer steps? Every `every` steps; without --checkpoint-every, after the last one."""
        return done % self.every == 0 if self.every is not None else done == last

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=_options())
        return {"model": model_sd, "optim": optim_sd}

    def save(self, done: int) -> None:
        import torch
        import torch.distributed as tdist
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        final, tmp = self.dir / f"step-{done}", self.dir / f"step-{done}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        tdist.barrier()
        dcp.save(self._state(), checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng-rank{self.rank}.pt")
        tdist.barrier()
        if self.rank == 0:
            meta = {"version": META_VERSION, "step": done, "engine": "torch",
                    "fingerprint": _digest(self.fingerprint), "run": self.fingerprint}
            (tmp / META).write_text(json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(self.dir / LATEST, final.name + "\n")
        tdist.barrier()
        self.saved.append(done)
        self.save_s += time.perf_counter() - t0

    def resume(self) -> int:
        """Load the latest checkpoint into the model, optimizer and RNGs; returns the steps it had done."""
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        path = latest(self.dir)
        require(path is not None, f"--resume: no checkpoint in '{self.dir}'")
        meta = read_meta(path)  # checked by the launcher already; again here for torchrun launches
        require(meta.get("fingerprint") == _digest(self.fingerprint),
                f"--resume: checkpoint '{path}' is of another run: {_first_difference(meta.get('run', {}), self.fingerprint)}")
        state = self._state()
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_options())
        _set_rng_state(torch.load(path / f"rng-rank{self.rank}.pt", weights_only=False))
        self.resumed_from = meta["step"]
        return meta["step"]

    def summary(self) -> dict:
        """The report's checkpoint facts (rank 0's)."""
        return {"dir": str(self.dir), "every": self.every, "saved_steps": list(self.saved),
                "resumed_from_step": self.resumed_from, "save_s": self.save_s}
