"""benchmarks/campaign.py (issue 7 harness): Spearman, the practitioners' baselines, the target logic, and one
end-to-end campaign of the `tiny` case on CPU (2 gloo processes)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from planner.core.cluster import load_cluster
from planner.core.job import ParallelConfig
from planner.core.model import load_model
from planner.cost.predict import predict

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("campaign", ROOT / "benchmarks" / "campaign.py")
campaign = importlib.util.module_from_spec(_spec)
sys.modules["campaign"] = campaign  # dataclasses look their module up by name
_spec.loader.exec_module(campaign)


# ---- Spearman ---------------------------------------------------------------------------------------------

def test_spearman_known_values():
    assert campaign.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7.5]) == pytest.approx(0.9)  # 1 - 6*2/(5*24)
    assert campaign.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert campaign.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert campaign.spearman([1, 1], [1, 2]) is None and campaign.spearman([1], [1]) is None


def test_spearman_with_ties_uses_average_ranks():
    assert campaign.average_ranks([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    # by hand: ranks [1, 2.5, 2.5, 4] vs [1, 3, 2, 4]: cov 4.5, variances 4.5 and 5 -> 4.5 / sqrt(22.5)
    assert campaign.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))  # 0.9487
    # ranks [1..5] vs [2.5, 1, 2.5, 4.5, 4.5]: cov 7.5, variances 10 and 9 -> 7.5 / sqrt(90) (scipy agrees)
    assert campaign.spearman([1, 2, 3, 4, 5], [2, 1, 2, 5, 5]) == pytest.approx(7.5 / math.sqrt(90))  # 0.7906


# ---- baselines --------------------------------------------------------------------------------------------

def _fits_faster(model, cluster, cfg, mb):
    c = ParallelConfig(**{**cfg.__dict__, "micro_batch_size": mb})
    return predict(model, cluster, c)


def test_baselines_on_h200_gpt2_xl():
    model, cluster = load_model("gpt2-xl"), load_cluster("h200-141gb")
    got = campaign.baseline_configs(model, cluster, 2, 32, 1024, None)
    assert set(got) == {"ddp", "deepspeed-zero2", "fsdp2-full", "megatron-heuristic"}
    engine, ddp, pred = got["ddp"]
    assert engine == "torch" and ddp.zero_stage == 0 and ddp.dp == 2 and pred.fits
    # the best fitting micro-batch: no other power of two of 32/2 that fits is faster
    for mb in (1, 2, 4, 8, 16):
        other = _fits_faster(model, cluster, ddp, mb)
        assert not other.fits or other.step_time_s >= pred.step_time_s
    assert got["deepspeed-zero2"][0] == "deepspeed" and got["deepspeed-zero2"][1].zero_stage == 2
    assert got["fsdp2-full"][0] == "torch" and got["fsdp2-full"][1].zero_stage == 3
    eng, mg, _ = got["megatron-heuristic"]
    assert eng == "megatron" and (mg.tp, mg.pp, mg.dp, mg.zero_stage) == (1, 1, 2, 1) and not mg.flash_attention


def test_ddp_takes_the_largest_micro_batch_when_time_does_not_prefer_another():
    model, cluster = load_model("gpt2"), load_cluster("h200-141gb")
    _, cfg, _ = campaign.baseline_configs(model, cluster, 2, 16, 1024, None)["ddp"]
    fitting = [mb for mb in (1, 2, 4, 8) if _fits_faster(model, cluster, cfg, mb).fits]
    times = {mb: _fits_faster(model, cluster, cfg, mb).step_time_s for mb in fitting}
    assert cfg.micro_batch_size == min(fitting, key=lambda mb: (times[mb], -mb))


def test_megatron_heuristic_smallest_fitting_tp_then_pp():
    # llama-2-13b at 4096 tokens on 2x H200: tp1 does not fit, tp2 (the node) does -> tp2 pp1, no pipeline
    model, cluster = load_model("llama-2-13b"), load_cluster("h200-141gb")
    cfg, pred = campaign.megatron_heuristic(model, cluster, 2, 8, 4096, None, engine="torch")
    assert (cfg.tp, cfg.pp, cfg.dp, cfg.zero_stage) == (2, 1, 1, 1) and pred.fits and cfg.sequence_parallel
    for mb in (1, 2, 4, 8):
        lean = ParallelConfig(dp=2, zero_stage=1, micro_batch_size=mb, global_batch_size=8, seq_len=4096, recompute=cfg.recompute)
        assert not predict(model, cluster, lean).fits
    # a model that fits at tp1 keeps tp1
    small = campaign.megatron_heuristic(load_model("gpt2"), cluster, 2, 16, 1024, None)[0]
    assert (small.tp, small.pp, small.dp) == (1, 1, 2)
    # llama-2-13b: DDP (16 bytes/parameter, 208 GB) does not fit and says why
    assert "does not fit" in campaign.baseline_configs(model, cluster, 2, 8, 4096, None)["ddp"]


# ---- summarize ------------------------------------------------------------------------------------------

def _r(name, role, pred_tps, meas_tps, step_err=0.0, mem_err=0.0, oom=False, case="c"):
    return {"case": case, "name": name, "role": role, "status": "oom" if oom else "ran",
            "predicted_tokens_per_s": pred_tps, "measured_tokens_per_s": meas_tps, "step_time_error": step_err,
            "memory_error": mem_err, "oom": oom}


def test_summarize_targets_met():
    rows = [_r("distplan", "distplan", 130, 120, 0.04), _r("ddp", "baseline", 100, 100, -0.08),
            _r("fsdp", "baseline", 90, 95), _r("alt1", "alternative", 110, 105, 0.09, 0.05)]
    s = campaign.summarize(rows)
    c = s["cases"]["c"]
    assert c["speedup_over_best_baseline"] == pytest.approx(1.2) and c["best_baseline"] == "ddp"
    assert c["spearman"] == pytest.approx(1.0)
    assert all(v is True for v in c["targets"].values()), c["targets"]
    assert s["overall"] == {"ge_10pct_faster_in_one_case": True, "all_targets_met": True} and c["misses"] == []


def test_summarize_targets_missed():
    rows = [_r("distplan", "distplan", 130, 90, 0.06), _r("ddp", "baseline", 100, 100, 0.0, 0.15),
            _r("fsdp", "baseline", 90, 120), _r("alt1", "alternative", 110, 80, 0.11)]
    c = campaign.summarize(rows)["cases"]["c"]
    t = c["targets"]
    assert c["speedup_over_best_baseline"] == pytest.approx(0.75) and c["best_baseline"] == "fsdp"
    assert t["distplan_ge_best_baseline"] is False and t["step_time_within_target"] is False  # 6% > 5% for the chosen plan
    assert t["memory_within_10pct"] is False and t["spearman_ge_0.9"] is False and t["chosen_plan_no_oom"] is True
    assert {m["name"] for m in c["misses"]} == {"distplan", "ddp", "alt1"}
    oom = campaign.summarize([{**_r("distplan", "distplan", 100, None, None, None, oom=True), "measured_tokens_per_s": None}])
    assert oom["cases"]["c"]["targets"]["chosen_plan_no_oom"] is False


# ---- end to end on CPU ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_campaign_on_one_process(tmp_path):
    """The one-GPU campaign's path (issue 7's 1xH100/H200 cases) on one CPU process: every baseline's engine with a
    world of one (DDP, DeepSpeed, FSDP2) and the same-mesh alternatives run and are measured."""
    import json

    rc = campaign.main(["--cases", "tiny", "--gpus", "1", "--out", str(tmp_path), "--budget-s", "240",
                        "--megatron-engine", "torch", "--machine", "cpu-test", "--steps", "1", "--warmup", "1"])
    assert rc == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    ran = {r["name"]: r for r in rows if r["status"] == "ran"}
    assert set(ran) == {"distplan", "ddp", "deepspeed-zero2", "fsdp2-full", "megatron-heuristic", "alt1", "alt2", "alt3"}
    assert all(r["measured_step_time_s"] > 0 and r["config"].startswith("dp1 tp1 pp1") for r in ran.values())
    # FSDP2's baseline without data parallelism is DDP's program (run_key): measured once
    if ran["fsdp2-full"]["config"].replace("zero3", "zero0") == ran["ddp"]["config"]:
        assert "reused" in ran["fsdp2-full"]["why"]
        assert ran["fsdp2-full"]["measured_step_time_s"] == ran["ddp"]["measured_step_time_s"]


def test_plans_the_engine_runs_alike_share_one_run(tmp_path):
    """run_key: the torch engine without data parallelism or offload runs every ZeRO stage as one program (nothing
    to shard), so such plans are one run; data parallelism, offload or another engine make them different runs."""
    from planner.core.plan import make_plan, save_plan

    model, cluster = load_model("gpt2-xl"), load_cluster("h200-141gb")

    def spec(name, engine="torch", **par):
        cfg = ParallelConfig(**{"micro_batch_size": 8, "global_batch_size": 32, "seq_len": 1024, **par})
        path = tmp_path / f"{name}.yaml"
        save_plan(make_plan(model, cluster, cfg.gpus, cfg, predict(model, cluster, cfg)), path)
        return campaign.PlanSpec(name, "baseline", engine, str(path), 1.0, 1.0, 1.0, "")

    one = campaign.run_key(spec("z0", zero_stage=0))
    assert campaign.run_key(spec("z3", zero_stage=3)) == one == campaign.run_key(spec("z1", zero_stage=1))
    assert campaign.run_key(spec("off", zero_stage=1, offload_optimizer=True)) != one  # FSDP2 with CPU offload
    assert campaign.run_key(spec("ds", engine="deepspeed", zero_stage=3))[0] == "deepspeed"
    assert campaign.run_key(spec("ds2", engine="deepspeed", zero_stage=2)) != campaign.run_key(spec("ds3", engine="deepspeed", zero_stage=3))
    two = dict(dp=2, micro_batch_size=4)
    assert campaign.run_key(spec("dp2z0", zero_stage=0, **two)) != campaign.run_key(spec("dp2z3", zero_stage=3, **two))


def test_a_row_that_reuses_another_plans_run_keeps_its_own_prediction():
    """FSDP2 ZeRO-3 at dp = 1 reuses DDP's run (run_key) but is predicted on its own (114.9 GiB against DDP's 114.8
    on one H200, call 8): its errors are the shared measurement against its own prediction."""
    case = campaign.CASES["gpt2-xl-1gpu"]
    z3 = campaign.PlanSpec("fsdp2-full", "baseline", "torch", "unused.yaml", 0.80, 40000.0, 120.0, "dp1 zero3")
    report = {"predicted_step_time_s": 0.78, "measured_step_time_s": 0.76, "step_time_error": 0.76 / 0.78 - 1,
              "stages": [{"predicted_memory_gib": 115.0, "peak_allocated_gib": 114.0, "memory_error": 114 / 115 - 1}],
              "failures": [], "wall_time_s": 20.0}
    own = campaign._row("gpt2-xl-1gpu", case, z3, report, "ran", "reused", reused=True)
    assert own["predicted_step_time_s"] == 0.80 and own["predicted_memory_gib"] == 120.0
    assert own["step_time_error"] == pytest.approx(0.76 / 0.80 - 1) and own["memory_error"] == pytest.approx(114 / 120 - 1)
    assert own["measured_step_time_s"] == 0.76 and own["peak_allocated_gib"] == 114.0
    ran = campaign._row("gpt2-xl-1gpu", case, z3, report, "ran")  # the plan's own run: the run's re-prediction
    assert ran["predicted_step_time_s"] == 0.78 and ran["step_time_error"] == pytest.approx(0.76 / 0.78 - 1)


@pytest.mark.slow
def test_tiny_campaign_end_to_end_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(campaign, "REPEAT_NEAR", 100.0)  # every tiny plan counts as close: each is repeated
    rc = campaign.main(["--cases", "tiny", "--out", str(tmp_path), "--budget-s", "240", "--megatron-engine", "torch",
                        "--machine", "cpu-test", "--steps", "1", "--warmup", "1", "--repeat", "2"])
    assert rc == 0
    import json

    rows = json.loads((tmp_path / "rows.json").read_text())
    # --repeat 2: each plan that ran itself ran twice (the second pass in reverse order); its row takes the median
    twice = [r for r in rows if r.get("measured_runs_s")]
    assert twice and all(len(r["measured_runs_s"]) == 2 for r in twice)
    reused = [r for r in rows if "reused" in (r.get("why") or "")]  # the same plan and engine as another row
    for r in reused:
        src = next(o for o in rows if o["config"] == r["config"] and o["engine"] == r["engine"] and not o.get("why"))
        assert r["measured_step_time_s"] == src["measured_step_time_s"] and r["measured_runs_s"] == src["measured_runs_s"]
    assert all(r["measured_step_time_s"] == pytest.approx(sum(r["measured_runs_s"]) / 2) for r in twice)
    ran = [r for r in rows if r["status"] == "ran"]
    assert {r["role"] for r in ran} == {"distplan", "baseline", "alternative"}
    assert {r["name"] for r in ran} >= {"distplan", "ddp", "deepspeed-zero2", "fsdp2-full", "megatron-heuristic"}
    for r in rows:
        if r["status"] == "not-made":  # e.g. an alternative torch pipelining cannot run; it says why
            assert r["why"] and r["role"] == "alternative", r
            continue
        assert r["status"] == "ran", r
        assert r["predicted_tokens_per_s"] > 0 and r["measured_tokens_per_s"] > 0 and math.isfinite(r["step_time_error"])
        assert Path(r["plan_path"]).exists() and not r["oom"]
    md = (tmp_path / "campaign_cpu-test.md").read_text()
    assert "| tiny | distplan | distplan | torch |" in md and "## Analysis of misses" in md
    assert "run-to-run spread" in md
    assert "torch" in md and "python" in md  # versions in the header


def test_merge_reports_the_machine_the_rows_were_measured_on(tmp_path):
    """--merge runs on a laptop: the header must name the GPU machine, read from each call's report."""
    from campaign import merged_environment

    for i, (date, torch_v) in enumerate((("2026-11-22 00:59", "2.11.0+cu130"), ("2026-11-22 01:08", "2.11.0+cu130"))):
        d = tmp_path / f"call{i}"
        d.mkdir()
        (d / "rows.json").write_text("[]")
        (d / "campaign_2xh200.md").write_text(
            f"# Plan quality on 2xh200 (issue 7), {date} UTC\n\nMachine and versions: python 3.12.3, torch {torch_v}, "
            "gpu 2x NVIDIA H200, nccl 2.28.9.\n")
    env = merged_environment([str(tmp_path / "call0" / "rows.json"), str(tmp_path / "call1" / "rows.json")])
    assert env["gpu"] == "2x NVIDIA H200" and env["torch"] == "2.11.0+cu130" and env["nccl"] == "2.28.9"
    assert env["date_utc"] == "2026-11-22 00:59 / 2026-11-22 01:08"
    assert merged_environment([str(tmp_path / "nowhere" / "rows.json")]) is None


