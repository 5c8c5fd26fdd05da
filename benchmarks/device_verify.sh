#!/usr/bin/env bash
# `distplan run` on a 2-GPU node (2xH200), from plans made by `distplan solve --profile` / `estimate -o`
# with the profiles measured there (benchmarks/results/profile_2xh200/). Writes OUT/summary.txt and
# OUT/runs.tar.gz (plans, report YAMLs, logs). Usage, from the repository root with .whl carried:
#   GROUP=torch bash benchmarks/device_verify.sh      # torch engine + Megatron argument-parser check
#   GROUP=frameworks bash benchmarks/device_verify.sh # deepspeed and megatron engines
set -u
out=${OUT:-out}; work="$out/work"; mkdir -p "$work"; log="$out/summary.txt"; : >"$log"
source benchmarks/device_env.sh || exit 1
P=benchmarks/results/profile_2xh200
GP=$P/profile-gpt2-xl-2xh200.yaml; LP=$P/profile-llama-3-8b-2xh200.yaml
dp() { python3 -m planner.cli "$@"; }
{ date -u; nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"; } >>"$log" 2>&1

run_case() {  # name engine plan [extra run args]
  local name=$1 engine=$2 plan=$3; shift 3
  local t0; t0=$(date +%s)
  timeout 240 python3 -m planner.cli run "$plan" --engine "$engine" --steps 6 --warmup 2 --timeout 220 \
    --profile "$PROF" "$@" -o "$work/$name.report.yaml" >"$work/$name.log" 2>&1
  echo "=== $name ($engine): exit $?, wall $(( $(date +%s) - t0 )) s" >>"$log"
  python3 - "$work/$name.report.yaml" >>"$log" 2>&1 <<'PY'
import sys, yaml
from pathlib import Path
p = Path(sys.argv[1])
if not p.exists(): print("  no report"); sys.exit()
r = yaml.safe_load(p.read_text())
print(f"  {r['config']}  predicted {r['predicted_step_time_s']:.4f} s  measured {r['measured_step_time_s']}  err {r['step_time_error']}")
for s in r["stages"]: print("  stage", {k: s[k] for k in s if k != "ranks"})
n = r.get("numerics") or {}
print("  numerics:", n.get("passed"), n.get("note", ""), " losses:", [round(x, 4) for x in r["losses"][:4]])
for v in r["verdict"]: print("  verdict:", v)
PY
}

if [ "${GROUP:-torch}" = torch ]; then
  (for f in tests/emitters/golden/emit/*/megatron/megatron_args.txt tests/emitters/golden/emit/llama-3-70b-64/slurm/megatron_args.txt; do echo "$f"; done \
     | xargs python3 benchmarks/megatron_args_check.py -o "$out/megatron_args_check.json" >"$out/megatron_args_check.log" 2>&1 &)
  PROF=$GP
  dp solve -m gpt2-xl -n 2 --profile $GP --global-batch 32 --engine torch -o "$work/gpt2xl_solved.yaml" >"$work/solve_gpt2xl.log" 2>&1
  dp estimate -m gpt2-xl -n 2 --profile $GP --global-batch 32 --micro-batch 4 --zero 0 -o "$work/gpt2xl_ddp.yaml" >/dev/null 2>&1
  dp estimate -m gpt2-xl -n 2 --profile $GP --global-batch 32 --micro-batch 4 --zero 3 -o "$work/gpt2xl_fsdp3.yaml" >/dev/null 2>&1
  dp estimate -m gpt2-xl -n 2 --profile $GP --global-batch 32 --micro-batch 4 --pp 2 -o "$work/gpt2xl_pp2.yaml" >/dev/null 2>&1
  dp estimate -m gpt2-xl -n 2 --profile $GP --global-batch 32 --micro-batch 4 --pp 2 --vpp 2 --schedule interleaved -o "$work/gpt2xl_pp2v2.yaml" >/dev/null 2>&1
  for c in solved ddp fsdp3 pp2 pp2v2; do run_case "gpt2xl_$c" torch "$work/gpt2xl_$c.yaml" --check-numerics; done
  PROF=$LP
  dp solve -m llama-3-8b -n 2 --profile $LP --global-batch 8 --engine torch -o "$work/llama8b_solved.yaml" >"$work/solve_llama8b.log" 2>&1
  dp estimate -m llama-3-8b -n 2 --profile $LP --global-batch 8 --tp 2 --sequence-parallel -o "$work/llama8b_tp2sp.yaml" >/dev/null 2>&1
  for c in solved tp2sp; do run_case "llama8b_$c" torch "$work/llama8b_$c.yaml" --check-numerics; done
  wait; sleep 1; tail -3 "$out/megatron_args_check.log" >>"$log"
else
  PROF=$GP
  dp estimate -m gpt2-xl -n 2 --profile $GP --global-batch 32 --micro-batch 4 --zero 2 -o "$work/gpt2xl_z2.yaml" >/dev/null 2>&1
  dp estimate -m gpt2-xl -n 2 --profile $GP --global-batch 32 --micro-batch 4 --zero 1 -o "$work/gpt2xl_z1.yaml" >/dev/null 2>&1
  dp estimate -m gpt2-xl -n 2 --profile $GP --global-batch 32 --micro-batch 4 --pp 2 --zero 1 -o "$work/gpt2xl_pp2z1.yaml" >/dev/null 2>&1
  run_case gpt2xl_ds_zero2 deepspeed "$work/gpt2xl_z2.yaml" --check-numerics
  run_case gpt2xl_ds_pp2 deepspeed "$work/gpt2xl_pp2z1.yaml" --check-numerics
  run_case gpt2xl_mg_zero1 megatron "$work/gpt2xl_z1.yaml" --check-numerics
  run_case gpt2xl_mg_pp2 megatron "$work/gpt2xl_pp2z1.yaml" --check-numerics
fi
tar -czf "$out/runs.tar.gz" -C "$out" work 2>/dev/null && rm -rf "$work"
cat "$log"
