"""Bad input on the command line: every option of every command with zero, negative, huge and
non-numeric values, and for file options a missing file, a folder and binary garbage. Each answer is exit
code 0 or 2, no exception, at most one line on stderr when it is 2, and no file left behind when it fails.

The options are enumerated from the click command objects, so a new option joins the catalogue by itself.
Expensive work is replaced where a valid value would start it: the solver's search and ILP return one
real solve's results, the profiler's measurement raises MEASURING (so `profile` checks come first), and `run`'s
workers raise SPAWNING instead of starting (so every check of `run` comes before its workers).
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

import profilers.run
from planner.cli import app
from planner.core.errors import DistplanError

HUGE = str(10**18)
GENERIC = ("0", "-1", HUGE, "abc", "")
FLOATS = ("nan", "inf")
INPUT_FILES = {"model", "cluster", "profile", "plan", "a", "b", "base", "measured", "calibration", "data"}  # files read
OUTPUT_SUFFIX = {("estimate", "output"): ".yaml", ("solve", "output"): ".yaml", ("profile", "output"): ".yaml",
                 ("solve", "report"): ".html", ("solve", "candidates"): ".csv", ("show", "report"): ".html",
                 ("show", "timeline"): ".png",
                 ("show", "memory_chart"): ".png", ("emit", "output"): "", ("run", "output"): ".yaml",
                 ("validate", "output"): ".md"}
# options whose valid values may fail the command's check (exit 1): validate's limits on the errors
CHECKS = {("validate", "max_mean_error"), ("validate", "max_row_error")}
MEASURING = "measurement started"
SPAWNING = "workers would start here"
RUN_BOUNDED = ("steps", "warmup", "timeout", "seed", "nproc")  # run's options with an upper bound
SOLVE = importlib.import_module("solvers.solve")  # the module (the package exports its function `solve`)

COMMAND = typer.main.get_command(app)
BASE = {  # the cheapest valid invocation of each command, as (parameter, tokens) pairs
    "estimate": [("model", ["-m", "gpt2"]), ("gpus", ["-n", "2"])],
    "solve": [("model", ["-m", "gpt2"]), ("gpus", ["-n", "2"]), ("output", ["-o", "plan.yaml"])],
    "show": [("plan", ["{plan}"])],
    "diff": [("a", ["{plan}"]), ("b", ["{plan}"])],
    "profile": [("model", ["-m", "gpt2"]), ("output", ["-o", "profile.yaml"])],
    "emit": [("plan", ["{plan}"]), ("target", ["-t", "torchrun"]), ("output", ["-o", "emitted"])],
    "run": [("plan", ["{plan}"]), ("output", ["-o", "report.yaml"])],
    "validate": [("suite", ["--suite", "zero_memory"])],
}


def _kind(param) -> str:
    return str(param.bare_type()) if callable(getattr(param, "bare_type", None)) else str(param.type.name)


def _values(command: str, param) -> list[str | None]:
    """The bad (and borderline) values tried for one parameter; None: a flag given alone."""
    kind = _kind(param)
    if getattr(param, "is_flag", False) or kind == "bool":
        return [None, "0", "abc"]
    values = list(GENERIC) + (list(FLOATS) if kind == "float" else [])
    if param.name in INPUT_FILES:
        values += ["{fx}/missing.yaml", "{fx}/folder.yaml", "{fx}/garbage.yaml", "{fx}/garbage.json", "{fx}/empty.yaml"]
    suffix = OUTPUT_SUFFIX.get((command, param.name))
    if suffix is not None:
        values += [f"{{fx}}/outfolder{suffix}", f"{{fx}}/afile/out{suffix}", f"new/out{suffix}"]
    return values


def _cases():
    for command, base in BASE.items():
        for param in COMMAND.commands[command].params:
            for value in _values(command, param):
                yield pytest.param(command, param.name, value, id=f"{command}-{param.name}-{value}")


def _argv(command: str, name: str, value: str | None) -> list[str]:
    param = next(p for p in COMMAND.commands[command].params if p.name == name)
    opts = [o for o in param.opts if o.startswith("--")] or [o for o in param.opts if o.startswith("-")]
    argv = [command]
    replaced = False
    for pname, tokens in BASE[command]:
        if pname == name and not opts:  # a positional argument: replaced where it stands
            argv.append(value)
            replaced = True
        elif pname != name:
            argv += tokens
    if not replaced:
        flag = getattr(param, "is_flag", False)
        argv += [opts[0]] if value is None else [f"{opts[0]}={value}"] if flag else [opts[0], value]
    return argv


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """A folder of inputs (a valid plan, a folder, garbage, an empty file) the commands read, never write."""
    fx = tmp_path_factory.mktemp("fixtures")
    runner = CliRunner()
    r = runner.invoke(app, ["estimate", "-m", "gpt2", "-n", "2", "-o", str(fx / "plan.yaml"), "--format", "json"])
    assert r.exit_code == 0, r.output
    (fx / "folder.yaml").mkdir()
    for suffix in set(OUTPUT_SUFFIX.values()):
        (fx / f"outfolder{suffix}").mkdir()
    (fx / "afile").write_text("a file, not a folder\n")
    (fx / "garbage.yaml").write_bytes(bytes(range(256)) * 8)
    (fx / "garbage.json").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(128, 256)))
    (fx / "empty.yaml").write_text("")
    return fx


@pytest.fixture(scope="module")
def solved():
    """One real solve of gpt2 on 2 GPUs: the search outcome and the ILP's sharding, replayed by the catalogue."""
    captured = {}
    real_search, real_shard = SOLVE.run_search, SOLVE.shard_layers

    def search(*args, **kwargs):
        captured["search"] = real_search(*args, **kwargs)
        return captured["search"]

    def shard(*args, **kwargs):
        captured["shard"] = real_shard(*args, **kwargs)
        return captured["shard"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SOLVE, "run_search", search)
        mp.setattr(SOLVE, "shard_layers", shard)
        from planner.core.cluster import load_cluster
        from planner.core.model import load_model

        SOLVE.solve(load_model("gpt2"), load_cluster("dgx-h100-80gb"), 2)
    return captured


