"""`distplan profile --hardware` on a CPU (tiny grids, fp32): the database it measures is well formed and reloads
to the same numbers, a budget that runs out is recorded rather than fatal, a failing point or capture does not stop
the grid, the GPU plan fits its budget, and the command writes its two files or refuses before measuring."""

import json
import math

import pytest
import torch

import profilers.hardware as hw
from planner.core.errors import DistplanError
from planner.core.fileio import dump_yaml, parse_yaml
from planner.core.kerneldb import GEMM_LAYOUTS, kernel_db_from_dict, load_kernel_db
from profilers import kernel_grid
from profilers.kernel_timing import KernelTimer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def measured():
    lines = []
    got = hw.measure_hardware(CPU, torch.float32, 30.0, lambda label, done, total: lines.append((label, done, total)))
    return got, lines


def test_cpu_run_is_a_well_formed_database_that_reloads(measured):
    got, lines = measured
    db = got.database
    assert (db["version"], db["device"], db["dtype"]) == (1, "cpu", "fp32")
    assert lines[-1] == ("clock: done", 8, 8)
    for section in ("gemm", "gemm_unaligned", "attention", "memory_bound", "launch", "optimizer"):
        assert "not_measured" not in db[section], (section, db[section])
    assert db["clock"] == {"not_measured": "no GPU: the CPU's clock is not sampled"}
    loaded = kernel_db_from_dict(parse_yaml(dump_yaml(db, sort_keys=False), "db"), "db")
    grid = db["gemm"]["axes"]
    for layout in GEMM_LAYOUTS:
        for i, m in enumerate(grid["m"]):
            for j, n in enumerate(grid["n"]):
                for k_, k in enumerate(grid["k"]):
                    assert loaded.gemm_time_s(m, n, k, layout) == (db["gemm"]["seconds"][layout][i][j][k_], "database")
    odd = db["gemm_unaligned"]
    assert odd["axes"]["n"] == [33, 65] and loaded.gemm_time_s(64, 33, 32, "wgrad") == (
        odd["seconds"]["wgrad"][1][0][0], "database")
    assert loaded.attention_time_s(64, 2, 32, gqa=2, phase="bwd")[1] == "database"
    assert "no such shape" in loaded.attention_time_s(64, 1, 32, gqa=2)[1]
    assert set(loaded.memory_bound) >= {"rms_norm.fwd", "rms_norm.bwd", "rotary.bwd", "swiglu.bwd", "cross_entropy.bwd",
                                        "embedding.bwd", "dropout.fwd", "add.fwd", "gqa_expand.bwd"}
    rate, prov = loaded.memory_bound_bytes_per_s("layer_norm.bwd", rows=16, width=64)
    assert prov == "database" and rate > 0
    assert loaded.launch_overhead_s()[0] > 0 and loaded.adamw_s_per_param()[0] > 0


def test_raw_points_keep_every_measurement(measured):
    got, _ = measured
    raw = json.loads(json.dumps(got.raw))
    for section in ("gemm", "gemm_unaligned", "attention", "memory_bound"):
        assert len(raw[section]["points"]) == raw[section]["counts"]["measured"]
        assert all(p["min_s"] <= p["seconds"] <= p["max_s"] and p["method"] == "cpu thread time"
                   for p in raw[section]["points"])
    assert {p["backend"] for p in raw["attention"]["points"]} <= {"flash_attention", "efficient_attention", "math",
                                                                 "cudnn_attention", "unknown"}


def test_a_budget_that_runs_out_is_recorded_not_fatal():
    got = hw.measure_hardware(CPU, torch.float32, 0.001)
    for section in ("gemm", "attention", "memory_bound"):
        assert got.database[section]["not_measured"].startswith(("no point", "no kernel")), got.database[section]
        assert got.database["facts"]["sections"][section]["counts"].get("budget", 0) > 0
    db = kernel_db_from_dict(got.database, "late")
    with pytest.raises(DistplanError, match="has no gemm measurements \\(no point of fwd, dgrad, wgrad measured"):
        db.gemm_time_s(64, 64, 64)
    assert db.launch_overhead_s()[1] == "database"


