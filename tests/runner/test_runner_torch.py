"""The torch engine end to end on CPU (gloo, 2-4 processes, a tiny GPT): every layout runs through the
launcher, matches the single-process run (--check-numerics, fp32 rtol 1e-5) and writes a report; a rank
killed mid-run or a hung run yields a failure report within the timeout and leaves no partial file.

Step times on CPU are nothing like the H100 prediction in the plan, so these tests use a huge
--tolerance and assert what the report says, not the accuracy of the cost model.
"""

import math
import time

import pytest
import yaml

from planner.core.cluster import load_cluster
from planner.core.job import ParallelConfig, validate_config
from planner.core.model import ModelSpec
from planner.core.plan import load_plan, make_plan, save_plan
from planner.cost.predict import predict
from planner.runner.data import write_tokens
from planner.runner.engine_api import TEST_KILL_ENV, RunOptions
from planner.runner.launch import run_plan
from planner.build.parallelize import ZERO_MAPPING

TINY = ModelSpec(name="tiny-gpt", family="gpt", num_layers=4, hidden_size=64, ffn_hidden_size=256, num_heads=4,
                 num_kv_heads=4, vocab_size=128, max_seq_len=32, tie_embeddings=True)
HUGE = 1e9  # --tolerance: CPU timings against an H100 prediction


def plan_file(tmp_path, **par):
    par = {"seq_len": 32, "global_batch_size": 8, **par}
    cfg = ParallelConfig(**par)
    validate_config(TINY, cfg, cfg.gpus)
    cluster = load_cluster("dgx-h100-80gb")
    plan = make_plan(TINY, cluster, cfg.gpus, cfg, predict(TINY, cluster, cfg), provenance={"command": "test"})
    path = tmp_path / "plan.yaml"
    save_plan(plan, path)
    return path


def run(tmp_path, steps=2, warmup=1, data=None, data_dtype="uint16", dtype="auto", **par):
    path = plan_file(tmp_path, **par)
    opts = RunOptions(steps=steps, warmup=warmup, lr=1e-3, timeout_s=300, data_path=data, data_dtype=data_dtype,
                      dtype=dtype)
    report = run_plan(path, opts, out_path=tmp_path / "report.yaml", tolerance=HUGE, check_numerics=True)
    assert not report.failures, [(f.rank, f.reason, f.log_tail) for f in report.failures]
    return report


