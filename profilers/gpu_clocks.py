"""The GPUs' clocks and power while a run keeps them busy, sampled beside it with nvidia-smi (`distplan run`, and
`distplan profile --hardware` beside its kernels: profilers/hardware.py).

Why: a block inside a model ran 6-13% slower than the same block timed alone, and the node's 4-block stacks did not
always show it (on 4x H200 under load every GPU ran at 1730-1770 MHz and about 600 W against the H200's 1980 MHz
boost, benchmarks/results/campaign_4xh200.md). A run's report says at what clock its steps ran, so a step
time can be read against the clock its profile was measured at.

What: `distplan run` on CUDA starts `nvidia-smi --query-gpu=... -lms 500` beside its workers where nvidia-smi is
installed, and adds a note per GPU with the median SM clock and power over the samples at which the GPU was busy
(utilization at least BUSY_UTILIZATION percent): start-up and idle moments are left out.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
from pathlib import Path

QUERY = "index,clocks.sm,power.draw,utilization.gpu"  # nvidia-smi --query-gpu fields sampled
INTERVAL_MS = 500  # nvidia-smi's sampling period
BUSY_UTILIZATION = 50  # percent: a sample counts when the GPU ran kernels at least this share of its interval


def start(out_file: Path) -> subprocess.Popen | None:
    """The sampler writing CSV lines to `out_file`; None where nvidia-smi is not installed."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        with open(out_file, "w") as fh:  # the child keeps its own descriptor
            return subprocess.Popen([exe, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                                     f"-lms={INTERVAL_MS}"], stdout=fh, stderr=subprocess.DEVNULL)
    except OSError:
        return None


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()


def summarize(text: str, gpus: int | None = None) -> dict[int, dict]:
    """CSV lines "index, sm MHz, power W, utilization %" -> {gpu: {sm_mhz, power_w, samples}} over the busy samples
    (medians), for the GPUs `0..gpus-1` (all where None); lines that do not parse (e.g. [N/A]) are skipped."""
    busy: dict[int, list[tuple[float, float]]] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            gpu, mhz, watts, util = int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3])
        except ValueError:
            continue
        if util >= BUSY_UTILIZATION and (gpus is None or gpu < gpus):
            busy.setdefault(gpu, []).append((mhz, watts))
    return {g: {"sm_mhz": statistics.median(m for m, _ in s), "power_w": statistics.median(w for _, w in s),
                "samples": len(s)} for g, s in sorted(busy.items())}


def note(summary: dict[int, dict]) -> str | None:
    """The report's note, or None when no busy sample was taken."""
    if not summary:
        return None
    parts = [f"GPU {g} {s['sm_mhz']:.0f} MHz, {s['power_w']:.0f} W ({s['samples']} samples)" for g, s in summary.items()]
    return f"while busy (nvidia-smi every {INTERVAL_MS} ms, median): " + "; ".join(parts)