def test_merge_keeps_the_latest_call_of_each_case():
    merge_rows = campaign.merge_rows
    first = [{"case": "a", "name": "ddp", "v": 1}, {"case": "b", "name": "ddp", "v": 1}, {"case": "a", "name": "x", "v": 1}]
    second = [{"case": "a", "name": "ddp", "v": 2}]
    assert merge_rows([first, second]) == [{"case": "a", "name": "ddp", "v": 2}, {"case": "b", "name": "ddp", "v": 1}]
    assert merge_rows([first]) == [first[0], first[2], first[1]]  # grouped by case, in order of first appearance


def test_merge_carries_an_earlier_measurement_into_a_plan_the_later_call_skipped_for_time():
    """Call 18 re-ran llama-3-8b-large's distplan plan and ran out of budget for the baselines, which call 12 had
    measured with the same engine and configuration: those keep call 18's prediction beside call 12's measurement."""
    ddp = {"case": "c", "name": "ddp", "engine": "torch", "config": "dp2 zero0 mb1x16"}
    old = [{**ddp, "status": "ran", "predicted_step_time_s": 9.0, "predicted_memory_gib": 120.0,
            "measured_step_time_s": 8.757, "measured_tokens_per_s": 100.0, "peak_allocated_gib": 126.0,
            "step_time_error": 8.757 / 9.0 - 1, "wall_s": 90.4},
           {"case": "c", "name": "alt9", "engine": "torch", "config": "dp1 pp2", "status": "ran",
            "predicted_step_time_s": 5.0, "measured_step_time_s": 5.5}]
    new = [{**ddp, "status": "skipped", "why": "budget: needs ~77 s, 57 s left", "predicted_step_time_s": 9.205,
            "predicted_memory_gib": 127.6},
           {"case": "c", "name": "fsdp2-full", "engine": "torch", "config": "dp2 zero3", "status": "skipped",
            "why": "budget: needs ~73 s, 57 s left", "predicted_step_time_s": 8.07}]
    got = campaign.merge_rows([old, new], ["call12", "call18"])
    assert [r["name"] for r in got] == ["ddp", "fsdp2-full"]  # the later call's rows only (alt9 is not carried)
    carried, unmeasured = got
    assert carried["status"] == "ran" and carried["measured_in"] == "call12" and "call12" in carried["why"]
    assert carried["predicted_step_time_s"] == 9.205 and carried["measured_step_time_s"] == 8.757
    assert carried["step_time_error"] == pytest.approx(8.757 / 9.205 - 1)
    assert carried["memory_error"] == pytest.approx(126.0 / 127.6 - 1)
    assert unmeasured["status"] == "skipped" and "measured_in" not in unmeasured  # never measured: stays skipped
    # a row skipped for another reason than time is not carried
    other = [{**new[0], "why": "predicted not to fit"}]
    assert campaign.merge_rows([old, other])[0]["status"] == "skipped"


