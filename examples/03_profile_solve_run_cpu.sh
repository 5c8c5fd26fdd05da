#!/usr/bin/env bash
# The closed loop on this machine's CPU: profile -> solve -> run -> verify -> recalibrate.
set -euo pipefail
out=${OUT:-out/examples}; mkdir -p "$out"
cat > "$out/tiny-gpt.yaml" <<'YAML'
family: gpt
num_layers: 4
hidden_size: 128
num_heads: 4
vocab_size: 512
max_seq_len: 64
tie_embeddings: true
default_global_batch: 8
YAML
distplan profile -m "$out/tiny-gpt.yaml" --quick -o "$out/profile.yaml"
distplan solve -m "$out/tiny-gpt.yaml" -n 2 --profile "$out/profile.yaml" --engine torch -o "$out/tiny-plan.yaml"
# exit 1 would mean the prediction missed by more than the tolerance; the report says by how much
distplan run "$out/tiny-plan.yaml" --steps 5 --warmup 2 --check-numerics --tolerance 1.0 \
    --calibrate --profile "$out/profile.yaml" -o "$out/tiny-report.yaml" || true
distplan show "$out/tiny-plan.yaml" --measured "$out/tiny-report.yaml" --report "$out/tiny-report.html" > /dev/null
echo "see $out/tiny-report.yaml and $out/tiny-report.html"
