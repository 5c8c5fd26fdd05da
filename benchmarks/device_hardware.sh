#!/usr/bin/env bash
# Measure this GPU's kernel database (distplan profile --hardware, profilers/hardware.py) in one device call.
# Use, from the repository root on the GPU machine: bash benchmarks/device_hardware.sh [TAG]
#   TAG names the files (default: the GPU's name as a slug, e.g. nvidia-h100-80gb-hbm3). BUDGET_S overrides the
#   measurement budget (default: the command's, 390 s; the whole call then takes about 7 minutes at most).
#   ONLY names the grid sections to measure (e.g. ONLY=memory_bound; merge with benchmarks/merge_hardware.py).
# Writes to OUT (default out/), three files: TAG.yaml (the database: commit it as configs/hardware/TAG.yaml),
# TAG.points.json (every raw point) and log-TAG.txt (the command's output); keep the last two under
# benchmarks/results/hardware_TAG/. No extra wheels are needed: torch, pyyaml, typer and rich are on the machine.
set -u
out=${OUT:-out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the lending workplace's rule
tag=${1:-$(python3 -c "import torch; from planner.core.kerneldb import gpu_slug; print(gpu_slug(torch.cuda.get_device_name()))")}
log="$out/log-$tag.txt"
{
  date -u; nvidia-smi -L; nvidia-smi --query-gpu=driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
} >"$log" 2>&1
budget=()
[ -n "${BUDGET_S:-}" ] && budget=(--budget-s "$BUDGET_S")
t0=$(date +%s)
# 570 s: the call's 600 s limit minus time for the summary; the budget makes a normal run end well before it
only=()
[ -n "${ONLY:-}" ] && only=(--only "$ONLY")
timeout 570 python3 -m planner.cli profile --hardware ${budget[@]+"${budget[@]}"} ${only[@]+"${only[@]}"} -o "$out/$tag.yaml" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
echo "=== exit $rc, wall $(( $(date +%s) - t0 )) s" | tee -a "$log"
[ "$rc" = 0 ] || exit "$rc"
python3 - "$out/$tag.yaml" <<'EOF' 2>&1 | tee -a "$log"
import sys
from planner.core.kerneldb import load_kernel_db

db = load_kernel_db(sys.argv[1])
print(f"=== summary of {sys.argv[1]}: {db.gpu_name}, {db.dtype}")
for m, n, k in ((4096, 4096, 4096), (8192, 14336, 4096), (8192, 4096, 14336), (8192, 128256, 4096), (2048, 1600, 6400)):
    for layout in ("fwd", "dgrad", "wgrad"):
        s, prov = db.gemm_time_s(m, n, k, layout)
        print(f"gemm {layout:5s} m={m} n={n} k={k}: {s * 1e6:9.1f} us, {2 * m * n * k / s / 1e12:6.1f} TFLOP/s ({prov})")
for seq, heads, hd, gqa in ((4096, 32, 128, 4), (1024, 25, 64, 1), (32768, 8, 128, 8)):
    for phase in ("fwd", "bwd"):
        s, prov = db.attention_time_s(seq, heads, hd, gqa, phase)
        print(f"attention {phase} seq={seq} heads={heads} hd={hd} gqa={gqa}: {s * 1e3:8.3f} ms ({prov})")
for kernel in sorted(db.memory_bound):
    width = max(db.memory_bound[kernel].values[0])
    rate, prov = db.memory_bound_bytes_per_s(kernel, rows=4096, width=width)
    print(f"{kernel:18s} rows=4096 width={width:g}: {rate / 1e9:7.0f} GB/s ({prov})")
for name, fn in (("launch", db.launch_overhead_s), ("adamw", db.adamw_s_per_param), ("clock", db.sustained_clock_mhz)):
    try:
        print(name, fn())
    except Exception as exc:
        print(name, "not measured:", exc)
EOF
ls -la "$out"