def test_eight_gpu_cases_plan_on_the_h200_preset(tmp_path):
    """Issue 8's cases (one 8-GPU node) make their plans without a GPU: llama-2-70b with 40 of its 80 layers (556 GB
    of model states) leaves DDP and DeepSpeed ZeRO-2 out as not fitting and keeps FSDP2 ZeRO-3, megatron's heuristic
    and distplan's plan, all on 8 GPUs."""
    from planner.core.plan import load_plan

    spec = load_model("llama-2-70b-40l")
    params = spec.num_layers * spec.block_params() + spec.embedding_params() + spec.head_params()
    assert 16 * params / 1e9 == pytest.approx(556, rel=0.01)
    plans, skipped = campaign.campaign_plans(campaign.CASES["llama-2-70b-40l-8gpu"], None, tmp_path, gpus=8,
                                             cluster="h200-141gb")
    names = {p.name for p in plans}
    assert {"distplan", "fsdp2-full", "megatron-heuristic"} <= names and not {"ddp", "deepspeed-zero2"} & names
    assert {s["name"] for s in skipped} >= {"ddp", "deepspeed-zero2"}
    for p in plans:
        cfg = load_plan(p.plan_path).parallel
        assert cfg.dp * cfg.tp * cfg.pp * cfg.cp == 8


