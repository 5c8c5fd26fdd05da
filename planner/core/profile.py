"""Measured hardware numbers (`distplan profile` writes them; solve/estimate --profile read them).

A profile is keyed by GPU type. The cost model asks it two questions, and falls back to the
cluster preset's analytic model where the profile has no answer (and says which was used):
- `layer_time_s(kind, tp, tokens, phase)`: compute time of one layer of a kind, TP-sharded, from a
  linear fit time = intercept + slope * tokens (Aceso/Alpa-style profiling, interpolated by tokens);
- `collective_time_s(op, group_size, bytes)`: latency + bytes / bus-bandwidth, fitted per
  collective and group size (house rule 6), times the nccl-tests bus-bandwidth factor.
Optionally `sharding_overhead_s(group_size, reshard_after_forward, tokens)`: measured extra seconds per
block per micro-batch of FSDP2 fully_shard over the plain block, and `sharding_edge_s` once per
micro-batch; the same for DeepSpeed ZeRO-2 (impl "deepspeed") plus its once-per-step part
`sharding_step_s` (profilers/sharding.py). Profiles written before these have no `sharding` key (or no
`impl`: FSDP2) and load unchanged (same version: the keys are optional).
A profile records the shape it measured (`model_shape`: family, widths, heads, vocabulary, experts, image and patch
sizes) beside `model`, `seq_len` and `dtype`; `profile_for_job` decides whether it applies to a job (same shape and
sequence length), refuses it naming both shapes, or with the explicit fallback keeps only what does not depend on
the model (`without_model_specific`). Profiles written before `model_shape` take it from the zoo on load.
Calibration factors (`distplan run --calibrate`) live apart, in a calibration file (planner/core/calibration.py); a
Profile carries the factors that apply to one job only in memory (`calibration`), and they are never written into it.
Version 2 stores what the profiler derives from its measurements, the block-in-a-stack factor (`stack_factor`, a
StackFit made by planner.cost.profiled.stack_fit), and says how in `derived`. This module is the schema and the file
io: it reads a version-1 file as stored (parse_profile, read_profile), and planner.cost.profiled.load_profile, the
door every caller uses, migrates it. What an older file lacks of its own raw points (a sharding entry's max_tokens,
the pipeline's proportional growth) is filled in here and named in `derived`.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from planner.core.cluster import MAX_GPUS
from planner.core.errors import DistplanError, require
from planner.core.fields import check_number, flag, integer, is_number, listing, mapping, name, number, text
from planner.core.fileio import read_yaml
from planner.core.model import describe_shape

PROFILE_VERSION = 2  # 2 stores the derived stack factor (`stack_factor`, `derived`); 1 did not (migrated on load)
VERSIONS = (1, PROFILE_VERSION)  # the file versions that load
# what a load derives from the raw points where an older file lacks the stored value (Profile.derived)
MAX_TOKENS_NOTE = ("derived on load: the largest tokens of raw.communication.sharding (the file predates the stored "
                   "value)")
GROWTH_NOTE = ("derived on load from raw.communication.pipeline (pipeline_growth): the file's additive slope_s_per_op "
               "predates the proportional growth")
MAX_GROUP = MAX_GPUS  # largest group size, TP degree or device count a profile may name: the largest cluster
PHASES = ("fwd", "bwd")  # the phases a compute fit has: forward and backward
# the attention core as megatron-core's local layer spec runs it (profilers/compute.UnfusedAttentionCore):
# a compute kind besides the layers, for plans with flash_attention=False
UNFUSED_ATTENTION_KIND = "attention_unfused"
# megatron-core's own local-spec layer at tp = 1 (profilers/megatron_layer.py): the megatron engine's block
MEGATRON_BLOCK_KIND = "megatron_block"
# megatron-core's last pipeline stage holding one of its layers: that layer, the final norm, the output layer and its
# vocabulary-parallel cross-entropy (profilers/megatron_layer.py); less MEGATRON_BLOCK_KIND, megatron's head
MEGATRON_HEAD_KIND = "megatron_head"


@dataclass(frozen=True)
class LinearFit:
    """time_s = intercept_s + slope_s * x (x: tokens for compute, bytes for communication)."""

    intercept_s: float
    slope_s: float

    def __call__(self, x: float) -> float:
        return self.intercept_s + self.slope_s * x

    def held(self, x: float, x_max: float) -> float:
        """The line at `x`, at least 0; a falling line stops falling at `x_max`, the largest x measured (0: none
        recorded). Measured overheads shrink as more work hides them, but not to 0 just past the last point:
        gpt2-xl's ZeRO-1 (FSDP2) line through 1k and 16k tokens read 0 at 32k, where the run paid ~20 ms per
        micro-batch (benchmarks/results/campaign_2xh200.md)."""
        return max(0.0, self(min(x, x_max) if x_max and self.slope_s < 0 else x))


@dataclass(frozen=True)
class ComputeFit:
    kind: str  # layer kind: embedding, block, moe_block, head
    tp: int
    fwd: LinearFit
    bwd: LinearFit
    peak_activation_bytes_per_token: float = 0.0  # allocator-measured, one layer, per token
    recompute: LinearFit | None = None  # extra backward time under full activation checkpointing (measured)
    oom_micro_batch: int = 0  # smallest micro-batch that ran out of memory while profiling (0: none did)
    # the measured points behind the fits, ascending in tokens: (tokens, {"fwd": s, "bwd": s, "recompute": s})
    points: tuple[tuple[float, tuple[tuple[str, float], ...]], ...] = field(default=(), hash=False, compare=False)

    def time_s(self, phase: str, tokens: float) -> float | None:
        """Seconds of `phase` (fwd, bwd, recompute) at `tokens` per micro-batch; None if not measured.

        A straight line through all points is wrong at both ends of a GPU's range: small micro-batches are
        launch-bound (gpt2-xl's block on H200: forward 0.63 ms at 1024 tokens, 1.10 ms at 8192), so the line's
        slope comes out at half the compute-bound rate and the 2xH200 campaign under-predicted gpt2-xl at
        micro-batch 16 by 37% (benchmarks/results/campaign_2xh200.md). So, where the points are known:
          - inside the measured range, piecewise-linear between the points (made non-decreasing in tokens);
          - above it, proportional to tokens from the largest point (compute-bound work scales with tokens;
            larger kernels can only be more efficient, so this errs high by at most that gain);
          - below it, the line, kept between the proportional share of the smallest point and that point.
        Without points (hand-written profiles), the line.
        """
        line = {"fwd": self.fwd, "bwd": self.bwd, "recompute": self.recompute}[phase]
        pts = [(x, dict(t)[phase]) for x, t in self.points if phase in dict(t)]
        if not pts:
            return None if line is None else max(0.0, line(tokens))
        xs, ys = [x for x, _ in pts], []
        for _, y in pts:
            ys.append(max(y, ys[-1]) if ys else y)  # non-decreasing: more tokens never take less time
        if tokens >= xs[-1]:
            return ys[-1] * tokens / xs[-1]
        if tokens <= xs[0]:
            share = ys[0] * tokens / xs[0]
            return min(ys[0], max(share, line(tokens) if line is not None else share))
        i = bisect.bisect_right(xs, tokens)
        w = (tokens - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + w * (ys[i] - ys[i - 1])


@dataclass(frozen=True)
class CollectiveFit:
    op: str  # all_reduce, all_gather, reduce_scatter, all_to_all, p2p
    group_size: int
    latency_s: float
    bus_bandwidth_gb_s: float  # nccl-tests "busbw": algbw * factor(op, n)


# who wrapped the measured blocks (profilers/sharding.py; ddp: ZeRO-0; tp: the torch engine's DTensor tensor
# parallelism over group_size ranks, profilers/tensor_parallel.py; tp-sp: the same with sequence parallelism)
SHARDING_IMPLS = ("fsdp2", "deepspeed", "ddp", "tp", "tp-sp")  # and "fsdp2-tp<N>": FSDP2 over tp-N-sharded blocks


@dataclass(frozen=True)
class ShardingFit:
    """Measured overhead of sharded data parallelism over plain blocks (profilers/sharding.py).

    impl "fsdp2": FSDP2 fully_shard per block, seconds per micro-batch: overhead(tokens) per block + edge.
    impl "deepspeed": DeepSpeed ZeRO-2 (reshard_after_forward False) through deepspeed.initialize; the same
    per-micro-batch lines, and a once-per-step part (gradient norm, the optimizer's partition bookkeeping,
    the all-gather of updated weights) beyond the plain AdamW step: step_s_per_param x parameters on the
    rank (before sharding) + step_edge_s.
    """

    group_size: int  # data-parallel ranks the block was sharded over
    reshard_after_forward: bool  # True: ZeRO-3; False: ZeRO-1/2 (weights kept from forward to backward)
    overhead: LinearFit  # per block; x: tokens per micro-batch per rank
    edge: LinearFit | None = None  # once per micro-batch per rank (unhidden first/last collective); None: not split
    impl: str = "fsdp2"  # one of SHARDING_IMPLS
    step_s_per_param: float = 0.0  # deepspeed: once per optimizer step, per parameter held (unsharded count)
    step_edge_s: float = 0.0  # deepspeed: once per optimizer step
    max_tokens: float = 0.0  # largest tokens per micro-batch measured (0: not recorded)
    # fsdp2: the same lines for a micro-batch that accumulates gradients without reducing them
    # (set_requires_gradient_sync(False): every micro-batch of a step but the last); None: not measured
    accumulate: LinearFit | None = None
    accumulate_edge: LinearFit | None = None

    def per_block_s(self, tokens: float, sync: bool = True) -> float:
        """Seconds one sharded block adds per micro-batch at `tokens` per rank (>= 0; LinearFit.held); `sync`
        False: a micro-batch without the gradients' reduce-scatter, where measured (else the synchronising one)."""
        line = self.overhead if sync or self.accumulate is None else self.accumulate
        return line.held(tokens, self.max_tokens)

    def edge_s(self, tokens: float, sync: bool = True) -> float:
        """Seconds added once per micro-batch (>= 0; 0 where the edge was not split out)."""
        line = self.edge if sync or self.accumulate is None else self.accumulate_edge
        return 0.0 if line is None else line.held(tokens, self.max_tokens)


@dataclass(frozen=True)
class PipelineFit:
    """Measured cost of one forward or backward operation of torch.distributed.pipelining's `schedule` ("1f1b",
    "interleaved") between 2 ranks beyond the chunk's compute, its activation transfer included
    (profilers/pipeline.py): action(bytes sent), held past the largest size measured where it falls."""

    schedule: str
    group_size: int
    action: LinearFit  # x: bytes of the activation (or its gradient) one operation sends
    max_bytes: float = 0.0
    # the cost grows with the schedule's operations per rank (2 x chunks per rank x micro-batches), in proportion:
    # llama-3-8b interleaved on 2xH200 measured 2.3-2.7x its cost at 16 per rank at 64 (benchmarks/results/
    # pipeline_grid_2xh200.md, campaign_2xh200.md). `action` is at base_ops; growth_per_op more per operation, up to
    # max_ops
    base_ops: int = 0  # 0: measured at one shape only (older profiles)
    max_ops: int = 0
    growth_per_op: float = 0.0

    def action_s(self, nbytes: float, ops: int | None = None) -> float:
        """Seconds per operation at `nbytes` sent and `ops` operations per rank (None: the base shape's); held at
        the largest operation count measured."""
        base = self.action.held(nbytes, self.max_bytes)
        if ops is None or not self.base_ops:
            return base
        return base * max(1.0 + self.growth_per_op * (min(ops, self.max_ops) - self.base_ops), 0.0)


GROWTH_FLOOR_S = 20e-6  # a base cost per pipeline operation below this is noise around 0: no ratio from it


def pipeline_growth(points: list[tuple[int, float, float]]) -> tuple[int, int, float]:
    """(base_ops, max_ops, growth_per_op) from one schedule's measured (operations per rank, bytes, seconds per
    operation) points: the mean over the sizes measured at both the fewest and the most operations of
    (most / fewest - 1) / (their difference), at least 0; (0, 0, 0.0) where one shape was measured."""
    if not points:
        return 0, 0, 0.0
    base_ops, max_ops = min(n for n, _, _ in points), max(n for n, _, _ in points)
    if max_ops == base_ops:
        return 0, 0, 0.0
    at = {(n, b): max(a, 0.0) for n, b, a in points}
    ratios = [(at[(max_ops, b)] / at[(base_ops, b)] - 1) / (max_ops - base_ops)
              for (n, b) in at if n == base_ops and (max_ops, b) in at and at[(base_ops, b)] >= GROWTH_FLOOR_S]
    return base_ops, max_ops, max(sum(ratios) / len(ratios), 0.0) if ratios else 0.0


def _log_interpolate(points: tuple, x: float) -> float:
    """y at `x` on ((x, y), ...) ascending, linear in log(x) between the two points around it, the end points' y
    outside them; 0.0 for no points."""
    if not points:
        return 0.0
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * math.log(x / x0) / math.log(x1 / x0)
    return points[-1][1]


@dataclass(frozen=True)
class StackFit:
    """Distplan's block inside a stack of blocks on every GPU at once over the same block alone on one GPU, as a
    factor on the block's compute fit. The profiler derives it once from its plain stacks and the block's compute
    points (planner.cost.profiled.stack_fit, which says how) and stores it in the profile (`stack_factor`)."""

    compute_bound: float  # the factor where the lone block is GPU-bound (>= 1)
    gpu_bound_from_tokens: float  # tokens per micro-batch from which the lone block is GPU-bound (0: none measured)
    host_bound: tuple[tuple[float, float], ...] = ()  # (tokens, factor) of the stacks below gpu_bound_from_tokens
    gpu_share: tuple[tuple[float, float], ...] = ()  # (tokens, GPU time / fit) of the lone block's raw points

    def factor(self, tokens: float | None = None) -> float:
        """The factor at `tokens` per micro-batch; without `tokens`, the compute-bound one. Between the largest
        host-bound stack at or below `tokens` and gpu_bound_from_tokens, linear in log(tokens) from the one to the
        other (gpt2-xl at 4 x 1024 tokens on 2x H200 ran between the 1024-token stacks' figure and the compute-bound
        one: benchmarks/results/campaign_2xh200.md, gpt2-xl-small). Never below the lone block's GPU share at
        `tokens` (log-interpolated between the raw points) times the compute-bound factor: the GPU's work in a stack
        is slowed as at compute-bound sizes, whatever the host hides (gpt2-xl at 8 x 1024 tokens on one H200:
        benchmarks/results/campaign_1xh200.md)."""
        if tokens is None or tokens >= self.gpu_bound_from_tokens or not self.host_bound:
            return self.compute_bound
        below = [p for p in self.host_bound if p[0] <= tokens]
        if not below:
            return self.host_bound[0][1]
        t0, f0 = below[-1]  # the host-bound stacks' figure, moving to the compute-bound one where the GPU bounds it
        top = self.gpu_bound_from_tokens
        interpolated = f0 + (self.compute_bound - f0) * math.log(tokens / t0) / math.log(top / t0)
        return max(interpolated, self.compute_bound * _log_interpolate(self.gpu_share, tokens))


@dataclass(frozen=True)
class Profile:
    gpu_name: str
    device: str  # "cuda" or "cpu": what was measured
    model: str
    seq_len: int
    dtype: str
    compute: tuple[ComputeFit, ...] = ()
    collectives: tuple[CollectiveFit, ...] = ()
    matmul_tflops: float = 0.0  # best achieved dense matmul rate in the profile's dtype
    hbm_bandwidth_gb_s: float = 0.0  # achieved device-to-device copy, bytes read + written
    matmul_tflops_by_gflop: tuple[tuple[float, float], ...] = ()  # (GFLOP per matmul, achieved TFLOP/s), ascending
    host_bandwidth_gb_s: float = 0.0  # pinned host-to-device copy (0: not measured)
    optimizer_s_per_param: float = 0.0  # one mixed-precision AdamW step per parameter (0: not measured)
    # the torch engine's AdamW step per parameter on the host's fp32 tensors (its optimizer offload; 0: not measured)
    host_optimizer_s_per_param: float = 0.0
    overlap_slowdown: float | None = None
    device_count: int = 0  # devices the profile saw on the node (CPU: local processes)
    memory_gib: float = 0.0  # measured memory per device (CPU: host memory / device_count)
    inter_node: CollectiveFit | None = None  # p2p between nodes, if launched on several (torchrun)
    # the job's calibration factors ("compute", f), ("all_reduce", f), ... (planner.core.calibration.apply_calibration);
    # in memory only, never written into a profile file
    calibration: tuple[tuple[str, float], ...] = ()
    sharding: tuple[ShardingFit, ...] = ()  # per (impl, group size, reshard); () = not measured
    pipeline: tuple[PipelineFit, ...] = ()  # per schedule kind (torch engine's pipelining); () = not measured
    facts: dict = field(default_factory=dict, hash=False, compare=False)  # versions, topology, timings
    raw: dict = field(default_factory=dict, hash=False, compare=False)  # raw measured points
    model_shape: tuple[tuple[str, object], ...] = ()  # the measured model's shape (model_shape()); (): not recorded
    # True: the model-specific measurements were dropped for a job of another shape (without_model_specific)
    model_specific_dropped: bool = False
    calibration_source: str = field(default="", compare=False)  # where `calibration` came from, for the sources
    stack: StackFit | None = None  # derived by the profiler (StackFit); None: no stack measured
    # what was derived rather than measured, and how: (quantity, note), e.g. ("stack_factor", "derived by ...")
    derived: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    file_version: int = field(default=PROFILE_VERSION, compare=False)  # the version of the file it was read from

    def stack_factor(self, tokens: float | None = None) -> float:
        """Measured slowdown of distplan's block inside a model on all GPUs at `tokens` per micro-batch
        (StackFit.factor; without `tokens`, the compute-bound one); 1.0 where none was measured."""
        return 1.0 if self.stack is None else self.stack.factor(tokens)

    @cached_property
    def _collective_points(self) -> dict[tuple[str, int], tuple[tuple[float, float], ...]]:
        """The raw collective points by (op, group size), sorted by size: an index of raw, built on first use."""
        groups: dict[tuple[str, int], list[tuple[float, float]]] = {}
        comm = self.raw.get("communication") if isinstance(self.raw, dict) else None
        for p in (comm.get("points") or [] if isinstance(comm, dict) else []):
            try:
                nbytes, t = float(p["bytes"]), float(p["time_s"])
                if nbytes > 0 and t > 0:
                    groups.setdefault((str(p["op"]), int(p["group_size"])), []).append((nbytes, t))
            except (KeyError, TypeError, ValueError):
                continue  # a malformed raw point is skipped; the fits still apply
        return {k: tuple(sorted(v)) for k, v in groups.items()}

    def measured_collective_s(self, op: str, group_size: int, nbytes: float) -> float | None:
        """Seconds for `op` on `nbytes`, interpolated (log-log) between the two measured sizes around it.

        NCCL changes protocol and algorithm with the message size, so time is not affine in bytes over
        64 KiB..1 GiB: the two-number latency + bandwidth fit is off by up to 24% at 16-256 MiB on 2xH200
        (benchmarks/results/profile_2xh200.md) while the raw points are within 3% of an independent loop.
        Inside the measured range the points are used; outside it (None) the caller uses the fit.
        """
        pts = self._collective_points.get((op, group_size))
        if not pts or not pts[0][0] <= nbytes <= pts[-1][0]:
            return None
        i = bisect.bisect_left([x for x, _ in pts], nbytes)
        if pts[i][0] == nbytes or i == 0:
            return pts[i][1]
        (x0, t0), (x1, t1) = pts[i - 1], pts[i]
        w = (math.log(nbytes) - math.log(x0)) / (math.log(x1) - math.log(x0))
        return math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0)))

    def compute_fit(self, kind: str, tp: int) -> ComputeFit | None:
        for c in self.compute:
            if c.kind == kind and c.tp == tp:
                return c
        return None

    def collective_fit(self, op: str, group_size: int) -> CollectiveFit | None:
        for c in self.collectives:
            if c.op == op and c.group_size == group_size:
                return c
        return None

    def sharding_fit(self, group_size: int, reshard_after_forward: bool, impl: str = "fsdp2") -> ShardingFit | None:
        for s in self.sharding:
            if s.group_size == group_size and s.reshard_after_forward == reshard_after_forward and s.impl == impl:
                return s
        return None

    def sharding_overhead_s(self, group_size: int, reshard_after_forward: bool, tokens: float,
                            impl: str = "fsdp2", sync: bool = True) -> float | None:
        """Measured seconds one sharded block adds per micro-batch at this group size (>= 0); None if not measured.
        `sync` False: a gradient-accumulating micro-batch (ShardingFit.per_block_s)."""
        s = self.sharding_fit(group_size, reshard_after_forward, impl)
        return None if s is None else s.per_block_s(tokens, sync)

    def sharding_edge_s(self, group_size: int, reshard_after_forward: bool, tokens: float, impl: str = "fsdp2",
                        sync: bool = True) -> float:
        """Measured seconds sharding adds once per micro-batch (unhidden first all-gather / last reduce-scatter)."""
        s = self.sharding_fit(group_size, reshard_after_forward, impl)
        return 0.0 if s is None else s.edge_s(tokens, sync)

    def sharding_step_s(self, group_size: int, params: float, impl: str, reshard_after_forward: bool = False) -> float | None:
        """Measured seconds the sharded optimizer step adds beyond the plain AdamW step, for `params` parameters
        held by the rank (before sharding); None where not measured (only impl "deepspeed" measures it: ZeRO-2, and
        ZeRO-3 with `reshard_after_forward`)."""
        s = self.sharding_fit(group_size, reshard_after_forward, impl)
        if s is None or impl == "fsdp2":
            return None
        return max(0.0, s.step_s_per_param * params + s.step_edge_s)

    def pipeline_action_s(self, schedule: str, nbytes: float, ops: int | None = None) -> float | None:
        """Measured seconds per pipeline operation of the torch engine's `schedule` (gpipe runs as 1f1b's
        operations do), or None where the profile did not measure it."""
        kind = "interleaved" if schedule == "interleaved" else "1f1b"
        fit = next((f for f in self.pipeline if f.schedule == kind), None)
        return None if fit is None else fit.action_s(nbytes, ops)

    def factor(self, key: str) -> float:
        return dict(self.calibration).get(key, 1.0)


