"""`distplan run` leaves nothing behind when it is stopped: SIGTERM, SIGINT or SIGHUP to the launcher stops every
worker's process group (SIGTERM, then SIGKILL) and removes the run's folder, and the run exits 128 + the signal;
and in a log (stderr not a terminal) it prints timestamped progress lines instead of a bar.

Fake workers (`python -c`, no torch) stand in for the real ones where the launcher is what is tested; the SIGTERM
test starts the real `python -m planner.cli run` with real workers, as a scheduler's cancel would meet it.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from planner.core.plan import save_plan
from planner.runner import launch
from planner.runner.engine_api import RankResult, RunOptions
from planner.runner.report import rank_result_to_dict
from tests.runner.test_runner import make

ROOT = Path(__file__).resolve().parents[2]


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state) of every process, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        found[int(entry.name)] = (int(ppid), int(pgrp), state)
    return found


def _survivors(pids) -> list[int]:
    """Processes still running whose pid, or process group, is one of `pids` (a zombie has stopped: an orphaned
    grandchild waits as one for an init that may never reap it, as in containers)."""
    pids = set(pids)
    return sorted(p for p, (_, pgrp, state) in _processes().items() if (p in pids or pgrp in pids) and state != "Z")


def _wait_for(condition, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        got = condition()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout_s} s")


def _kill_groups(pids) -> None:
    """Test clean-up: whatever a failed assertion left running."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_sigterm_to_distplan_run_stops_every_worker_and_exits_143(tmp_path):
    save_plan(make(dp=2), tmp_path / "plan.yaml")
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "planner.cli", "run", str(tmp_path / "plan.yaml"), "--steps",
                             "100000", "--timeout", "300", "-o", str(tmp_path / "report.yaml")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        def two_workers():
            kids = [p for p, (ppid, _, _) in _processes().items() if ppid == proc.pid]
            return kids if len(kids) == 2 else None

        workers = _wait_for(two_workers, 60, "two workers")
        assert len(list(tmp_path.glob("distplan-run-*"))) == 1
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        _kill_groups(workers)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "stopped by SIGTERM: 2 workers stopped, no report written", stderr
    assert "Traceback" not in stderr
    assert _survivors(workers) == []
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not list(tmp_path.glob("distplan-run-*")) and not (tmp_path / "report.yaml").exists()


# a worker that ignores SIGTERM (only SIGKILL stops it) and starts a grandchild in its own process group
STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(os.path.join(sys.argv[1], os.environ["RANK"]), "w").write(f"{os.getpid()} {child.pid}")
open(os.environ["DISTPLAN_PROGRESS_FILE"], "w").write("0")
time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_a_signal_kills_each_workers_group_restores_the_handlers_and_raises(tmp_path, monkeypatch, sig):
    save_plan(make(dp=2), tmp_path / "plan.yaml")
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(launch, "KILL_WAIT_S", 0.5)
    monkeypatch.setattr(launch, "worker_argv", lambda plan, opts, result_dir=None: ["-c", STUBBORN, str(pid_dir)])
    before = signal.getsignal(sig)

    def signal_when_started():
        _wait_for(lambda: len(list(tmp_path.glob("distplan-run-*/rank*.progress"))) == 2, 30, "progress files")
        os.kill(os.getpid(), sig)

    threading.Thread(target=signal_when_started, daemon=True).start()
    pids = []
    try:
        with pytest.raises(launch.RunStopped) as stopped:
            launch.run_plan(tmp_path / "plan.yaml", RunOptions(steps=5, warmup=0, timeout_s=60),
                            out_path=tmp_path / "report.yaml")
    finally:
        pids = [int(p) for f in pid_dir.iterdir() for p in f.read_text().split()]
        _kill_groups(pids)
    assert stopped.value.signum == sig and stopped.value.exit_code == 128 + sig and stopped.value.workers == 2
    assert signal.getsignal(sig) is before
    assert len(pids) == 4  # two workers, a grandchild each
    assert _survivors(pids[0::2]) == []  # each worker's group: the grandchild went with it
    assert not list(tmp_path.glob("distplan-run-*")) and not (tmp_path / "report.yaml").exists()


def test_an_ignored_signal_stays_ignored():
    """nohup's SIGHUP: a run started to outlive its terminal is not stopped by it."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with launch._StopSignals() as stop:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._record
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
            stop.check()  # nothing recorded: no RunStopped
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)


# a worker that runs STEPS steps (a progress file each), then writes its result and exits 0
QUICK = """
import json, os, sys, time
rank, result_dir, steps, result = os.environ["RANK"], sys.argv[1], int(sys.argv[2]), sys.argv[3]
for k in range(steps):
    open(os.environ["DISTPLAN_PROGRESS_FILE"], "w").write(str(k))
    time.sleep(0.4 if k < steps - 1 else 1.0)
tmp = os.path.join(result_dir, f"rank{rank}.json.tmp")
open(tmp, "w").write(result.replace("RANK", rank))
os.replace(tmp, os.path.join(result_dir, f"rank{rank}.json"))
"""


def test_progress_lines_when_stderr_is_not_a_terminal(cli, tmp_path, monkeypatch):
    save_plan(make(dp=2), tmp_path / "plan.yaml")
    result = rank_result_to_dict(RankResult(rank=0, pp_rank=0, step_times_s=(0.1, 0.1), losses=(4.8, 4.7, 4.6),
                                            peak_allocated_bytes=0, peak_reserved_bytes=0, device="cpu", dtype="fp32"))
    text = json.dumps(result).replace('"rank": 0', '"rank": RANK')
    monkeypatch.setattr(launch, "worker_argv", lambda plan, opts, result_dir=None:
                        ["-c", QUICK, str(result_dir), str(opts.warmup + opts.steps), text])
    r = cli("run", tmp_path / "plan.yaml", "--steps", 2, "--warmup", 1, "--tolerance", 1e9, "-o", tmp_path / "r.yaml")
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("[")]
    pattern = re.compile(r"\[ *(\d+\.\d) s\] (\d)/3 steps, running plan\.yaml \(torch\)")
    parsed = [pattern.fullmatch(ln) for ln in lines]
    assert lines and all(parsed), r.stderr
    done = [int(m.group(2)) for m in parsed]
    seconds = [float(m.group(1)) for m in parsed]
    assert done[0] == 0 and done[-1] == 2 and done == sorted(set(done)), r.stderr  # one line per step begun
    assert seconds == sorted(seconds)
    assert (tmp_path / "r.yaml").exists()
