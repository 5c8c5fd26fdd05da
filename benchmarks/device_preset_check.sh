#!/usr/bin/env bash
# Issue 24's evidence on one GPU (benchmarks/results/preset_vs_measured.md): for each pre-registered shape, a quick
# profile at sequence 4096 and `distplan run` (torch engine) of its plans, benchmarks/results/preset_check/plans/
# <model>-<GPU>-*.yaml (made on a CPU with the preset; the predictions are recomputed there from the reports).
# Optionally first the kernel database's sections HW_ONLY (benchmarks/device_hardware.sh, HW_BUDGET_S).
# Use, from the repository root on the GPU machine:
#   GPU=h100 [HW_ONLY=memory_bound,gemm_unaligned HW_BUDGET_S=150] [MODELS="llama-3.2-1b ..."] [MBS=1,2,4]
#   bash benchmarks/device_preset_check.sh
# Writes OUT/summary.txt (one block per run), OUT/preset_check.tar.gz (profiles, reports, logs) and, with HW_ONLY,
# the database files of device_hardware.sh under OUT/hardware/. Stops starting work LIMIT_S (default 560) seconds
# after it began, so one device call (600 s) always returns its files.
set -u
out=${OUT:-out}; work="$out/work"; mkdir -p "$work"; log="$out/summary.txt"; : >"$log"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the lending workplace's rule
gpu=${GPU:?set GPU=h100 or h200}; limit=${LIMIT_S:-560}; t_start=$(date +%s)
left() { echo $(( limit - ($(date +%s) - t_start) )); }
{ date -u; nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"; } >>"$log" 2>&1

if [ -n "${HW_ONLY:-}" ]; then
  mkdir -p "$out/hardware"
  OUT="$out/hardware" ONLY="$HW_ONLY" BUDGET_S="${HW_BUDGET_S:-150}" bash benchmarks/device_hardware.sh >"$out/hardware/stdout.txt" 2>&1
  echo "=== hardware ($HW_ONLY): exit $?, $(( $(date +%s) - t_start )) s since start" >>"$log"
fi

run_plan() {  # run_plan PLAN: `distplan run` of one plan, its report's summary to the log
  local plan=$1 name prof t0; name=$(basename "$1" .yaml)
  prof="$work/profile-${name%%-$gpu-*}-$gpu.yaml"
  if [ "$(left)" -lt 60 ]; then echo "=== $name: not run, $(left) s left" >>"$log"; return; fi
  local pargs=(); [ -f "$prof" ] && pargs=(--profile "$prof")
  t0=$(date +%s)
  timeout $(( $(left) - 15 )) python3 -m planner.cli run "$plan" --engine torch --steps 6 --warmup 2 \
    --timeout $(( $(left) - 25 )) ${pargs[@]+"${pargs[@]}"} -o "$work/$name.report.yaml" >"$work/$name.log" 2>&1
  echo "=== $name: exit $?, wall $(( $(date +%s) - t0 )) s" >>"$log"
  python3 - "$work/$name.report.yaml" >>"$log" 2>&1 <<'PY'
import sys, yaml
from pathlib import Path
p = Path(sys.argv[1])
if not p.exists():
    print("  no report"); sys.exit()
r = yaml.safe_load(p.read_text())
print(f"  {r['config']}  predicted {r['predicted_step_time_s']:.4f} s  measured {r['measured_step_time_s']}  "
      f"err {r['step_time_error']}")
for s in r["stages"]:
    print("  stage", {k: s[k] for k in s if k != "ranks"})
PY
}

models=${MODELS-llama-3.2-1b llama-3.2-3b qwen2.5-14b-6l}  # MODELS= (empty): none
plans=benchmarks/results/preset_check/plans
for m in $models; do  # first every shape's profile and the preset's own plan, then the alternatives in the time left
  if [ "$(left)" -lt 150 ]; then echo "=== $m: not profiled, $(left) s left" >>"$log"; continue; fi
  t0=$(date +%s)
  timeout $(( $(left) - 90 )) python3 -m planner.cli profile -m "$m" --seq-len 4096 --quick \
    --micro-batches "${MBS:-1,2,4}" -o "$work/profile-$m-$gpu.yaml" >"$work/profile-$m.log" 2>&1
  echo "=== $m profile: exit $?, wall $(( $(date +%s) - t0 )) s" >>"$log"
  run_plan "$plans/$m-$gpu-solved.yaml"
done
for m in $models; do
  for plan in "$plans/$m-$gpu"-*.yaml; do
    case "$plan" in *-solved.yaml) ;; *) run_plan "$plan" ;; esac
  done
done
tar -czf "$out/preset_check.tar.gz" -C "$out" work 2>/dev/null && rm -rf "$work"
cat "$log"