def test_a_failing_point_is_recorded_and_the_grid_goes_on(monkeypatch):
    timer = KernelTimer(CPU, 1e-4, 2)
    real = timer.measure

    def flaky(fn, est_s, max_inner, prepare=None, kind=""):
        if kind == "gemm.wgrad" and flaky.calls == 0:
            flaky.calls += 1
            raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED\nmore")
        return real(fn, est_s, max_inner, prepare, kind)

    flaky.calls = 0
    monkeypatch.setattr(timer, "measure", flaky)
    grid = kernel_grid.GemmGrid(m=(16, 32), n=(16,), k=(16,), flop_cap=2.0**20, operand_cap_bytes=2**20)
    sec = kernel_grid.measure_gemm(grid, CPU, torch.float32, timer, 1e10, 1e10, 4, math.inf, lambda _: None)
    assert sec.counts == {"measured": 5, "failed": 1}
    assert sec.errors == {"RuntimeError: CUBLAS_STATUS_EXECUTION_FAILED": 1}
    assert kernel_grid.nest(sec, "wgrad", (grid.m, grid.n, grid.k))[0] == [["failed"]]


def test_a_call_that_refuses_capture_is_timed_eagerly(monkeypatch):
    timer = KernelTimer(CPU, 1e-4, 2)
    timer.cuda, graphs = True, []

    def capture(fn, inner, prepare):
        graphs.append(inner)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(timer, "_graph", capture)
    monkeypatch.setattr(timer, "_eager", lambda fn, inner, prepare: {"seconds": 1.0, "method": "eager"})
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: "a new stream")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    for _ in range(4):
        assert timer.measure(lambda: None, 1e-5, 8, kind="embedding.bwd")["method"] == "eager"
    assert len(graphs) == 2 and timer.stream == "a new stream"
    assert timer.graph_errors == {"embedding.bwd: RuntimeError: operation not permitted when stream is capturing": 2}


def test_memory_bound_kernels_are_never_captured(monkeypatch):
    """A failed capture of an autograd backward broke every later kernel of the H100 run (rotary.bwd,
    2026-12-07): the memory-bound section times its kernels eagerly, and GEMMs still go through the graph."""
    timer = KernelTimer(CPU, 1e-4, 2)
    timer.cuda, methods = True, []
    monkeypatch.setattr(timer, "_graph", lambda fn, inner, prepare: methods.append("graph") or {"seconds": 1.0})
    monkeypatch.setattr(timer, "_eager", lambda fn, inner, prepare: methods.append("eager") or {"seconds": 1.0})
    grid = kernel_grid.MemoryGrid(widths={"rotary": (16,)}, rows=(16,), bytes_cap=2**22, fixed={"rotary": {"heads": 8}})
    sec = kernel_grid.measure_memory_bound(grid, CPU, torch.float32, timer, 1e10, 4, float("inf"), lambda label: None)
    assert methods == ["eager", "eager"] and sec.counts == {"measured": 2}
    methods.clear()
    timer.measure(lambda: None, 1e-5, 8, kind="gemm.fwd")
    assert methods == ["graph"]


def test_gpu_plan_covers_the_issue_grid_and_fits_its_budget_on_an_h100():
    s = hw.plan_settings(cuda=True, quick=False, memory_bytes=80 * 2**30)
    fine, coarse = s.gemm
    assert (fine.m[0], fine.m[-1], fine.n[0], fine.n[-1], fine.k[0], fine.k[-1]) == (256, 131072, 64, 262144, 128, 65536)
    assert all(v % 32 == 0 for v in fine.n + fine.k) and {1536, 12288, 49152, 196608} <= set(fine.n)
    assert s.attention.seq == tuple(2**j for j in range(10, 18)) and s.attention.gqa == (1, 4, 8)
    # H100: ~780 TFLOP/s and ~3 TB/s (benchmarks/results/profile_1xh100.md); probes, launch ~10 s, then the shares
    est = [kernel_grid.gemm_estimate_s(g, 2, 780e12, 3.0e12, s.loop_s, s.repeats, s.max_inner["gemm"], hw.HOST_POINT_S,
                                       hw.HOST_CALL_S) for g in s.gemm]
    gemm_share = (hw.BUDGET_S["cuda"] - 10 - hw.TAIL_S["cuda"]) * hw.SHARES["gemm"]
    assert coarse != fine and est[1] < est[0] <= hw.GEMM_FIT * gemm_share
    # odd n: GPT-2's 50,257 and every vocabulary to 256k inside the grid, and the grid done in its share even at a
    # seventh of the aligned rate (GPT-2's head on an H100: benchmarks/results/preset_vs_measured.md)
    odd = s.gemm_unaligned
    assert all(n % 2 for n in odd.n) and odd.n[0] < 50257 < 262144 < odd.n[-1] and odd.m == fine.m
    slow = kernel_grid.gemm_estimate_s(odd, 2, 780e12 / 7, 3.0e12, s.loop_s, s.repeats, s.max_inner["gemm"],
                                       hw.HOST_POINT_S, hw.HOST_CALL_S)
    assert slow <= (hw.BUDGET_S["cuda"] - 10 - hw.TAIL_S["cuda"]) * hw.SHARES["gemm_unaligned"]


