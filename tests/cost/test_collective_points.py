"""Measured collective points: inside the measured sizes the cost model uses them, outside it the fit."""

import pytest

from planner.core.cluster import load_cluster
from planner.cost.terms import CommModel, ring_volume_factor
from planner.core.profile import CollectiveFit, Profile

POINTS = [{"op": "all_reduce", "group_size": 2, "bytes": b, "time_s": t}
          for b, t in ((2**16, 20e-6), (2**24, 80e-6), (2**28, 0.9e-3), (2**30, 3.3e-3))]
FIT = CollectiveFit("all_reduce", 2, latency_s=25e-6, bus_bandwidth_gb_s=330.0)


def profile(points=POINTS, calibration=()):
    return Profile(gpu_name="NVIDIA H200", device="cuda", model="gpt2-xl", seq_len=1024, dtype="bf16",
                   collectives=(FIT,), calibration=calibration, raw={"communication": {"points": points}})


def test_measured_points_are_reproduced_exactly():
    p = profile()
    for pt in POINTS:
        assert p.measured_collective_s("all_reduce", 2, pt["bytes"]) == pt["time_s"]


def test_between_points_log_log_interpolation():
    p = profile()
    mid = p.measured_collective_s("all_reduce", 2, 2**26)  # geometric middle of 2**24 and 2**28
    assert mid == pytest.approx((80e-6 * 0.9e-3) ** 0.5, rel=1e-12)


def test_cost_model_uses_points_inside_and_the_fit_outside_the_range():
    comm = CommModel(load_cluster("h200-141gb"), profile())
    assert comm.time_s("all_reduce", 2, 1, 2**28) == pytest.approx(0.9e-3)
    beyond = 2**31
    assert comm.time_s("all_reduce", 2, 1, beyond) == pytest.approx(
        FIT.latency_s + beyond * ring_volume_factor("all_reduce", 2) / (FIT.bus_bandwidth_gb_s * 1e9))
    # another group size or op was not measured: no points
    assert profile().measured_collective_s("all_gather", 2, 2**28) is None
    assert profile().measured_collective_s("all_reduce", 4, 2**28) is None


def test_calibration_scales_measured_points_and_malformed_points_are_skipped():
    comm = CommModel(load_cluster("h200-141gb"), profile(calibration=(("all_reduce", 1.5),)))
    assert comm.time_s("all_reduce", 2, 1, 2**24) == pytest.approx(1.5 * 80e-6)
    bad = profile(points=POINTS + [{"op": "all_reduce", "group_size": 2, "bytes": "x"}, {"op": "p2p"}])
    assert bad.measured_collective_s("all_reduce", 2, 2**24) == 80e-6
