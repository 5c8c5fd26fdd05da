#!/usr/bin/env bash
# Profile gpt2-xl and llama-3-8b on this GPU node and check the profile independently
# (benchmarks/profile_check.py). Writes profiles, check JSON and one log under OUT (default: out/).
# Use, from the repository root: bash benchmarks/profile_device.sh [TAG]   (TAG names the files, e.g. 2xh200)
# STEPS="quick full check oom" (the default) picks what runs.
set -u
tag=${1:-gpu}
out=${OUT:-out}
mkdir -p "$out"
log="$out/log-$tag.txt"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# NVLink multicast stays off (the lending workplace's rule; harmless elsewhere)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{
  date -u; nvidia-smi -L; nvidia-smi --query-gpu=driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())"
} >>"$log" 2>&1

run() {  # run NAME ARGS...: one profile, timed, its table and errors to the log
  local name=$1; shift
  echo "=== $name: distplan profile $*" >>"$log"
  local t0=$(date +%s.%N)
  timeout 300 python3 -m planner.cli profile "$@" -o "$out/profile-$name-$tag.yaml" >>"$log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc, wall $(python3 -c "import time; print(round(time.time() - $t0, 1))") s" >>"$log"
  return $rc
}

steps=${STEPS:-quick full check oom}
case " $steps " in *" quick "*) run gpt2-xl-quick -m gpt2-xl --quick || { tail -60 "$log"; exit 1; } ;; esac
case " $steps " in *" full "*) run llama-3-8b -m llama-3-8b || { tail -60 "$log"; exit 1; } ;; esac
case " $steps " in *" check "*)
  echo "=== independent check (llama-3-8b profile)" >>"$log"
  timeout 240 python3 benchmarks/profile_check.py "$out/profile-llama-3-8b-$tag.yaml" -o "$out/check-$tag.json" >>"$log" 2>&1 ;; esac
case " $steps " in *" full "*) run gpt2-xl -m gpt2-xl ;; esac
# a micro-batch that cannot fit (llama-3-8b's LM head at 16 x 8192 tokens needs ~190 GB at tp=1): marked, not fatal
case " $steps " in *" oom "*) run llama-3-8b-oom -m llama-3-8b --quick --micro-batches 1,2,4,8,16 ;; esac
grep -E "^===|TFLOP|GB/s|wall time|OOM|layer fits|tp[12]|error|Error" "$log" | tail -90
