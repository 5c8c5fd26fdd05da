"""planner/core/kerneldb.py against a synthetic database whose every number is known: measured points come back exactly,
points between them interpolate monotonically, points outside say "extrapolated" and name the axis, and a bad
file is one DistplanError line naming what is wrong."""

import copy
import math

import pytest
import yaml

from planner.core.errors import DistplanError
from planner.core.fileio import dump_yaml
from planner.core.kerneldb import (GEMM_LAYOUTS, WORK, available_databases, gpu_slug, kernel_db_from_dict, load_kernel_db)

M, N, K = (256, 1024, 4096), (64, 256, 1024, 4096), (128, 512, 2048)
SEQ, HEADS, HEAD_DIM, GQA = (1024, 4096), (1, 8), (64, 128), (1, 8)
PEAK, LATENCY_S, BW = 5e14, 5e-6, 2e12


def gemm_s(m, n, k, layout):
    """Latency plus work at a rate that grows with size: monotone in every axis."""
    rate = PEAK * (m * n * k) / (m * n * k + 2**28) * {"fwd": 1.0, "dgrad": 0.9, "wgrad": 0.8}[layout]
    return LATENCY_S + 2 * m * n * k / rate


def synthetic(missing=()) -> dict:
    gemm = {layout: [[[("flop_cap" if (m, n, k) in missing else gemm_s(m, n, k, layout)) for k in K] for n in N]
                     for m in M] for layout in GEMM_LAYOUTS}
    att = {phase: [[[[("infeasible" if h < g else LATENCY_S + f * 2 * s * s * d * h / 3e14) for g in GQA]
                     for d in HEAD_DIM] for h in HEADS] for s in SEQ] for phase, f in (("fwd", 1.0), ("bwd", 2.5))}
    rows, widths = (16, 256, 4096), (1024, 4096)
    mb = {"rms_norm.fwd": {"axes": {"width": list(widths), "rows": list(rows)},
                           "seconds": [[LATENCY_S + 4 * r * w / BW for r in rows] for w in widths]},
          "embedding.bwd": {"axes": {"width": [32768, 131072], "rows": list(rows)}, "fixed": {"hidden": 1024},
                            "seconds": [[LATENCY_S + 2 * 1024 * (r + v) / BW for r in rows] for v in (32768, 131072)]}}
    return {"version": 1, "kind": "distplan kernel database", "gpu_name": "Synthetic GPU", "device": "cuda",
            "dtype": "bf16", "facts": {"date_utc": "2026-01-01T00:00:00Z"},
            "gemm": {"axes": {"m": list(M), "n": list(N), "k": list(K)}, "seconds": gemm},
            "attention": {"axes": {"seq": list(SEQ), "heads": list(HEADS), "head_dim": list(HEAD_DIM), "gqa": list(GQA)},
                          "seconds": att},
            "memory_bound": {"kernels": mb},
            "launch": {"eager_op_s": 6e-6, "graph_kernel_s": 2e-6, "eager_roundtrip_s": 2e-5},
            "optimizer": {"adamw_s_per_param": 1.5e-11},
            "clock": {"sustained_sm_mhz": 1755.0, "power_w": 690.0, "samples": 28, "max_sm_mhz": 1980.0}}


@pytest.fixture(scope="module")
def db():
    return kernel_db_from_dict(synthetic(), "synthetic")


def test_every_measured_point_comes_back_exactly(db):
    for layout in GEMM_LAYOUTS:
        for m in M:
            for n in N:
                for k in K:
                    assert db.gemm_time_s(m, n, k, layout) == (gemm_s(m, n, k, layout), "database")
    s, prov = db.attention_time_s(4096, 8, 128, gqa=8, phase="bwd")
    assert prov == "database" and s == LATENCY_S + 2.5 * 2 * 4096**2 * 128 * 8 / 3e14
    assert db.memory_bound_time_s("rms_norm.fwd", rows=256, width=4096) == (LATENCY_S + 4 * 256 * 4096 / BW, "database")


