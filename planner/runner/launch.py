"""The launcher behind `distplan run`: start one worker per rank, watch them, build the report.

`run_plan(plan_path, opts, ...) -> Report` does, on one node, what torchrun does: it starts the
worker once per rank, with the argv the torchrun emitter puts on its launch line (emitters.torchrun.
RUNNER_WORKER: `python -m planner.runner.worker --plan PLAN --engine ...`, the one spelling of it), with MASTER_ADDR/MASTER_PORT (a free local port), RANK, WORLD_SIZE, LOCAL_RANK,
each in its own process group. Ranks hand back results as files in a private temporary folder:
rank<r>.json (RankResult), rank<r>.error.json (a failure record), rank<r>.progress (the step it is in).

A watchdog bounds the run: when a rank exits non-zero (an exception, an OOM, SIGKILL from the
kernel's OOM killer) the others get GRACE_S to finish or fail on their own, then their process groups
are killed; when `opts.timeout_s` passes, every rank still running is killed and reported as hung.
Once every rank has written its result, the ranks get EXIT_GRACE_S to exit, then are stopped and their
results kept (a process-group teardown that does not return costs seconds, not the run).
Either way a report comes back (which rank, which step, why), it is written atomically, and the
temporary folder is removed.

While the workers run, SIGINT, SIGTERM and SIGHUP (Ctrl-C, a scheduler's cancel, `timeout`, a closed terminal)
stop the run the same way: every worker's process group is killed, the folder removed, and `RunStopped` raised
(the CLI exits 128 + the signal's number). Everything that can be refused is refused before the first worker
starts: bad option values, a plan needing more CPU ranks than this host can run, a report or profile that could
not be written at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import planner
from emitters.torchrun import RUNNER_WORKER, runner_worker_argv
from planner.core.errors import require
from planner.core.plan import Plan, load_plan
from planner.build.host import host_threads_per_rank
from planner.runner.engine_api import PROGRESS_ENV, RankResult, RunOptions
from planner.core.fileio import check_writable
from planner.cost.engines import torch_engine_fsdp
from planner.runner.checkpoint import check_options as check_checkpoint_options
from planner.runner.preflight import check_request
from planner.runner.report import Failure, Report, build_report, global_losses, rank_result_from_dict, save_report
from profilers import gpu_clocks
from planner.runner.memory_peak import ENV as MEMORY_PEAK_ENV
from planner.runner.trace import ENV as TRACE_ENV

WORKER_MODULE = RUNNER_WORKER[RUNNER_WORKER.index("-m") + 1]  # planner.runner.worker
GRACE_S = 5.0  # after the first rank fails, time the others get to finish or fail by themselves
EXIT_GRACE_S = 20.0  # ranks' time to exit once all results are in; some hung (benchmarks/results/campaign_4xh200.md)
KILL_WAIT_S = 3.0  # SIGTERM, then SIGKILL after this long
POLL_S = 0.1  # how often the launcher looks at its ranks
# a rank whose error says a peer vanished failed because another rank did (gloo, NCCL, c10d store messages)
CONSEQUENCES = ("connection closed by peer", "connection reset by peer", "remote worker", "broken pipe",
                "nccl communicator was aborted", "ncclremoteerror", "socket timeout", "failed to recv", "eof")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # signals that stop a run and its ranks

ProgressFn = Callable[[int, int], None]  # (steps begun by the slowest rank, total steps)


class RunStopped(BaseException):
    """A signal stopped the run; its workers were stopped and its folder removed. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` carries on with the next run."""

    def __init__(self, signum: int, workers: int = 0):
        self.signum, self.workers = signum, workers
        super().__init__(f"stopped by {signal.Signals(signum).name}: {workers} workers stopped, no report written")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _StopSignals:
    """While workers run: STOP_SIGNALS only record themselves; the launcher polls `check()`, which raises RunStopped,
    and its clean-up stops the workers (no worker outlives a cancelled run). Signals already ignored (nohup's SIGHUP)
    stay ignored; the previous handlers come back on exit. Off the main thread Python installs no handlers: a no-op."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def check(self, workers: int = 0) -> None:
        if self.signum is not None:
            raise RunStopped(self.signum, workers)

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_argv(plan_path: str, opts: RunOptions, result_dir: str | None = None) -> list[str]:
    """argv of one worker after the interpreter: the emitted torchrun line's, then this run's options."""
    argv = runner_worker_argv(str(plan_path))
    argv[argv.index("--engine") + 1] = opts.engine
    argv += ["--steps", str(opts.steps), "--warmup", str(opts.warmup),
             "--seed", str(opts.seed), "--dtype", opts.dtype, "--lr", repr(opts.lr), "--timeout", repr(opts.timeout_s)]
    if opts.data_path:
        argv += ["--data", str(opts.data_path), "--data-dtype", opts.data_dtype]
    if opts.checkpoint_dir:
        argv += ["--checkpoint-dir", str(Path(opts.checkpoint_dir).resolve())]
        if opts.checkpoint_every is not None:
            argv += ["--checkpoint-every", str(opts.checkpoint_every)]
        if opts.resume:
            argv += ["--resume"]
    if result_dir:
        argv += ["--result-dir", str(result_dir)]
    return argv


CUDA_ALLOC_CONF = "expandable_segments:True"  # PYTORCH_CUDA_ALLOC_CONF unless the user set it (torchtitan's default)


def _spawn(plan_path: str, opts: RunOptions, nproc: int, tmp: Path, device_type: str,
           procs: list[subprocess.Popen] | None = None, stop: _StopSignals | None = None) -> list[subprocess.Popen]:
    """Start the workers, appending each to `procs` as it starts (the caller's clean-up sees every one of them)."""
    port = _free_port()
    root = str(Path(planner.__file__).resolve().parents[1])
    threads = host_threads_per_rank(nproc)
    procs = [] if procs is None else procs
    for rank in range(nproc):
        if stop is not None:
            stop.check(len(procs))
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc), **{PROGRESS_ENV: str(tmp / f"rank{rank}.progress")},
                   PYTHONPATH=os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        if opts.trace:
            env[TRACE_ENV] = "1"
        if opts.memory_peak:
            env[MEMORY_PEAK_ENV] = "1"
        if device_type == "cpu":
            env["OMP_NUM_THREADS"] = str(threads)
        else:
            # the host's cores shared among the ranks (the user's own setting wins): each rank's OpenMP pool
            # otherwise takes every core, and the torch engine's offloaded AdamW (fused, on the host) ran 8.5 ns
            # per parameter with two such pools on a 32-core 2x H200 host where one process measured 0.23 ns
            # (gpt2-xl ZeRO-1 with offload, benchmarks/results/campaign_1xh200.md and cost_model_notes.md)
            env.setdefault("OMP_NUM_THREADS", str(threads))
            # growable segments instead of fixed blocks (torchtitan's default): on 2xH200 an FSDP2 llama-2-13b
            # run died at 124 GiB allocated with 13.5 GiB reserved but unusable; the user's own setting wins
            env.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
        log = open(tmp / f"rank{rank}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, *worker_argv(plan_path, opts, str(tmp))],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True))
        log.close()
    return procs


def _kill(procs: list[subprocess.Popen]) -> set[int]:
    """SIGTERM the process group of every still-running worker, SIGKILL after KILL_WAIT_S; returns their ranks."""
    alive = {r for r, p in enumerate(procs) if p.poll() is None}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for r in alive:
            if procs[r].poll() is None:
                try:
                    os.killpg(procs[r].pid, sig)  # the worker's own group (start_new_session): nothing else
                except ProcessLookupError:
                    pass
        end = time.monotonic() + KILL_WAIT_S
        while time.monotonic() < end and any(procs[r].poll() is None for r in alive):
            time.sleep(POLL_S)
    for r in alive:
        procs[r].wait()
    return alive


def _heartbeat(tmp: Path, rank: int) -> int:
    try:
        return int((tmp / f"rank{rank}.progress").read_text())
    except (OSError, ValueError):
        return -1


def _log_tail(tmp: Path, rank: int, lines: int = 15) -> str:
    try:
        text = (tmp / f"rank{rank}.log").read_text(errors="replace")
    except OSError:
        return ""
    keep = [ln for ln in text.splitlines() if ln.strip() and "Warning" not in ln and "warnings.warn" not in ln]
    return "\n".join(keep[-lines:])


def _watch(procs, tmp: Path, timeout_s: float, total_steps: int, on_progress: ProgressFn | None,
           stop: _StopSignals | None = None):
    """Wait for the workers; returns (primary failed ranks, ranks killed by the watchdog, timed out?, ranks stopped
    after writing their results: EXIT_GRACE_S passed since the last one was written). Raises RunStopped on a signal."""
    start, first_fail, primary, all_written = time.monotonic(), None, set(), None
    while True:
        if stop is not None:
            stop.check(len(procs))
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return primary, set(), False, set()
        now = time.monotonic()
        failed = {r for r, c in enumerate(codes) if c not in (None, 0)}
        if failed and first_fail is None:
            first_fail, primary = now, failed
        if first_fail is not None and now - first_fail > GRACE_S:
            return primary, _kill(procs), False, set()
        if first_fail is None and all_written is None and all((tmp / f"rank{r}.json").exists() for r in range(len(procs))):
            all_written = now
        if all_written is not None and now - all_written > EXIT_GRACE_S:
            return primary, set(), False, _kill(procs)
        if now - start > timeout_s:
            return primary, _kill(procs), True, set()
        if on_progress is not None:
            on_progress(max(0, min(_heartbeat(tmp, r) for r in range(len(procs)))), total_steps)
        time.sleep(POLL_S)


def _classify(procs, tmp: Path, primary: set[int], killed: set[int], timed_out: bool, timeout_s: float,
              reaped: frozenset[int] | set[int] = frozenset()):
    results: list[RankResult] = []
    failures: list[Failure] = []
    first = min(primary) if primary else None
    for rank, proc in enumerate(procs):
        code, step = proc.returncode, _heartbeat(tmp, rank)
        ok_file, err_file = tmp / f"rank{rank}.json", tmp / f"rank{rank}.error.json"
        if ok_file.exists() and (code == 0 or rank in reaped):
            results.append(rank_result_from_dict(json.loads(ok_file.read_text())))
            continue
        tail = _log_tail(tmp, rank)
        if err_file.exists():
            rec = json.loads(err_file.read_text())
            failures.append(Failure(rank, int(rec.get("step", step)), rec.get("kind", "error"), rec.get("reason", "?"),
                                    code, rank in primary or first is None, tail))
        elif rank in killed and timed_out:
            failures.append(Failure(rank, step, "timeout", f"no result within the {timeout_s:g} s timeout (hung or too slow); "
                                    "killed by the watchdog", code, True, tail))
        elif rank in killed:
            failures.append(Failure(rank, step, "terminated", f"stopped by the watchdog after rank {first} failed", code, False, tail))
        elif code is not None and (code < 0 or code == 128 + signal.SIGKILL):
            sig = signal.Signals(-code if code < 0 else code - 128)
            why = f"killed by {sig.name}" + (" (the kernel's OOM killer, or an external kill -9)" if sig == signal.SIGKILL else "")
            failures.append(Failure(rank, step, "killed", why, code, rank in primary or first is None, tail))
        elif code == 0:
            failures.append(Failure(rank, step, "missing", "exited 0 without writing its result", code, True, tail))
        else:
            last = tail.splitlines()[-1] if tail else ""
            failures.append(Failure(rank, step, "error", f"exited with code {code}: {last}", code, rank in primary or first is None, tail))
    return results, _demote_consequences(failures)


def _demote_consequences(failures: list[Failure]) -> list[Failure]:
    """Among failures seen at once, a lost-peer error is the consequence of another rank's failure, not a cause."""
    def consequence(f: Failure) -> bool:
        return f.kind == "error" and any(c in f.reason.lower() for c in CONSEQUENCES)

    if any(f.primary and not consequence(f) for f in failures):
        return [replace(f, primary=False) if f.primary and consequence(f) else f for f in failures]
    return failures


def run_plan(plan_path: str | Path, opts: RunOptions, nproc: int | None = None, out_path: str | Path | None = None,
             tolerance: float = 0.10, check_numerics: bool = False, profile_path: str | Path | None = None,
             calibrate: bool = False, on_progress: ProgressFn | None = None, calibration: str | Path | None = None,
             profile_fallback: bool = False) -> Report:
    """Run the plan for real with `opts.engine`, measure, verify against the prediction; see the module docstring."""
    import torch

    require(math.isfinite(tolerance) and tolerance > 0,
            f"--tolerance {tolerance:g} is not a relative error; valid: a finite number > 0, e.g. 0.1 for 10%")
    require(not calibrate or profile_path is not None or calibration is not None,
            "--calibrate needs --calibration FILE (or --profile PATH: then PATH's .calibration.yaml beside it)")
    require(not opts.trace or opts.engine == "torch", f"--trace profiles the torch engine's step only; engine is {opts.engine!r}")
    require(not opts.memory_peak or opts.engine == "torch",
            f"--memory-peak records the torch engine's step only; engine is {opts.engine!r}")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    require(not opts.memory_peak or device_type == "cuda",
            "--memory-peak needs CUDA (it replays the caching allocator's history); no CUDA device is visible")
    plan = load_plan(plan_path)
    from planner.runner.worker import resolve_dtype

    check_checkpoint_options(plan, replace(opts, dtype=resolve_dtype(opts.dtype, device_type)),
                             torch_engine_fsdp(plan.parallel), check_numerics)
    nproc = check_request(plan, opts, nproc, device_type, torch.cuda.device_count() if device_type == "cuda" else 0)
    opts = replace(opts, dtype=resolve_dtype(opts.dtype, device_type))
    if out_path is not None:
        require(Path(out_path).resolve() != Path(plan_path).resolve(), f"--output '{out_path}' is the plan itself; "
                "give the report another path, e.g. the default <plan>.report.yaml")
        check_writable(out_path, "--output")
    if profile_path is not None:
        require(not Path(profile_path).is_dir(), f"--profile '{profile_path}' is a folder; give a profile YAML file")
    profile, prediction, calibration, applied = _load_profile(plan, profile_path, calibrate, opts.engine, calibration,
                                                              profile_fallback)
    if calibrate:
        check_writable(calibration, "--calibration")

    start = time.monotonic()
    procs: list[subprocess.Popen] = []
    sampler, clocks = None, {}
    with _StopSignals() as stop:
        tmp = Path(tempfile.mkdtemp(prefix="distplan-run-"))
        try:
            if device_type == "cuda":  # the GPUs' clocks and power beside the run (profilers/gpu_clocks.py)
                sampler = gpu_clocks.start(tmp / "gpu_clocks.csv")
            _spawn(str(Path(plan_path).resolve()), opts, nproc, tmp, device_type, procs, stop)
            primary, killed, timed_out, reaped = _watch(procs, tmp, opts.timeout_s, opts.warmup + opts.steps,
                                                        on_progress, stop)
            results, failures = _classify(procs, tmp, primary, killed, timed_out, opts.timeout_s, reaped)
        finally:
            if sampler is not None:
                gpu_clocks.stop(sampler)
                clocks = gpu_clocks.summarize((tmp / "gpu_clocks.csv").read_text(errors="replace"))
            _kill(procs)  # no-op unless stopped by a signal or an error while they ran
            shutil.rmtree(tmp, ignore_errors=True)
        stop.check(len(procs))  # a signal during the clean-up: stop all the same

    numerics = None
    if check_numerics and not failures:
        from planner.runner.numerics import check_numerics as run_check

        if opts.engine == "megatron":  # not engine behaviour: megatron-core's reference is its own module tree
            numerics = _megatron_numerics(plan, global_losses(results), opts, on_progress)
        else:
            numerics = run_check(plan, global_losses(results), opts.seed, opts.lr, opts.dtype,
                                 "cuda:0" if device_type == "cuda" else "cpu", opts.data_path, opts.data_dtype)
    where = f"{device_type} ({torch.cuda.get_device_name(0)})" if device_type == "cuda" else device_type
    clock_note = gpu_clocks.note(clocks)
    notes = (f"launched {nproc} worker processes ({WORKER_MODULE}) on {where}",) + ((clock_note,) if clock_note else ())
    data = (f"file {opts.data_path} ({opts.data_dtype})" if opts.data_path else f"synthetic (seed {opts.seed})")
    report = build_report(plan, str(plan_path), opts.engine, device_type, opts.dtype,
                          opts.steps, opts.warmup, data, tolerance, prediction, results, failures, numerics, notes,
                          wall_time_s=time.monotonic() - start,
                          checkpoint=next((r.extra.get("checkpoint") for r in results if r.rank == 0), None))
    if calibrate and report.measured_step_time_s is not None:
        from planner.runner.calibrate import calibrate_run

        report = replace(report, calibration=calibrate_run(plan, profile, report, calibration, profile_path, applied))
    elif applied:
        report = replace(report, calibration={"applied": list(applied)})
    if out_path is not None:
        save_report(report, out_path)
    return report


def _megatron_numerics(plan: Plan, parallel_losses: tuple[float, ...], opts: RunOptions, on_progress):
    """Megatron's reference is Megatron itself on one GPU (tp = pp = dp = 1, same model, seed, data and
    micro-batching): its weights come from Megatron's own init by name, not from the torch reference's."""
    from planner.core.plan import save_plan
    from planner.runner.engines.megatron_engine import reference_plan
    from planner.runner.numerics import NUMERICS_STEPS, compare

    steps = min(len(parallel_losses), NUMERICS_STEPS)
    with tempfile.TemporaryDirectory(prefix="distplan-mg-ref-") as tmp:
        ref_path = Path(tmp) / "reference-plan.yaml"
        save_plan(reference_plan(plan), ref_path)
        ref_opts = replace(opts, warmup=0, steps=steps)
        ref = run_plan(ref_path, ref_opts, nproc=1, tolerance=1e9, on_progress=on_progress)
    return compare(parallel_losses[:steps], list(ref.losses[:steps]), opts.dtype)


def _load_profile(plan: Plan, profile_path, calibrate: bool, engine: str = "torch", calibration=None,
                  fallback: bool = False):
    """(profile, prediction to verify, calibration file, notes): the plan's own prediction without a profile or a
    calibration file, else re-predicted with the profile as it applies to the plan's model and sequence length
    (planner.estimate.job_profile: refused where it measured another shape, unless `fallback`) and the calibration
    factors of this engine, this machine's GPU, shape and profile (the torch engine runs ZeRO-1 as FSDP2: its
    measured per-block sharding overhead applies, predict.rank_timer). With `calibrate` the calibration file defaults
    to the profile's (planner.core.profile.default_calibration_path), created by the run if missing."""
    from planner.core.profile import default_calibration_path
    from planner.estimate import job_profile
    from planner.cost.predict import predict
    from planner.cost.profiled import load_profile
    from planner.runner.calibrate import machine_gpu

    require(not fallback or profile_path is not None, "--profile-fallback needs --profile PATH (the profile to fall back from)")
    if calibrate and calibration is None:
        calibration = default_calibration_path(profile_path)
    # a calibration file --calibrate has yet to create applies nothing
    existing = None if calibration is None or (calibrate and not Path(calibration).exists()) else calibration
    if profile_path is None and existing is None:
        return None, plan.prediction, calibration, ()
    profile = load_profile(profile_path) if profile_path is not None else None
    job = job_profile(profile, profile_path, plan.model, plan.parallel.seq_len, plan.cluster, engine=engine,
                      fallback=fallback, calibration=existing, gpu_name=machine_gpu(profile))
    return job.profile, predict(plan.model, plan.cluster, plan.parallel, job.profile, engine=engine).to_dict(), \
        calibration, job.notes
