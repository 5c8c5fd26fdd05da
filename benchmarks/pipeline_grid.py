"""How torch.distributed.pipelining's cost per operation moves with the schedule's shape: chunks per rank (vpp)
and micro-batches per step, measured over 2 ranks (a diagnostic for benchmarks/DEVICE_NOTES.md, not a profile).

Why: the profiler measures the interleaved schedule at one shape (profilers/pipeline.VPP chunks of one block,
MICROBATCHES micro-batches: 16 operations per rank) and solved 0.52 ms per operation on 2x H200 for llama-3-8b;
runs of 64 operations per rank (llama-3-8b v8 x 4, gpt2-xl v2 x 16) lost 1.1-1.3 ms per operation. This
measures the same quantity (profilers.pipeline.solve_action_s) over a grid of shapes, and beside the step's
wall clock the host's: the seconds until schedule.step returns before the device is synchronised. Where the
two are close the step is bound by the host (the runtime's Python and the chunks' kernel launches).

Use (2 GPUs, or 2 CPU processes with gloo): python3 benchmarks/pipeline_grid.py -m llama-3-8b --seq-len 4096
    [--micro-batch 1] [--grid 1f1b:1:4,interleaved:2:4,...] [-o grid.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# schedule:chunks per rank:micro-batches shapes timed (16 to 64 operations per rank)
DEFAULT_GRID = ("1f1b:1:4", "1f1b:1:16", "interleaved:2:4", "interleaved:2:8", "interleaved:2:16",
                "interleaved:4:4", "interleaved:8:4", "interleaved:4:8")


def parse_grid(text: str) -> list[tuple[str, int, int]]:
    """'kind:vpp:microbatches,...' -> [(kind, vpp, microbatches)]; a one-line ValueError on a bad entry."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in ("1f1b", "interleaved") or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"grid entry {item!r}: expected kind:vpp:microbatches with kind 1f1b or interleaved")
        kind, vpp, m = parts[0], int(parts[1]), int(parts[2])
        if vpp < 1 or m < 2 or m % 2 or (kind == "1f1b" and vpp != 1):
            raise ValueError(f"grid entry {item!r}: vpp >= 1 (1 for 1f1b), micro-batches an even number >= 2")
        out.append((kind, vpp, m))
    return out


def _worker(rank: int, args, init_file: str, queue) -> None:
    cuda = torch.cuda.is_available() and not args.cpu
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    from planner.core.model import load_model
    from profilers.compute import build_layer, make_inputs
    from profilers.pipeline import _chunk_times, solve_action_s, step_times
    from profilers.timing import slowest

    spec = load_model(args.model)
    block = build_layer(spec, "block", 1, device, dtype)
    (x,), grad = make_inputs(spec, "block", 1, args.micro_batch, args.seq_len, device, dtype)
    fwd, bwd = _chunk_times(block, x, grad, device, args.warmup, args.trials)
    fwd, bwd = slowest(fwd, None, device), slowest(bwd, None, device)
    del block, x, grad
    rows = []
    for kind, vpp, m in parse_grid(args.grid):
        host, wall = step_times(kind, spec, args.micro_batch, args.seq_len, None, device, dtype, args.warmup,
                                args.trials, vpp, m)
        host, wall = slowest(host, None, device), slowest(wall, None, device)
        a = solve_action_s(kind, wall, fwd, bwd, vpp, m)
        rows.append({"schedule": kind, "vpp": vpp, "microbatches": m, "ops_per_rank": 2 * vpp * m,
                     "step_s": wall, "host_s": host, "chunk_fwd_s": fwd, "chunk_bwd_s": bwd, "action_s": a})
        if rank == 0:
            print(f"{kind:11s} v{vpp} m{m:<3d} ops/rank {2 * vpp * m:4d}  step {wall * 1e3:8.2f} ms  "
                  f"host {host * 1e3:8.2f} ms  per-op {a * 1e3:6.3f} ms", flush=True)
    if rank == 0:
        queue.put(rows)
    dist.barrier()  # both ranks done with their pipelines before the group goes
    dist.destroy_process_group()
    # skip the interpreter's teardown: once under a loaded CPU a gloo rank aborted in it ("terminate called without
    # an active exception") after its measurements were in; the results are already with the parent
    os._exit(0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="llama-3-8b")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grid", default=",".join(DEFAULT_GRID))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU even where GPUs are present")
    ap.add_argument("-o", "--output")
    args = ap.parse_args(argv)
    try:
        parse_grid(args.grid)
        from planner.core.model import load_model

        load_model(args.model)
    except Exception as e:  # one line, exit 2 (house rule for bad input)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.cpu and torch.cuda.is_available() and torch.cuda.device_count() < 2:
        print(f"error: needs 2 GPUs, found {torch.cuda.device_count()} (or pass --cpu)", file=sys.stderr)
        return 2
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.start_processes(_worker, args=(args, os.path.join(tmp, "rdv"), queue), nprocs=2,
                                             start_method="spawn")
        rows = queue.get()
    meta = {"model": args.model, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu else "cpu",
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
