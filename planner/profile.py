"""Measured hardware numbers (`distplan profile` writes them; solve/estimate --profile read them).

A profile is keyed by GPU type. The cost model asks it two questions, and falls back to the
cluster preset's analytic model where the profile has no answer (and says which was used):
- `layer_time_s(kind, tp, tokens, phase)`: compute time of one layer of a kind, TP-sharded, from a
  linear fit time = intercept + slope * tokens (Aceso/Alpa-style profiling, interpolated by tokens);
- `collective_time_s(op, group_size, bytes)`: latency + bytes / bus-bandwidth, fitted per
  collective and group size (house rule 6), times the nccl-tests bus-bandwidth factor.
`calibration` holds measured/predicted correction factors written by `distplan run --calibrate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from planner.errors import DistplanError, require

PROFILE_VERSION = 1
PHASES = ("fwd", "bwd")


@dataclass(frozen=True)
class LinearFit:
    """time_s = intercept_s + slope_s * x (x: tokens for compute, bytes for communication)."""

    intercept_s: float
    slope_s: float

    def __call__(self, x: float) -> float:
        return self.intercept_s + self.slope_s * x


@dataclass(frozen=True)
class ComputeFit:
    kind: str  # layer kind: embedding, block, moe_block, head
    tp: int
    fwd: LinearFit
    bwd: LinearFit
    peak_activation_bytes_per_token: float = 0.0  # allocator-measured, one layer, per token


@dataclass(frozen=True)
class CollectiveFit:
    op: str  # all_reduce, all_gather, reduce_scatter, all_to_all, p2p
    group_size: int
    latency_s: float
    bus_bandwidth_gb_s: float  # nccl-tests "busbw": algbw * factor(op, n)


@dataclass(frozen=True)
class Profile:
    gpu_name: str
    device: str  # "cuda" or "cpu": what was measured
    model: str
    seq_len: int
    dtype: str
    compute: tuple[ComputeFit, ...] = ()
    collectives: tuple[CollectiveFit, ...] = ()
    matmul_tflops: float = 0.0
    hbm_bandwidth_gb_s: float = 0.0
    overlap_slowdown: float | None = None
    calibration: tuple[tuple[str, float], ...] = ()  # ("compute", f), ("all_reduce", f), ...
    facts: dict = field(default_factory=dict, hash=False, compare=False)  # versions, topology, timings
    raw: dict = field(default_factory=dict, hash=False, compare=False)  # raw measured points

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

    def factor(self, key: str) -> float:
        return dict(self.calibration).get(key, 1.0)


def bus_factor(op: str, n: int) -> float:
    """nccl-tests bus-bandwidth factor: busbw = algbw * factor (PERFORMANCE.md of nccl-tests)."""
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    return 1.0  # p2p


def profile_to_dict(p: Profile) -> dict:
    return {
        "version": PROFILE_VERSION,
        "gpu_name": p.gpu_name,
        "device": p.device,
        "model": p.model,
        "seq_len": p.seq_len,
        "dtype": p.dtype,
        "matmul_tflops": p.matmul_tflops,
        "hbm_bandwidth_gb_s": p.hbm_bandwidth_gb_s,
        "overlap_slowdown": p.overlap_slowdown,
        "compute": [
            {"kind": c.kind, "tp": c.tp,
             "fwd": {"intercept_s": c.fwd.intercept_s, "slope_s_per_token": c.fwd.slope_s},
             "bwd": {"intercept_s": c.bwd.intercept_s, "slope_s_per_token": c.bwd.slope_s},
             "peak_activation_bytes_per_token": c.peak_activation_bytes_per_token}
            for c in p.compute
        ],
        "collectives": [
            {"op": c.op, "group_size": c.group_size, "latency_s": c.latency_s, "bus_bandwidth_gb_s": c.bus_bandwidth_gb_s}
            for c in p.collectives
        ],
        "calibration": dict(p.calibration),
        "facts": p.facts,
        "raw": p.raw,
    }


def _fit(d: dict, where: str, slope_key: str) -> LinearFit:
    require(isinstance(d, dict) and "intercept_s" in d and slope_key in d, f"{where}: needs intercept_s and {slope_key}")
    return LinearFit(float(d["intercept_s"]), float(d[slope_key]))


def profile_from_dict(d: object, source: str) -> Profile:
    require(isinstance(d, dict), f"{source}: expected a mapping")
    require(d.get("version") == PROFILE_VERSION, f"{source}: profile version {d.get('version')!r} is not supported; expected {PROFILE_VERSION}")
    for key in ("gpu_name", "device", "model", "seq_len", "dtype"):
        require(key in d, f"{source}: missing key '{key}'")
    try:
        compute = tuple(
            ComputeFit(kind=str(c["kind"]), tp=int(c["tp"]), fwd=_fit(c["fwd"], f"{source}: compute", "slope_s_per_token"),
                       bwd=_fit(c["bwd"], f"{source}: compute", "slope_s_per_token"),
                       peak_activation_bytes_per_token=float(c.get("peak_activation_bytes_per_token", 0.0)))
            for c in d.get("compute") or []
        )
        collectives = tuple(
            CollectiveFit(op=str(c["op"]), group_size=int(c["group_size"]), latency_s=float(c["latency_s"]),
                          bus_bandwidth_gb_s=float(c["bus_bandwidth_gb_s"]))
            for c in d.get("collectives") or []
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DistplanError(f"{source}: malformed compute/collectives entry ({type(exc).__name__}: {exc})") from None
    calib = d.get("calibration") or {}
    require(isinstance(calib, dict), f"{source}: calibration must be a mapping of name: factor")
    return Profile(
        gpu_name=str(d["gpu_name"]), device=str(d["device"]), model=str(d["model"]), seq_len=int(d["seq_len"]),
        dtype=str(d["dtype"]), compute=compute, collectives=collectives,
        matmul_tflops=float(d.get("matmul_tflops") or 0.0), hbm_bandwidth_gb_s=float(d.get("hbm_bandwidth_gb_s") or 0.0),
        overlap_slowdown=d.get("overlap_slowdown"), calibration=tuple(sorted((str(k), float(v)) for k, v in calib.items())),
        facts=d.get("facts") or {}, raw=d.get("raw") or {},
    )


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    require(path.exists(), f"profile file '{path}' does not exist; create one with `distplan profile -o {path}`")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DistplanError(f"profile file '{path}' is malformed: {str(exc).splitlines()[0]}") from None
    return profile_from_dict(data, str(path))


def save_profile(p: Profile, path: str | Path) -> None:
    from planner.fileio import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(profile_to_dict(p), sort_keys=False))