@pytest.mark.parametrize("axis", ["m", "n", "k"])
def test_between_points_is_monotone_and_between_the_neighbours(db, axis):
    values = {"m": M, "n": N, "k": K}[axis]
    base = {"m": 1024, "n": 256, "k": 512}
    lo, hi = values[0], values[-1]
    xs = [lo * (hi / lo) ** (i / 60) for i in range(61)]
    times = []
    for x in xs:
        t, prov = db.gemm_time_s(**{**base, axis: x}, layout="dgrad")
        # a fractional width is no width cuBLAS's aligned kernels run: priced at the aligned rate, and said
        assert prov == "database" or (axis != "m" and prov.endswith("not a multiple of 8: priced at the aligned grid's rate)"))
        times.append(t)
    assert all(b >= a for a, b in zip(times, times[1:]))
    for a, b in zip(values, values[1:]):  # inside a cell: between its two measured ends
        mid = math.sqrt(a * b)
        t = db.gemm_time_s(**{**base, axis: mid}, layout="dgrad")[0]
        ta, tb = (db.gemm_time_s(**{**base, axis: v}, layout="dgrad")[0] for v in (a, b))
        assert ta < t < tb


def test_interpolation_is_log_linear_in_time(db):
    """Halfway in log2 between two points the time is their geometric mean (work and rate both log-linear)."""
    t = db.gemm_time_s(512, 256, 512)[0]
    assert t == pytest.approx(math.sqrt(gemm_s(256, 256, 512, "fwd") * gemm_s(1024, 256, 512, "fwd")), rel=1e-12)


def test_outside_the_grid_is_extrapolated_naming_the_axis(db):
    small, prov = db.gemm_time_s(64, 256, 512)
    assert prov.startswith("extrapolated (") and "m 64 below the grid's 256-4096: time held" in prov
    assert small == pytest.approx(db.gemm_time_s(256, 256, 512)[0], rel=1e-12)  # the latency floor is held
    big, prov = db.gemm_time_s(1024, 16384, 512, "wgrad")
    assert "n 16384 above the grid's 64-4096: rate held" in prov
    assert big == pytest.approx(4 * db.gemm_time_s(1024, 4096, 512, "wgrad")[0], rel=1e-12)  # time grows with work
    _, prov = db.gemm_time_s(8192, 64, 100000)
    assert "m 8192 above" in prov and "k 100000 above" in prov
    _, prov = db.attention_time_s(131072, 8, 128)
    assert "seq 131072 above the grid's 1024-4096" in prov
    _, prov = db.memory_bound_time_s("embedding.bwd", rows=256, width=131072, hidden=4096)
    assert "hidden 4096: rate measured at hidden 1024" in prov


def test_an_unmeasured_point_holds_the_best_rate_measured_below_it_and_says_so():
    db = kernel_db_from_dict(synthetic(missing={(4096, 4096, 2048)}), "synthetic")
    t, prov = db.gemm_time_s(4096, 4096, 2048)
    assert prov == "extrapolated (past the FLOP cap: rate held at the best measured at a smaller shape)"
    below = [(m, n, k) for m in M for n in N for k in K if (m, n, k) != (4096, 4096, 2048)]
    best = max(2 * m * n * k / gemm_s(m, n, k, "fwd") for m, n, k in below)
    assert t == pytest.approx(2 * 4096 * 4096 * 2048 / best, rel=1e-12)
    # a point whose cell touches it is extrapolated too; one whose cell does not stays "database"
    assert db.gemm_time_s(3000, 4096, 2048)[1].startswith("extrapolated")
    assert db.gemm_time_s(3000, 1024, 512)[1] == "database"
    # attention: fewer heads than the GQA ratio is no shape; its cell says so
    assert "no such shape" in db.attention_time_s(2048, 4, 64, gqa=4)[1]