def bus_factor(op: str, n: int) -> float:
    """nccl-tests bus-bandwidth factor: busbw = algbw * factor (PERFORMANCE.md of nccl-tests)."""
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    return 1.0  # p2p


def _fit_dict(f: LinearFit) -> dict:
    return {"intercept_s": f.intercept_s, "slope_s_per_token": f.slope_s}


def _collective_dict(c: CollectiveFit) -> dict:
    return {"op": c.op, "group_size": c.group_size, "latency_s": c.latency_s, "bus_bandwidth_gb_s": c.bus_bandwidth_gb_s}


def profile_to_dict(p: Profile) -> dict:
    compute = []
    for c in p.compute:
        row = {"kind": c.kind, "tp": c.tp, "fwd": _fit_dict(c.fwd), "bwd": _fit_dict(c.bwd),
               "peak_activation_bytes_per_token": c.peak_activation_bytes_per_token}
        if c.recompute is not None:
            row["recompute"] = _fit_dict(c.recompute)
        if c.oom_micro_batch:
            row["oom_micro_batch"] = c.oom_micro_batch
        compute.append(row)
    return {
        "version": PROFILE_VERSION,
        "gpu_name": p.gpu_name,
        "device": p.device,
        "model": p.model,
        "seq_len": p.seq_len,
        "dtype": p.dtype,
        **({"model_shape": dict(p.model_shape)} if p.model_shape else {}),
        "device_count": p.device_count,
        "memory_gib": p.memory_gib,
        "matmul_tflops": p.matmul_tflops,
        "hbm_bandwidth_gb_s": p.hbm_bandwidth_gb_s,
        "matmul_tflops_by_gflop": [[g, t] for g, t in p.matmul_tflops_by_gflop],
        "host_bandwidth_gb_s": p.host_bandwidth_gb_s,
        "optimizer_s_per_param": p.optimizer_s_per_param,
        **({"host_optimizer_s_per_param": p.host_optimizer_s_per_param} if p.host_optimizer_s_per_param else {}),
        "overlap_slowdown": p.overlap_slowdown,
        "compute": compute,
        "collectives": [_collective_dict(c) for c in p.collectives],
        "inter_node": _collective_dict(p.inter_node) if p.inter_node else None,
        **({"sharding": [_sharding_dict(s) for s in p.sharding]} if p.sharding else {}),
        **({"pipeline": [{"schedule": f.schedule, "group_size": f.group_size,
                          "action": {"intercept_s": f.action.intercept_s, "slope_s_per_byte": f.action.slope_s},
                          "max_bytes": f.max_bytes,
                          **({"ops": {"base": f.base_ops, "max": f.max_ops, "growth_per_op": f.growth_per_op}}
                             if f.base_ops else {})} for f in p.pipeline]} if p.pipeline else {}),
        **({"stack_factor": _stack_dict(p.stack)} if p.stack is not None else {}),
        **({"derived": dict(p.derived)} if p.derived else {}),
        "facts": p.facts,
        "raw": p.raw,
    }