def assert_verified(report, tmp_path, world):
    num = report.numerics
    assert num is not None and num.checked and num.dtype == "fp32" and num.passed, num
    assert len(num.parallel_losses) == report.warmup + report.steps and num.max_rel_error <= 1e-5
    assert report.passed and report.device == "cpu" and report.dtype == "fp32" and report.world_size == world
    assert report.measured_step_time_s > 0 and report.step_time_p10_s <= report.step_time_p90_s
    d = yaml.safe_load((tmp_path / "report.yaml").read_text())
    assert d["version"] == 1 and d["passed"] is True and len(d["ranks"]) == world
    assert d["numerics"]["passed"] is True and d["predicted_step_time_s"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml", "report.yaml"]


@pytest.mark.slow
def test_dp2_ddp_through_the_cli_with_calibration(cli, tmp_path):
    """--calibrate records the run's factors in the profile's calibration file (torch engine, this CPU, the tiny
    model's shape) and leaves the profile byte for byte as it was; --calibration then applies them."""
    from planner.core.calibration import load_calibration
    from planner.core.profile import Profile, save_profile
    from planner.core.model import model_shape
    from planner.runner.launch import _load_profile

    path = plan_file(tmp_path, dp=2)
    prof = tmp_path / "profile.yaml"
    save_profile(Profile(gpu_name="test CPU", device="cpu", model=TINY.name, seq_len=32, dtype="fp32",
                         model_shape=model_shape(TINY), device_count=2), prof)
    written = prof.read_bytes()
    r = cli("run", path, "--steps", 2, "--warmup", 1, "--check-numerics", "--tolerance", HUGE, "-o",
            tmp_path / "report.yaml", "--calibrate", "--profile", prof, "--timeout", 300)
    assert r.exit_code == 0, r.output
    assert "numerics vs single process" in r.stdout and "PASSED" in r.stdout and "calibration" in r.stdout
    d = yaml.safe_load((tmp_path / "report.yaml").read_text())
    assert d["numerics"]["passed"] and ZERO_MAPPING[0] in d["notes"]
    assert d["calibration"]["factors"]["compute"] > 1  # a CPU is slower than the H100 the plan assumed
    assert prof.read_bytes() == written
    (record,) = load_calibration(tmp_path / "profile.calibration.yaml").records
    assert record.engine == "torch" and record.gpu == "test CPU" and dict(record.factors)["compute"] > 1
    _, prediction, _, applied = _load_profile(load_plan(path), str(prof), False, "torch",
                                              str(tmp_path / "profile.calibration.yaml"))
    assert prediction["sources"]["calibration.compute"].startswith("x") and applied[0].startswith("calibration: ")
    assert prediction["step_time_s"] == pytest.approx(d["calibration"]["predicted_after_s"], rel=1e-5)  # 6 digits kept
    # the same run with the default 10% tolerance fails verification: exit code 1, report still written
    r = cli("run", path, "--steps", 1, "--warmup", 0, "-o", tmp_path / "strict.yaml", "--timeout", 300)
    assert r.exit_code == 1 and "FAILED" in r.stdout
    assert yaml.safe_load((tmp_path / "strict.yaml").read_text())["passed"] is False


@pytest.mark.slow
def test_tp2_sequence_parallel_on_a_token_file(tmp_path):
    write_tokens(tmp_path / "tokens.bin", [(i * 7) % 128 for i in range(5000)], "uint32")
    report = run(tmp_path / "run", tp=2, sequence_parallel=True, data=str(tmp_path / "tokens.bin"), data_dtype="uint32")
    assert_verified(report, tmp_path / "run", 2)
    assert "tokens.bin" in report.data


@pytest.mark.slow
def test_pp2_1f1b_uneven_split_tied_embedding(tmp_path):
    report = run(tmp_path, pp=2, layer_split=(1, 3), schedule="1f1b")
    assert_verified(report, tmp_path, 2)
    assert [r["chunks"] for r in report.ranks] == [[[0, 0, 1]], [[1, 1, 4]]]
    assert math.isnan(report.ranks[0]["losses"][0])  # only the last stage sees the loss
    # each rank's chunk compute per step, inside its step time; the rank with 3 blocks computes longer
    for r in report.ranks:
        c = r["chunk_compute_s"]
        assert c["fwd"] > 0 and c["bwd"] > 0 and c["fwd"] + c["bwd"] < r["median_step_time_s"]
    assert sum(report.ranks[1]["chunk_compute_s"].values()) > sum(report.ranks[0]["chunk_compute_s"].values())
    for r in report.ranks:  # the host's time inside the same calls: on the CPU the work is synchronous, so it is
        h, c = r["chunk_host_s"], r["chunk_compute_s"]  # the wall clock the chunk timer reads, less its own overhead
        assert all(0 < h[k] <= c[k] * 1.05 + 1e-3 for k in ("fwd", "bwd")), (h, c)
    where = [n for n in report.notes if n.startswith("pipeline stage")]
    assert len(where) == 2 and "chunk compute" in where[0] and "the rest of the step" in where[1]


@pytest.mark.slow
def test_pp2_interleaved_vpp2(tmp_path):
    report = run(tmp_path, pp=2, vpp=2, schedule="interleaved")
    assert_verified(report, tmp_path, 2)
    assert [r["chunks"] for r in report.ranks] == [[[0, 0, 1], [2, 2, 3]], [[1, 1, 2], [3, 3, 4]]]


@pytest.mark.slow
def test_fsdp2_zero3_with_full_recompute(tmp_path):
    report = run(tmp_path, dp=2, zero_stage=3, recompute="full")
    assert_verified(report, tmp_path, 2)
    assert ZERO_MAPPING[3] in report.notes


@pytest.mark.slow
def test_one_rank_offload_runs_through_fsdp2(tmp_path):
    """Optimizer offload on one GPU is FSDP2's CPUOffloadPolicy over a data-parallel group of one (without FSDP2 the
    engine had nothing to offload with, and an offload plan on one H200 ran with every state on the GPU); on the
    CPU the policy itself is dropped (notes say so), the FSDP2 path still runs and matches one process."""
    report = run(tmp_path, dp=1, zero_stage=1, offload_optimizer=True)
    assert_verified(report, tmp_path, 1)
    assert any(n.startswith("offload_optimizer: FSDP2 without CPUOffloadPolicy on the CPU") for n in report.notes)


@pytest.mark.slow
def test_4_ranks_fsdp2_zero2_by_tp2_sp_selective_recompute(tmp_path):
    report = run(tmp_path, steps=1, dp=2, tp=2, zero_stage=2, sequence_parallel=True, recompute="selective",
                 flash_attention=False, micro_batch_size=2)  # unfused plan: selective checkpoints the attention core
    assert_verified(report, tmp_path, 4)
    assert {(r["dp_rank"], r["tp_rank"]) for r in report.ranks} == {(0, 0), (0, 1), (1, 0), (1, 1)}


@pytest.mark.slow
@pytest.mark.parametrize("par", [{"dp": 2}, {"pp": 2, "layer_split": (1, 3), "schedule": "1f1b"}],
                         ids=["ddp-zero0", "pp2-1f1b-tied"])
def test_bf16_without_fsdp_runs_bf16_weights_with_fp32_masters(tmp_path, par):
    """Miss 2 of benchmarks/results/run_2xh200.md: DDP and pipeline-only layouts train bf16 weights and
    gradients (DDP all-reduces them as bf16 over gloo here) with fp32 masters in the optimizer, no autocast,
    and still match the single-process bf16 reference within the bf16 tolerance."""
    report = run(tmp_path, dtype="bf16", **par)
    num = report.numerics
    assert report.dtype == "bf16" and num.checked and num.dtype == "bf16" and num.passed, num
    assert any("MasterWeightsOptimizer" in n for n in report.notes), report.notes


@pytest.mark.slow
def test_a_killed_rank_yields_a_failure_report_and_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_KILL_ENV, "1:2")  # rank 1 SIGKILLs itself as step 2 begins
    path = plan_file(tmp_path, dp=2)
    start = time.monotonic()
    report = run_plan(path, RunOptions(steps=3, warmup=1, timeout_s=120), out_path=tmp_path / "report.yaml")
    assert time.monotonic() - start < 120
    assert not report.passed
    first = report.failures[0]
    assert (first.rank, first.step, first.kind, first.primary) == (1, 2, "killed", True)
    assert "SIGKILL" in first.reason and first.exit_code == -9
    assert all(not f.primary for f in report.failures[1:])  # rank 0 only lost its peer
    d = yaml.safe_load((tmp_path / "report.yaml").read_text())
    assert d["failures"][0]["rank"] == 1 and d["verdict"][0].startswith("rank 1 failed at step 2 (killed)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml", "report.yaml"]


