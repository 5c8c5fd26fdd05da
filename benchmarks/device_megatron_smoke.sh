#!/usr/bin/env bash
# Smoke runs of the megatron and deepspeed engines of `distplan run` on a 2-GPU node (2xH200: Python 3.12,
# torch 2.11 CUDA, no network). Small gpt2-xl-shaped plans (8 blocks) plus a llama-shaped one for tp=2 (GQA,
# SwiGLU, RMSNorm) and a mixtral-shaped one for ep=2, each through `python3 -m planner.cli run`.
#
# Prepare here (network): bash ../shared/tools/device-wheels.sh .whl   (megatron-core, a pure-Python DeepSpeed
# wheel, hjson, pydantic, ortools, pulp). On the device, from the repository root, with .whl carried:
#   bash benchmarks/device_megatron_smoke.sh            # every case (about 6-9 min)
#   CASES="mg_ref mg_dp2_zero1" bash benchmarks/device_megatron_smoke.sh   # a subset
#   CASES="mg_ref mg_llama_ref ds_1gpu" ...                                  # what one GPU can run
# Writes to OUT (default out/): summary.txt (one line per case: exit code, wall time, losses, numerics)
# and smoke.tar.gz (the plans, every report YAML and every log).
#
# Numerics: the deepspeed cases use --check-numerics (the torch single-process reference: same weights).
# The megatron engine draws its own weights by Megatron parameter name, so its cases are compared with
# the single-process megatron runs mg_ref / mg_llama_ref (tp = pp = dp = 1, same batches) at the end;
# bf16 tolerance as planner/runner/numerics.py: |diff| <= 1e-2 + 2e-2 |ref| per step.
set -u
out=${OUT:-out}
mkdir -p "$out/work"
work="$out/work"
log="$out/summary.txt"
: >"$log"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
# NVLink multicast stays off (the lending workplace's rule; harmless elsewhere)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# DeepSpeed's JIT-built ops (DeepSpeedCPUAdam for the offload case) need this on Hopper ('9.0a' breaks its parser)
export TORCH_CUDA_ARCH_LIST=9.0
{
  date -u; nvidia-smi -L
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'gpus', torch.cuda.device_count())"
  python3 -c "import megatron.core as m; print('megatron-core', m.__version__)" 2>&1 | tail -1
  python3 -c "import megatron.training.arguments; print('megatron.training: yes')" 2>&1 | tail -1
  python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
} >>"$log" 2>&1

# ---- the plans ----------------------------------------------------------------------------------------
python3 - "$work" <<'EOF' >>"$log" 2>&1 || { cat "$log"; exit 1; }
import sys
from dataclasses import replace
from planner.core.cluster import load_cluster
from planner.core.job import ParallelConfig, validate_config
from planner.core.model import load_model
from planner.core.plan import make_plan, save_plan
from planner.cost.predict import predict

work = sys.argv[1]
cluster = load_cluster("h200-141gb")
gpt = replace(load_model("gpt2-xl"), name="gpt2-xl-8l", num_layers=8)                       # 25 heads: tp 1 only
llama = replace(load_model("llama-3-8b"), name="llama-small", num_layers=8, hidden_size=2048, ffn_hidden_size=5632,
                num_heads=16, num_kv_heads=8, vocab_size=32000, max_seq_len=4096)
moe = replace(load_model("mixtral-8x7b"), name="mixtral-small", num_layers=4, hidden_size=1024, ffn_hidden_size=2048,
              num_heads=16, num_kv_heads=8, num_experts=4, top_k=2, vocab_size=32000, max_seq_len=4096)