def _stack_dict(f: StackFit) -> dict:
    return {"compute_bound": f.compute_bound, "gpu_bound_from_tokens": f.gpu_bound_from_tokens,
            "host_bound": [[t, x] for t, x in f.host_bound], "gpu_share": [[t, x] for t, x in f.gpu_share]}


def _stack(d: object, where: str) -> StackFit:
    pairs = {}
    for key in ("host_bound", "gpu_share"):
        items = listing(d, key, where, default=[])
        for i, pair in enumerate(items):
            require(isinstance(pair, list) and len(pair) == 2 and all(is_number(x) and x >= 0 for x in pair)
                    and pair[0] > 0, f"{where}.{key}[{i}] must be a [tokens > 0, value >= 0] pair, got {pair!r}")
        pairs[key] = tuple(sorted((float(t), float(x)) for t, x in items))
    return StackFit(compute_bound=number(d, "compute_bound", where, 0, above=True),
                    gpu_bound_from_tokens=number(d, "gpu_bound_from_tokens", where, 0), **pairs)


def _sharding_dict(s: ShardingFit) -> dict:
    """One sharding entry; an FSDP2 entry is written as before the impl field existed (older readers load it)."""
    d = {"group_size": s.group_size, "reshard_after_forward": s.reshard_after_forward, "overhead": _fit_dict(s.overhead),
         **({"edge": _fit_dict(s.edge)} if s.edge else {})}
    if s.impl != "fsdp2":
        d.update({"impl": s.impl, "step_s_per_param": s.step_s_per_param, "step_edge_s": s.step_edge_s})
    if s.max_tokens:
        d["max_tokens"] = s.max_tokens
    if s.accumulate is not None:
        d["accumulate"] = _fit_dict(s.accumulate)
        if s.accumulate_edge is not None:
            d["accumulate_edge"] = _fit_dict(s.accumulate_edge)
    return d