@pytest.mark.slow
def test_a_hung_rank_is_stopped_at_the_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_KILL_ENV, "1:2:hang")  # rank 1 stops as step 2 begins; rank 0 blocks in its all-reduce
    path = plan_file(tmp_path, dp=2)
    start = time.monotonic()
    report = run_plan(path, RunOptions(steps=3, warmup=1, timeout_s=20), out_path=tmp_path / "report.yaml")
    assert time.monotonic() - start < 20 + 10  # timeout + SIGTERM/SIGKILL grace
    assert [(f.rank, f.step, f.kind) for f in report.failures] == [(0, 2, "timeout"), (1, 2, "timeout")]
    assert "no result within the 20 s timeout" in report.verdict[0] and not report.passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml", "report.yaml"]


@pytest.mark.slow
def test_trace_profiles_one_extra_step_outside_the_measurement(cli, tmp_path):
    path = plan_file(tmp_path, tp=2)
    r = cli("run", path, "--steps", 2, "--warmup", 1, "--check-numerics", "--tolerance", HUGE, "--trace", "-o",
            tmp_path / "report.yaml", "--timeout", 300)
    assert r.exit_code == 0, r.output
    assert "traced step" in r.stdout and "no GPU kernels" in r.stdout  # the table, on CPU without kernels
    d = yaml.safe_load((tmp_path / "report.yaml").read_text())
    assert d["numerics"]["passed"] is True  # the traced step adds no loss: numerics still compares 3 steps
    for rank in d["ranks"]:
        t = rank["trace"]
        assert len(rank["losses"]) == 3 and t["wall_s"] > 0
        # CPU: no GPU kernels, so the GPU was busy for none of the step
        assert t["kernels"] == 0 and t["busy_s"] == 0 and t["idle_s"] == pytest.approx(t["wall_s"])


def test_trace_is_refused_for_other_engines(cli, tmp_path):
    r = cli("run", plan_file(tmp_path, dp=2), "--engine", "deepspeed", "--trace", "-o", tmp_path / "r.yaml")
    assert r.exit_code == 2 and "--trace" in r.output and "'deepspeed'" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "r.yaml").exists()
