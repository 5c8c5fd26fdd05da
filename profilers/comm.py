"""Collective and point-to-point communication profiling through torch.distributed.

One process per device, started here (torch.multiprocessing, 'spawn') or by torchrun (then the
processes already exist: `measure_launched`). NCCL on GPUs, gloo between CPU processes.

For every group size n (2, 4, 8, ... up to the devices of one node; the group is ranks 0..n-1)
and every message size, each op is timed nccl-tests style (nccl-tests `common.cu`): warm-up
runs, then `trials` timed loops of `iters` back-to-back ops; time = loop / iters; the median
trial is kept, and the slowest rank's number is the group's. Sizes follow nccl-tests: the
all-gather size is the gathered output, the reduce-scatter size is the input, all-to-all and
all-reduce the buffer each rank holds, p2p the bytes sent (rank 0 -> rank 1, one direction,
as a pipeline sends activations; measured for n = 2 only).

Overlap: a matmul loop is timed alone, then again while all-reduces run beside it (NCCL on its
own stream; gloo on its own thread), on ranks 0 and 1; slowdown = t_with / t_alone - 1, what
planner.cost.predict uses where data-parallel gradient reduction overlaps backward.

Several nodes (torchrun with WORLD_SIZE > LOCAL_WORLD_SIZE): groups stay inside node 0, and the
inter-node tier is measured too: p2p from rank 0 to the first rank of node 1 (one NIC per GPU,
the cluster's `inter_node` link) and an all-reduce over one rank per node (raw only).
"""

from __future__ import annotations

import math
import os
import queue
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from planner.core.errors import DistplanError
from profilers.sharding import ShardingSettings

# the collectives measured (nccl-tests' set and p2p)
OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")
KIB, MIB, GIB = 2**10, 2**20, 2**30


@dataclass(frozen=True)
class CommSettings:
    sizes_bytes: tuple[int, ...]
    group_sizes: tuple[int, ...]
    ops: tuple[str, ...] = OPS
    dtype: str = "bf16"
    warmup: int = 3
    trials: int = 3
    target_loop_s: float = 0.02  # iters per loop chosen so one loop takes about this long
    max_iters: int = 1000
    overlap: bool = True
    local_size: int = 0  # ranks per node; 0: all ranks are on one node
    sharding: ShardingSettings | None = None  # also time one FSDP2-sharded block per group (profilers/sharding.py)


def sizes_between(lo: int, hi: int, step: int) -> tuple[int, ...]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= step
    if out[-1] != hi:
        out.append(hi)
    return tuple(out)


def power_of_two_groups(devices: int) -> tuple[int, ...]:
    return tuple(2**k for k in range(1, int(math.log2(devices)) + 1)) if devices >= 2 else ()


# ---- one rank's work ----------------------------------------------------------------------------


