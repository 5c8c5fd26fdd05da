# Sourced by the device scripts (device_campaign.sh, device_memory_peak.sh, device_verify.sh, pipeline_busy.sh), from
# the repository root with .whl carried: installs the carried wheels (DeepSpeed, megatron-core, the solvers' deps) to
# /tmp/site and sets the environment every device run needs: DeepSpeed's ops built for Hopper only, NVLink multicast
# off (as the device tool's KINDS.md asks). Returns 1 if the install fails.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
