"""Calibration files (planner/core/calibration.py, issue 22 item 2): `distplan run --calibrate` records its factors per
engine, GPU, model shape and profile, apart from the profile (never written), and estimate / solve / run apply only
the record of the job's own engine, shape and profile, saying so where they do."""

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from conftest import parse_json
from planner.core.calibration import (Calibration, CalibrationRecord, calibration_from_dict, calibration_to_dict,
                                      load_calibration, profile_digest, save_calibration)
from planner.core.fileio import dump_yaml
from planner.core.profile import default_calibration_path, profile_to_dict, save_profile
from planner.core.errors import DistplanError
from planner.estimate import EstimateRequest, job_profile, run_estimate
from planner.core.model import load_model
from planner.core.plan import make_plan
from planner.cost.profiled import load_profile
from planner.core.model import model_shape
from planner.runner.calibrate import calibrate_run

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "benchmarks/results/profile_2xh200/profile-gpt2-xl-2xh200.yaml"
REQ = dict(model="gpt2-xl", cluster="", gpus=2, micro_batch=16, global_batch=32, zero=1)


class Measured:
    """The fields calibrate_run reads from a run's Report: a torch run 1.3x slower than predicted."""

    def __init__(self, step_s: float, engine: str = "torch"):
        self.measured_step_time_s, self.engine = step_s, engine
        self.device, self.dtype, self.config = "cuda", "bf16", "dp=2 zero1"


def _calibrated(tmp_path, engine="torch"):
    """A copy of the committed gpt2-xl profile, one `engine` run of its dp2 ZeRO-1 plan calibrated beside it."""
    prof_path = tmp_path / "h200.yaml"
    save_profile(load_profile(PROFILE), prof_path)  # as the current version: the notes are calibration's alone
    res = run_estimate(EstimateRequest(**REQ, engine=engine, profile=str(prof_path)))
    plan = make_plan(res.model, res.cluster, 2, res.config, res.prediction, provenance={"command": "test"})
    before = res.prediction.step_time_s
    cal = default_calibration_path(prof_path)
    job = job_profile(load_profile(prof_path), prof_path, plan.model, 1024, plan.cluster, engine=engine,
                      gpu_name="NVIDIA H200")
    summary = calibrate_run(plan, job.profile, Measured(1.3 * before, engine), cal, prof_path)
    return prof_path, cal, before, summary


@pytest.fixture
def on_h200(monkeypatch):
    """calibrate_run names the GPU it runs on; these tests calibrate as if on the profiled H200s."""
    import planner.runner.calibrate as calibrate

    monkeypatch.setattr(calibrate, "machine_gpu", lambda profile: "NVIDIA H200")


def test_a_torch_run_moves_only_the_torch_engines_prediction_of_that_shape(tmp_path, on_h200):
    prof_path, cal, before, summary = _calibrated(tmp_path)
    assert prof_path.read_text() == dump_yaml(profile_to_dict(load_profile(PROFILE)), sort_keys=False)  # never written
    assert summary["file"] == str(cal) == str(tmp_path / "h200.calibration.yaml") and summary["runs"] == 1
    measured = 1.3 * before
    # most of the gap closed by one run (not all: the measured FSDP2 overhead in zero_comm takes no factor)
    assert abs(summary["predicted_after_s"] - measured) < 0.15 * (measured - before)
    applied = {e: run_estimate(EstimateRequest(**REQ, engine=e, profile=str(prof_path), calibration=str(cal)))
               for e in ("torch", "deepspeed", "any")}
    plain = {e: run_estimate(EstimateRequest(**REQ, engine=e, profile=str(prof_path))) for e in applied}
    assert applied["torch"].prediction.step_time_s == pytest.approx(summary["predicted_after_s"], rel=1e-9)
    src = dict(applied["torch"].prediction.sources)
    assert src["calibration.compute"].startswith("x1.") and src["calibration.compute"].endswith(
        f"from 1 torch run of this shape ({cal})")
    # another engine, and --engine any, are priced as without the file, and the output says why
    for e in ("deepspeed", "any"):
        assert applied[e].prediction == plain[e].prediction
    assert "no record for deepspeed gpt2-xl" in applied["deepspeed"].notes[0]
    assert "its factors are per engine" in applied["any"].notes[0]
    # another model (its blocks priced from the preset beside this profile) is not moved either
    other = dict(REQ, model="gpt2-large")
    cal_other = run_estimate(EstimateRequest(**other, engine="torch", profile=str(prof_path), profile_fallback=True,
                                             calibration=str(cal)))
    no_cal = run_estimate(EstimateRequest(**other, engine="torch", profile=str(prof_path), profile_fallback=True))
    assert cal_other.prediction == no_cal.prediction and "no record for torch gpt2-large" in cal_other.notes[-1]