def _sharding(s: object, where: str, raw_points: list, notes: dict) -> ShardingFit:
    """One sharding entry. A profile written before `max_tokens` existed gets it from its raw points (said in
    `notes`)."""
    impl = text(s, "impl", where, default="fsdp2")
    n = integer(s, "group_size", where, 1, MAX_GROUP)  # 1: a one-device profile's stacks (a world of one)
    reshard = flag(s, "reshard_after_forward", where)
    require(impl in SHARDING_IMPLS or re.fullmatch(r"fsdp2-tp[1-9][0-9]*", impl) is not None,
            f"{where}: sharding impl {impl!r} is not one of {', '.join(SHARDING_IMPLS)}, fsdp2-tp<N>")
    measured = [float(p["tokens"]) for p in raw_points if "tokens" in p and p.get("impl", "fsdp2") == impl
                and p.get("group_size") == n and p.get("reshard_after_forward") == reshard]
    line = lambda key: _fit(s[key], f"{where}.{key}", "slope_s_per_token") if s.get(key) else None  # noqa: E731
    if "max_tokens" not in s and measured:
        notes["sharding.max_tokens"] = MAX_TOKENS_NOTE
    return ShardingFit(group_size=n, reshard_after_forward=reshard, overhead=_fit(mapping(s, "overhead", where),
                                                                                  f"{where}.overhead", "slope_s_per_token"),
                       edge=line("edge"), impl=impl, step_s_per_param=number(s, "step_s_per_param", where, default=0.0),
                       step_edge_s=number(s, "step_edge_s", where, default=0.0),
                       max_tokens=number(s, "max_tokens", where, 0, default=max(measured, default=0.0)),
                       accumulate=line("accumulate"), accumulate_edge=line("accumulate_edge"))


