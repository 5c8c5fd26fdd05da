"""profilers.fit: the two fitted numbers reproduce the measured points, and CommModel reads them back."""

import random

import pytest

from planner.core.cluster import load_cluster
from planner.cost.terms import CommModel
from planner.core.profile import Profile, bus_factor
from profilers.fit import collective_fit, collective_time_s, linear_fit, max_relative_error

SIZES = [64 * 2**10 * 4**k for k in range(8)]  # 64 KiB .. 1 GiB by x4, the GPU sweep


def nccl_like(op: str, n: int, latency_s: float, busbw_gb_s: float, noise: float, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [(latency_s + s * bus_factor(op, n) / (busbw_gb_s * 1e9)) * (1 + rng.uniform(-noise, noise)) for s in SIZES]


@pytest.mark.parametrize("op,n", [("all_reduce", 2), ("all_gather", 4), ("reduce_scatter", 8), ("all_to_all", 8),
                                  ("p2p", 2)])
def test_collective_fit_recovers_latency_and_bus_bandwidth_exactly(op, n):
    times = nccl_like(op, n, 12e-6, 331.0, noise=0.0)
    fit = collective_fit(op, n, SIZES, times)
    assert fit.latency_s == pytest.approx(12e-6, rel=1e-6)
    assert fit.bus_bandwidth_gb_s == pytest.approx(331.0, rel=1e-6)
    assert max(abs(collective_time_s(fit, s) - t) / t for s, t in zip(SIZES, times)) < 1e-9


def test_collective_fit_reproduces_noisy_points_within_noise():
    """5% measurement noise: every raw point is within 10% of the fit (the relative-error weighting
    keeps the 64 KiB points as well fitted as the 1 GiB ones)."""
    for seed in range(5):
        times = nccl_like("all_reduce", 2, 20e-6, 300.0, noise=0.05, seed=seed)
        fit = collective_fit("all_reduce", 2, SIZES, times)
        assert max(abs(collective_time_s(fit, s) - t) / t for s, t in zip(SIZES, times)) < 0.10
        assert fit.bus_bandwidth_gb_s == pytest.approx(300.0, rel=0.08)


def test_outlier_is_dropped():
    times = nccl_like("all_gather", 2, 15e-6, 250.0, noise=0.0)
    times[3] *= 5  # one straggling trial
    fit = collective_fit("all_gather", 2, SIZES, times)
    assert fit.bus_bandwidth_gb_s == pytest.approx(250.0, rel=0.01)
    assert fit.latency_s == pytest.approx(15e-6, rel=0.05)


def test_linear_fit_compute_points_and_intercept_clamp():
    tokens = [1024, 2048, 4096, 8192]
    t = [1e-4 + 2e-7 * x for x in tokens]
    f = linear_fit(tokens, t)
    assert f.intercept_s == pytest.approx(1e-4) and f.slope_s == pytest.approx(2e-7)
    assert max_relative_error(f, tokens, t) < 1e-9
    # superlinear points would give a negative intercept: clamped to 0, slope through the origin
    f = linear_fit([1, 2], [1.0, 3.0])
    assert f.intercept_s == 0.0 and f.slope_s > 0
    assert linear_fit([1000], [0.5]).slope_s == pytest.approx(5e-4)  # one point: through the origin


def test_comm_model_reads_the_fit_back():
    """CommModel.time_s on a profiled (op, n) is exactly the fitted time: latency + bytes*factor/busbw."""
    times = nccl_like("all_reduce", 8, 30e-6, 400.0, noise=0.0)
    fit = collective_fit("all_reduce", 8, SIZES, times)
    prof = Profile(gpu_name="NVIDIA H100 80GB HBM3", device="cuda", model="gpt2", seq_len=1024, dtype="bf16",
                   collectives=(fit,))
    comm = CommModel(load_cluster("dgx-h100-80gb"), prof)
    for s, t in zip(SIZES, times):
        assert comm.time_s("all_reduce", 8, 1, s) == pytest.approx(t, rel=1e-9)
    assert comm.time_s("all_gather", 8, 1, SIZES[-1]) != pytest.approx(times[-1])  # not profiled: the preset
