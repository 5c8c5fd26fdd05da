"""The runner's single-process parts: data contract, stage cut, weights by name, report, numerics, calibration,
and the bad inputs `distplan run` rejects before starting any process (exit 2, one line)."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from planner.core.cluster import load_cluster
from planner.core.errors import DistplanError
from planner.core.job import ParallelConfig, validate_config
from planner.core.model import ModelSpec
from planner.core.plan import make_plan, save_plan
from planner.cost.predict import predict
from planner.core.calibration import load_calibration
from planner.core.profile import ComputeFit, LinearFit, Profile, save_profile
from planner.core.model import model_shape
from planner.runner.calibrate import attribute, calibrate_run, fit_factors
from planner.runner.data import DataSource, local_batch, write_tokens
from planner.runner.engine_api import RankResult, RunOptions
from planner.runner.launch import check_request
from planner.runner.numerics import TOLERANCES, compare, reference_losses
from planner.build.parallelize import build_full, build_stage, materialise, stage_layers
from planner.runner.report import Failure, build_report, load_report_dict, save_report

TINY = ModelSpec(name="tiny-gpt", family="gpt", num_layers=4, hidden_size=64, ffn_hidden_size=256, num_heads=4,
                 num_kv_heads=4, vocab_size=128, max_seq_len=32, tie_embeddings=True)


def make(spec=TINY, **par):
    par = {"seq_len": 32, "global_batch_size": 8, **par}
    cfg = ParallelConfig(**par)
    validate_config(spec, cfg, cfg.gpus)
    cluster = load_cluster("dgx-h100-80gb")
    return make_plan(spec, cluster, cfg.gpus, cfg, predict(spec, cluster, cfg), provenance={"command": "test"})


# ---- data --------------------------------------------------------------------------------------------

def test_synthetic_batches_are_deterministic_and_shifted():
    src = DataSource(TINY, 32, 8, seed=7)
    x, y = src.global_batch(3)
    x2, y2 = DataSource(TINY, 32, 8, seed=7).global_batch(3)
    assert x.shape == (8, 32) and x.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    assert not torch.equal(x, src.global_batch(4)[0])
    assert int(x.max()) < TINY.vocab_size


def test_local_batch_follows_the_data_contract():
    x = torch.arange(8)[:, None].repeat(1, 4)  # sample i holds i
    # dp=2, mb=2: micro-batch j of rank r is samples [(j*2 + r)*2, +2)
    lx, _ = local_batch(x, x, dp_rank=1, dp=2, micro_batch_size=2, num_microbatches=2)
    assert lx[:, 0].tolist() == [2, 3, 6, 7]
    lx, _ = local_batch(x, x, dp_rank=0, dp=2, micro_batch_size=2, num_microbatches=2)
    assert lx[:, 0].tolist() == [0, 1, 4, 5]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_windows(tmp_path, dtype):
    tokens = np.arange(1000) % 100
    write_tokens(tmp_path / "t.bin", tokens, dtype)
    src = DataSource(TINY, 32, 4, path=str(tmp_path / "t.bin"), dtype=dtype)
    x, y = src.global_batch(1)
    starts = [(4 + i) * 32 for i in range(4)]
    assert x[:, 0].tolist() == [s % 100 for s in starts]
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("make_file,dtype,match", [
    (None, "uint16", "does not exist"),
    (lambda p: p.write_bytes(b"\0" * 101), "uint16", "not a whole number of uint16 tokens"),
    (lambda p: write_tokens(p, [1] * 10), "uint16", "fewer than one sample"),
    (lambda p: write_tokens(p, [1] * 100), "int8", "--data-dtype 'int8' is unknown"),
])
def test_bad_token_files(tmp_path, make_file, dtype, match):
    path = tmp_path / "t.bin"
    if make_file:
        make_file(path)
    with pytest.raises(DistplanError, match=match):
        DataSource(TINY, 32, 4, path=str(path), dtype=dtype)


def test_token_ids_outside_the_vocabulary_are_named(tmp_path):
    write_tokens(tmp_path / "t.bin", [500] * 200)
    with pytest.raises(DistplanError, match="token id 500 .* outside the vocabulary"):
        DataSource(TINY, 32, 2, path=str(tmp_path / "t.bin")).global_batch(0)


# ---- stages and weights --------------------------------------------------------------------------------

def test_stage_layers_uneven_and_interleaved():
    assert stage_layers(ParallelConfig(pp=2, layer_split=(1, 3), global_batch_size=8), 4) == [[(0, 1)], [(1, 4)]]
    cfg = ParallelConfig(pp=2, vpp=2, schedule="interleaved", global_batch_size=8)
    assert stage_layers(cfg, 8) == [[(0, 2), (4, 6)], [(2, 4), (6, 8)]]  # virtual stage v = chunk * pp + rank


def test_a_pipeline_stage_holds_the_full_models_weights():
    full, last = build_full(TINY), build_stage(TINY, 2, 4, has_embed=False, has_head=True)
    materialise(full, torch.device("cpu"), TINY, seed=5)
    materialise(last, torch.device("cpu"), TINY, seed=5)
    ref = dict(full.named_parameters())
    for name, p in last.named_parameters():
        # the last stage's untied LM head starts as the embedding it is tied to
        assert torch.equal(p, ref["embed.tok.weight" if name == "head.weight" else name]), name
    assert full.head.weight is full.embed.tok.weight  # one stage with both: still tied
    std = float(ref["layers.0.attn.o_proj.weight"].detach().std())
    assert std == pytest.approx(0.02 / math.sqrt(8), rel=0.1)  # GPT-2 residual-projection init


# ---- numerics -------------------------------------------------------------------------------------------

def test_numerics_compare_per_dtype_tolerance():
    ref = [4.8, 4.7, 4.6]
    assert compare([4.8, 4.7 * (1 + 5e-6), 4.6], ref, "fp32").passed
    bad = compare([4.8, 4.7 * (1 + 5e-5), 4.6], ref, "fp32")
    assert bad.passed is False and "step 1" in bad.note
    assert compare([4.8, 4.7 * (1 + 5e-3), 4.6], ref, "bf16").passed
    assert TOLERANCES["fp32"][0] < TOLERANCES["bf16"][0]
    assert compare([float("nan")], [4.8], "fp32").passed is False


def test_reference_is_deterministic_and_learns():
    plan = make(dp=2)
    a = reference_losses(plan, 3, seed=1, lr=1e-3, dtype="fp32", device="cpu")
    assert a == reference_losses(plan, 3, seed=1, lr=1e-3, dtype="fp32", device="cpu")
    assert abs(a[0] - math.log(TINY.vocab_size)) < 0.1  # uniform predictions at init



def test_numerics_gives_the_references_gpu_memory_back(monkeypatch):
    """The reference runs in the launching process: its cached GPU memory must be released, on success and on
    out-of-memory alike, or the campaign's next run finds the GPU held (2xH200, call 13: 86 GiB)."""
    import planner.runner.numerics as numerics

    released = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(True))
    monkeypatch.setattr(numerics, "reference_losses", lambda *a, **k: [4.8, 4.7])
    assert numerics.check_numerics(make(dp=2), (4.8, 4.7), 1, 1e-3, "bf16", "cuda:0").passed
    assert released == [True]

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.07 GiB")

    monkeypatch.setattr(numerics, "reference_losses", oom)
    res = numerics.check_numerics(make(dp=2), (4.8, 4.7), 1, 1e-3, "bf16", "cuda:0")
    assert res.checked is False and "does not fit on cuda:0 (OutOfMemoryError)" in res.note
    assert released == [True, True]
    numerics.release_device_memory("cpu")  # a CPU reference has no cache to empty
    assert released == [True, True]