def _pipeline(f: object, where: str, raw_points: list, notes: dict) -> PipelineFit:
    """One pipeline entry. An entry of the older format whose growth was additive ("slope_s_per_op") gets the
    proportional growth from its raw points (said in `notes`)."""
    fit = PipelineFit(schedule=text(f, "schedule", where, ("1f1b", "interleaved")),
                      group_size=integer(f, "group_size", where, 1, MAX_GROUP),
                      action=_fit(mapping(f, "action", where), f"{where}.action", "slope_s_per_byte"),
                      max_bytes=number(f, "max_bytes", where, 0, default=0.0))
    ops = mapping(f, "ops", where, default={})
    if ops and "growth_per_op" not in ops and "slope_s_per_op" in ops:
        pts = [(int(p["ops_per_rank"]), float(p["bytes"]), float(p["action_s"])) for p in raw_points
               if p.get("schedule") == fit.schedule and {"ops_per_rank", "bytes", "action_s"} <= set(p)]
        base, most, growth = pipeline_growth(pts)
        ops = {"base": base, "max": most, "growth_per_op": growth} if base else {}
        notes["pipeline.growth_per_op"] = GROWTH_NOTE
    if ops:
        fit = replace(fit, base_ops=integer(ops, "base", f"{where}.ops", 1), max_ops=integer(ops, "max", f"{where}.ops", 1),
                      growth_per_op=number(ops, "growth_per_op", f"{where}.ops", 0))
        require(fit.base_ops <= fit.max_ops, f"{where}.ops: base {fit.base_ops} and max {fit.max_ops} "
                "must satisfy 0 < base <= max")
    return fit