def test_cli_writes_the_database_and_its_points(cli, tmp_path):
    out = tmp_path / "cpu.yaml"
    r = cli("profile", "--hardware", "--device", "cpu", "--budget-s", "20", "-o", out)
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.stderr and (tmp_path / "cpu.points.json").is_file()
    db = load_kernel_db(out)
    assert db.device == "cpu" and db.gemm_time_s(32, 32, 32)[1] == "database"
    assert "kernel database of cpu" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--hardware", "-o", "{folder}"], "cannot write --output"),
    (["--hardware", "-o", "{blocker}/hw.yaml"], "cannot write --output"),
    (["--hardware", "-m", "gpt2"], "--hardware measures the GPU, not a model: leave out --model"),
    (["--hardware", "--seq-len", "1024"], "leave out --seq-len"),
    (["--hardware", "--only", "compute"], "--only 'compute' with --hardware: valid sections are gemm, gemm_unaligned, attention, memory_bound"),
    (["--hardware", "--budget-s", "0"], "--budget-s must be seconds above 0 and at most 3600, got 0"),
    (["--hardware", "--budget-s", "nan"], "--budget-s must be seconds"),
    (["--hardware", "--device", "tpu"], "--device 'tpu' is unknown"),
    (["--hardware", "--dtype", "int8"], "--dtype 'int8' is unknown"),
    ([], "missing option --model / -m (the model to profile); or pass --hardware"),
    (["-m", "gpt2", "--budget-s", "5"], "--budget-s is for --hardware"),
])
def test_cli_refuses_before_measuring(cli, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file")
    (tmp_path / "folder").mkdir()
    monkeypatch.setattr(hw, "measure_hardware", lambda *a, **k: pytest.fail("measured"))
    r = cli("profile", *[a.format(folder=tmp_path / "folder", blocker=tmp_path / "blocker") for a in args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "folder"]


def test_only_some_sections_then_merged_into_a_full_database(measured):
    """A re-run of one section (--only) merges into an earlier full database: that section and the scalar figures
    from the re-run, the rest as they were; both load, and the merged file answers from the re-run's grid."""
    full = measured[0].database
    part = hw.measure_hardware(CPU, torch.float32, 30.0, only=("memory_bound",)).database
    assert part["gemm"] == {"not_measured": "not requested (--only)"} and part["attention"]["not_measured"]
    assert "kernels" in part["memory_bound"]
    merged = hw.merge_databases(full, part)
    assert merged["gemm"] == full["gemm"] and merged["attention"] == full["attention"]
    assert merged["memory_bound"] == part["memory_bound"] and merged["optimizer"] == part["optimizer"]
    assert set(merged["facts"]["merged"]["from_newer"]) == {"memory_bound", "launch", "optimizer"}
    db = kernel_db_from_dict(merged, "merged")
    want = kernel_db_from_dict(part, "part").memory_bound_time_s("add.fwd", rows=8, width=32)
    assert db.memory_bound_time_s("add.fwd", rows=8, width=32) == want
    with pytest.raises(DistplanError, match="different gpu_name"):
        hw.merge_databases(full, {**part, "gpu_name": "another GPU"})
