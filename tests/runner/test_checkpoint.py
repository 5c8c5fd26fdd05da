"""Checkpoint and resume (torch engine, CPU, gloo, 2 processes): a run stopped after 3 steps and resumed for 3 more
trains steps 4-6 exactly as the uninterrupted 6-step run does (same losses to fp32 round-off: DCP restores the
FSDP2 / pipeline-stage shards, AdamW's states and step counts, and the data of step k is a pure function of
(seed, k)); bad combinations are refused in one line before any worker starts.
"""

import math

import pytest
import yaml

from planner.core.errors import DistplanError
from planner.runner.checkpoint import LATEST, META
from planner.runner.engine_api import RunOptions
from planner.runner.launch import run_plan
from tests.runner.test_runner_torch import HUGE, plan_file

RTOL = 1e-6  # fp32 on CPU: the same arithmetic in the same order, so equal up to round-off (in practice bit-equal)


def _run(plan, tmp_path, name, steps, warmup=0, **ckpt):
    opts = RunOptions(steps=steps, warmup=warmup, lr=1e-3, timeout_s=300, **ckpt)
    report = run_plan(plan, opts, out_path=tmp_path / f"{name}.yaml", tolerance=HUGE)
    assert not report.failures, [(f.rank, f.reason, f.log_tail) for f in report.failures]
    return report


def _resume_matches(tmp_path, **par):
    plan = plan_file(tmp_path, **par)
    full = _run(plan, tmp_path, "full", steps=5, warmup=1)  # 6 training steps
    d = tmp_path / "ckpt"
    first = _run(plan, tmp_path, "first", steps=2, warmup=1, checkpoint_dir=str(d), checkpoint_every=3)
    assert (d / LATEST).read_text().strip() == "step-3" and (d / "step-3" / META).is_file()
    assert not list(d.glob("*.tmp"))
    assert first.checkpoint["saved_steps"] == [3] and first.checkpoint["resumed_from_step"] is None
    assert first.checkpoint["save_s"] > 0
    second = _run(plan, tmp_path, "second", steps=3, checkpoint_dir=str(d), resume=True)
    assert second.checkpoint["resumed_from_step"] == 3 and second.checkpoint["saved_steps"] == [6]  # no --checkpoint-every: after its last step
    assert len(full.losses) == 6 and len(first.losses) == 3 and len(second.losses) == 3
    assert all(math.isfinite(x) for x in full.losses)
    assert list(first.losses) == pytest.approx(full.losses[:3], rel=RTOL, abs=0)
    assert list(second.losses) == pytest.approx(full.losses[3:], rel=RTOL, abs=0)
    assert full.losses[3] != full.losses[2]  # the steps differ: resuming at the wrong step would show
    assert (d / LATEST).read_text().strip() == "step-6"
    written = yaml.safe_load((tmp_path / "second.yaml").read_text())
    assert written["checkpoint"]["resumed_from_step"] == 3
    return full, second


def test_fsdp2_zero3_dp2_resumes_bit_for_bit(tmp_path):
    full, _ = _resume_matches(tmp_path, dp=2, zero_stage=3)
    assert "dp=2" in full.config and "zero=3" in full.config


def test_tensor_parallel_tp2_dtensor_shards_resume(tmp_path):
    full, _ = _resume_matches(tmp_path, tp=2)
    assert "tp=2" in full.config


def test_pipeline_pp2_stages_resume_their_own_modules(tmp_path):
    _resume_matches(tmp_path, pp=2, layer_split=(1, 3), schedule="1f1b")


@pytest.mark.parametrize("ckpt,needle", [
    (dict(resume=True), "--resume needs --checkpoint-dir"),
    (dict(checkpoint_every=0, checkpoint_dir="c"), "--checkpoint-every 0 is out of range"),
    (dict(checkpoint_every=3), "--checkpoint-every needs --checkpoint-dir"),
    (dict(checkpoint_dir="c", resume=True), "--resume: no checkpoint in"),
    (dict(checkpoint_dir="c", engine="deepspeed"), "supported by the torch engine only"),
])
def test_bad_combinations_are_refused_before_spawning(tmp_path, monkeypatch, ckpt, needle):
    monkeypatch.chdir(tmp_path)
    plan = plan_file(tmp_path, dp=2, zero_stage=3)
    with pytest.raises(DistplanError, match=needle.replace("-", r"\-").replace("(", r"\(")):
        run_plan(plan, RunOptions(steps=1, warmup=0, **ckpt), tolerance=HUGE)
    assert not (tmp_path / "c").exists()


def test_a_checkpoint_of_another_plan_is_refused(tmp_path):
    plan = plan_file(tmp_path, dp=2, zero_stage=3)
    d = tmp_path / "ckpt"
    _run(plan, tmp_path, "first", steps=1, checkpoint_dir=str(d))  # saved after its last step
    assert (d / LATEST).read_text().strip() == "step-1"
    (tmp_path / "other").mkdir()
    other = plan_file(tmp_path / "other", dp=2, zero_stage=1)
    with pytest.raises(DistplanError, match="is of another run: parallel.zero_stage 3 in the checkpoint, 1 now"):
        run_plan(other, RunOptions(steps=1, warmup=0, checkpoint_dir=str(d), resume=True), tolerance=HUGE)


@pytest.mark.parametrize("args,needle", [
    (["--resume"], "error: --resume needs --checkpoint-dir D"),
    (["--checkpoint-dir", "c", "--checkpoint-every", "-1"], "error: --checkpoint-every -1 is out of range"),
    (["--checkpoint-dir", "c", "--engine", "megatron"], "supported by the torch engine only; engine is 'megatron'"),
])
def test_the_cli_says_it_in_one_line_with_exit_2(cli, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    r = cli("run", plan_file(tmp_path, dp=2, zero_stage=3), *args)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml"]