@pytest.mark.parametrize("case", ["llama-3-8b-4gpu", "llama-2-13b-4gpu"])
def test_four_gpu_cases_plan_on_the_h200_preset(tmp_path, case):
    """Issue 8 at 4 GPUs (nvidia-h200-x4): distplan's plan and the baselines that fit, every one over 4 GPUs; the 13B
    model's DDP (208 GB of model states per GPU) is left out as not fitting."""
    from planner.core.plan import load_plan

    plans, skipped = campaign.campaign_plans(campaign.CASES[case], None, tmp_path, gpus=4, cluster="h200-141gb")
    names = {p.name for p in plans}
    assert {"distplan", "fsdp2-full", "megatron-heuristic"} <= names
    assert ("ddp" in {s["name"] for s in skipped}) == (case == "llama-2-13b-4gpu")
    for p in plans:
        cfg = load_plan(p.plan_path).parallel
        assert cfg.dp * cfg.tp * cfg.pp * cfg.cp == 4 and cfg.global_batch_size == 16


def test_hints_read_the_reports_diagnostics():
    """A miss's report says what it measured: the FSDP2 llama-3-8b run of 2026-11-22 (diagnostic re-run, call 7)
    retried allocations 6 times; a pipeline stage whose chunks and optimizer took 1.6 of a 2.0 s step spent 20% of
    it in the schedule."""
    import tarfile

    import yaml

    with tarfile.open(ROOT / "benchmarks/results/campaign_2xh200/call7-gpt2xl/diag.tar.gz") as tar:
        report = yaml.safe_load(tar.extractfile("diag-distplan.report.yaml").read())
    assert campaign._hints(report) == ["allocator retries 6 (rank max)"]
    pipe = {"ranks": [{"pp_rank": 0, "median_step_time_s": 2.0, "optimizer_s": 0.1, "chunk_compute_s": {"fwd": 0.5, "bwd": 1.0}},
                      {"pp_rank": 1, "median_step_time_s": 2.0, "optimizer_s": 0.1, "chunk_compute_s": {"fwd": 0.6, "bwd": 1.2}}]}
    assert campaign._hints(pipe) == ["pipeline schedule 20% of the step on stage 0 (outside chunk compute and optimizer)"]
    pipe["ranks"][0]["chunk_host_s"] = {"fwd": 0.45, "bwd": 0.75}  # the host's time in the same calls: 1.2 of 1.5 s
    assert campaign._hints(pipe)[1] == "chunk host time over chunk GPU time: 0.80 (stage 0)"
    # llama-2-13b tp2 (call 14): its micro-batches spread +23%; call 16's llama-3-8b FSDP2 ZeRO-1 (+13.8%, the last
    # micro-batch synchronising) stays below the bar
    tp2 = {"ranks": [{"rank": 0, "pp_rank": 0, "microbatch_s": [0.666, 0.648, 0.6, 0.608, 0.676, 0.564, 0.551, 0.571]}]}
    assert campaign._hints(tp2) == ["micro-batch times vary 0.551-0.676 s on rank 0 (+23%): host-bound or memory "
                                    "pressure, not the GPU's steady compute"]
    fsdp = {"ranks": [{"rank": 0, "pp_rank": 0, "microbatch_s": [0.439, 0.4541, 0.4639, 0.4996]}]}
    assert campaign._hints(fsdp) == []
    # DISTPLAN_TRACE=1: the rank whose GPU idled the largest share of its traced step is the one reported
    t0 = {"wall_s": 2.0, "busy_s": 1.8, "compute_busy_s": 1.7, "idle_s": 0.2, "by_category_s": {"matmul": 1.5, "other": 0.3}}
    t1 = {"wall_s": 2.0, "busy_s": 1.0, "compute_busy_s": 0.9, "idle_s": 1.0,
          "by_category_s": {"matmul": 0.7, "communication": 0.1, "other": 0.2}}
    traced = {"ranks": [{"rank": 0, "pp_rank": 0, "trace": t0}, {"rank": 1, "pp_rank": 0, "trace": t1}]}
    assert campaign._hints(traced) == ["traced step on rank 1: 2 s, GPU idle 50%, compute kernels busy 0.9 s "
                                       "(kernel seconds: matmul 0.7, other 0.2, communication 0.1)"]


