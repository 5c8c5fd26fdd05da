"""`distplan show` and `distplan diff` through typer's CliRunner; every command's help; shell completion."""

import json
import os
import shutil
import subprocess

import pytest
import typer
import yaml
from review_plans import review_plan

from planner.cli import app
from planner.core.plan import save_plan
from planner.show import diff_plans, plan_review


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    d = tmp_path_factory.mktemp("plans")
    a, b = d / "a.yaml", d / "b.yaml"
    save_plan(review_plan(schedule="1f1b"), a)
    save_plan(review_plan(schedule="interleaved", vpp=2, recompute="full"), b)
    return a, b


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]


# ---- show ---------------------------------------------------------------------------------------------


def test_show_renders_layout_stages_breakdown_and_rationale(cli, plans):
    r = cli("show", plans[0])
    assert r.exit_code == 0, r.output
    for text in ("gpt2-xl", "dp=2 tp=1 pp=4 mb=2x8 1f1b", "GPU map", "s0d0t0", "s3d1t0", "pipeline stages",
                 "pipeline_bubble", "why this plan", "74 GiB fit limit", "alternatives considered",
                 "all-reduce of all 1.6 B gradients"):
        assert text in r.stdout, text


def test_show_json_and_yaml_carry_the_same_review(cli, plans):
    j = json.loads(cli("show", plans[0], "--format", "json").stdout)
    y = yaml.safe_load(cli("show", plans[0], "--format", "yaml").stdout)
    assert j == y
    assert j["prediction"]["step_time_s"] > 0 and len(j["stages"]) == 4
    assert j["layout"][1]["replicas"] == [{"dp": 0, "cp": 0, "gpus": [2]}, {"dp": 1, "cp": 0, "gpus": [3]}]
    assert j["alternatives"][0]["why_lost"].startswith("no pipeline")
    assert j["alternatives"][1]["name"] == "dp=2 tp=4 pp=1" and j["alternatives"][1]["slower_pct"] > 0
    assert sum(t["share"] for t in j["breakdown"]) == pytest.approx(1.0, rel=1e-3)


def test_show_writes_pictures_and_report(cli, plans, tmp_path):
    r = cli("show", plans[1], "--timeline", tmp_path / "t.svg", "--memory-chart", tmp_path / "m.png",
            "--report", tmp_path / "r.html", "--format", "json")
    assert r.exit_code == 0, r.output
    json.loads(r.stdout)  # stdout stays machine-readable; "wrote ..." goes to stderr
    assert "wrote" in r.stderr
    assert (tmp_path / "t.svg").read_text().lstrip().startswith("<?xml")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert "<!doctype html>" in (tmp_path / "r.html").read_text()


def test_show_adds_measured_records(cli, plans, tmp_path):
    rec = tmp_path / "measured.yaml"
    rec.write_text(yaml.safe_dump({"records": [{"name": "a", "predicted_step_s": 0.08, "measured_step_s": 0.09,
                                                "predicted_mem_gib": 11.8, "measured_mem_gib": None}]}))
    r = cli("show", plans[0], "--measured", rec, "--report", tmp_path / "r.html")
    assert r.exit_code == 0, r.output
    assert "predicted vs measured" in r.stdout
    assert 'id="measured"' in (tmp_path / "r.html").read_text()
    run = tmp_path / "run-report.yaml"  # the shape of planner/runner/report.py's file
    run.write_text(yaml.safe_dump({"version": 1, "config": "dp=2 tp=1 pp=4", "predicted_step_time_s": 0.12,
                                   "measured_step_time_s": 0.125, "stages": [
                                       {"stage": 0, "predicted_memory_gib": 11.8, "peak_allocated_gib": 11.1},
                                       {"stage": 1, "predicted_memory_gib": 9.3, "peak_allocated_gib": None}]}))
    j = json.loads(cli("show", plans[0], "--measured", rec, "--measured", run, "--format", "json").stdout)
    assert j["measured"][1] == {"name": "dp=2 tp=1 pp=4", "predicted_step_s": 0.12, "measured_step_s": 0.125,
                                "predicted_mem_gib": 11.8, "measured_mem_gib": 11.1}
    rec.write_text("- {name: a, predicted_step_s: fast}\n")
    one_line_error(cli("show", plans[0], "--measured", rec), "lacks measured_step_s")
    one_line_error(cli("show", plans[0], "--measured", tmp_path / "none.yaml"), "does not exist")


def test_show_bad_input_is_one_line_and_exit_2(cli, plans, tmp_path):
    one_line_error(cli("show", tmp_path / "missing.yaml"), "does not exist")
    one_line_error(cli("show", plans[0], "--format", "xml"), "--format 'xml' is unknown")
    one_line_error(cli("show", plans[0], "--timeline", tmp_path / "t.jpg"), "suffix must be .png or .svg")
    assert not (tmp_path / "t.jpg").exists()

    data = yaml.safe_load(plans[0].read_text())
    data["stages"][1]["layers"] = [13, 23]  # tampered: stage ranges no longer cover the model
    bad = tmp_path / "tampered.yaml"
    bad.write_text(yaml.safe_dump(data))
    one_line_error(cli("show", bad), "must start at layer 12")

    data = yaml.safe_load(plans[0].read_text())
    del data["prediction"]["breakdown"]
    bad.write_text(yaml.safe_dump(data))
    one_line_error(cli("show", bad), "prediction lacks 'breakdown'")

    bad.write_text("version: 1\nmodel: [unclosed\n")
    one_line_error(cli("show", bad), "malformed YAML")