def test_an_odd_width_reads_the_unaligned_grid_and_an_odd_k_says_it_was_not_measured():
    """GPT-2's 50,257-word head runs on cuBLAS's unaligned kernels: the file's gemm_unaligned grid (odd n) prices it;
    an aligned n never reads it; an odd k (no grid) is priced at the aligned rate and named."""
    d = synthetic()
    odd_n = (65, 1025, 65537)
    d["gemm_unaligned"] = {"axes": {"m": list(M), "n": list(odd_n), "k": list(K)},
                           "seconds": {lay: [[[7 * gemm_s(m, n, k, lay) for k in K] for n in odd_n] for m in M]
                                       for lay in GEMM_LAYOUTS}}
    db = kernel_db_from_dict(d, "synthetic")
    assert db.gemm_time_s(1024, 1025, 512, "dgrad") == (7 * gemm_s(1024, 1025, 512, "dgrad"), "database")
    inside, prov = db.gemm_time_s(1024, 50257, 512)
    assert prov == "database" and 7 * gemm_s(1024, 1025, 512, "fwd") < inside < 7 * gemm_s(1024, 65537, 512, "fwd")
    assert db.gemm_time_s(1024, 1024, 512) == (gemm_s(1024, 1024, 512, "fwd"), "database")
    t, prov = db.gemm_time_s(1024, 1024, 513)
    assert prov.startswith("extrapolated (k 513 not a multiple of 8: priced at the aligned grid's rate")
    assert t == pytest.approx(gemm_s(1024, 1024, 512, "fwd") * 513 / 512, rel=0.02)
    half = db.gemm_time_s(1024, 50257 / 2, 512)  # a vocabulary split by tp into a fraction is unaligned too
    assert half[1] == "database" and half[0] > 5 * db.gemm_time_s(1024, 25128, 512)[0]
    without = kernel_db_from_dict(synthetic(), "synthetic")
    assert "n 50257 not a multiple of 8: priced at the aligned grid's rate" in without.gemm_time_s(1024, 50257, 512)[1]
    assert kernel_db_from_dict(yaml.safe_load(dump_yaml(d)), "synthetic").gemm_unaligned["wgrad"] == db.gemm_unaligned["wgrad"]


def test_rates_scalars_and_provenance(db):
    rate, prov = db.memory_bound_bytes_per_s("rms_norm.fwd", rows=4096, width=4096)
    assert prov == "database" and rate == pytest.approx(4 * 4096 * 4096 / (LATENCY_S + 4 * 4096 * 4096 / BW))
    assert db.launch_overhead_s() == (6e-6, "database")
    assert db.adamw_s_per_param() == (1.5e-11, "database")
    assert db.sustained_clock_mhz() == (1755.0, "database")
    assert WORK["gemm"]({"m": 2, "n": 3, "k": 4}, 2) == 48


def test_queries_that_cannot_be_answered_are_one_line_errors(db):
    with pytest.raises(DistplanError, match="gemm 'fprop' is unknown; valid: fwd, dgrad, wgrad"):
        db.gemm_time_s(1, 2, 3, "fprop")
    with pytest.raises(DistplanError, match="m must be a number > 0, got -5"):
        db.gemm_time_s(-5, 2, 3)
    with pytest.raises(DistplanError, match="memory_bound 'rotary.fwd' is unknown"):
        db.memory_bound_time_s("rotary.fwd", rows=1, width=64)
    with pytest.raises(DistplanError, match="'rows' is missing"):
        db.memory_bound_time_s("rms_norm.fwd", width=64)
    with pytest.raises(DistplanError, match="unknown shape key"):
        db.memory_bound_time_s("rms_norm.fwd", rows=4, width=64, heads=2)
    data = synthetic()
    data["attention"] = {"not_measured": "TypeError: no SDPA here"}
    data["clock"] = {"not_measured": "no GPU"}
    partial = kernel_db_from_dict(data, "partial")
    with pytest.raises(DistplanError, match="has no attention measurements \\(TypeError: no SDPA here\\)"):
        partial.attention_time_s(1024, 1, 64)
    with pytest.raises(DistplanError, match="has no sustained clock \\(no GPU\\)"):
        partial.sustained_clock_mhz()


def _set(data: dict, path: str, value):
    *parents, last = path.split("/")
    node = data
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


DELETE = object()


