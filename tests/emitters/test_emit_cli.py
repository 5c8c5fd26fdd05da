"""`distplan emit` through typer's CliRunner, the torchrun and slurm targets, and the all-or-nothing output folder."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from emit_cases import GOLDEN, case_plan, variant_plan
from emitters import RUNNER_WORKER, TARGETS, emit_plan, runner_worker_argv
from emitters.common import EmitOptions, write_emission
from planner.core.errors import DistplanError
from planner.core.plan import load_plan, save_plan


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder holding plan.yaml (the llama golden plan), as the current directory."""
    shutil.copy(GOLDEN / "llama-3-70b-64" / "plan.yaml", tmp_path / "plan.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_error_line(result, needle: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_emit_writes_the_golden_files(cli, workdir, target):
    args = ["emit", "plan.yaml", "--target", target, "-o", "out"]
    if target == "slurm":
        args += ["--wrap", "megatron"]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    golden = GOLDEN / "llama-3-70b-64" / target
    assert sorted(p.name for p in (workdir / "out").iterdir()) == sorted(p.name for p in golden.iterdir())
    for p in golden.iterdir():
        assert (workdir / "out" / p.name).read_text() == p.read_text(), p.name
    assert "launch" in r.stdout and "wrote" in r.stdout
    for script in ("launch.sh", "job.sbatch"):
        if (workdir / "out" / script).exists():
            assert os.access(workdir / "out" / script, os.X_OK)
    assert not [p for p in workdir.iterdir() if p.name.startswith(".out.")]  # no temporary folder left


def test_emit_check_reports_each_validator(cli, workdir):
    r = cli("emit", "plan.yaml", "--target", "deepspeed", "-o", "out", "--check")
    assert r.exit_code == 0, r.output
    assert "semantic checks" in r.stdout and "DeepSpeedConfig parse" in r.stdout and "pass" in r.stdout
    r = cli("emit", "plan.yaml", "--target", "megatron", "-o", "out2", "--check")
    assert r.exit_code == 0, r.output
    assert "mirror of Megatron" in r.stdout and "parse_args" in r.stdout


def test_failed_check_writes_nothing(cli, workdir, monkeypatch):
    import emitters.checks as checks

    monkeypatch.setattr(checks, "deepspeed_semantic_errors", lambda cfg, dp: ["planted mistake"])
    r = cli("emit", "plan.yaml", "--target", "deepspeed", "-o", "out", "--check")
    one_error_line(r, "planted mistake")
    assert "nothing written" in r.stderr
    assert not (workdir / "out").exists()


def test_existing_output_folder_is_refused_then_forced(cli, workdir):
    (workdir / "out").mkdir()
    (workdir / "out" / "old.txt").write_text("keep me unless --force")
    one_error_line(cli("emit", "plan.yaml", "--target", "torchrun", "-o", "out"), "output folder 'out' exists; pass --force")
    assert (workdir / "out" / "old.txt").exists()
    r = cli("emit", "plan.yaml", "--target", "torchrun", "-o", "out", "--force")
    assert r.exit_code == 0, r.output
    assert not (workdir / "out" / "old.txt").exists() and (workdir / "out" / "launch.sh").exists()
    assert sorted(p.name for p in workdir.iterdir()) == ["out", "plan.yaml"]


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["parallel"].update(tensor_parallel=8), "unknown key(s) tensor_parallel"),
    (lambda d: d["parallel"].update(tp=7), "dp*tp*pp*cp = 2*7*4*1"),
    (lambda d: d.update(extra=1), "unknown top-level key(s) extra"),
    (lambda d: d["job"].update(global_batch_size="512"), "job.global_batch_size"),
    (lambda d: d["stages"][0].update(layers=[0, 17]), "stages[1].layers"),
    (lambda d: d.pop("prediction"), "missing top-level key 'prediction'"),
])
def test_tampered_plan_names_the_key(cli, workdir, edit, needle):
    data = yaml.safe_load((workdir / "plan.yaml").read_text())
    edit(data)
    (workdir / "plan.yaml").write_text(yaml.safe_dump(data))
    one_error_line(cli("emit", "plan.yaml", "--target", "megatron", "-o", "out"), needle)
    assert not (workdir / "out").exists()


def test_deepspeed_pipeline_with_zero3_suggests_zero1(cli, workdir):
    save_plan(variant_plan("pp_zero3"), workdir / "pp_zero3.yaml")
    line = one_error_line(cli("emit", "pp_zero3.yaml", "--target", "deepspeed", "-o", "out"),
                          "deepspeed cannot express this plan")
    assert "ZeRO-3" in line and "ZeRO-1 (zero_stage=1)" in line
    assert not (workdir / "out").exists()


