#!/usr/bin/env bash
# Issue 7's 4-GPU miss (campaign_4xh200.md): llama-3-8b dp2 x pp2 interleaved (v4, 2 x 4) ran 2.143 s per step on
# 4x H200, +14.8% over its prediction, where the same per-replica pipeline (pp2 v4, 2 x 4, no data parallelism)
# ran 1.985 s on 2x H200. Its stage-0 forward chunks took 22% more GPU time and 35% more host time than on
# 2x H200; the backward chunks took the same. This separates the three candidate causes in one device call:
#   A  the pipeline alone on GPUs 0-1 of this node (the other two idle): this node against the 2x H200 one;
#   B  the same pipeline twice at once, on GPUs 0-1 and 2-3 (every GPU and four ranks' hosts busy, no
#      data parallelism between them): a busy node against an idle one;
#   C  the 4-GPU plan (dp2 x pp2, DDP between the replicas), traced (`distplan run --trace`): what data
#      parallelism adds to B.
# GPU clocks, power and temperature are sampled every second throughout (smi.csv), and the host's CPU described
# (machine.txt). Planned with the committed 4xH200 profile (no profiling here).
# Usage, from the repository root with .whl carried, on nvidia-h200-x4: OUT=$OUT bash benchmarks/pipeline_busy.sh
# Optional: STEPS (default 4) WARMUP (default 2), PROFILE (default the committed 4xH200 llama-3-8b profile below).
set -u
out=${OUT:-out}; mkdir -p "$out/work"; log="$out/log.txt"; : >"$log"
source benchmarks/device_env.sh || exit 1
prof=${PROFILE:-benchmarks/results/campaign_4xh200/call2-session9/profiles/profile-llama-3-8b-s4096.yaml}
steps=${STEPS:-4}; warm=${WARMUP:-2}
{ date -u; nvidia-smi -L; nproc; lscpu | grep -E "^Model name|^CPU\(s\)|^Thread|^Socket|MHz"; uptime;
  python3 -c "import torch; print('torch', torch.__version__)"; } >"$out/machine.txt" 2>&1

common=(-m llama-3-8b --pp 2 --vpp 4 --schedule interleaved --micro-batch 2 --seq-len 4096 --profile "$prof")
python3 -m planner.cli estimate "${common[@]}" -n 2 --global-batch 8 -o "$out/work/pp2.yaml" >>"$log" 2>&1 || exit 1
python3 -m planner.cli estimate "${common[@]}" -n 4 --dp 2 --global-batch 16 -o "$out/work/dp2pp2.yaml" >>"$log" 2>&1 || exit 1

nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu \
  --format=csv -l 1 >"$out/smi.csv" 2>&1 &
smi=$!
mark() { echo "=== $1 $(date -u +%H:%M:%S)" | tee -a "$log" >>"$out/smi.csv"; }
run() {  # run <name> <gpus> <plan> [distplan run options]: one measured run, its report under out/
  local name=$1 gpus=$2 plan=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpus timeout 200 python3 -m planner.cli run "$plan" --steps "$steps" --warmup "$warm" \
    -o "$out/$name.report.yaml" "$@" >"$out/work/$name.log" 2>&1
  echo "$name on GPUs $gpus: exit $?" >>"$log"
}

mark "A alone"; run A-pp2-gpu01 0,1 "$out/work/pp2.yaml"
mark "B both"; run B-pp2-gpu01 0,1 "$out/work/pp2.yaml" & b0=$!
run B-pp2-gpu23 2,3 "$out/work/pp2.yaml" & b1=$!; wait "$b0" "$b1"  # not `wait`: nvidia-smi runs on
mark "C dp2xpp2"; run C-dp2pp2 0,1,2,3 "$out/work/dp2pp2.yaml" --trace
mark "end"; kill "$smi" 2>/dev/null

python3 - "$out" >>"$log" 2>&1 <<'EOF'
import sys, yaml, pathlib
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("*.report.yaml")):
    r = yaml.safe_load(f.read_text())
    print(f.stem, "measured", r.get("measured_step_time_s"), "predicted", r.get("predicted_step_time_s"),
          "error", r.get("step_time_error"))
    for rk in r.get("ranks") or []:
        print("  rank", rk.get("rank"), "step", rk.get("median_step_time_s"), "compute", rk.get("chunk_compute_s"),
              "host", rk.get("chunk_host_s"))
EOF
tar -czf "$out/work.tar.gz" -C "$out" work && rm -rf "$out/work"
cat "$log"