class _Rank:
    def __init__(self, rank: int, world: int, device: torch.device, settings: CommSettings, report: Callable):
        self.rank, self.world, self.device, self.s, self.report = rank, world, device, settings, report
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[settings.dtype]
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reduce_max(self, value: float, group) -> float:
        t = torch.tensor([value], dtype=torch.float64 if not self.cuda else torch.float32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return float(t.item())

    def _op(self, op: str, nbytes: int, group, n: int, peer: tuple[int, int]) -> Callable[[], None] | None:
        """A closure running one `op` on `nbytes` over `group`; None if this rank has no part."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        count = max(n, nbytes // elem // n * n)
        make = lambda k: torch.ones(k, dtype=self.dtype, device=self.device)  # noqa: E731
        if op == "all_reduce":
            buf = make(count)
            return lambda: dist.all_reduce(buf, group=group)
        if op == "all_gather":
            out, inp = make(count), make(count // n)
            return lambda: dist.all_gather_into_tensor(out, inp, group=group)
        if op == "reduce_scatter":
            out, inp = make(count // n), make(count)
            return lambda: dist.reduce_scatter_tensor(out, inp, group=group)
        if op == "all_to_all":
            out, inp = make(count), make(count)
            return lambda: dist.all_to_all_single(out, inp, group=group)
        if op == "p2p":
            src, dst = peer
            buf = make(count)
            if self.rank == src:
                return lambda: dist.send(buf, dst=dst, group=group)
            return lambda: dist.recv(buf, src=src, group=group)
        raise ValueError(op)

    def time_op(self, op: str, nbytes: int, group, n: int, peer=(0, 1)) -> float:
        """Seconds per op (median trial, slowest rank of the group)."""
        run = self._op(op, nbytes, group, n, peer)
        for _ in range(self.s.warmup):
            run()
        t0 = self.now()
        run()
        one = self.now() - t0
        iters = int(self.reduce_max(min(self.s.max_iters, max(1, round(self.s.target_loop_s / max(one, 1e-7)))), group))
        trials = []
        for _ in range(self.s.trials):
            t0 = self.now()
            for _ in range(iters):
                run()
            trials.append((self.now() - t0) / iters)
        del run
        return self.reduce_max(sorted(trials)[len(trials) // 2], group)

    def overlap(self, group, n: int) -> dict:
        """Matmul-loop slowdown while all-reduces of 64 MiB (GPU; CPU 4 MiB) run beside it."""
        dim = 4096 if self.cuda else 256
        a = torch.randn(dim, dim, dtype=self.dtype, device=self.device)
        b = torch.randn(dim, dim, dtype=self.dtype, device=self.device)
        for _ in range(3):  # cuBLAS handle and workspace: the first matmul takes far longer than the rest
            a @ b
        loops = 1
        while True:  # size the compute loop to ~50 ms
            t0 = self.now()
            for _ in range(loops):
                a @ b
            alone = self.now() - t0
            if alone > 0.05 or loops >= 2**16:
                break
            loops *= 2
        loops = int(self.reduce_max(loops, group))
        comm_bytes = (64 if self.cuda else 4) * MIB
        buf = torch.ones(comm_bytes // a.element_size(), dtype=self.dtype, device=self.device)
        t0 = self.now()
        dist.all_reduce(buf, group=group)
        ar = self.now() - t0
        count = int(self.reduce_max(math.ceil(2 * alone / max(ar, 1e-6)) + 1, group))  # comm outlasts compute
        alones, withs = [], []
        for _ in range(3):
            t0 = self.now()
            for _ in range(loops):
                a @ b
            alones.append(self.now() - t0)
            works = [dist.all_reduce(buf, group=group, async_op=True) for _ in range(count)]
            t0 = time.perf_counter()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(loops):
                    a @ b
                end.record()
                end.synchronize()
                withs.append(start.elapsed_time(end) / 1e3)
            else:
                for _ in range(loops):
                    a @ b
                withs.append(time.perf_counter() - t0)
            for w in works:
                w.wait()
            self.sync()
        alone, together = sorted(alones)[1], sorted(withs)[1]
        slowdown = self.reduce_max(max(0.0, together / alone - 1.0), group)
        return {"group_size": n, "matmul_dim": dim, "matmul_loop_s": alone, "with_all_reduce_s": together,
                "all_reduce_bytes": comm_bytes, "slowdown": slowdown}

    @staticmethod
    def _optional(name: str, raw: dict, measure) -> list[dict]:
        """Points of a measurement the profile can do without (DeepSpeed's ZeRO-2, the torch engine's pipelining and
        DTensor TP): a failure, raised on every rank alike (a missing or older library, out of memory), is recorded
        in raw["unmeasured"] under `name` and the profile goes on."""
        try:
            return measure()
        except Exception as exc:  # noqa: BLE001
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raw["unmeasured"][name] = f"{type(exc).__name__}: {first}"
            return []

    def run(self) -> dict:
        s, world = self.s, self.world
        local = s.local_size or world
        raw: dict = {"points": [], "unmeasured": {}, "overlap": None, "inter_node": None, "sharding": [], "pipeline": []}
        seconds = raw["seconds"] = {}  # where this phase's time goes, per part and group size
        for n in [g for g in s.group_sizes if g <= local]:
            ranks = list(range(n))
            group = dist.new_group(ranks)
            if self.rank in ranks:
                t0 = time.perf_counter()
                for op in s.ops:
                    if op == "p2p" and n != 2:
                        continue
                    for size in s.sizes_bytes:
                        try:
                            t = self.time_op(op, size, group, n)
                        except RuntimeError as exc:  # e.g. an op this backend lacks
                            raw["unmeasured"][f"{op}.n{n}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                            break
                        raw["points"].append({"op": op, "group_size": n, "bytes": size, "time_s": t})
                        self.report(f"{op} n={n} {_fmt(size)}")
                if s.overlap and n == 2:
                    raw["overlap"] = self.overlap(group, n)
                seconds[f"collectives_n{n}"] = round(time.perf_counter() - t0, 3)
                if s.sharding is not None:
                    from profilers import sharding

                    t0 = time.perf_counter()
                    raw["sharding"] += sharding.measure(s.sharding, group, n, self.device, self.dtype, self.report)
                    seconds[f"fsdp2_n{n}"] = round(time.perf_counter() - t0, 3)
                    if n == 2 and s.sharding.pipeline:
                        from profilers import pipeline

                        t0 = time.perf_counter()
                        raw["pipeline"] = self._optional("pipeline.n2", raw, lambda: pipeline.measure(
                            s.sharding, group, self.device, self.dtype, self.report))
                        seconds["pipeline_n2"] = round(time.perf_counter() - t0, 3)
                    if s.sharding.tensor_parallel:
                        from profilers import tensor_parallel

                        t0 = time.perf_counter()
                        raw["sharding"] += self._optional(f"tensor_parallel.n{n}", raw, lambda: tensor_parallel.measure(
                            s.sharding, group, n, self.device, self.dtype, self.report))
                        seconds[f"tensor_parallel_n{n}"] = round(time.perf_counter() - t0, 3)
            self.barrier()
            if s.sharding is not None and s.sharding.deepspeed and n == world:
                from profilers import sharding

                for stage in s.sharding.deepspeed_stages:  # one at a time: a ZeRO-3 failure keeps ZeRO-2's points
                    t0 = time.perf_counter()
                    one = replace(s.sharding, deepspeed_stages=(stage,))
                    raw["sharding"] += self._optional(f"deepspeed_zero{stage}.n{n}", raw, lambda one=one: sharding.measure_deepspeed(
                        one, n, self.device, self.dtype, self.report))
                    seconds[f"deepspeed_zero{stage}_n{n}" if stage != 2 else f"deepspeed_n{n}"] = round(time.perf_counter() - t0, 3)
                    self.barrier()
            if s.sharding is not None and s.sharding.tensor_parallel and n == world and world >= 4:
                # FSDP2 over TP-sharded blocks on the whole node, at each tp degree that leaves dp >= 2
                from profilers.tensor_parallel import measure_fsdp_tp

                for t in [g for g in s.group_sizes if 2 <= g <= world // 2 and world % g == 0]:
                    t0 = time.perf_counter()
                    raw["sharding"] += self._optional(f"fsdp2_tp{t}.n{n}", raw, lambda t=t: measure_fsdp_tp(
                        s.sharding, world, t, self.device, self.dtype, self.report))
                    seconds[f"fsdp2_tp{t}_n{n}"] = round(time.perf_counter() - t0, 3)
                    self.barrier()
        if world > local:
            raw["inter_node"] = self.inter_node(local)
        return raw

    def inter_node(self, local: int) -> dict:
        nodes = self.world // local
        heads = [k * local for k in range(nodes)]
        pair = dist.new_group([0, local])
        heads_group = dist.new_group(heads)
        out = {"nodes": nodes, "ranks_per_node": local, "p2p": [], "all_reduce": []}
        if self.rank in (0, local):
            for size in self.s.sizes_bytes:
                out["p2p"].append({"bytes": size, "time_s": self.time_op("p2p", size, pair, 2, peer=(0, local))})
                self.report(f"inter-node p2p {_fmt(size)}")
        self.barrier()
        if self.rank in heads:
            for size in self.s.sizes_bytes:
                out["all_reduce"].append({"bytes": size, "group_size": nodes,
                                          "time_s": self.time_op("all_reduce", size, heads_group, nodes)})
                self.report(f"inter-node all_reduce n={nodes} {_fmt(size)}")
        self.barrier()
        return out

    def barrier(self) -> None:
        t = torch.zeros(1, device=self.device)
        dist.all_reduce(t)
        self.sync()


def _fmt(nbytes: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


# ---- launching -----------------------------------------------------------------------------------


def _device_for(local_rank: int, cuda: bool) -> torch.device:
    if cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    torch.set_num_threads(1)  # one core per rank, as one GPU per rank
    return torch.device("cpu")


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    # one op at a time here, so NCCL serialising p2p with collectives costs nothing: no warning
    os.environ.setdefault("TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING", "false")


def _worker(rank: int, world: int, init_file: str, cuda: bool, settings: CommSettings, q) -> None:
    _quiet()
    try:
        local = settings.local_size or world
        device = _device_for(rank % local, cuda)
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world, **({"device_id": device} if cuda else {}))
        report = (lambda label: q.put(("progress", label))) if rank == 0 else (lambda label: None)
        raw = _Rank(rank, world, device, settings, report).run()
        if rank == 0:
            q.put(("result", raw))
    except BaseException:  # noqa: BLE001 - the parent turns it into a DistplanError
        q.put(("error", f"rank {rank}: {traceback.format_exc()}"))
        raise SystemExit(1)
    # every rank is done (run() ends on a barrier): exit without tearing the groups down, as destroy_process_group
    # did not return after the FSDP2 x TP points' 2D meshes on 8x H200 (benchmarks/results/campaign_8xh200.md); the
    # queue is flushed first
    q.close()
    q.join_thread()
    os._exit(0)


# seconds the parent waits for the ranks to exit once rank 0's result is in, then stops them (ranks that did not exit,
# joined one by one, held a profile past its limit: benchmarks/results/campaign_8xh200.md)
EXIT_GRACE_S = 20.0
# a rank's progress message at least this often (the longest point, DeepSpeed's engine start, takes about 2 minutes)
STALL_S = 300.0


def measure_spawned(world: int, cuda: bool, settings: CommSettings, on_point: Callable[[str], None] = lambda _: None,
                    timeout_s: float = 900.0, stall_s: float = STALL_S) -> dict:
    """Start `world` local processes, measure, and return rank 0's raw results. DistplanError where a rank fails,
    exits, falls silent for `stall_s` (naming the last point) or the whole takes over `timeout_s`."""
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="distplan-comm-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, world, init_file, cuda, settings, q), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        result, deadline = None, time.monotonic() + timeout_s
        last, last_at = "the start", time.monotonic()
        try:
            while result is None:
                try:
                    kind, payload = q.get(timeout=1.0)
                except queue.Empty:
                    now = time.monotonic()
                    if now > deadline:
                        raise DistplanError(f"communication profiling took over {timeout_s:.0f} s; stopped") from None
                    if now - last_at > stall_s:
                        raise DistplanError(f"communication profiling made no progress for {stall_s:.0f} s after "
                                            f"{last}; stopped") from None
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise DistplanError(f"communication profiling: process {procs.index(dead[0])} exited with "
                                            f"code {dead[0].exitcode}") from None
                    continue
                if kind == "progress":
                    on_point(payload)
                    last, last_at = payload, time.monotonic()
                elif kind == "error":
                    raise DistplanError(f"communication profiling failed on {payload.strip().splitlines()[-1]} "
                                        f"({payload.splitlines()[0]})")
                else:
                    result = payload
        finally:
            reap(procs, EXIT_GRACE_S if result is not None else 0.0)
    return result


def reap(procs: list, grace_s: float) -> None:
    """Wait up to `grace_s` in all for `procs` to exit, then stop the rest (SIGTERM, then SIGKILL)."""
    end = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def launched() -> bool:
    """True when torchrun (or another launcher) started this process as one rank of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def measure_launched(settings: CommSettings, on_point: Callable[[str], None] = lambda _: None) -> tuple[int, dict]:
    """Measure from inside a torchrun job (env:// rendezvous); returns (rank, raw) on every rank."""
    _quiet()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cuda = torch.cuda.is_available()
    device = _device_for(int(os.environ.get("LOCAL_RANK", rank % local)), cuda)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": device} if cuda else {}))
    settings = replace(settings, local_size=local)
    raw = _Rank(rank, world, device, settings, on_point if rank == 0 else (lambda _: None)).run()
    return rank, raw