# ---- report ---------------------------------------------------------------------------------------------

def _result(rank, pp_rank, times, losses, alloc=0):
    return RankResult(rank=rank, pp_rank=pp_rank, step_times_s=tuple(times), losses=tuple(losses),
                      peak_allocated_bytes=alloc, peak_reserved_bytes=alloc, device="cuda:0", dtype="bf16")


def test_report_takes_the_slowest_rank_per_step_and_compares(tmp_path):
    plan = make(pp=2)
    pred = {**plan.prediction, "step_time_s": 1.0}
    gib = 1024**3
    mem0, mem1 = (int(s["memory_gib"] * gib * 1.05) for s in plan.prediction["stages"])
    results = [_result(0, 0, [1.0, 1.2, 1.1], [math.nan] * 4, mem0), _result(1, 1, [1.05, 1.0, 1.0], [5, 4, 3, 2], mem1)]
    r = build_report(plan, "p.yaml", "torch", "cuda:0", "bf16", 3, 1, "synthetic", 0.05, pred, results, [], None)
    assert r.measured_step_time_s == pytest.approx(1.1)  # median of max(1.0,1.05), max(1.2,1.0), max(1.1,1.0)
    assert r.step_time_error == pytest.approx(0.1)
    assert r.losses == (5, 4, 3, 2)
    assert [round(s.memory_error, 3) for s in r.stages] == [0.05, 0.05]
    assert not r.passed and "exceeds the 5% tolerance" in r.verdict[0]
    r2 = build_report(plan, "p.yaml", "torch", "cuda:0", "bf16", 3, 1, "synthetic", 0.2, pred, results, [], None)
    assert r2.passed and r2.step_time_p10_s <= r2.measured_step_time_s <= r2.step_time_p90_s
    save_report(r2, tmp_path / "report.yaml")
    d = load_report_dict(tmp_path / "report.yaml")
    assert d["passed"] is True and d["stages"][1]["ranks"] == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["report.yaml"]  # no temporary file left behind


