#!/usr/bin/env bash
# The cost model on configurations fixed by hand.
set -euo pipefail
out=${OUT:-out/examples}; mkdir -p "$out"
# GPT-3 175B as Megatron-LM SC'21 trained it on 1024 A100s (tp 8, pp 16, full recompute, no flash attention)
distplan estimate -m gpt3-175b -c dgx-a100-80gb -n 1024 --tp 8 --pp 16 --micro-batch 1 --global-batch 1536 \
    --recompute full --no-flash-attention --no-overlap-grad-reduce
# Llama-3-70B on 64 H100s with sequence parallelism, ZeRO-1, selective recompute and an uneven split
distplan estimate -m llama-3-70b -n 64 --tp 8 --pp 4 --sequence-parallel --zero 1 --recompute selective \
    --layer-split 19,21,21,19 --format json > "$out/llama-3-70b.json"
python3 -c "import json; d = json.load(open('$out/llama-3-70b.json')); print('llama-3-70b: step', round(d['step_time_s'], 2), 's, MFU', round(100 * d['mfu'], 1), '%, peak', round(d['peak_memory_gib'], 1), 'GiB, fits', d['fits'])"
# A hand-picked configuration written as a plan file (for emit / run / show / diff)
distplan estimate -m gpt2-xl -n 64 --micro-batch 4 --zero 2 -o "$out/gpt2-xl-zero2.yaml" > /dev/null
echo "wrote $out/gpt2-xl-zero2.yaml"
