"""`distplan solve` through typer's CliRunner: the plan is written and reloads; bad input is one line, exit 2."""

import json

import pytest

from planner.core.plan import load_plan, plan_to_yaml
from planner.core.profile import Profile, save_profile


def test_solve_writes_a_plan_that_reloads(cli, tmp_path):
    path = tmp_path / "plan.yaml"
    r = cli("solve", "--gpus", 64, "--model", "gpt2-xl", "-o", path)
    assert r.exit_code == 0, r.output
    for needle in ("parallel degrees", "pipeline stages", "step time", "MFU", "peak memory per GPU",
                   "memory per pipeline stage", "alternatives", "why this plan", "intra-op sharding"):
        assert needle in r.stdout, needle
    plan = load_plan(path)
    assert plan.gpus == 64 and plan.parallel.gpus == 64 and plan.model.name == "gpt2-xl"
    assert plan_to_yaml(plan) == path.read_text()  # reloads to the same plan, byte for byte
    assert plan.rationale and plan.sharding["block"]
    assert "Regenerate: distplan solve --model gpt2-xl --gpus 64" in path.read_text()


def test_json_format_prints_the_plan(cli, tmp_path):
    path = tmp_path / "p.yaml"
    r = cli("solve", "-m", "gpt2", "-n", 8, "--top-k", 1, "--ilp-backend", "pulp", "--format", "json", "-o", path)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    plan = load_plan(path)
    assert out["parallel"] == plan.to_dict()["parallel"]
    assert out["prediction"]["step_time_s"] == plan.prediction["step_time_s"]
    assert len(out["alternatives"]) >= 1 and out["search"]["candidates"] > 0
    assert out["provenance"]["solver"]["ilp_backend"] == "pulp"


def _profile(tmp_path, gpu: str) -> str:
    path = tmp_path / "profile.yaml"
    save_profile(Profile(gpu_name=gpu, device="cuda", model="gpt2", seq_len=1024, dtype="bf16"), path)
    return str(path)


@pytest.mark.parametrize("args,needle", [
    (["-m", "gpt-9", "-n", 8], "unknown model 'gpt-9'"),
    (["-m", "gpt2", "-n", 8, "-c", "tpu-pod"], "unknown cluster 'tpu-pod'"),
    (["-m", "gpt2", "-n", 0], "--gpus must be a positive integer"),
    (["-m", "gpt2", "-n", 12], "not a multiple of 8 GPUs per node"),
    (["-m", "gpt2", "-n", 8, "--global-batch", 0], "--global-batch must be a positive integer"),
    (["-m", "gpt2", "-n", 8, "--seq-len", 4096], "exceeds the 1024 learned positions"),
    (["-m", "gpt2", "-n", 8, "--format", "xml"], "--format 'xml' is unknown"),
    (["-m", "gpt2", "-n", 8, "--ilp-backend", "gurobi"], "--ilp-backend 'gurobi' is unknown"),
    (["-m", "gpt2", "-n", 8, "--top-k", -1], "--top-k must be >= 0"),
    (["-m", "gpt2", "-n", 8, "--time-limit", 0], "--time-limit must be positive"),
    (["-m", "gpt2", "-n", 8, "--time-limit", 0.000001], "ran out before any plan was found"),
    (["-m", "gpt3-175b", "-n", 8], "fits on no plan of 8 GPUs"),
    (["-m", "gpt2", "-n", 8, "--profile", "missing-profile.yaml"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(cli, tmp_path, args, needle):
    path = tmp_path / "plan.yaml"
    r = cli("solve", *args, "-o", path)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not path.exists()  # nothing half-written


def test_profile_of_another_gpu_is_rejected(cli, tmp_path):
    path = tmp_path / "plan.yaml"
    r = cli("solve", "-m", "gpt2", "-n", 8, "-c", "dgx-h100-80gb", "--profile", _profile(tmp_path, "NVIDIA A100-SXM4-80GB"),
            "-o", path)
    assert r.exit_code == 2, r.output
    assert "A100" in r.stderr and "H100" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not path.exists()
