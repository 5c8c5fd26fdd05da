"""Golden files: every target on gpt2-xl@64, llama-3-70b@64 (TP+PP+uneven split+selective recompute) and
mixtral-8x7b@64 (EP), compared byte for byte. Regenerate: DISTPLAN_UPDATE_GOLDEN=1 python3 -m pytest tests/emitters/test_emit_golden.py
"""

from __future__ import annotations

import json
import shutil

import pytest

from emit_cases import CASES, GOLDEN, UPDATE, case_plan
from emitters import TARGETS, emit_plan
from emitters.checks import check_emission
from emitters.checks_megatron import megatron_rule_errors, read_args_file
from emitters.common import EmitOptions
from emitters.torchrun import runner_refusal
from planner.core.plan import load_plan, save_plan

OPTS = EmitOptions(plan_path="plan.yaml", out_dir="out")


def golden_plan(case: str):
    """The committed plan of `case` (rewritten from the hand config when regenerating)."""
    path = GOLDEN / case / "plan.yaml"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_plan(case_plan(case), path)
    return load_plan(path)


def options(case: str, target: str) -> EmitOptions:
    return EmitOptions(plan_path=OPTS.plan_path, out_dir=OPTS.out_dir, wrap=CASES[case][3]) if target == "slurm" else OPTS


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case, target):
    em = emit_plan(golden_plan(case), target, options(case, target))
    folder = GOLDEN / case / target
    if UPDATE:
        shutil.rmtree(folder, ignore_errors=True)
        for name, text in em.files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
    expected = sorted(p.name for p in folder.iterdir())
    assert sorted(em.files) == expected, f"files differ from {folder}; regenerate with DISTPLAN_UPDATE_GOLDEN=1"
    for name, text in em.files.items():
        assert text == (folder / name).read_text(), f"{folder / name} differs; regenerate with DISTPLAN_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_plans_match_cases(case, tmp_path):
    """The committed plan files still hold the hand configurations the cases name, and reload exactly.
    (Predictions and cluster numbers may drift with the cost model; the golden files keep the committed ones.)"""
    plan, built = golden_plan(case), case_plan(case)
    assert plan.parallel == built.parallel and plan.model == built.model and plan.gpus == built.gpus
    save_plan(plan, tmp_path / "again.yaml")
    assert load_plan(tmp_path / "again.yaml").digest() == plan.digest()


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_files_pass_checks(case):
    """distplan's own checks and DeepSpeed's parser accept every golden emission (Megatron's own: skipped here
    unless megatron.training is importable; see benchmarks/megatron_args_check.py), except that the torchrun
    target's check fails, naming why, exactly where distplan's torch engine (what it launches) refuses the plan."""
    plan = golden_plan(case)
    for target in sorted(TARGETS):
        results = check_emission(plan, emit_plan(plan, target, options(case, target)))
        assert results
        failed = [r for r in results if r.failed]
        launches_torch = target == "torchrun" or (target == "slurm" and CASES[case][3] == "torchrun")
        if launches_torch and runner_refusal(plan) is not None:
            assert len(failed) == 1 and "torch engine refuses the plan" in failed[0].detail, failed
        else:
            assert not failed, failed


def test_golden_content_llama():
    """Spot checks of what the llama case must say, independent of the golden text."""
    folder = GOLDEN / "llama-3-70b-64"
    argv, world, env = read_args_file((folder / "megatron" / "megatron_args.txt").read_text())
    assert world == 64 and env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    joined = " ".join(argv)
    for flag in ("--tensor-model-parallel-size 8", "--pipeline-model-parallel-size 4", "--sequence-parallel",
                 "--decoder-first-pipeline-num-layers 19", "--decoder-last-pipeline-num-layers 19",
                 "--recompute-granularity selective", "--recompute-modules core_attn", "--use-distributed-optimizer",
                 "--micro-batch-size 1", "--global-batch-size 512", "--num-query-groups 8", "--bf16"):
        assert flag in joined
    assert megatron_rule_errors(argv, world, env) == []
    ds = json.loads((folder / "deepspeed" / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 1 and ds["pipeline"]["stages"] == 4
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    part = json.loads((folder / "deepspeed" / "pipeline_partition.json").read_text())
    assert part["parts"] == [0, 20, 41, 62, 82]
    assert (folder / "deepspeed" / "hostfile").read_text().count("slots=8") == 8


def test_golden_content_mixtral():
    folder = GOLDEN / "mixtral-8x7b-64"
    argv, _, _ = read_args_file((folder / "megatron" / "megatron_args.txt").read_text())
    joined = " ".join(argv)
    assert "--expert-model-parallel-size 8" in joined and "--num-experts 8" in joined and "--moe-router-topk 2" in joined
    ds = json.loads((folder / "deepspeed" / "ds_config.json").read_text())
    assert ds["expert_parallel"] == {"enabled": True, "autoep_size": 8, "preset_model": "mixtral"}


def test_every_file_has_a_header():
    """Files that allow comments start with the header; JSON carries it in README.txt (with the file's sha256)."""
    for case in CASES:
        plan = load_plan(GOLDEN / case / "plan.yaml")
        for target in TARGETS:
            for path in (GOLDEN / case / target).iterdir():
                text = path.read_text()
                if path.suffix == ".json":
                    readme = (GOLDEN / case / target / "README.txt").read_text()
                    assert path.name in readme
                    if path.name != "ds_config.json":
                        assert json.loads(text)["distplan"]["plan_hash"] == plan.digest()
                    continue
                head = "\n".join(text.splitlines()[:6])
                assert f"Plan {plan.digest()}" in head, path
                assert "distplan 0." in head and "Predicted: step time" in head and "Regenerate: distplan emit" in head, path


def test_shell_scripts_parse():
    """bash -n accepts every emitted shell script and sbatch file."""
    import subprocess

    scripts = [p for p in GOLDEN.rglob("*") if p.name in ("launch.sh", "job.sbatch")]
    assert len(scripts) == 3 * 4 + 3
    for path in scripts:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"
        assert path.read_text().startswith("#!/usr/bin/env bash\n")


def test_standalone_megatron_check_reads_args_files_as_the_emitter_checks_do():
    """benchmarks/megatron_args_check.py keeps its own reader (it runs where distplan is not installed); it must
    read every golden argument file exactly as emitters.checks_megatron.read_args_file does."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "megatron_args_check.py"
    spec = importlib.util.spec_from_file_location("megatron_args_check", path)
    standalone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standalone)
    files = sorted(GOLDEN.glob("*/megatron/megatron_args.txt"))
    assert files
    for f in files:
        assert standalone.read_args_file(f) == read_args_file(f.read_text())
