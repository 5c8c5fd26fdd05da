"""The CLI's everyday answers: --version, help in plain words, solve's constraints / --candidates / warnings, and
training time and cost on solve, estimate and show."""

import csv
import json

import pytest
import typer

from planner import __version__
from planner.cli import app
from planner.training import training_estimate


def test_version(cli):
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"distplan {__version__}"


@pytest.mark.parametrize("command", ["", "estimate", "solve", "show", "diff", "profile", "run", "emit",
                                     "validate"])
def test_help_names_values_in_words_not_python_types(cli, command):
    r = cli(*([command] if command else []), "--help")
    assert r.exit_code == 0, r.output
    for internal in ("<bool>", "<str>", "<int>", "<float>", "<path>", "list[", "{plan}", "{PLAN}"):
        assert internal not in r.stdout, (internal, r.stdout)


def test_every_option_shows_a_value_name_or_is_a_flag():
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for param in command.params:
            assert param.metavar is not None, (name, param.name)
            if getattr(param, "is_flag", False):
                assert param.metavar == "", (name, param.name)
            else:
                assert param.metavar.isupper(), (name, param.name, param.metavar)


def test_solve_constraints_candidates_and_training(cli, tmp_path):
    plan, rows = tmp_path / "p.yaml", tmp_path / "c.csv"
    r = cli("solve", "-m", "gpt2-medium", "-n", "8", "--tp", "2,4", "--zero", "1,3", "--max-micro-batch", "4",
            "--candidates", rows, "--train-tokens", "1e11", "--gpu-hour-price", "2", "-o", plan, "--format", "json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    par = out["parallel"]
    assert par["tp"] in (2, 4) and par["zero_stage"] in (1, 3) and par["micro_batch_size"] <= 4
    assert out["provenance"]["solver"]["constraints"] == "--tp 2,4 --max-micro-batch 4 --zero 1,3"
    table = list(csv.DictReader(rows.open()))
    assert table[0]["status"] == "chosen" and all(int(t["tp"]) in (2, 4) for t in table)
    expected = training_estimate(out["prediction"]["tokens_per_s"], 8, 1e11, 2)
    assert out["training"] == pytest.approx(expected)
    assert out["training"]["cost"] == pytest.approx(2 * 8 * 1e11 / out["prediction"]["tokens_per_s"] / 3600)
    # show prices the same run from what solve kept in the plan, and --train-tokens overrides it
    shown = json.loads(cli("show", plan, "--format", "json").stdout)
    assert shown["training"]["gpu_hours"] == pytest.approx(expected["gpu_hours"], rel=1e-5)
    shown = json.loads(cli("show", plan, "--format", "json", "--train-tokens", "2e11").stdout)
    assert shown["training"]["days"] == pytest.approx(2 * expected["days"], rel=1e-5) and "cost" in shown["training"]


def test_estimate_prints_training_time_in_its_table(cli):
    r = cli("estimate", "-m", "gpt2-medium", "-n", "8", "--train-tokens", "3e10")
    assert r.exit_code == 0, r.output
    assert "training time" in r.stdout and "GPU-hours" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--train-tokens", "0"], "--train-tokens 0"), (["--train-tokens", "nan"], "--train-tokens nan"),
    (["--train-tokens", "1e30"], "--train-tokens 1e+30"), (["--gpu-hour-price", "2"], "needs --train-tokens"),
    (["--train-tokens", "1e12", "--gpu-hour-price", "-1"], "--gpu-hour-price -1"),
    (["--candidates", "c.txt"], "--candidates 'c.txt' must end in .csv or .json"),
    (["--tp", "three"], "--tp 'three'"),
])
def test_bad_solve_answers_options_are_one_line(cli, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    r = cli("solve", "-m", "gpt2-medium", "-n", "8", *args)
    assert r.exit_code == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_training_arithmetic():
    est = training_estimate(tokens_per_s=1e6, gpus=100, train_tokens=8.64e10, gpu_hour_price=3.0)
    assert est["days"] == pytest.approx(1.0) and est["gpu_hours"] == pytest.approx(2400.0)
    assert est["cost"] == pytest.approx(7200.0)
