"""Least-squares fits of measured times: the two numbers per curve the cost model reads.

- Compute: time_s = intercept_s + slope_s * tokens per layer kind, TP degree and phase
  (Alpa and Aceso profile layers at a few sizes and interpolate the same way).
- Communication: time_s = latency_s + bytes * factor(op, n) / bus_bandwidth (house rule 6;
  nccl-tests PERFORMANCE.md: algbw = bytes / time, busbw = algbw * factor(op, n)), so a straight
  line in bytes has slope factor / busbw. `planner.cost.layer.CommModel.time_s` inverts exactly this.

Measured sizes span orders of magnitude (64 KiB to 1 GiB), so the fit minimises relative error
(each point weighted by 1/y): a plain least-squares line would fit the 1 GiB points and miss the
small ones entirely. Robustness: one pass drops points whose relative residual exceeds
OUTLIER_FACTOR times the median (a straggling repeat), keeping at least MIN_KEPT points; the
intercept and the slope are kept >= 0 (a negative latency, or time falling with size, is noise
or a fitting artefact, not a measurement).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np

from planner.core.profile import CollectiveFit, LinearFit, bus_factor

OUTLIER_FACTOR = 4.0  # relative residual, in multiples of the median one, beyond which a point is dropped
MIN_KEPT = 3  # never drop below this many points (a line needs two; the third checks it)


def _weighted_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) minimising sum(((a + b x - y) / y)^2), with a >= 0 and b >= 0."""
    w = 1.0 / y
    design = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    (a, b), *_ = np.linalg.lstsq(design, y * w, rcond=None)
    if a < 0 or len(x) == 1:
        # through the origin: minimise sum(((b x - y) / y)^2) -> b = sum(x/y) / sum((x/y)^2)
        r = x / y
        a, b = 0.0, float(r.sum() / (r * r).sum())
    elif b < 0:
        # time falling with size is noise around a constant: minimise sum(((a - y) / y)^2)
        a, b = float((1 / y).sum() / (1 / y**2).sum()), 0.0
    return float(a), float(b)


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> LinearFit:
    """Fit y = intercept + slope * x to measured points (x > 0, y > 0), minimising relative error."""
    if not xs:
        raise ValueError("linear_fit needs at least one point")
    x, y = np.asarray(xs, dtype=float), np.maximum(np.asarray(ys, dtype=float), 1e-12)
    a, b = _weighted_line(x, y)
    if len(x) > MIN_KEPT:
        rel = np.abs(a + b * x - y) / y
        med = float(np.median(rel))
        keep = rel <= max(OUTLIER_FACTOR * med, 0.05)
        if MIN_KEPT <= keep.sum() < len(x):
            a, b = _weighted_line(x[keep], y[keep])
    return LinearFit(intercept_s=a, slope_s=b)


def max_relative_error(fit: LinearFit, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Largest |fit(x) - y| / y over the points: how well the two numbers reproduce the measurements."""
    return max((abs(fit(x) - y) / y for x, y in zip(xs, ys) if y > 0), default=0.0)


def collective_fit(op: str, group_size: int, sizes_bytes: Sequence[float], times_s: Sequence[float]) -> CollectiveFit:
    """latency_s and bus bandwidth (GB/s, nccl-tests convention) of one collective on one group size."""
    line = linear_fit(sizes_bytes, times_s)
    factor = bus_factor(op, group_size)
    slope = line.slope_s if line.slope_s > 0 else min(t / s for s, t in zip(sizes_bytes, times_s))
    return CollectiveFit(op=op, group_size=group_size, latency_s=line.intercept_s,
                         bus_bandwidth_gb_s=factor / slope / 1e9)


def collective_time_s(fit: CollectiveFit, nbytes: float) -> float:
    """The fitted time of one collective on an `nbytes` buffer (what CommModel.time_s computes)."""
    return fit.latency_s + nbytes * bus_factor(fit.op, fit.group_size) / (fit.bus_bandwidth_gb_s * 1e9)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))
