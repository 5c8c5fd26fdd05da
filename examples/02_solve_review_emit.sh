#!/usr/bin/env bash
# Solve, review, compare, emit.
set -euo pipefail
out=${OUT:-out/examples}; mkdir -p "$out"
distplan solve -m gpt2-xl -n 64 -o "$out/plan.yaml" --report "$out/report.html"
distplan show "$out/plan.yaml" --timeline "$out/timeline.png" --memory-chart "$out/memory.png" > /dev/null
# A baseline a practitioner might pick: DeepSpeed ZeRO-2 with micro-batch 4
distplan estimate -m gpt2-xl -n 64 --micro-batch 4 --zero 2 -o "$out/baseline.yaml" > /dev/null
distplan diff "$out/baseline.yaml" "$out/plan.yaml"
for target in deepspeed megatron torchrun slurm; do
  distplan emit "$out/plan.yaml" --target "$target" -o "$out/emit-$target" --force --check > /dev/null
  echo "emitted $out/emit-$target"
done
