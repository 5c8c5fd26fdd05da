"""benchmarks/pipeline_grid.py: its grid parsing, bad input (one line, exit 2), and a 2-process gloo run whose
per-operation cost comes from the profiler's own solve (profilers.pipeline.solve_action_s)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import pipeline_grid  # noqa: E402

from profilers.pipeline import solve_action_s  # noqa: E402


def test_grid_parses_and_rejects_bad_entries():
    assert pipeline_grid.parse_grid("1f1b:1:4, interleaved:8:4") == [("1f1b", 1, 4), ("interleaved", 8, 4)]
    for bad in ("gpipe:1:4", "1f1b:2:4", "interleaved:2:3", "interleaved:2", "interleaved:x:4"):
        with pytest.raises(ValueError, match="grid entry"):
            pipeline_grid.parse_grid(bad)


def test_bad_input_is_one_line_and_exit_2(capsys):
    assert pipeline_grid.main(["--grid", "1f1b:1:5"]) == 2
    assert pipeline_grid.main(["-m", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)


@pytest.mark.slow
def test_two_processes_measure_each_shape(tmp_path):
    out = tmp_path / "grid.json"
    assert pipeline_grid.main(["-m", "gpt2", "--seq-len", "32", "--cpu", "--grid", "1f1b:1:2,interleaved:2:2",
                               "--warmup", "1", "--trials", "1", "-o", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["meta"]["device"] == "cpu" and [(r["schedule"], r["ops_per_rank"]) for r in d["rows"]] == [
        ("1f1b", 4), ("interleaved", 8)]
    for r in d["rows"]:
        assert 0 < r["host_s"] <= r["step_s"]
        assert r["action_s"] == solve_action_s(r["schedule"], r["step_s"], r["chunk_fwd_s"], r["chunk_bwd_s"], r["vpp"],
                                               r["microbatches"])