base = dict(seq_len=1024, global_batch_size=16, micro_batch_size=2)
cases = {  # name: (model, parallel)
    "mg_ref": (gpt, dict()),
    "mg_dp2_zero1": (gpt, dict(dp=2, zero_stage=1)),
    "mg_pp2_uneven": (gpt, dict(pp=2, layer_split=(3, 5), recompute="full")),
    "mg_pp2_vpp2": (gpt, dict(pp=2, vpp=2, schedule="interleaved")),
    "mg_llama_ref": (llama, dict()),
    "mg_llama_tp2": (llama, dict(tp=2, recompute="selective")),
    "mg_moe_ep2": (moe, dict(dp=2, ep=2, zero_stage=1)),
    "ds_dp2_zero2": (gpt, dict(dp=2, zero_stage=2)),
    "ds_dp2_zero3": (gpt, dict(dp=2, zero_stage=3, recompute="full")),
    "ds_pp2_zero1": (gpt, dict(pp=2, zero_stage=1, layer_split=(3, 5))),
    "ds_dp2_offload": (gpt, dict(dp=2, zero_stage=2, offload_optimizer=True)),
    "ds_1gpu": (gpt, dict()),  # not in the default list: a one-GPU check of the deepspeed engine
}
for name, (model, par) in cases.items():
    cfg = ParallelConfig(**{**base, **par})
    validate_config(model, cfg, cfg.gpus)
    plan = make_plan(model, cluster, cfg.gpus, cfg, predict(model, cluster, cfg), provenance={"command": f"smoke {name}"})
    save_plan(plan, f"{work}/{name}.yaml")
print("plans:", ", ".join(cases))
EOF

all="mg_ref mg_dp2_zero1 mg_pp2_uneven mg_pp2_vpp2 mg_llama_ref mg_llama_tp2 mg_moe_ep2 ds_dp2_zero2 ds_dp2_zero3 ds_pp2_zero1 ds_dp2_offload"
for name in ${CASES:-$all}; do
  engine=megatron; extra=()
  case $name in ds_*) engine=deepspeed; extra=(--check-numerics);; esac
  t0=$(date +%s.%N)
  CUDA_DEVICE_MAX_CONNECTIONS=1 timeout 420 python3 -m planner.cli run "$work/$name.yaml" --engine "$engine" \
    --steps 8 --warmup 3 --timeout 400 "${extra[@]}" -o "$work/$name.report.yaml" >"$work/$name.log" 2>&1
  rc=$?
  echo "=== $name ($engine): exit $rc, wall $(python3 -c "import time; print(round(time.time() - $t0, 1))") s" >>"$log"
  grep -E "step time|numerics|losses|error|Error|peak" "$work/$name.log" | head -12 >>"$log"
done

# ---- megatron numerics: each megatron case against its single-process megatron reference ---------------
python3 - "$work" <<'EOF' >>"$log" 2>&1
import math, sys, yaml
from pathlib import Path

work = Path(sys.argv[1])
def losses(name):
    p = work / f"{name}.report.yaml"
    return [x for x in (yaml.safe_load(p.read_text()) or {}).get("losses", [])] if p.exists() else []
for name, ref in (("mg_dp2_zero1", "mg_ref"), ("mg_pp2_uneven", "mg_ref"), ("mg_pp2_vpp2", "mg_ref"),
                  ("mg_llama_tp2", "mg_llama_ref")):
    a, b = losses(name), losses(ref)
    k = min(len(a), len(b))
    if not k:
        print(f"numerics {name} vs {ref}: no losses ({len(a)}, {len(b)})"); continue
    errs = [abs(x - y) for x, y in zip(a[:k], b[:k]) if x is not None and y is not None]
    ok = len(errs) == k and all(e <= 1e-2 + 2e-2 * abs(y) for e, y in zip(errs, b))
    print(f"numerics {name} vs {ref}: {'match' if ok else 'DIVERGE'} over {k} steps, max |diff| "
          f"{max(errs) if errs else math.nan:.3g}; step 0 {a[0]} vs {b[0]}")
EOF
tar -czf "$out/smoke.tar.gz" -C "$out" work 2>/dev/null && rm -rf "$work"
cat "$log"