@pytest.fixture
def cheap(monkeypatch, solved):
    """The solver replays `solved`; the profiler stops where it would start measuring."""
    monkeypatch.setattr(SOLVE, "run_search", lambda *a, **k: solved["search"])
    monkeypatch.setattr(SOLVE, "shard_layers", lambda *a, **k: solved["shard"])

    def measuring(*args, **kwargs):
        raise DistplanError(MEASURING)

    monkeypatch.setattr(profilers.run.comm, "measure_spawned", measuring)
    monkeypatch.setattr(profilers.run.facts, "device_facts", measuring)

    def spawning(*args, **kwargs):
        raise DistplanError(SPAWNING)

    import planner.runner.launch

    monkeypatch.setattr(planner.runner.launch, "_spawn", spawning)


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _check(result, cwd: Path, fixtures_before: set[str], fx: Path, checks: bool = False) -> None:
    err = result.stderr
    assert result.exit_code in ((0, 1, 2) if checks else (0, 2)), f"exit {result.exit_code}: {result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) <= 1, err
        assert _listing(cwd) == set(), f"left behind: {_listing(cwd)}"
    assert _listing(fx) == fixtures_before, f"changed fixtures: {_listing(fx) ^ fixtures_before}"


@pytest.mark.parametrize("command,name,value", list(_cases()))
def test_bad_value(command, name, value, fixtures, cheap, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _listing(fixtures)
    argv = [a.format(fx=fixtures, plan=fixtures / "plan.yaml") if a is not None else a
            for a in _argv(command, name, None if value is None else value)]
    result = CliRunner().invoke(app, argv)
    _check(result, tmp_path, before, fixtures, checks=(command, name) in CHECKS)
    if result.exit_code == 1:  # a limit exceeded says so in one line
        assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    if command == "profile" and value in ("0", "-1", HUGE) and _kind(next(
            p for p in COMMAND.commands["profile"].params if p.name == name)) == "int":
        assert MEASURING not in result.stderr, f"profile {name}={value} reached the measurement"
    run_kind = _kind(next(p for p in COMMAND.commands["run"].params if p.name == name)) if command == "run" else ""
    if run_kind in ("int", "float") and (value in ("-1", "nan", "inf") or value == HUGE and name in RUN_BOUNDED):
        assert SPAWNING not in result.stderr, f"run {name}={value} reached its workers"


def test_catalogue_covers_every_command():
    assert set(BASE) == set(COMMAND.commands)
    covered = {(c, n) for c, n, _ in (p.values for p in _cases())}
    assert covered == {(c, p.name) for c in BASE for p in COMMAND.commands[c].params}


# ---- the cases of issue 22 one by one ------------------------------------------------------------------


def one_line(result, needle: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("args,needle", [
    (["estimate", "-m", "gpt2", "-n", "abc"], "error: --gpus 'abc' is not an integer"),
    (["estimate", "-m", "gpt2", "--gpus=3x"], "--gpus '3x' is not an integer"),
    (["estimate", "-m", "gpt2", "-n3x"], "--gpus '3x' is not an integer"),
    (["solve", "-m", "gpt2", "-n", "2", "--time-limit", "soon"], "--time-limit 'soon' is not a number"),
    (["estimate", "-m", "gpt2"], "missing option --gpus / -n (Total number of GPUs.)"),
    (["show"], "missing argument PLAN"),
    (["estimate", "-m", "gpt2", "-n", "2", "--gpu", "2"], "no such option --gpu; did you mean --gpus"),
    (["estimate", "-m", "gpt2", "-n"], "option '-n' requires an argument"),
    (["estimate", "-m", "gpt2", "-n", "2", "--te"], "no such option --te"),
    (["solve", "-m", "gpt2", "-n", "2", "--te=yes"], "option '--te' does not take a value"),
    (["plan"], "no such command 'plan'; commands: estimate, solve"),
    (["--verbose"], "no such option --verbose"),
    (["show", "a.yaml", "b.yaml"], "got unexpected extra argument(s) (b.yaml)"),
])
def test_usage_errors_are_one_line_naming_the_value(cli, args, needle):
    one_line(cli(*args), needle)


def test_help_and_no_arguments_still_print_help(cli):
    assert cli("estimate", "--help").exit_code == 0
    r = cli()
    assert "estimate" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("args,needle", [
    (["estimate", "-m", "gpt2", "-n", "2", "--seq-len", "0"], "--seq-len must be a positive integer"),
    (["estimate", "-m", "gpt2", "-n", "2", "--global-batch", "0"], "--global-batch must be a positive integer"),
    (["estimate", "-m", "llama-3-8b", "-n", "8", "--seq-len", HUGE], "--seq-len must be a positive integer"),
    (["estimate", "-m", "gpt2", "-n", "2", "--dp", "0"], "--dp must be a positive integer"),
    (["solve", "-m", "gpt2", "-n", "2", "--seq-len", "0"], "--seq-len must be a positive integer"),
    (["solve", "-m", "gpt2", "-n", "2", "--global-batch", HUGE], "--global-batch must be a positive integer"),
    (["solve", "-m", "gpt2", "-n", "2", "--top-k", HUGE], "--top-k must be >= 0 and at most 100"),
    (["solve", "-m", "gpt2", "-n", "2", "--time-limit", "inf"], "--time-limit must be positive seconds"),
    (["solve", "-m", "gpt2", "-n", "2", "--time-limit", "nan"], "--time-limit must be positive seconds"),
])
def test_zero_and_huge_values_are_refused(cli, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    one_line(cli(*args), needle)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("gpus", [10**12, 10**18, 2**20 + 8])
def test_a_huge_gpu_count_answers_at_once(cli, gpus):
    start = time.monotonic()
    for command in ("solve", "estimate"):
        one_line(cli(command, "-m", "gpt2", "-n", gpus), "--gpus must be a positive integer of at most 1048576")
    assert time.monotonic() - start < 5


def test_divisors_take_square_root_steps():
    from solvers.search import _divisors

    for n in (1, 2, 12, 36, 97, 1024, 720):
        assert _divisors(n) == [d for d in range(1, n + 1) if n % d == 0]
    start = time.monotonic()
    assert len(_divisors(10**12)) == 169
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("args,needle", [
    (["--seq-len", "0"], "--seq-len must be a positive integer"),
    (["--seq-len", HUGE], "--seq-len must be a positive integer"),
    (["--gpus-per-node", HUGE], "--gpus-per-node must be >= 1 and at most 1024"),
    (["--stack-blocks", HUGE], "--stack-blocks"),
    (["--micro-batches", f"1,{HUGE}"], "micro-batches must be >= 1"),
    (["-o", "{blocker}/profile.yaml"], "cannot write --output"),
    (["-o", "{folder}"], "cannot write --output"),
])
def test_profile_refuses_before_measuring(cli, cheap, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file")
    (tmp_path / "folder").mkdir()
    args = [a.format(blocker=tmp_path / "blocker", folder=tmp_path / "folder") for a in args]
    line = one_line(cli("profile", "-m", "gpt2", *(["-o", "p.yaml"] if "-o" not in args else []), *args), needle)
    assert MEASURING not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "folder"]


def test_solve_writes_plan_and_report_together_or_neither(cli, cheap, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file")
    one_line(cli("solve", "-m", "gpt2", "-n", "2", "-o", "plan.yaml", "--report", "blocker/report.html"),
             "cannot write --report")
    one_line(cli("solve", "-m", "gpt2", "-n", "2", "-o", "x.html", "--report", "x.html"), "name the same file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]
    r = cli("solve", "-m", "gpt2", "-n", "2", "-o", "plan.yaml", "--report", "out/report.html")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "plan.yaml").exists() and (tmp_path / "out" / "report.html").exists()


def test_solve_leaves_nothing_when_the_report_cannot_be_written(cli, cheap, tmp_path, monkeypatch):
    """A failure while writing (after the checks) leaves neither file: both are staged, then renamed."""
    import planner.core.fileio

    monkeypatch.chdir(tmp_path)
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(".html"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(planner.core.fileio.os, "replace", replace)
    one_line(cli("solve", "-m", "gpt2", "-n", "2", "-o", "plan.yaml", "--report", "report.html"), "cannot write")
    assert not list(tmp_path.iterdir())
    (tmp_path / "plan.yaml").write_text("the plan before\n")
    one_line(cli("solve", "-m", "gpt2", "-n", "2", "-o", "plan.yaml", "--report", "report.html"), "cannot write")
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]
    assert (tmp_path / "plan.yaml").read_text() == "the plan before\n"


def test_emit_refuses_an_unwritable_folder_before_emitting(cli, fixtures, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file")
    one_line(cli("emit", fixtures / "plan.yaml", "-t", "torchrun", "-o", "blocker/out"), "cannot write --output")
    one_line(cli("emit", fixtures / "plan.yaml", "-t", "torchrun", "-o", "blocker", "--force"), "is not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_markup_in_user_input_is_printed_not_read(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line(cli("estimate", "-m", "[/]", "-n", "2"), "unknown model '[/]'")
    one_line(cli("estimate", "-m", "gpt2", "-n", "2", "--schedule", "[bold]x[/]"), "[bold]x[/]")
    spec = yaml.safe_load(Path(__file__).parents[2].joinpath("configs", "models", "gpt2.yaml").read_text())
    (tmp_path / "[x].yaml").write_text(yaml.safe_dump(spec))
    one_line(cli("estimate", "-m", "[x].yaml", "-n", "2"), "must be a name")
    r = cli("estimate", "-m", "gpt2", "-n", "2", "-o", "[red]plan[/].yaml")
    assert r.exit_code == 0 and "wrote [red]plan[/].yaml" in r.stderr