def test_a_failure_fails_the_report_and_names_rank_and_step():
    plan = make(dp=2)
    f = Failure(rank=1, step=2, kind="killed", reason="killed by SIGKILL", exit_code=-9)
    r = build_report(plan, "p.yaml", "torch", "cpu", "fp32", 3, 1, "synthetic", 0.1, plan.prediction, [], [f], None)
    assert not r.passed and r.measured_step_time_s is None
    assert r.verdict[0].startswith("rank 1 failed at step 2 (killed)")


# ---- calibration ----------------------------------------------------------------------------------------

def test_fit_factors_single_run_is_the_pooled_ratio_and_several_runs_separate_kinds():
    one = fit_factors([{"measured_step_time_s": 3.0, "fixed_s": 1.0, "terms_s": {"compute": 0.5, "all_reduce": 0.5}}])
    assert one == pytest.approx({"compute": 2.0, "all_reduce": 2.0})
    true = {"compute": 1.5, "all_reduce": 3.0}
    runs = [{"measured_step_time_s": 0.1 + true["compute"] * c + true["all_reduce"] * a, "fixed_s": 0.1,
             "terms_s": {"compute": c, "all_reduce": a}} for c, a in ((1.0, 0.1), (0.5, 0.5), (0.2, 0.8))]
    assert fit_factors(runs) == pytest.approx(true, rel=1e-2)


def test_attribute_splits_the_breakdown_by_collective():
    plan = make(dp=2, tp=2, zero_stage=3, sequence_parallel=True)
    terms, fixed = attribute(plan, {"compute_fwd": 1, "compute_bwd": 2, "tp_comm": 0.4, "zero_comm": 0.3,
                                    "dp_grad_sync": 0.0, "optimizer": 0.5})
    assert terms == pytest.approx({"compute": 3, "reduce_scatter": 0.3, "all_gather": 0.4})
    assert fixed == 0.5


def _profile(tp):
    fit = LinearFit(1e-5, 1e-8)
    compute = tuple(ComputeFit(kind=k, tp=tp, fwd=fit, bwd=fit) for k in ("block", "embedding", "head"))
    return Profile(gpu_name="H100-SXM-80GB", device="cuda", model="tiny-gpt", seq_len=32, dtype="bf16",
                   model_shape=model_shape(TINY), compute=compute)


