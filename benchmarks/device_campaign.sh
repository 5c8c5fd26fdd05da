#!/usr/bin/env bash
# Issue 7 campaign on one GPU node: profile the cases' models here (reusing the committed 2xH200 profiles
# whose model and sequence length match), then benchmarks/campaign.py runs distplan's plan, its next 3
# alternatives and the 4 practitioners' baselines per case. Writes OUT/campaign_<machine>.md, OUT/rows.json,
# OUT/summary.txt and OUT/campaign.tar.gz (plans, report YAMLs, profiles, logs).
# Usage, from the repository root with .whl carried (as device_verify.sh), one case batch per 10-minute call:
#   CASES=gpt2-xl-small,gpt2-xl-large BUDGET_S=500 bash benchmarks/device_campaign.sh
# Optional: STEPS=6 WARMUP=2 (default: each case's), EXTRA="--check-numerics" or "--repeat 2" or
#   "--distplan-engine deepspeed --no-baselines" (an engine's coverage: distplan's plans alone) or
#   "--measured benchmarks/results/campaign_2xh200/callN-x/rows.json" (plans that call ran are carried, not run
#   again: a re-run after a fix measures only what is new; EXTRA is expanded unquoted, so a glob such as
#   ".../campaign_2xh200/call*/rows.json" names every call, read in call order), MACHINE=2xh200;
#   FRESH=1 profiles every case's model even where a committed profile exists (after a profiler change);
#   PROFILE_CASES=a,b profiles those cases' models too (for later calls); PROFILE_ARGS (default --quick);
#   QUICK_MODELS="m1 m2": those models --quick whatever PROFILE_ARGS says; PROFILE_TIMEOUT (default 240 s: a
#   full llama-3-8b profile on 4xH200 did not finish in it: benchmarks/results/campaign_4xh200.md);
#   CHECK=1 runs benchmarks/profile_check.py on the first new profile (OUT/check.json, ~1 minute);
#   COMMITTED=dir: committed profiles to reuse (default profile_2xh200; another node size needs FRESH=1);
#   DISTPLAN_TRACE=1: torch-engine runs profile one extra step (planner/runner/trace.py; the hints read it);
#   DISTPLAN_MEMORY_PEAK=1: torch-engine runs record one extra step's allocations (planner/runner/memory_peak.py);
#   RUN_WITHOUT_PROFILE=1 (with FRESH=1): run a case whose fresh profile failed, on the local GPU's preset.
set -u
out=${OUT:-out}; mkdir -p "$out/profiles"; log="$out/summary.txt"; : >"$log"
t_start=$(date +%s)
source benchmarks/device_env.sh || exit 1
cases=${CASES:-gpt2-xl-small}
committed=${COMMITTED:-benchmarks/results/profile_2xh200}  # reused where model and sequence length match
{ date -u; nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"; } >>"$log" 2>&1

# 1. profiles: only (model, seq_len) pairs that no committed profile covers (--quick: ~40 s for llama-3-8b)
need_dir=$committed; [ "${FRESH:-0}" = 1 ] && need_dir=/nonexistent
python3 benchmarks/campaign.py --cases "${PROFILE_CASES:-$cases}" --profile-dir "$need_dir" --need-profiles >"$out/need.txt" 2>>"$log" || exit 1
while read -r model seq; do
  [ -n "$model" ] || continue
  t0=$(date +%s); pargs=${PROFILE_ARGS---quick}
  case " ${QUICK_MODELS:-} " in *" $model "*) pargs=--quick ;; esac
  timeout "${PROFILE_TIMEOUT:-240}" python3 -m planner.cli profile -m "$model" --seq-len "$seq" $pargs \
    -o "$out/profiles/profile-$model-s$seq.yaml" >"$out/profiles/profile-$model-s$seq.log" 2>&1
  echo "=== profile $model seq $seq: exit $?, wall $(( $(date +%s) - t0 )) s" >>"$log"
done <"$out/need.txt"

# 1b. CHECK=1: the independent matmul and collective checks (benchmarks/profile_check.py) on the first new profile
if [ "${CHECK:-0}" = 1 ]; then
  first=$(ls "$out"/profiles/*.yaml 2>/dev/null | head -1)
  if [ -n "$first" ]; then
    t0=$(date +%s)
    timeout 120 python3 benchmarks/profile_check.py "$first" -o "$out/check.json" >"$out/check.log" 2>&1
    echo "=== profile_check $first: exit $?, wall $(( $(date +%s) - t0 )) s" >>"$log"; cat "$out/check.log" >>"$log"
  fi
fi

# 1c. FRESH=1: a case whose profile failed here is not run (one ran 300 s on a preset after its profile timed out:
#     benchmarks/results/cost_model_notes.md); RUN_WITHOUT_PROFILE=1 runs it anyway, on the local GPU's preset
if [ "${FRESH:-0}" = 1 ] && [ "${RUN_WITHOUT_PROFILE:-0}" != 1 ]; then
  profiled=$(python3 benchmarks/campaign.py --cases "$cases" --profile-dir "$out/profiles" --profiled-cases 2>>"$log")
  if [ "$profiled" != "$cases" ]; then
    echo "=== no fresh profile for some of $cases: running only '${profiled}' (RUN_WITHOUT_PROFILE=1 runs all)" >>"$log"
    cases=$profiled
  fi
fi
# a campaign ran over no case after its profile stalled (benchmarks/results/campaign_8xh200.md)
if [ -z "$cases" ]; then
  echo "=== no case left to run: no campaign" >>"$log"; cat "$log"; exit 0
fi

# 2. the campaign, in what is left of the budget (BUDGET_S counts from the start of this script)
left=$(( ${BUDGET_S:-500} - ($(date +%s) - t_start) ))
args=(--cases "$cases" --profile-dir "$out/profiles" --profile-dir "$committed" --out "$out/campaign" --budget-s "$left")
[ -n "${STEPS:-}" ] && args+=(--steps "$STEPS"); [ -n "${WARMUP:-}" ] && args+=(--warmup "$WARMUP")
[ -n "${MACHINE:-}" ] && args+=(--machine "$MACHINE")
echo "=== campaign.py ${args[*]} ${EXTRA:-}" >>"$log"
python3 benchmarks/campaign.py "${args[@]}" ${EXTRA:-} >"$out/campaign.log" 2>&1
echo "=== campaign: exit $?, total wall $(( $(date +%s) - t_start )) s" >>"$log"
grep -vE "^\s*$" "$out/campaign.log" | tail -60 >>"$log"
cp "$out"/campaign/campaign_*.md "$out"/campaign/rows.json "$out/" 2>/dev/null
tar -czf "$out/campaign.tar.gz" -C "$out" campaign profiles campaign.log 2>/dev/null && rm -rf "$out/campaign"
cat "$log"
