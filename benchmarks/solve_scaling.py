"""How long `distplan solve` takes, from 64 to 16384 GPUs (targets on the 2-core dev machine in the table).

Each case runs `solvers.solve` in a fresh Python process (so the one-off torch warm-up of the operator
tracer is counted), on the default cluster preset dgx-h100-80gb with the model's default batch and
sequence, and reports the solve time split into outer search + stage DP and the intra-op ILP
(tracing included), plus the whole process with imports. Writes benchmarks/results/solve_scaling.md.
Usage: python3 benchmarks/solve_scaling.py
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "solve_scaling.md"  # the report written
# (model, GPUs, target solve seconds) timed
CASES = [("gpt2-xl", 64, 5.0), ("gpt3-175b", 1024, 10.0), ("llama-3.1-405b", 16384, 60.0), ("mixtral-8x7b", 64, 10.0)]


def one(model: str, gpus: int) -> dict:
    """Runs in the child process: solve once, report the timings and the plan."""
    from planner.core.cluster import load_cluster
    from planner.core.model import load_model
    from solvers import solve
    from solvers.explain import describe

    spec, cluster = load_model(model), load_cluster("dgx-h100-80gb")
    t0 = time.perf_counter()
    result = solve(spec, cluster, gpus)
    seconds = time.perf_counter() - t0
    s, p = result.stats, result.prediction
    return {"solve_s": seconds, "search_s": s["search_seconds"], "ilp_s": s["ilp_seconds"], "candidates": s["candidates"],
            "evaluated": s["evaluated_with_stage_dp"], "plan": describe(result.plan.parallel), "step_s": p.step_time_s,
            "mfu": p.mfu}


def main() -> None:
    if len(sys.argv) == 3:
        print(json.dumps(one(sys.argv[1], int(sys.argv[2]))))
        return
    rows = ["| model | GPUs | solve s | search + stage DP s | ILP s (with tracing) | process s | target s | met | "
            "configurations (through the DP) | plan | step s | MFU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, gpus, target in CASES:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, model, str(gpus)], check=True, capture_output=True, text=True)
        process = time.perf_counter() - t0
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(f"| {model} | {gpus} | {r['solve_s']:.2f} | {r['search_s']:.2f} | {r['ilp_s']:.2f} | {process:.2f} | "
                    f"{target:g} | {'yes' if r['solve_s'] < target else 'NO'} | {r['candidates']} ({r['evaluated']}) | "
                    f"{r['plan']} | {r['step_s']:.3f} | {100 * r['mfu']:.1f}% |")
        print(rows[-1], flush=True)
    load = os.getloadavg()
    head = ["# solve scaling", "",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (the shared 2-core dev box), "
            f"Python {platform.python_version()}, {platform.system()}; date {datetime.date.today()}; "
            f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other jobs share the cores).", "",
            "`solvers.solve` on dgx-h100-80gb with each model's default global batch and sequence; one fresh process per "
            "case. solve s = search + stage DP + ILP (the ILP column includes tracing the layer graphs on the meta "
            "device and torch's one-off warm-up); process s adds interpreter start and imports.", ""]
    text = "\n".join(head + rows) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
