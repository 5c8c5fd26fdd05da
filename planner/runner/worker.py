"""One rank of `distplan run`: `python -m planner.runner.worker --plan plan.yaml [options]`.

Started once per rank, by the launcher (planner/runner/launch.py) or by the emitted torchrun line
(torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). It initialises
torch.distributed (NCCL on CUDA, gloo on CPU), calls the engine and hands back its RankResult:

- with --result-dir (the launcher): writes DIR/rank<r>.json atomically; if the rank fails it writes
  DIR/rank<r>.error.json (rank, step, kind error|oom, exception, traceback) and exits 1 at once, so
  the launcher can stop the other ranks instead of letting them hang in a collective;
- without it (torchrun on several nodes): the results are gathered on rank 0, which writes the report
  (-o, default report.yaml; the numerics check needs the launcher, `distplan run`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

from planner.core.fileio import atomic_write_text
from planner.runner.engine_api import DistInfo, RunOptions, current_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m planner.runner.worker", description=__doc__.splitlines()[0])
    p.add_argument("--plan", required=True)
    p.add_argument("--engine", default="torch")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data", default=None)
    p.add_argument("--data-dtype", default="uint16")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--result-dir", default=None)
    p.add_argument("-o", "--output", default="report.yaml")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    return p.parse_args(argv)


def resolve_dtype(dtype: str, device_type: str) -> str:
    if dtype == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return dtype


def _dist_info() -> DistInfo:
    import torch

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        return DistInfo(rank, world, local, f"cuda:{local}", "nccl")
    return DistInfo(rank, world, local, "cpu", "gloo")


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and what caused it (raise ... from / during handling), outermost first."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _is_oom(exc: BaseException) -> bool:
    """Out of memory anywhere in the chain: torch.distributed.pipelining re-raises a stage's OOM as
    RuntimeError("[Stage 4] failed to run forward"), which on 2xH200 was reported as a plain error."""
    import torch

    return any(isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()
               for e in _chain(exc))


def _reason(exc: BaseException) -> str:
    """One line: the exception, and its root cause when it wraps another."""
    def line(e: BaseException) -> str:
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": ")

    chain = _chain(exc)
    return line(exc) if len(chain) == 1 else f"{line(exc)} (caused by {line(chain[-1])})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as tdist

    dist = _dist_info()
    opts = RunOptions(engine=args.engine, steps=args.steps, warmup=args.warmup, seed=args.seed, data_path=args.data,
                      data_dtype=args.data_dtype, dtype=resolve_dtype(args.dtype, dist.device.split(":")[0]), lr=args.lr,
                      timeout_s=args.timeout, checkpoint_dir=args.checkpoint_dir,
                      checkpoint_every=args.checkpoint_every, resume=args.resume)
    result_dir = Path(args.result_dir) if args.result_dir else None
    try:
        from planner.core.plan import load_plan
        from planner.runner.engines import get_engine

        plan = load_plan(args.plan)
        if dist.backend == "nccl":
            torch.cuda.set_device(dist.local_rank)
        tdist.init_process_group(dist.backend, rank=dist.rank, world_size=dist.world_size,
                                 timeout=timedelta(seconds=opts.timeout_s))
        result = get_engine(opts.engine)(plan, opts, dist)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a record the launcher reports
        record = {"rank": dist.rank, "step": current_step(), "kind": "oom" if _is_oom(exc) else "error",
                  "reason": _reason(exc),
                  "traceback": traceback.format_exc()[-4000:]}
        if result_dir is not None:
            atomic_write_text(result_dir / f"rank{dist.rank}.error.json", json.dumps(record))
        print(record["traceback"], file=sys.stderr, flush=True)
        os._exit(1)  # no destroy_process_group: peers may be blocked in a collective with us

    from planner.runner.report import rank_result_to_dict

    if result_dir is not None:
        atomic_write_text(result_dir / f"rank{dist.rank}.json", json.dumps(rank_result_to_dict(result)))
    else:
        _gather_and_report(plan, args, opts, result)
    tdist.destroy_process_group()
    return 0


def _gather_and_report(plan, args, opts: RunOptions, result) -> None:
    """torchrun mode: rank 0 gathers every RankResult and writes the report."""
    import torch.distributed as tdist

    from planner.runner.report import build_report, rank_result_from_dict, rank_result_to_dict, save_report

    gathered = [None] * tdist.get_world_size() if tdist.get_rank() == 0 else None
    tdist.gather_object(rank_result_to_dict(result), gathered, dst=0)
    if tdist.get_rank() != 0:
        return
    results = [rank_result_from_dict(d) for d in gathered]
    report = build_report(plan, args.plan, opts.engine, result.device, opts.dtype, opts.steps, opts.warmup,
                          opts.data_path or "synthetic", args.tolerance, plan.prediction, results, [], None,
                          notes=("launched by torchrun: no numerics check (use `distplan run --check-numerics`)",))
    save_report(report, args.output)
    print(f"report written to {args.output}: {'passed' if report.passed else 'FAILED'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