def test_recalibrated_prediction_moves_toward_the_measurement(tmp_path):
    plan = make(dp=2)
    profile = _profile(1)
    save_profile(profile, tmp_path / "profile.yaml")
    written = (tmp_path / "profile.yaml").read_bytes()
    before = predict(plan.model, plan.cluster, plan.parallel, profile, engine="torch").step_time_s
    measured = 3.0 * before

    class Measured:  # the fields calibrate_run reads from a Report
        measured_step_time_s, device, dtype, config, engine = measured, "cuda:0", "bf16", "dp=2", "torch"

    cal = tmp_path / "profile.calibration.yaml"
    summary = calibrate_run(plan, profile, Measured, cal, tmp_path / "profile.yaml")
    (record,) = load_calibration(cal).records
    after = predict(plan.model, plan.cluster, plan.parallel, replace(profile, calibration=record.factors),
                    engine="torch").step_time_s
    assert abs(after - measured) < 0.1 * abs(before - measured)  # most of the gap closed by one run
    assert summary["predicted_after_s"] == pytest.approx(after)
    assert dict(record.factors)["compute"] > 2 and len(record.runs) == 1 and record.engine == "torch"
    assert (tmp_path / "profile.yaml").read_bytes() == written  # the profile is never written
    calibrate_run(plan, profile, Measured, cal, tmp_path / "profile.yaml")  # same plan again: replaces its run
    assert [len(r.runs) for r in load_calibration(cal).records] == [1]


# ---- bad inputs (nothing is started) --------------------------------------------------------------------

@pytest.mark.parametrize("par,nproc,match", [
    ({"dp": 1, "cp": 2}, None, "context parallel cp=2 is not supported by the torch engine on CPU"),
    ({"dp": 2}, 4, "--gpus 4 does not match the plan's world size .* = 2"),
    ({"dp": 2}, 0, "--gpus 0 does not match"),
])
def test_check_request_rejects(par, nproc, match):
    with pytest.raises(DistplanError, match=match):
        check_request(make(**par), RunOptions(), nproc, "cpu")


def test_unknown_engine_and_dtype_are_rejected():
    with pytest.raises(DistplanError, match="--engine 'jax' is unknown"):
        check_request(make(), RunOptions(engine="jax"), None, "cpu")
    with pytest.raises(DistplanError, match="--dtype 'fp8' is unknown"):
        check_request(make(), RunOptions(dtype="fp8"), None, "cpu")


def test_moe_with_ep_is_rejected_by_the_torch_engine():
    moe = replace(TINY, name="tiny-moe", family="mixtral", num_experts=4, top_k=2, tie_embeddings=False)
    with pytest.raises(DistplanError, match="expert parallel ep=2 is not supported"):
        check_request(make(moe, dp=2, ep=2), RunOptions(), None, "cpu")


