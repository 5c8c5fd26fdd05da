"""Predicted vs published for every published case the cost model is calibrated or checked against.

The comparison is `distplan validate`'s (planner/validate.py: SC'21 Tables 1 and 2, ZeRO's memory, torchtitan);
this harness adds the machine and date, times `distplan estimate` for gpt3-175b on 1024 GPUs end to end (target:
under 2 s on the 2-core dev machine), prints it all and writes benchmarks/results/estimate_accuracy.md.
Usage: python3 benchmarks/estimate_accuracy.py
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository, imported before any installed distplan
sys.path.insert(0, str(ROOT))

from planner.validate import run_validation, to_markdown  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "estimate_accuracy.md"  # the report written


def estimate_wall_time() -> list[str]:
    cmd = [sys.executable, "-m", "planner.cli", "estimate", "-m", "gpt3-175b", "-c", "dgx-a100-80gb", "-n", "1024",
           "--tp", "8", "--pp", "16", "--global-batch", "1536", "--recompute", "full", "--format", "json"]
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return [f"`distplan estimate` gpt3-175b on 1024 GPUs (whole process, 5 runs): median {statistics.median(times):.2f} s, "
            f"max {max(times):.2f} s (target: under 2 s)"]


def main() -> None:
    head = ["# estimate accuracy", "",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}; date {datetime.date.today()}. The tables are `distplan validate`'s; "
            "assumptions for unstated settings: configs/reference/published.yaml.", ""]
    validation = to_markdown(run_validation()).split("\n", 2)[2]  # without its title
    text = "\n".join(head + [validation.rstrip(), "", "## Speed", ""] + estimate_wall_time()) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
