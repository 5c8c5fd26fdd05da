"""The solver's plan next to the published Megatron-LM SC'21 Table 1 configuration, under the same cost model.

For every Table 1 row (GPT, vocab 51200, sequence 2048, dgx-a100-80gb, the published GPU count and
global batch) it predicts the published configuration (planner.core.published.sc21_table1: full recompute,
unfused attention, gradient reduce after backward, micro-batch 1, interleaving where the layers allow)
and runs `solvers.solve` with the same fixed settings (flash_attention=False, overlap_grad_reduce=False),
then prints both side by side. The solver's plan must be at least as fast (tests/solvers/test_search.py checks it).
Writes benchmarks/results/sc21_solver_vs_published.md. Usage: python3 benchmarks/sc21_solver_vs_published.py
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from pathlib import Path

from planner.core.cluster import load_cluster
from planner.cost.predict import predict
from planner.core.published import sc21_table1
from solvers import solve
from solvers.explain import describe

RESULTS = Path(__file__).parent / "results" / "sc21_solver_vs_published.md"  # the report written


def main() -> None:
    cluster = load_cluster("dgx-a100-80gb")
    rows = ["| model | GPUs | batch | published config | tokens/s | TFLOP/s/GPU | solver's plan | tokens/s | "
            "TFLOP/s/GPU | speed-up | solve s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    ok = True
    for case in sc21_table1():
        pub = predict(case.model, cluster, case.config)
        t0 = time.perf_counter()
        result = solve(case.model, cluster, case.gpus, global_batch=case.config.global_batch_size,
                       seq_len=case.config.seq_len, top_k=0, flash_attention=False, overlap_grad_reduce=False)
        seconds = time.perf_counter() - t0
        got = result.prediction
        ok &= got.tokens_per_s >= pub.tokens_per_s
        rows.append(f"| {case.params_billion}B | {case.gpus} | {case.config.global_batch_size} | {describe(case.config)} | "
                    f"{pub.tokens_per_s:,.0f} | {pub.model_tflops_per_gpu:.0f} | {describe(result.plan.parallel)} | "
                    f"{got.tokens_per_s:,.0f} | {got.model_tflops_per_gpu:.0f} | {got.tokens_per_s / pub.tokens_per_s:.2f}x | "
                    f"{seconds:.1f} |")
        print(rows[-1], flush=True)
    head = ["# solver vs published Megatron-LM SC'21 Table 1 configurations (same cost model)", "",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared dev box), Python "
            f"{platform.python_version()}; date {datetime.date.today()}.", "",
            "Cluster preset dgx-a100-80gb; GPT with vocab 51200 and sequence 2048; the published GPU count and global "
            "batch. Both sides use unfused attention and a gradient reduce after backward (2021 Megatron-LM); the "
            "published side also has full recompute and micro-batch 1 (configs/reference/published.yaml). Model "
            "TFLOP/s per GPU (no recompute counted) so the two compare on useful work.", ""]
    verdict = ["", f"Solver at least as fast as the published configuration in every row: {'yes' if ok else 'NO'}."]
    text = "\n".join(head + rows + verdict) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
