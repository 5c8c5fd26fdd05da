#!/usr/bin/env bash
# What is live at the peak of a plan's step on this node: `distplan run PLAN --memory-peak` (torch engine, CUDA;
# planner/runner/memory_peak.py) for each plan in PLANS (space-separated paths), one step after one warm-up step.
# Writes OUT/reports.tar.gz (<plan name>.report.yaml: each rank's `memory_peak`: bytes before the step, the step's peak, what is live
# at it by where it was allocated) and OUT/<plan name>.log, and prints each rank's summary.
# Usage, from the repository root with .whl carried (as device_campaign.sh):
#   PLANS="benchmarks/results/campaign_2xh200/diagnostics/memory-peak/llama-3-8b-large-alt3.yaml" \
#     bash benchmarks/device_memory_peak.sh
set -u
out=${OUT:-out}; mkdir -p "$out"
source benchmarks/device_env.sh || exit 1
for plan in ${PLANS:?PLANS=<plan.yaml ...>}; do
  name=$(basename "$plan" .yaml); t0=$(date +%s)
  timeout "${RUN_TIMEOUT:-240}" python3 -m planner.cli run "$plan" --steps "${STEPS:-1}" --warmup "${WARMUP:-1}" \
    --memory-peak -o "$out/$name.report.yaml" >"$out/$name.log" 2>&1
  echo "=== $name: exit $?, wall $(( $(date +%s) - t0 )) s"
  python3 - "$out/$name.report.yaml" <<'PY'
import sys, yaml
try:
    rep = yaml.safe_load(open(sys.argv[1]))
except OSError as exc:
    sys.exit(f"no report: {exc}")
print("predicted step", rep.get("predicted_step_time_s"), "measured", rep.get("measured_step_time_s"))
for st in rep.get("stages") or []:
    print(f"stage {st.get('stage')}: predicted {st.get('predicted_memory_gib')} GiB, peak allocated {st.get('peak_allocated_gib')} GiB")
for r in rep.get("ranks") or []:
    mp = r.get("memory_peak") or {}
    print(f"rank {r.get('rank')}: peak allocated {r.get('peak_allocated_gib')} GiB; before step "
          f"{mp.get('before_step_gib', 0):.2f}, step peak {mp.get('step_peak_gib', 0):.2f} GiB")
    for p in mp.get("live_at_peak") or []:
        print(f"   {p['gib']:8.3f} GiB {p['blocks']:6d} blocks  {p['where']}")
    print(f"   {mp.get('live_at_peak_other_gib', 0):8.3f} GiB elsewhere")
PY
done
# one file back instead of a report per plan: the device tool returns a limited number of files per command (a report
# was left out: benchmarks/results/cost_model_notes.md)
( cd "$out" && ls ./*.report.yaml >/dev/null 2>&1 && tar -czf reports.tar.gz ./*.report.yaml && rm -f ./*.report.yaml )