def test_hints_put_a_pipelines_chunk_compute_against_the_predicted_stage_times(tmp_path):
    """llama-2-13b pp2 1F1B at 1 x 8 (2xH200, call 9): the stages' chunks ran 5.2% and 9.8% over the stage times its
    plan predicted, which located the miss in the layers' compute, not the schedule (campaign_2xh200.md)."""
    import tarfile

    import yaml

    with tarfile.open(ROOT / "benchmarks/results/campaign_2xh200/call9-llama13b/campaign.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    case = tmp_path / "campaign" / "llama-2-13b-small"
    report = yaml.safe_load((case / "distplan.report.yaml").read_text())
    times = campaign._stage_times(str(case / "distplan.yaml"))
    assert times == pytest.approx({0: 0.298438, 1: 0.336682}, rel=1e-5)
    assert campaign._hints(report, times)[-1] == "chunk compute against the predicted stage time: +5.2%, +9.8%"
    assert campaign._stage_times(str(tmp_path / "missing.yaml")) is None


def test_budget_learns_the_start_up_from_the_cases_runs():
    """Call 12's llama-3-8b-large DDP run: 89.7 s wall, 2 warm-up + 1 measured steps of 8.757 s -> 63.4 s outside
    the steps; the budget uses the largest such start-up seen, the default before any run, and skips numerics runs
    (their wall includes the single-process reference)."""
    ddp = {"wall_time_s": 89.7, "steps": 2, "warmup": 1, "measured_step_time_s": 8.757, "numerics": None}
    quick = {"wall_time_s": 40.0, "steps": 3, "warmup": 1, "measured_step_time_s": 2.5, "numerics": None}
    checked = {"wall_time_s": 200.0, "steps": 3, "warmup": 1, "measured_step_time_s": 2.5, "numerics": {"passed": True}}
    assert campaign.startup_estimate([], 45.0) == 45.0
    assert campaign.startup_estimate([quick, ddp, checked], 45.0) == pytest.approx(89.7 - 3 * 8.757)
    assert campaign.startup_estimate([quick], 45.0) == pytest.approx(30.0)
    need = campaign.budget_need(30.0, 3, 1, 2.0, check_numerics=False)
    assert need == pytest.approx(30.0 + campaign.STEP_MARGIN * 8.0)
    assert campaign.budget_need(30.0, 3, 1, 2.0, check_numerics=True) - 30.0 == pytest.approx(2 * (need - 30.0))


def test_repeats_fold_into_the_row_and_the_cases_spread():
    """gpt2-xl-large's FSDP2 baseline measured 3.171 s (call 13) and 3.110 s (call 15): as two runs of one row, the
    median and a 2.0% run-to-run spread; --repeat 0 is refused (exit 2)."""
    case = campaign.CASES["gpt2-xl-large"]
    row = _r("fsdp2-full", "baseline", 80000, 80000)
    row.update(measured_step_time_s=3.171, predicted_step_time_s=3.225)
    campaign.add_repeat(row, 3.110, case)
    assert row["measured_runs_s"] == [3.171, 3.110]
    assert row["measured_step_time_s"] == pytest.approx(3.1405)
    assert row["measured_tokens_per_s"] == pytest.approx(256 * 1024 / 3.1405)
    assert row["step_time_error"] == pytest.approx(3.1405 / 3.225 - 1)
    other = _r("ddp", "baseline", 80000, 79000)
    c = campaign.summarize([row, other])["cases"]["c"]
    assert c["run_spread"] == pytest.approx(3.171 / 3.110 - 1)
    assert campaign.main(["--cases", "tiny", "--repeat", "0", "--dry-run"]) == 2


def test_a_case_without_a_profile_plans_on_the_local_gpus_preset():
    """4xH200 call 1 (session 7): the profile timed out and the campaign planned on the H100 preset (78 GiB usable
    on 141 GiB GPUs); without a profile the local GPU's preset applies, and none without a GPU or a match."""
    assert campaign.local_preset("NVIDIA H200") == "h200-141gb"
    assert campaign.local_preset("NVIDIA H100 80GB HBM3") == "dgx-h100-80gb"
    assert campaign.local_preset("NVIDIA L4") is None


def test_profiled_cases_lists_only_cases_with_a_profile(tmp_path, capsys):
    """device_campaign.sh with FRESH=1 runs only the cases whose fresh profile exists (`--profiled-cases`)."""
    import shutil

    src = ROOT / "benchmarks/results/profile_2xh200/session7/profile-llama-3-8b-s4096.yaml"
    shutil.copy(src, tmp_path / "p.yaml")
    assert campaign.main(["--cases", "llama-3-8b-small,llama-2-13b-small,llama-3-8b-large", "--profile-dir",
                          str(tmp_path), "--profiled-cases"]) == 0
    assert capsys.readouterr().out.strip() == "llama-3-8b-small,llama-3-8b-large"
    assert campaign.main(["--cases", "llama-2-13b-small", "--profile-dir", str(tmp_path / "none"), "--profiled-cases"]) == 0
    assert capsys.readouterr().out.strip() == ""


def test_distplan_solved_for_the_deepspeed_engine_runs_deepspeeds_plans(tmp_path):
    """`--distplan-engine deepspeed` (issue 6's engine coverage): distplan's plan and alternatives are solved for
    DeepSpeed and run on it; 13B on 2x H200 needs a pipeline there (DeepSpeed's pipeline engine, ZeRO <= 1), as
    ZeRO-2 does not fit."""
    from planner.core.plan import load_plan

    plans, _ = campaign.campaign_plans(campaign.CASES["llama-2-13b-small"], None, tmp_path, gpus=2,
                                       cluster="h200-141gb", engine_for_distplan="deepspeed")
    mine = [p for p in plans if p.role in ("distplan", "alternative")]
    assert mine and all(p.engine == "deepspeed" for p in mine)
    for p in mine:
        cfg = load_plan(p.plan_path).parallel
        assert cfg.tp == 1 and (cfg.pp == 1 or cfg.zero_stage <= 1)  # what DeepSpeed's engine runs
    assert any(load_plan(p.plan_path).parallel.pp == 2 for p in mine)
    none, _ = campaign.campaign_plans(campaign.CASES["llama-2-13b-small"], None, tmp_path / "alone", gpus=2,
                                      cluster="h200-141gb", engine_for_distplan="deepspeed", baselines=False)
    assert sorted(p.name for p in none) == sorted(p.name for p in mine)  # --no-baselines: distplan's plans alone


def test_repeats_go_to_the_plans_whose_order_noise_can_flip():
    """gpt2-xl-large as measured (calls 13-15): the data-parallel plans at 3.11-3.17 s are run again; the pp2 plan
    (3.50 s, 10% slower) and megatron's heuristic (5.72 s) keep their order and are not."""
    measured = {"distplan": 3.122, "deepspeed-zero2": 3.166, "fsdp2-full": 3.110, "megatron-heuristic": 5.717,
                "alt1": 3.501}
    assert campaign.close_plans(measured) == ["distplan", "deepspeed-zero2", "fsdp2-full"]
    assert campaign.close_plans({"a": 1.0, "b": 1.051}) == [] == campaign.close_plans({"a": 1.051, "b": 1.0})
    assert campaign.close_plans({"a": 1.0, "b": 1.049}) == ["a", "b"]
    assert campaign.close_plans({"a": 1.0}) == []


def test_plans_measured_in_an_earlier_call_are_carried_not_run_again(tmp_path, monkeypatch):
    """--measured: a re-run after a fix runs only the plans no earlier call measured. Every tiny plan here was
    'measured' by an earlier call, so nothing is launched (_run_once raises here) and each row carries the
    earlier step time and memory beside today's prediction, with its errors recomputed and its source named."""
    import json

    dry = campaign.run_case("tiny", None, tmp_path / "dry", dry_run=True, megatron_engine="torch")
    earlier = [{**r, "status": "ran", "measured_step_time_s": 0.5, "measured_tokens_per_s": 1.0,
                "peak_allocated_gib": 0.25} for r in dry if r["status"] == "dry-run"]
    assert earlier
    (tmp_path / "call7-tiny").mkdir()
    (tmp_path / "call7-tiny" / "rows.json").write_text(json.dumps(earlier))
    measured = campaign.measured_runs([str(tmp_path / "call7-tiny" / "rows.json")])

    def no_run(*a, **k):
        raise RuntimeError("launched")

    monkeypatch.setattr(campaign, "_run_once", no_run)
    monkeypatch.setattr(campaign, "_cuda", lambda: False)
    rows = campaign.run_case("tiny", None, tmp_path / "again", measured=measured, megatron_engine="torch")
    carried = [r for r in rows if r["status"] == "ran"]
    assert len(carried) == len(earlier)
    for r in carried:
        assert r["measured_in"] == "call7-tiny" and r["measured_step_time_s"] == 0.5
        assert r["step_time_error"] == pytest.approx(0.5 / r["predicted_step_time_s"] - 1)
        assert r["memory_error"] == pytest.approx(0.25 / r["predicted_memory_gib"] - 1)
    # a plan no earlier call ran is run: with an empty record the first plan reaches _run_once
    with pytest.raises(RuntimeError, match="launched"):
        campaign.run_case("tiny", None, tmp_path / "new", measured={("other", "torch", "x"): ({}, "c")},
                          megatron_engine="torch")


def test_unreadable_rows_files_are_one_line_errors(tmp_path, capsys):
    """--measured and --merge read earlier calls' rows.json: a missing file, one that is not JSON and JSON that is
    not campaign rows each give one line naming the file and exit 2, before anything runs."""
    bad = tmp_path / "bad.json"
    bad.write_text("[")
    other = tmp_path / "other.json"
    other.write_text("[1]")
    for args in (["--measured", str(tmp_path / "none.json")], ["--measured", str(bad)], ["--merge", str(other)]):
        assert campaign.main(["--cases", "tiny", "--dry-run", "--out", str(tmp_path / "out"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and args[1] in err
    assert not (tmp_path / "out" / "rows.json").exists()


def test_nothing_ran_is_not_all_targets_met(tmp_path, capsys):
    """No case, or a case whose plans all failed to run, checks no target: 'all targets met' is None, not True (8xH200
    call 1 reported True over an empty campaign); --cases naming no case is a one-line error, exit 2."""
    assert campaign.summarize([])["overall"] == {"ge_10pct_faster_in_one_case": None, "all_targets_met": None}
    refused = {**_r("distplan", "distplan", None, None), "status": "refused", "step_time_error": None,
               "memory_error": None}
    assert campaign.summarize([refused])["overall"]["all_targets_met"] is None
    missed = [_r("distplan", "distplan", 130, 120, 0.2)]
    assert campaign.summarize(missed)["overall"]["all_targets_met"] is False
    assert campaign.main(["--cases", "", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --cases '' names no case") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_one_gpu_alternatives_take_each_memory_strategy_first(tmp_path):
    """One GPU has one mesh, where solve's alternatives (one per mesh) give none: the campaign takes the best
    fitting plan of each other memory strategy (recompute, optimizer offload) on the chosen mesh, as solve takes
    the best of each mesh; gpt2-xl at 32 x 1024 on an H200 has three besides the chosen one's."""
    from planner.core.plan import load_plan
    from planner.cost.predict import predict
    from solvers.search import search_space

    plans, skipped = campaign.campaign_plans(campaign.CASES["gpt2-xl-1gpu"], None, tmp_path, gpus=1,
                                             cluster="h200-141gb")
    dist = load_plan(next(p.plan_path for p in plans if p.role == "distplan"))
    chosen = dist.parallel
    alts = [p for p in plans if p.role == "alternative"]
    assert len(alts) == 3 and not [s for s in skipped if s["role"] == "alternative"]
    cfgs = [load_plan(p.plan_path).parallel for p in alts]
    strategies = [(c.recompute, c.offload_optimizer) for c in [chosen, *cfgs]]
    assert len(set(strategies)) == 4 and all(c.gpus == 1 for c in cfgs)
    # each is its strategy's fastest fitting plan, by the same prediction the campaign reports
    for cfg, spec in zip(cfgs, alts):
        rivals = [predict(dist.model, dist.cluster, c, None, engine="torch").step_time_s
                  for c in search_space(dist.model, dist.cluster, 1, cfg.global_batch_size, cfg.seq_len,
                                        flash_attention=cfg.flash_attention, engine="torch")
                  if (c.recompute, c.offload_optimizer) == (cfg.recompute, cfg.offload_optimizer)
                  and predict(dist.model, dist.cluster, c, None, engine="torch").fits]
        assert abs(spec.predicted_step_time_s - min(rivals)) < 1e-9
    assert min(p.predicted_step_time_s for p in alts) >= next(p for p in plans if p.role == "distplan").predicted_step_time_s
    assert {p.name for p in plans if p.role == "baseline"} == {"ddp", "deepspeed-zero2", "fsdp2-full", "megatron-heuristic"}


def test_alternatives_that_fit_come_first_and_number_three(tmp_path):
    """solve adds a faster plan that does not fit, to explain the choice; the campaign still makes three that fit
    (the issue's 'next 3 alternatives') and reports the misfit after them. llama-3-8b at 2048 tokens on one H200:
    no recompute at micro-batch 16 does not fit."""
    from planner.core.plan import load_plan

    plans, skipped = campaign.campaign_plans(campaign.CASES["llama-3-8b-1gpu"], None, tmp_path, gpus=1,
                                             cluster="h200-141gb")
    alts = [p for p in plans if p.role == "alternative"]
    assert [p.name for p in alts] == ["alt1", "alt2", "alt3"]
    assert all(load_plan(p.plan_path).parallel.micro_batch_size * load_plan(p.plan_path).parallel.num_microbatches == 16
               for p in alts)
    misfit = [s for s in skipped if s["role"] == "alternative"]
    assert [s["name"] for s in misfit] == ["alt4"] and misfit[0]["why"] == "predicted not to fit"


def test_measured_rows_are_read_in_call_order(tmp_path):
    """--measured takes a shell glob (call*/rows.json lists call10 before call2): a plan two calls ran keeps the
    later call's measurement, call 10's here, whatever order the files come in."""
    row = {"case": "tiny", "name": "distplan", "role": "distplan", "engine": "torch", "config": "dp2 mb1x4",
           "status": "ran", "measured_step_time_s": None, "peak_allocated_gib": 1.0}
    files = []
    for call, t in (("call10-x", 2.0), ("call2-x", 1.0)):
        d = tmp_path / call
        d.mkdir()
        (d / "rows.json").write_text(json.dumps([{**row, "measured_step_time_s": t}]))
        files.append(str(d / "rows.json"))
    assert campaign.call_order(files) == files[::-1]
    got = campaign.measured_runs(files)
    assert [(r["measured_step_time_s"], call) for r, call in got.values()] == [(2.0, "call10-x")]