@pytest.mark.parametrize("args,needle", [
    (["--target", "colossal"], "--target 'colossal' is unknown; valid: deepspeed, megatron, torchrun, slurm"),
    (["--target", "megatron", "--wrap", "torchrun"], "--wrap applies to --target slurm only"),
    (["--target", "slurm", "--wrap", "mpirun"], "--wrap 'mpirun' is unknown"),
    (["--target", "deepspeed", "--hosts", "a,,b"], "--hosts 'a,,b' must be comma-separated host names"),
    (["--target", "deepspeed", "--hosts", "a,b"], "--hosts names 2 host(s), but the plan needs 8 node(s)"),
])
def test_bad_options(cli, workdir, args, needle):
    one_error_line(cli("emit", "plan.yaml", *args, "-o", "out"), needle)
    assert not (workdir / "out").exists()


def test_missing_plan(cli, workdir):
    one_error_line(cli("emit", "nope.yaml", "--target", "megatron", "-o", "out"), "plan file 'nope.yaml' does not exist")


def test_help_has_an_example(cli):
    r = cli("emit", "--help")
    assert r.exit_code == 0 and "Example: distplan emit plan.yaml --target" in r.stdout


def test_nothing_half_written_when_a_write_fails(tmp_path, monkeypatch):
    em = emit_plan(case_plan("llama-3-70b-64"), "megatron")
    real = Path.write_text
    calls = []

    def flaky(self, text, *a, **k):
        calls.append(self.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", flaky)
    with pytest.raises(DistplanError, match="cannot write output folder .*No space left on device"):
        write_emission(em, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin


# ---- torchrun and slurm --------------------------------------------------------------------------


def test_torchrun_runner_contract():
    """The torchrun target starts RUNNER_WORKER, the one constant distplan run's launcher must agree with."""
    assert RUNNER_WORKER[:2] == ("-m", "planner.runner.worker")
    assert runner_worker_argv("p.yaml") == ["-m", "planner.runner.worker", "--plan", "p.yaml", "--engine", "torch"]
    em = emit_plan(case_plan("mixtral-8x7b-64"), "torchrun")
    assert em.launch.endswith(" ".join(runner_worker_argv("plan.yaml")))
    assert load_plan_text(em.files["plan.yaml"]).digest() == case_plan("mixtral-8x7b-64").digest()
    try:  # the runner (written separately) names the same module, where it exists
        from planner.runner.launch import WORKER_MODULE
    except ImportError:
        return
    assert WORKER_MODULE == RUNNER_WORKER[1]


def load_plan_text(text: str):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "plan.yaml").write_text(text)
        return load_plan(Path(d) / "plan.yaml")


def test_torchrun_single_and_multi_node():
    single = emit_plan(variant_plan("single_node_pp"), "torchrun")
    assert single.launch.startswith("torchrun --standalone --nnodes 1 --nproc-per-node 8 -m planner.runner.worker")
    multi = emit_plan(case_plan("gpt2-xl-64"), "torchrun")
    assert "--nnodes 8 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT" in multi.launch
    small = emit_plan(variant_plan("zero0_unfused"), "torchrun")  # 4 GPUs on an 8-GPU node
    assert "--nproc-per-node 4" in small.launch


def test_slurm_wraps_each_target():
    plan = case_plan("llama-3-70b-64")
    for wrap in ("torchrun", "megatron"):
        em = emit_plan(plan, "slurm", EmitOptions(wrap=wrap))
        sb = em.files["job.sbatch"]
        assert re.search(r"^#SBATCH --nodes=8$", sb, re.M) and re.search(r"^#SBATCH --gpus-per-node=8$", sb, re.M)
        assert 'srun --nodes=8 --ntasks-per-node=1 bash "$HERE/launch.sh"' in sb
        assert "launch.sh" in em.files and em.launch == "sbatch job.sbatch"
        assert "Regenerate: distplan emit plan.yaml --target slurm -o out --wrap " + wrap in em.files["launch.sh"]
    ds = emit_plan(case_plan("gpt2-xl-64"), "slurm", EmitOptions(wrap="deepspeed")).files["job.sbatch"]
    assert "--launcher slurm" in ds and 'sed "s/$/ slots=8/"' in ds
    one = emit_plan(variant_plan("single_node_pp"), "slurm").files["job.sbatch"]
    assert "#SBATCH --nodes=1" in one and 'exec bash "$HERE/launch.sh"' in one
    # every #SBATCH line comes before the first command (sbatch stops reading them there)
    lines = [line for line in sb.splitlines() if line and not line.startswith("#")]
    assert sb.index(lines[0]) > sb.rindex("#SBATCH")


def test_gpus_not_filling_whole_nodes_are_refused():
    from dataclasses import replace

    plan = case_plan("gpt2-xl-64")
    odd = replace(plan, gpus=12, parallel=replace(plan.parallel, dp=12, global_batch_size=96))
    for target in TARGETS:
        with pytest.raises(DistplanError, match="12 GPUs are not a whole number of 8-GPU nodes"):
            emit_plan(odd, target)