def _fit(d: object, where: str, slope_key: str, nonnegative: bool = False) -> LinearFit:
    """A line from {intercept_s, <slope_key>}; `nonnegative`: both >= 0 (a measured time cannot fall with size)."""
    floor = 0.0 if nonnegative else None
    return LinearFit(number(d, "intercept_s", where, floor), number(d, slope_key, where, floor))


def _collective(c: object, where: str) -> CollectiveFit:
    return CollectiveFit(op=text(c, "op", where), group_size=integer(c, "group_size", where, 1, MAX_GROUP),
                         latency_s=number(c, "latency_s", where, 0),
                         bus_bandwidth_gb_s=number(c, "bus_bandwidth_gb_s", where, 0, above=True))


def _compute(c: object, where: str, raw: dict) -> ComputeFit:
    """One layer fit: its lines are times, so >= 0, and forward and backward take time at some size."""
    kind, tp = text(c, "kind", where), integer(c, "tp", where, 1, MAX_GROUP)
    line = lambda key: _fit(mapping(c, key, where), f"{where}.{key}", "slope_s_per_token", nonnegative=True)  # noqa: E731
    fwd, bwd = line("fwd"), line("bwd")
    for phase, fit in (("fwd", fwd), ("bwd", bwd)):
        require(fit.intercept_s > 0 or fit.slope_s > 0, f"{where}.{phase}: a layer's time cannot be 0 at every size "
                f"(intercept_s and slope_s_per_token are both 0)")
    return ComputeFit(kind=kind, tp=tp, fwd=fwd, bwd=bwd,
                      peak_activation_bytes_per_token=number(c, "peak_activation_bytes_per_token", where, 0, default=0.0),
                      recompute=line("recompute") if c.get("recompute") else None,
                      oom_micro_batch=integer(c, "oom_micro_batch", where, 0, default=0),
                      points=compute_points(_raw_compute(raw, kind, tp)))