@pytest.mark.parametrize("path,value,needle", [
    ("version", 2, "'version' must be 1"),
    ("version", DELETE, "'version' must be 1"),
    ("kind", "profile", "'kind' must be one of distplan kernel database"),
    ("device", "tpu", "'device' must be one of cuda, cpu"),
    ("dtype", "int8", "'dtype' must be one of bf16, fp16, fp32"),
    ("gpu_name", "H100 [SXM]", "'gpu_name' must be a name"),
    ("gemm/axes/m", [256, 256, 4096], "gemm.axes.m must be ascending without repeats"),
    ("gemm/axes/n", [], "gemm.axes.n must be a non-empty list"),
    ("gemm/axes/k", [128, -1, 2048], "must be a number > 0"),
    ("gemm/seconds/fwd/0", [[1.0]], "gemm.seconds.fwd[0] must be a list of 4"),
    ("gemm/seconds/dgrad/1/2/0", -1.0, "gemm.seconds.dgrad[1][2][0] must be seconds > 0 or one of flop_cap"),
    ("gemm/seconds/wgrad/0/0/0", "lost", "must be seconds > 0 or one of"),
    ("gemm/seconds/wgrad", DELETE, "missing key 'wgrad'"),
    ("gemm", "fast", "'gemm' must be a mapping"),
    ("attention/axes", DELETE, "missing key 'axes'"),
    ("memory_bound/kernels/softmax.fwd", {"axes": {}, "seconds": []}, "'softmax.fwd' is unknown; valid: layer_norm.fwd"),
    ("memory_bound/kernels/rms_norm.fwd/fixed", {"hidden": "big"}, "must be a number > 0, got 'big'"),
    ("launch/eager_op_s", 0, "must be a number > 0, got 0"),
    ("optimizer/adamw_s_per_param", "fast", "must be a number > 0"),
])
def test_bad_files_are_one_line_errors(tmp_path, path, value, needle):
    data = copy.deepcopy(synthetic())
    _set(data, path, value)
    f = tmp_path / "bad.yaml"
    f.write_text(dump_yaml(data, sort_keys=False))
    with pytest.raises(DistplanError) as exc:
        load_kernel_db(f)
    assert needle in str(exc.value) and "\n" not in str(exc.value) and str(f) in str(exc.value)


def test_a_grid_with_nothing_measured_and_unreadable_files_are_refused(tmp_path):
    data = synthetic()
    data["gemm"]["seconds"]["fwd"] = [[["budget"] * len(K) for _ in N] for _ in M]
    with pytest.raises(DistplanError, match="gemm fwd: no grid point was measured"):
        kernel_db_from_dict(data, "x")
    with pytest.raises(DistplanError, match="kernel database '.*missing.yaml' does not exist; committed databases"):
        load_kernel_db(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("gemm: [1, 2\n")
    with pytest.raises(DistplanError, match="is malformed YAML"):
        load_kernel_db(tmp_path / "bad.yaml")


def test_file_round_trip_and_committed_databases(tmp_path):
    f = tmp_path / "synthetic.yaml"
    f.write_text(dump_yaml(synthetic(), sort_keys=False))
    db = load_kernel_db(f)
    assert db.gpu_name == "Synthetic GPU" and db.gemm_time_s(256, 64, 128)[0] == gemm_s(256, 64, 128, "fwd")
    assert yaml.safe_load(f.read_text())["version"] == 1
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    for name, path in available_databases().items():  # every committed database loads and answers by name
        committed = load_kernel_db(name)
        assert committed.device == "cuda" and committed.gemm_time_s(4096, 4096, 4096)[1] == "database", path


def test_attention_below_the_sequence_grid_is_priced_as_the_same_causal_work():
    """A sequence shorter than the grid's shortest (a ViT's 257 patches, a context-parallel chunk) is priced at the
    grid's shortest sequence over proportionally fewer heads (heads x seq^2 kept), not held at that edge's time;
    the measured H100 database: never above the edge's time, never below a measured smaller-work point's, and
    labelled extrapolated."""
    db = load_kernel_db("nvidia-h100-80gb-hbm3")
    lo = 1024
    edge, _ = db.attention_time_s(lo, 64, 128, 1, "fwd")
    short, prov = db.attention_time_s(lo / 2, 64, 128, 1, "fwd")
    same, _ = db.attention_time_s(lo, 16, 128, 1, "fwd")  # heads x seq^2 equal: a measured point
    assert short == pytest.approx(same, rel=1e-12) and short < edge
    assert prov.startswith("extrapolated (") and "same causal work" in prov
    for phase in ("fwd", "bwd"):
        times = [db.attention_time_s(s, 32, 64, 1, phase)[0] for s in (128, 257, 512, 1024, 2048)]
        assert times == sorted(times)  # monotone in the sequence across the grid's edge