GOOD_OUTPUTS = {"--timeline": "t.png", "--memory-chart": "m.svg", "--report": "r.html"}
BAD_SUFFIXES = {"--timeline": "t.jpg", "--memory-chart": "m.pdf", "--report": "r.txt"}


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("option", GOOD_OUTPUTS)
def test_show_bad_output_is_one_line_and_writes_nothing(cli, plans, tmp_path, option):
    out = tmp_path / "out"
    out.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = [(out, "is a folder"), (blocker / GOOD_OUTPUTS[option], "is a file, not a folder"),
             (out / BAD_SUFFIXES[option], "suffix must be")]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((locked / GOOD_OUTPUTS[option], "is not writable"))
    # the other outputs are fine, and come first: none of them may be written either
    others = [a for o, name in GOOD_OUTPUTS.items() if o != option for a in (o, out / name)]
    for target, needle in cases:
        before = files_under(tmp_path)
        one_line_error(cli("show", plans[0], *others, option, target), option, str(target), needle)
        assert files_under(tmp_path) == before, target
    same = out / "same.png"
    one_line_error(cli("show", plans[0], "--timeline", same, "--memory-chart", same), "also the --timeline file")
    assert not same.exists()


# ---- diff ---------------------------------------------------------------------------------------------


def test_diff_names_changes_and_consequences(cli, plans):
    r = cli("diff", *plans)
    assert r.exit_code == 0, r.output
    for text in ("parallel.schedule", "interleaved", "parallel.recompute", "predicted consequence", "step_time_s",
                 "peak_memory_gib", "verdict:"):
        assert text in r.stdout, text
    d = json.loads(cli("diff", *plans, "--format", "json").stdout)
    keys = {c["key"]: (c["a"], c["b"]) for c in d["changes"]}
    assert keys["parallel.vpp"] == (1, 2) and keys["parallel.recompute"] == ("none", "full")
    step = d["consequences"][0]
    assert step["metric"] == "step_time_s" and step["delta"] == pytest.approx(step["b"] - step["a"])
    assert "recompute" in d["verdict"] and "GiB less peak memory" in d["verdict"]


def test_diff_of_a_plan_with_itself_is_empty(cli, plans):
    r = cli("diff", plans[0], plans[0])
    assert r.exit_code == 0 and "same plan" in r.stdout


def test_diff_library_flags_different_workloads():
    a, b = review_plan(), review_plan(global_batch_size=64)
    d = diff_plans(a, b)
    assert not d["same_workload"] and {"key": "job.global_batch_size", "a": 32, "b": 64} in d["changes"]
    assert plan_review(a)["schedule"]["bubble_share"] > plan_review(b)["schedule"]["bubble_share"]


def test_diff_bad_input_is_one_line_and_exit_2(cli, plans, tmp_path):
    one_line_error(cli("diff", plans[0], tmp_path / "nope.yaml"), "nope.yaml", "does not exist")


# ---- every command: help with an example; shell completion ---------------------------------------------


def test_every_command_help_has_an_example(cli):
    group = typer.main.get_command(app)
    assert {"show", "diff"} <= set(group.commands)
    r = cli("--help")
    assert r.exit_code == 0 and "Example:" in r.stdout
    for name in sorted(group.commands):
        r = cli(name, "--help")
        assert r.exit_code == 0, (name, r.output)
        assert "Example:" in r.stdout, f"`distplan {name} --help` has no 'Example:' line"


def test_shell_completion_script_and_completions():
    """The installed `distplan` prints a bash completion script, and completing with it works."""
    exe = shutil.which("distplan")
    if exe is None:
        pytest.skip("the distplan entry point is not installed (pip install -e .)")
    # with shell detection off (typer's own switch), --show-completion takes the shell by name, so the test
    # does not depend on which process launched pytest (CI runs it from make, not an interactive shell)
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    script = subprocess.run([exe, "--show-completion", "bash"], capture_output=True, text=True, timeout=60, env=env)
    assert script.returncode == 0, script.stderr
    assert "_DISTPLAN_COMPLETE=complete_bash" in script.stdout and "complete -o default -F" in script.stdout

    def complete(words: str, cword: int) -> list[str]:
        env = {**os.environ, "_DISTPLAN_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        r = subprocess.run([exe], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    assert "show" in complete("distplan sh", 1)
    assert {"diff", "estimate", "show"} <= set(complete("distplan ", 1))
    assert "--timeline" in complete("distplan show plan.yaml --ti", 3)