def compute_points(raw_points: list) -> tuple[tuple[float, tuple[tuple[str, float], ...]], ...]:
    """ComputeFit.points from the profiler's raw points ({tokens, fwd_s, bwd_s[, recompute_s]}), ascending;
    a malformed or non-positive point is skipped (the fits still apply)."""
    out = []
    for p in raw_points or []:
        try:
            x = float(p["tokens"])
            times = tuple((ph, float(p[f"{ph}_s"])) for ph in ("fwd", "bwd", "recompute") if p.get(f"{ph}_s") is not None)
        except (KeyError, TypeError, ValueError):
            continue
        if x > 0 and all(t >= 0 for _, t in times) and dict(times).get("fwd", 0) > 0:
            out.append((x, times))
    return tuple(sorted(out))


# the raw points each part of the profile reads: (path under raw, its number keys, text keys, true/false keys)
RAW_POINTS = (
    (("communication", "points"), ("group_size", "bytes", "time_s"), ("op",), ()),
    (("communication", "sharding"), ("group_size", "blocks", "tokens", "plain_s"), ("impl",), ("reshard_after_forward",)),
    (("communication", "pipeline"), ("ops_per_rank", "bytes", "action_s"), ("schedule",), ()),
    (("ceilings", "matmul"), ("gflop", "tflops"), (), ()),
)
# number keys of a raw compute point (profilers/compute.py)
COMPUTE_POINT_NUMBERS = ("tokens", "fwd_s", "bwd_s", "recompute_s", "gpu_fwd_s", "gpu_bwd_s", "activation_bytes")


def _points(items: object, where: str, numbers: tuple, texts: tuple = (), flags: tuple = ()) -> list[dict]:
    """A list of raw points whose keys among `numbers`, `texts` and `flags` hold values of that type where present
    (recompute_s may be null: not measured)."""
    require(isinstance(items, list), f"{where} must be a list of points, got {type(items).__name__}")
    for i, p in enumerate(items):
        at = f"{where}[{i}]"
        require(isinstance(p, dict), f"{at} must be a mapping, got {type(p).__name__}")
        for key in (k for k in numbers if k in p and not (p[k] is None and k == "recompute_s")):
            check_number(p[key], key, at)
        for key in (k for k in texts if k in p):
            text(p, key, at)
        for key in (k for k in flags if k in p):
            flag(p, key, at)
    return items


def _raw(d: dict, source: str) -> dict:
    """The profile's raw section with the parts it reads checked: RAW_POINTS and the compute points."""
    raw = mapping(d, "raw", source, default={})
    for path, numbers, texts, flags in RAW_POINTS:
        part = mapping(raw, path[0], f"{source}: raw", default={})
        _points(part.get(path[1]) or [], f"{source}: raw.{'.'.join(path)}", numbers, texts, flags)
    mapping(raw, "settings", f"{source}: raw", default={})
    _points(raw.get("calibration_runs") or [], f"{source}: raw.calibration_runs", ())
    entries = _points(raw.get("compute") or [], f"{source}: raw.compute", ("tp",), ("kind",))
    for i, entry in enumerate(entries):
        where = f"{source}: raw.compute[{i}].points"
        for j, p in enumerate(_points(entry.get("points") or [], where, COMPUTE_POINT_NUMBERS)):
            require("tokens" in p, f"{where}[{j}]: missing key 'tokens'")
    return raw


def _raw_compute(raw: dict, kind: str, tp: int) -> list:
    for r in raw.get("compute") or []:
        if r.get("kind") == kind and r.get("tp") == tp:
            return r.get("points") or []
    return []


def _entries(d: dict, key: str, source: str) -> list:
    return [(item, f"{source}: {key}[{i}]") for i, item in enumerate(listing(d, key, source, default=[]))]


def parse_profile(d: object, source: str) -> Profile:
    """The profile in the file's dict form, checked. A version-1 dict has no stored derived values: it reads with
    `stack` None and `file_version` 1, for planner.cost.profiled.profile_from_dict to migrate (the door every
    caller uses)."""
    require(isinstance(d, dict), f"{source}: expected a mapping")
    version = d.get("version")
    require(version in VERSIONS, f"{source}: profile version {version!r} is not supported; expected {PROFILE_VERSION} "
            f"(or {', '.join(str(v) for v in VERSIONS if v != PROFILE_VERSION)}, migrated on load)")
    raw = _raw(d, source)
    comm = raw.get("communication") or {}
    compute = tuple(_compute(c, where, raw) for c, where in _entries(d, "compute", source))
    collectives = tuple(_collective(c, where) for c, where in _entries(d, "collectives", source))
    inter_node = _collective(d["inter_node"], f"{source}: inter_node") if d.get("inter_node") is not None else None
    notes: dict[str, str] = {}  # what this load derived from the raw points, for `derived`
    sharding = tuple(_sharding(s, where, comm.get("sharding") or [], notes)
                     for s, where in _entries(d, "sharding", source))
    pipeline = tuple(_pipeline(f, where, comm.get("pipeline") or [], notes)
                     for f, where in _entries(d, "pipeline", source))
    sweep = listing(d, "matmul_tflops_by_gflop", source, default=[])
    for i, pair in enumerate(sweep):
        require(isinstance(pair, list) and len(pair) == 2 and all(is_number(x) and x >= 0 for x in pair) and pair[0] > 0,
                f"{source}: matmul_tflops_by_gflop[{i}] must be a [GFLOP > 0, TFLOP/s >= 0] pair, got {pair!r}")
    facts = mapping(d, "facts", source, default={})
    number(facts, "host_memory_gib", f"{source}: facts", 0, default=None)
    integer(facts, "gpu_count", f"{source}: facts", 0, default=None)
    overlap = d.get("overlap_slowdown")
    model = name(d, "model", source)
    _refuse_legacy_calibration(d.get("calibration"), source)
    shape, facts = _model_shape(d, source)
    return Profile(
        gpu_name=name(d, "gpu_name", source), device=text(d, "device", source, ("cuda", "cpu")), model=model,
        seq_len=integer(d, "seq_len", source, 1), dtype=text(d, "dtype", source), compute=compute, collectives=collectives,
        matmul_tflops=number(d, "matmul_tflops", source, 0, default=0.0),
        hbm_bandwidth_gb_s=number(d, "hbm_bandwidth_gb_s", source, 0, default=0.0),
        matmul_tflops_by_gflop=tuple(sorted((float(g), float(t)) for g, t in sweep)),
        host_bandwidth_gb_s=number(d, "host_bandwidth_gb_s", source, 0, default=0.0),
        optimizer_s_per_param=number(d, "optimizer_s_per_param", source, 0, default=0.0),
        host_optimizer_s_per_param=number(d, "host_optimizer_s_per_param", source, 0, default=0.0),
        overlap_slowdown=None if overlap is None else number(d, "overlap_slowdown", source, 0),
        device_count=integer(d, "device_count", source, 0, MAX_GROUP, default=0),
        memory_gib=number(d, "memory_gib", source, 0, default=0.0), inter_node=inter_node,
        sharding=sharding, pipeline=pipeline, facts=facts, raw=raw, model_shape=shape, file_version=version,
        **_derived(d, source, notes),
    )