def test_a_deepspeed_run_does_not_move_the_torch_engines_factors(tmp_path, on_h200):
    """The issue: factors were global, so a DeepSpeed run moved the torch engine's prediction off its own
    measurement. Each engine keeps its own record."""
    prof_path, cal, _, _ = _calibrated(tmp_path, "torch")
    torch_after = run_estimate(EstimateRequest(**REQ, engine="torch", profile=str(prof_path), calibration=str(cal)))
    res = run_estimate(EstimateRequest(**REQ, engine="deepspeed", profile=str(prof_path)))
    plan = make_plan(res.model, res.cluster, 2, res.config, res.prediction, provenance={"command": "test"})
    calibrate_run(plan, load_profile(prof_path), Measured(0.8 * res.prediction.step_time_s, "deepspeed"), cal, prof_path)
    saved = load_calibration(cal)
    assert sorted(r.engine for r in saved.records) == ["deepspeed", "torch"]
    again = run_estimate(EstimateRequest(**REQ, engine="torch", profile=str(prof_path), calibration=str(cal)))
    assert again.prediction == torch_after.prediction
    ds = run_estimate(EstimateRequest(**REQ, engine="deepspeed", profile=str(prof_path), calibration=str(cal)))
    assert ds.prediction.step_time_s < res.prediction.step_time_s and dict(ds.prediction.sources)["calibration.compute"]


def test_the_same_plan_again_replaces_its_run_and_a_remeasured_profile_starts_afresh(tmp_path, on_h200):
    prof_path, cal, _, _ = _calibrated(tmp_path)
    _calibrated(tmp_path)  # the same plan: its run replaced, not added
    assert [len(r.runs) for r in load_calibration(cal).records] == [1]
    d = yaml.safe_load(prof_path.read_text())
    d["facts"]["date_utc"] = "re-measured"
    prof_path.write_text(yaml.safe_dump(d))  # another profile file: the record names the one it was fitted against
    res = run_estimate(EstimateRequest(**REQ, engine="torch", profile=str(prof_path), calibration=str(cal)))
    assert "calibration.compute" not in dict(res.prediction.sources)
    assert "against profile" in res.notes[0] and "it holds torch gpt2-xl seq 1024 on H200" in res.notes[0]


def test_the_calibration_file_round_trips_and_bad_files_are_one_line(tmp_path):
    rec = CalibrationRecord(engine="torch", gpu="NVIDIA H200", model="gpt2-xl",
                            model_shape=model_shape(load_model("gpt2-xl")), seq_len=1024, profile="0123456789abcdef",
                            profile_path="h200.yaml", factors=(("all_reduce", 0.9), ("compute", 1.07)),
                            runs=({"plan_digest": "abc", "measured_step_time_s": 0.5, "fixed_s": 0.01,
                                   "terms_s": {"compute": 0.4, "all_reduce": 0.05}},))
    cal = Calibration((rec, replace(rec, engine="megatron", factors=(("compute", 0.95),))))
    save_calibration(cal, tmp_path / "c.yaml")
    assert load_calibration(tmp_path / "c.yaml") == cal
    assert calibration_from_dict(calibration_to_dict(cal), "again") == cal
    assert cal.with_record(replace(rec, factors=(("compute", 2.0),))).records[0].factors == (("compute", 2.0),)
    with pytest.raises(DistplanError, match="calibration file '.*missing.yaml' does not exist"):
        load_calibration(tmp_path / "missing.yaml")
    bad = calibration_to_dict(cal)
    bad["records"][0]["engine"] = "jax"
    with pytest.raises(DistplanError, match="record 1: engine 'jax' is not one of torch, deepspeed, megatron"):
        calibration_from_dict(bad, "c.yaml")
    assert profile_digest(None) == "none" and len(profile_digest(PROFILE)) == 16