@pytest.mark.parametrize("args,needle", [
    (["missing.yaml"], "plan file 'missing.yaml' does not exist"),
    (["{cp}"], "context parallel cp=2 is not supported by the torch engine on CPU"),
    (["{dp}", "-n", "3"], "--gpus 3 does not match the plan's world size"),
    (["{dp}", "--data", "nope.bin"], "--data 'nope.bin' does not exist"),
    (["{dp}", "--calibrate"], "--calibrate needs --calibration FILE (or --profile PATH"),
    (["{dp}", "--calibration", "none.yaml"], "calibration file 'none.yaml' does not exist"),
])
def test_cli_bad_input_exits_2_with_one_line(cli, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    save_plan(make(cp=2), tmp_path / "cp.yaml")
    save_plan(make(dp=2), tmp_path / "dp.yaml")
    args = [a.format(cp="cp.yaml", dp="dp.yaml") for a in args]
    r = cli("run", *args)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(tmp_path.glob("*.report.yaml"))


@pytest.mark.parametrize("args,needle", [
    (["--steps", 0], "--steps 0 is out of range; valid: 1 to 1,000,000"),
    (["--steps", -3], "--steps -3 is out of range"),
    (["--steps", 10**7], "--steps 10000000 is out of range; valid: 1 to 1,000,000"),
    (["--warmup", -1], "--warmup -1 is out of range; valid: 0 to 1,000,000"),
    (["--warmup", 10**7], "--warmup 10000000 is out of range"),
    (["--timeout", 0], "--timeout 0 is out of range; valid: seconds above 0, at most 604800"),
    (["--timeout", -5], "--timeout -5 is out of range"),
    (["--timeout", "inf"], "--timeout inf is out of range"),
    (["--timeout", "nan"], "--timeout nan is out of range"),
    (["--tolerance", 0], "--tolerance 0 is not a relative error; valid: a finite number > 0"),
    (["--tolerance", -0.1], "--tolerance -0.1 is not a relative error"),
    (["--tolerance", "nan"], "--tolerance nan is not a relative error"),
    (["--tolerance", "inf"], "--tolerance inf is not a relative error"),
    (["--lr", "nan"], "--lr nan is not a learning rate; valid: a finite number > 0"),
    (["--lr", "inf"], "--lr inf is not a learning rate"),
    (["--lr", 0], "--lr 0 is not a learning rate"),
    (["--seed", -1], "--seed -1 is out of range; valid: 0 to 4294967295"),
    (["--seed", 2**64], f"--seed {2**64} is out of range"),
    (["--data", "."], "--data '.' does not exist or is not a file"),
    (["--data", "missing.bin"], "--data 'missing.bin' does not exist or is not a file"),
    (["--data", "empty.bin"], "--data 'empty.bin' holds 0 tokens, fewer than one sample"),
    (["--data-dtype", "int8"], "--data-dtype 'int8' is unknown; valid: uint16, uint32"),
    (["--nproc", 0], "--gpus 0 does not match the plan's world size dp*tp*pp*cp = 2*1*1*1 = 2"),
    (["--nproc", -2], "--gpus -2 does not match the plan's world size"),
    (["-o", "."], "cannot write --output '.': it names a folder"),
    (["-o", "/proc/distplan-missing/report.yaml"],  # /proc takes no new files, not even root's
     "cannot write --output '/proc/distplan-missing/report.yaml': no file can be created in '/proc'"),
    (["-o", "/proc/report.yaml"], "cannot write --output '/proc/report.yaml': no file can be created in '/proc'"),
    (["-o", "dp.yaml/report.yaml"], "cannot write --output 'dp.yaml/report.yaml': '"),
    (["-o", "dp.yaml"], "--output 'dp.yaml' is the plan itself"),
    (["--calibrate", "--calibration", "/proc/distplan/calibration.yaml"],
     "cannot write --calibration '/proc/distplan/calibration.yaml': no file can be created in '/proc'"),
    (["--calibrate", "--profile", "/proc/distplan/profile.yaml"], "profile file '/proc/distplan/profile.yaml' does not exist"),
    (["--profile", "."], "--profile '.' is a folder"),
])
def test_every_bad_run_option_is_refused_before_a_worker_starts(cli, tmp_path, monkeypatch, args, needle):
    """One line naming the value and what is valid, exit 2, nothing started and nothing written."""
    from planner.runner import launch

    def no_spawn(*a, **k):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(launch, "_spawn", no_spawn)
    monkeypatch.chdir(tmp_path)
    save_plan(make(dp=2), tmp_path / "dp.yaml")
    (tmp_path / "empty.bin").write_bytes(b"")
    r = cli("run", "dp.yaml", *args)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dp.yaml", "empty.bin"]


def test_a_plan_needing_more_cpu_ranks_than_the_host_holds_is_refused_unless_nproc_asks(monkeypatch):
    from planner.runner import preflight

    monkeypatch.setattr(preflight, "host_cores", lambda: 2)
    monkeypatch.setattr(preflight, "host_memory_available_gib", lambda: 100.0)
    wide = make(dp=64, global_batch_size=64)
    with pytest.raises(DistplanError, match=r"the plan needs 64 ranks, but this host can run 8 CPU ranks \(2 cores x 4 "
                                            r"ranks per core = 8; .*\); `--gpus 64` starts them anyway"):
        check_request(wide, RunOptions(), None, "cpu")
    assert check_request(wide, RunOptions(), 64, "cpu") == 64  # asked for explicitly
    assert check_request(make(dp=4), RunOptions(), None, "cpu") == 4  # the tests' 4 ranks on 2 cores
    monkeypatch.setattr(preflight, "host_memory_available_gib", lambda: 1.0)  # memory, not cores, is the limit
    with pytest.raises(DistplanError, match=r"needs 4 ranks, but this host can run 2 CPU ranks .*1\.0 GiB of memory "
                                            r"available / 0\.3\d GiB per rank = 2"):
        check_request(make(dp=4), RunOptions(), None, "cpu")
    assert check_request(make(dp=4), RunOptions(), None, "cuda", cuda_count=4) == 4  # GPUs: counted, not cores


def test_cli_refuses_a_too_wide_cpu_plan_in_one_line_before_starting_anything(cli, tmp_path, monkeypatch):
    from planner.runner import launch, preflight

    monkeypatch.setattr(preflight, "host_cores", lambda: 2)
    monkeypatch.setattr(launch, "_spawn", lambda *a, **k: pytest.fail("a worker was started"))
    save_plan(make(dp=64, global_batch_size=64), tmp_path / "wide.yaml")
    r = cli("run", tmp_path / "wide.yaml")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "needs 64 ranks" in r.stderr and "`--gpus 64` starts them anyway" in r.stderr
    assert not list(tmp_path.glob("*.report.yaml"))


def test_host_memory_is_the_smaller_of_memavailable_and_the_cgroups_room(tmp_path):
    from planner.runner.preflight import host_memory_available_gib

    (tmp_path / "meminfo").write_text("MemTotal:       32000000 kB\nMemAvailable:   8388608 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert host_memory_available_gib(str(tmp_path / "meminfo"), str(cgroup)) == pytest.approx(8.0)
    (cgroup / "memory.max").write_text("max\n")
    assert host_memory_available_gib(str(tmp_path / "meminfo"), str(cgroup)) == pytest.approx(8.0)
    (cgroup / "memory.max").write_text(f"{4 * 1024**3}\n")
    (cgroup / "memory.current").write_text(f"{1024**3}\n")
    assert host_memory_available_gib(str(tmp_path / "meminfo"), str(cgroup)) == pytest.approx(3.0)
    assert host_memory_available_gib(str(tmp_path / "none"), str(tmp_path / "none")) is None


def test_classify_names_the_failing_rank_its_step_and_why(tmp_path):
    import json
    from types import SimpleNamespace

    from planner.runner.launch import _classify
    from planner.runner.report import rank_result_to_dict

    ok = _result(0, 0, [0.1], [4.0])
    (tmp_path / "rank0.json").write_text(json.dumps(rank_result_to_dict(ok)))
    (tmp_path / "rank1.error.json").write_text(json.dumps(
        {"rank": 1, "step": 3, "kind": "oom", "reason": "OutOfMemoryError: CUDA out of memory"}))
    (tmp_path / "rank2.error.json").write_text(json.dumps(
        {"rank": 2, "step": 3, "kind": "error", "reason": "RuntimeError: Connection closed by peer"}))
    (tmp_path / "rank3.progress").write_text("4")
    procs = [SimpleNamespace(returncode=c) for c in (0, 1, 1, -9, None)]
    results, failures = _classify(procs, tmp_path, primary={1, 2, 3}, killed={4}, timed_out=False, timeout_s=60)
    assert [r.rank for r in results] == [0]
    got = {f.rank: (f.step, f.kind, f.primary) for f in failures}
    assert got == {1: (3, "oom", True), 2: (3, "error", False), 3: (4, "killed", True), 4: (-1, "terminated", False)}
    assert "SIGKILL" in next(f.reason for f in failures if f.rank == 3)


def test_ranks_that_wrote_their_results_but_do_not_exit_are_stopped_and_kept(tmp_path, monkeypatch):
    """A rank hung in its teardown after writing rank<r>.json costs EXIT_GRACE_S, not the run's timeout."""
    import json
    import subprocess
    import sys
    import time

    from planner.runner import launch
    from planner.runner.report import rank_result_to_dict

    monkeypatch.setattr(launch, "EXIT_GRACE_S", 0.5)
    for r in (0, 1):
        (tmp_path / f"rank{r}.json").write_text(json.dumps(rank_result_to_dict(_result(r, 0, [0.1], [4.0]))))
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
             for _ in range(2)]
    t0 = time.monotonic()
    primary, killed, timed_out, reaped = launch._watch(procs, tmp_path, 60.0, 1, None)
    assert time.monotonic() - t0 < 10.0 and reaped == {0, 1} and not killed and not timed_out and not primary
    results, failures = launch._classify(procs, tmp_path, primary, killed, timed_out, 60.0, reaped)
    assert [r.rank for r in results] == [0, 1] and failures == []


def test_a_wrapped_out_of_memory_is_reported_as_oom_with_its_cause():
    """torch.distributed.pipelining re-raises a stage's OOM as RuntimeError("[Stage 4] failed to run forward:")."""
    import torch

    from planner.runner.worker import _is_oom, _reason

    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 606.00 MiB.")
        except torch.cuda.OutOfMemoryError as inner:
            raise RuntimeError("\n            [Stage 4] failed to run forward:\n            args: (...)") from inner
    except RuntimeError as exc:
        assert _is_oom(exc)
        assert _reason(exc) == ("RuntimeError: [Stage 4] failed to run forward (caused by OutOfMemoryError: "
                                "CUDA out of memory. Tried to allocate 606.00 MiB.)")
    assert not _is_oom(ValueError("bad plan")) and _reason(ValueError("bad plan")) == "ValueError: bad plan"


def test_weights_are_drawn_on_the_runs_gpu_and_on_the_cpu_elsewhere(monkeypatch):
    """Where weights are drawn: a CUDA run on its GPU (the CPU took over a minute per rank for a 13B model), a CPU
    run, and a host-offloaded shard of a GPU run, as its run computes (draw_on); the same numbers per (seed, name)."""
    from planner.build import parallelize

    assert parallelize.draw_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert parallelize.draw_device(torch.device("cpu")) == torch.device("cpu")
    a = parallelize.draw("layers.0.attn.q_proj.weight", 5, (4, 3), 0.02)
    assert torch.equal(a, parallelize.draw("layers.0.attn.q_proj.weight", 5, (4, 3), 0.02))
    assert not torch.equal(a, parallelize.draw("layers.0.attn.k_proj.weight", 5, (4, 3), 0.02))
    seen = []
    real = parallelize.draw
    monkeypatch.setattr(parallelize, "draw", lambda key, seed, shape, std, device="cpu": seen.append(device) or
                        real(key, seed, shape, std, "cpu"))
    stage = build_stage(TINY, 0, 1, has_embed=True, has_head=False)
    materialise(stage, torch.device("cpu"), TINY, seed=5, draw_on=torch.device("cuda", 0))  # an offloaded shard
    assert seen and set(seen) == {torch.device("cuda", 0)}
    seen.clear()
    materialise(build_stage(TINY, 0, 1, has_embed=True, has_head=False), torch.device("cpu"), TINY, seed=5)
    assert set(seen) == {torch.device("cpu")}


@pytest.mark.parametrize("device_type,preset,want", [("cuda", None, "16"), ("cuda", "3", "3"), ("cpu", "3", "16")])
def test_each_rank_gets_its_share_of_the_host_cores(monkeypatch, tmp_path, device_type, preset, want):
    """`distplan run` gives each rank cores / ranks OpenMP threads on GPUs too (a user's OMP_NUM_THREADS wins there):
    with every rank's pool on all cores the torch engine's offloaded AdamW ran 37x slower than one process measured
    (2x H200, call 29). On the CPU each rank's share always (a rank is a device)."""
    import planner.runner.launch as launch

    seen = []

    class FakePopen:
        def __init__(self, argv, env, **kw):
            seen.append(env)

    monkeypatch.setattr(launch.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 32)
    if preset is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", preset)
    launch._spawn(str(tmp_path / "plan.yaml"), RunOptions(), 2, tmp_path, device_type)
    assert [e["OMP_NUM_THREADS"] for e in seen] == [want, want]
