"""`distplan validate` and planner.validate: every published row is predicted, the report's numbers come from the
rows it prints, and today's accuracy holds as a regression bar (SC'21 Table 1: mean |error| <= 5%, every row <= 10%)."""

import json
import math
import re
import statistics

import pytest

from planner.core.published import published, torchtitan_performance
from planner.cost.predict import predict
from planner.validate import SUITES, run_validation, to_json, to_markdown


@pytest.fixture(scope="module")
def report():
    return run_validation()


def _published_rows() -> dict[str, int]:
    ref = published()
    return {"sc21_table1": len(ref["megatron_lm_sc21_table1"]["rows"]),
            "sc21_table2": len(ref["megatron_lm_sc21_table2"]["rows"]),
            "zero_memory": len(ref["zero_model_state_memory"]["gb_per_gpu"]),
            "torchtitan": sum(len(g["rows"]) for g in ref["torchtitan_performance"]["groups"])}


def test_every_row_of_every_suite_is_predicted(report):
    assert [s.name for s in report.suites] == list(SUITES)
    assert {s.name: len(s.rows) for s in report.suites} == _published_rows()
    for suite, row in report.rows:
        assert math.isfinite(row.predicted) and row.predicted > 0, (suite.name, row.case)
        assert row.error == pytest.approx(row.predicted / row.published - 1)


def test_sc21_table1_regression_bar(report):
    table1 = next(s for s in report.suites if s.name == "sc21_table1")
    assert table1.mean_abs_error <= 0.05
    assert table1.max_abs_error <= 0.10


def test_zero_memory_regression_bar(report):
    zero = next(s for s in report.suites if s.name == "zero_memory")
    assert zero.max_abs_error <= 0.02  # ZeRO's Figure 1 numbers are rounded to 3 digits; 1.3% today


def test_torchtitan_rows_are_the_cost_models_prediction(report):
    """A torchtitan row is predict()'s tokens/s per GPU for that FSDP2 configuration, nothing stored."""
    rows = next(s for s in report.suites if s.name == "torchtitan").rows
    for case, row in zip(torchtitan_performance(), rows):
        pred = predict(case.model, case.cluster, case.config, engine="torch")
        assert row.predicted == pred.tokens_per_s / case.config.gpus
        assert row.published == case.tokens_per_s_per_gpu
    full = [c for c in torchtitan_performance() if c.config.recompute == "full"]
    assert full and all(c.config.zero_stage == 3 and c.config.dp == c.config.gpus for c in full)


def test_the_summary_is_computed_from_the_printed_rows(report):
    text = to_markdown(report)
    printed = [float(m) for m in re.findall(r"^\|[^|]+\|[^|]+\|[^|]+\| ([+-]\d+\.\d)% \|", text, flags=re.M)]
    assert len(printed) == len(report.rows)
    overall = re.search(r"^\| overall \| (\d+) \| (\d+\.\d)% \| (\d+\.\d)% \|$", text, flags=re.M)
    assert int(overall.group(1)) == len(printed)
    assert float(overall.group(2)) == pytest.approx(statistics.mean(abs(e) for e in printed), abs=0.06)
    assert float(overall.group(3)) == pytest.approx(max(abs(e) for e in printed), abs=0.06)
    data = to_json(report)
    errors = [r["error"] for s in data["suites"] for r in s["rows"]]
    assert data["overall"]["mean_abs_error"] == pytest.approx(statistics.mean(abs(e) for e in errors), rel=1e-12)
    assert data["overall"]["max_abs_error"] == max(abs(e) for e in errors)
    for s in data["suites"]:
        assert s["mean_abs_error"] == pytest.approx(statistics.mean(abs(r["error"]) for r in s["rows"]), rel=1e-12)


# ---- the command ------------------------------------------------------------------------------------


def test_validate_prints_the_table_and_exits_0(cli):
    r = cli("validate")
    assert r.exit_code == 0, r.output
    for name in SUITES:
        assert f"## {name}:" in r.stdout and f"| {name} |" in r.stdout
    assert "| overall | " in r.stdout and "| ZeRO-3, 1536 GPUs, micro-batch 1 | 44 |" in r.stdout


def test_max_row_error_exceeded_exits_1_naming_the_worst_row(cli):
    r = cli("validate", "--max-row-error", "0.10")
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--max-row-error 10%" in lines[0], r.stderr
    assert "worst sc21_table2 'ZeRO-3, 1536 GPUs, micro-batch 1'" in lines[0]


def test_limits_met_exit_0(cli, tmp_path):
    out = tmp_path / "report.json"
    r = cli("validate", "--suite", "sc21_table1,zero_memory", "--max-mean-error", "0.05", "--max-row-error", "0.10",
            "-o", out)
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert [s["name"] for s in data["suites"]] == ["sc21_table1", "zero_memory"]
    assert data == json.loads(json.dumps(to_json(run_validation(("sc21_table1", "zero_memory")))))


def test_max_mean_error_names_the_suites_over_it(cli):
    r = cli("validate", "--suite", "sc21_table1,sc21_table2", "--max-mean-error", "0.05")
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "sc21_table2" in lines[0] and "sc21_table1" not in lines[0], r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--suite", "nonsense"], "--suite 'nonsense' is unknown; valid: sc21_table1, sc21_table2, zero_memory, torchtitan"),
    (["--max-row-error", "-0.1"], "--max-row-error must be a fraction >= 0"),
    (["--max-mean-error", "nan"], "--max-mean-error must be a fraction >= 0"),
    (["-o", "report.txt"], "--output 'report.txt' must end in .md or .json"),
])
def test_bad_input_is_one_line_and_exit_2(cli, args, needle):
    r = cli("validate", *args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