def test_estimate_shows_the_factors_it_applied(cli, tmp_path, on_h200):
    prof_path, cal, _, summary = _calibrated(tmp_path)
    args = ["estimate", "-m", "gpt2-xl", "-n", 2, "--micro-batch", 16, "--global-batch", 32, "--zero", 1,
            "--engine", "torch", "--profile", prof_path, "--calibration", cal]
    out = parse_json(cli(*args, "--format", "json"))
    assert out["calibration"] == str(cal) and out["step_time_s"] == pytest.approx(summary["predicted_after_s"])
    assert out["notes"][0].startswith("calibration: all_reduce x1.3") and "compute x1.3" in out["notes"][0]
    assert out["notes"][0].endswith(f"from 1 torch run of this shape ({cal})")
    table = " ".join(cli(*args).stdout.split())
    assert "calibration: all_reduce x1.3" in table
    r = cli(*args[:-2], "--calibration", tmp_path / "nope.yaml")
    assert r.exit_code == 2 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_profile_carrying_legacy_factors_is_refused_with_the_way_out(cli, tmp_path):
    """No committed profile carries factors (every one has `calibration: {}`, which loads as before); a profile an
    older `run --calibrate` wrote into held one set for every engine and model, so it is refused, naming them."""
    d = yaml.safe_load(PROFILE.read_text())
    assert d["calibration"] == {}
    d["calibration"] = {"compute": 1.07}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(d))
    r = cli("estimate", "-m", "gpt2-xl", "-n", 2, "--profile", path)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    line = " ".join(r.stderr.split())
    assert "holds calibration factors (compute x1.07)" in line and "delete its 'calibration' key" in line
    assert str(tmp_path / "old.calibration.yaml") in line
    with pytest.raises(DistplanError, match="holds calibration factors"):
        load_profile(path)


def test_calibration_without_a_profile_corrects_the_preset_prediction(tmp_path, monkeypatch):
    """A run predicted from the preset alone (no --profile) keeps its own record (profile: none)."""
    import planner.runner.calibrate as calibrate

    monkeypatch.setattr(calibrate, "machine_gpu", lambda profile: "H100-SXM-80GB")
    res = run_estimate(EstimateRequest(model="gpt2", cluster="dgx-h100-80gb", gpus=8, engine="torch"))
    plan = make_plan(res.model, res.cluster, 8, res.config, res.prediction, provenance={"command": "test"})
    cal = tmp_path / "c.yaml"
    calibrate_run(plan, None, Measured(2 * res.prediction.step_time_s), cal, None)
    assert load_calibration(cal).records[0].profile == "none"
    got = run_estimate(EstimateRequest(model="gpt2", cluster="dgx-h100-80gb", gpus=8, engine="torch",
                                       calibration=str(cal)))
    assert got.prediction.step_time_s == pytest.approx(2 * res.prediction.step_time_s, rel=0.05)
    assert got.cluster == res.cluster and "calibration.compute" in dict(got.prediction.sources)
    with_profile = run_estimate(EstimateRequest(**REQ, engine="torch", profile=str(PROFILE), calibration=str(cal)))
    assert "calibration.compute" not in dict(with_profile.prediction.sources)
