"""The step trace's summary (planner/runner/trace.py) on hand-made kernel intervals."""

import pytest

from planner.runner.trace import category, summarize


def test_categories_follow_kernel_names():
    assert category("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "communication"
    assert category("flash_fwd_kernel<...>") == "attention"
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert category("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT") == "matmul"
    assert category("vectorized_elementwise_kernel<4, ...>") == "other"


def test_busy_time_is_the_union_of_overlapping_kernels():
    # microseconds: a gemm 0-100, an all-reduce 50-150 on another stream, an add 300-400; step of 1 ms
    kernels = [("sm90_gemm", 0, 100), ("ncclDevKernel_AllReduce", 50, 150), ("elementwise_add", 300, 400)]
    s = summarize(kernels, wall_s=1e-3)
    assert s["busy_s"] == pytest.approx(250e-6)  # 0-150 and 300-400
    assert s["compute_busy_s"] == pytest.approx(200e-6)  # without the all-reduce
    assert s["idle_s"] == pytest.approx(750e-6)
    assert s["by_category_s"] == pytest.approx({"communication": 100e-6, "matmul": 100e-6, "other": 100e-6})
    assert [k["name"] for k in s["top_kernels"]] == ["sm90_gemm", "ncclDevKernel_AllReduce", "elementwise_add"]
    assert s["kernels"] == 3


def test_nested_and_repeated_intervals_count_once():
    s = summarize([("a", 0, 100), ("b", 10, 20), ("a", 0, 100), ("c", 100, 200)], wall_s=1e-4)
    assert s["busy_s"] == pytest.approx(200e-6) and s["idle_s"] == 0.0
