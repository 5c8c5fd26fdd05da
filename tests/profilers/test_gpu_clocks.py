"""profilers/gpu_clocks.py: the GPUs' clocks and power beside a run, from nvidia-smi's CSV; checked against
hand-made samples and a stand-in nvidia-smi on the PATH (CI has no GPU)."""

import os
import stat
import time

import pytest

from profilers import gpu_clocks

# nvidia-smi --query-gpu=index,clocks.sm,power.draw,utilization.gpu --format=csv,noheader,nounits, as on 4xH200
SAMPLES = """0, 345, 80.50, 0
1, 345, 79.03, 0
0, 1755, 601.20, 100
1, 1740, 611.00, 99
0, 1980, 420.00, 40
0, 1750, 598.00, 100
1, [N/A], [N/A], [N/A]
1, 1760, 605.00, 97
garbage line
"""


def test_busy_samples_give_median_clock_and_power_per_gpu():
    got = gpu_clocks.summarize(SAMPLES)
    assert got == {0: {"sm_mhz": 1752.5, "power_w": pytest.approx(599.6), "samples": 2},
                   1: {"sm_mhz": 1750.0, "power_w": 608.0, "samples": 2}}
    assert gpu_clocks.summarize(SAMPLES, gpus=1).keys() == {0}
    note = gpu_clocks.note(got)
    assert note.startswith("while busy (nvidia-smi every 500 ms, median): GPU 0 1752 MHz, 600 W (2 samples); GPU 1 1750")
    assert gpu_clocks.note({}) is None and gpu_clocks.summarize("0, 345, 80, 0\n") == {}


def test_sampler_runs_nvidia_smi_beside_the_run_and_stops(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\nwhile true; do echo '0, 1700, 650.5, 100'; sleep 0.05; done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "clocks.csv"
    proc = gpu_clocks.start(out)
    assert proc is not None
    time.sleep(0.5)
    gpu_clocks.stop(proc)
    assert proc.poll() is not None
    args = (fake.parent / "args").read_text().split()
    assert args == ["--query-gpu=index,clocks.sm,power.draw,utilization.gpu", "--format=csv,noheader,nounits", "-lms=500"]
    got = gpu_clocks.summarize(out.read_text())
    assert got[0]["sm_mhz"] == 1700 and got[0]["power_w"] == 650.5 and got[0]["samples"] >= 2
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpu_clocks.start(tmp_path / "none.csv") is None  # no nvidia-smi: no sampler, the run goes on
    gpu_clocks.stop(None)