def _derived(d: dict, source: str, loaded: dict[str, str]) -> dict:
    """The stored stack factor and notes of what was derived (a current version's; a version-1 file has neither),
    with the notes of what this load derived (`loaded`)."""
    stored = mapping(d, "derived", source, default={}) if d["version"] == PROFILE_VERSION else {}
    for key in stored:
        text(stored, key, f"{source}: derived")
    stack = d.get("stack_factor") if d["version"] == PROFILE_VERSION else None
    return {"stack": None if stack is None else _stack(mapping(d, "stack_factor", source), f"{source}: stack_factor"),
            "derived": tuple((str(k), str(v)) for k, v in {**stored, **loaded}.items())}


def _refuse_legacy_calibration(calib: object, source: str) -> None:
    """Profiles used to hold `distplan run --calibrate`'s factors, one set for every engine and model: refused with
    the way out (an empty mapping, as every committed profile has, loads as before)."""
    require(calib is None or isinstance(calib, dict), f"{source}: calibration must be a mapping of name: factor")
    if calib:

        factors = ", ".join(f"{k} x{v}" for k, v in sorted(calib.items()))
        raise DistplanError(f"{source}: holds calibration factors ({factors}) that an older `distplan run --calibrate` "
                            "wrote into the profile, where they applied to every engine and model: delete its "
                            "'calibration' key to use the profile, and re-run `distplan run --calibrate` to record them "
                            f"per engine and model shape in {default_calibration_path(source)}")


def _model_shape(d: dict, source: str) -> tuple[tuple, dict]:
    """(Profile.model_shape, facts): the recorded shape, checked; for a profile written before shapes were recorded,
    the zoo model of its name (said in facts["model_shape"]), or () where its name is no zoo model (a file's)."""
    from planner.core.model import FAMILIES, load_model, zoo_names
    from planner.core.model import SHAPE_KEYS, VIT_SHAPE_KEYS, model_shape

    facts = dict(d.get("facts") or {})
    raw = d.get("model_shape")
    if raw is None:
        name = str(d["model"])
        if name not in zoo_names():
            return (), facts
        facts["model_shape"] = f"derived on load from the zoo model '{name}' (the profile predates recorded shapes)"
        return model_shape(load_model(name)), facts
    require(isinstance(raw, dict), f"{source}: model_shape must be a mapping of {', '.join(SHAPE_KEYS)}")
    require(raw.get("family") in FAMILIES, f"{source}: model_shape family {raw.get('family')!r} is not one of "
                                           f"{', '.join(FAMILIES)}")
    keys = SHAPE_KEYS + (VIT_SHAPE_KEYS if raw["family"] == "vit" else ())
    for key in keys[1:]:
        v = raw.get(key)
        require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                f"{source}: model_shape needs {key} as a positive integer, got {v!r}")
    return tuple((k, raw[k]) for k in keys), facts


def read_profile(path: str | Path) -> Profile:
    """The profile file as stored (parse_profile); planner.cost.profiled.load_profile also migrates an older one."""
    data = read_yaml(path, "profile file", hint=f"; create one with `distplan profile -o {path}`")
    return parse_profile(data, str(path))


def save_profile(p: Profile, path: str | Path) -> None:
    from planner.core.fileio import atomic_write_text, dump_yaml

    atomic_write_text(Path(path), dump_yaml(profile_to_dict(p), sort_keys=False))


def describe_profile(profile: Profile) -> str:
    """The profile's own shape in words."""
    return describe_shape(profile.model, profile.model_shape, profile.seq_len, profile.dtype)


def default_calibration_path(profile_path: str | Path) -> Path:
    """Beside the profile: h200.yaml -> h200.calibration.yaml."""
    p = Path(profile_path)
    return p.with_name(f"{p.stem}.calibration.yaml")
