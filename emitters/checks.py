"""Validators for emitted files: the frameworks' own parsers where installed, and distplan's mirrors of their rules.

- DeepSpeed (here): `deepspeed_semantic_errors` catches what DeepSpeedConfig accepts silently (unknown top-level
  or section keys, offload_param or stage3_* keys below ZeRO-3, NVMe offload without a path, offload at stage 0,
  a pipeline section with ZeRO >= 2, batch sizes that do not multiply out); `deepspeed_parse` runs DeepSpeed's
  own DeepSpeedConfig for the planned data-parallel size (its two distributed calls, get_rank and
  get_world_size, are patched, so this works on CPU without a process group), and AutoEP's validator.
- Megatron-LM: emitters/checks_megatron.py (distplan's mirror of Megatron's rules; Megatron's own parser).
- torchrun / slurm: the plan file reloads to the same plan; the launch geometry matches the plan's GPUs.
`check_emission` runs whichever apply to an emission's files and returns one CheckResult per validator.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import re
from unittest import mock

import yaml

from emitters.checks_megatron import check_megatron
from emitters.common import FAIL, PASS, SKIP, CheckResult, Emission, check_result
from planner.core.errors import DistplanError
from planner.core.plan import Plan, plan_from_dict

# ---- DeepSpeed ------------------------------------------------------------------------------------

# Top-level keys DeepSpeed 0.19's DeepSpeedConfig and deepspeed.initialize read (recorded from
# deepspeed/runtime/config.py; tests/emitters/test_emit_deepspeed.py re-records them from the installed DeepSpeed).
DS_TOP_LEVEL_KEYS = frozenset("""
activation_checkpointing aio amp autotuning bf16 bfloat16 checkpoint comet comms_logger communication_data_type
compile compression_training csv_monitor curriculum_learning data_efficiency data_parallel_size data_types
dataloader_drop_last datastates_ckpt disable_allgather disable_python_gc dump_state eigenvalue elasticity
expert_parallel flops_profiler fp16 gradient_accumulation_steps gradient_allreduce_op gradient_clipping
gradient_predivide_factor graph_harvesting hybrid_engine log_level managed_gradient_accumulation memory_breakdown
nebula optimizer pipeline prescale_gradients progressive_layer_drop quantize_training scheduler
seq_parallel_communication_data_type sequence_parallel_size sparse_attention sparse_gradients steps_per_print
tensor_parallel tensorboard timers torch_autocast train_batch_size train_micro_batch_size_per_gpu
use_data_before_expert_parallelism vocabulary_size wall_clock_breakdown wandb weight_quantization
zero_allow_untested_optimizer zero_force_ds_cpu_optimizer zero_optimization
""".split())
# sections DeepSpeed reads with dict.get, so unknown keys inside them are ignored silently
DS_SECTION_KEYS = {
    "pipeline": frozenset({"stages", "partition", "seed_layers", "activation_checkpoint_interval", "pipe_partitioned",
                           "grad_partitioned", "use_reentrant"}),
    "activation_checkpointing": frozenset({"partition_activations", "contiguous_memory_optimization",
                                           "cpu_checkpointing", "number_checkpoints",
                                           "synchronize_checkpoint_boundary", "profile"}),
}
# ZeRO keys that only stage 3 uses (pydantic field names and their stage3_ aliases)
DS_STAGE3_ONLY = frozenset({"offload_param", "prefetch_bucket_size", "param_persistence_threshold",
                            "model_persistence_threshold", "max_live_parameters", "max_reuse_distance",
                            "gather_16bit_weights_on_model_save", "module_granularity_threshold",
                            "use_all_reduce_for_fetch_params", "allgather_sequential"})


def deepspeed_semantic_errors(cfg: dict, dp: int) -> list[str]:
    """Mistakes DeepSpeedConfig accepts without a word, for a config meant for `dp` data-parallel ranks."""
    errors = []
    unknown = sorted(set(cfg) - DS_TOP_LEVEL_KEYS)
    if unknown:
        errors.append(f"unknown top-level key(s) {', '.join(unknown)} (DeepSpeed ignores them silently)")
    for section, known in DS_SECTION_KEYS.items():
        extra = sorted(set(cfg.get(section) or {}) - known)
        if extra:
            errors.append(f"unknown key(s) {', '.join(extra)} in '{section}' (DeepSpeed ignores them silently)")
    zero = cfg.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage < 3:
        s3 = sorted(k for k in zero if k.startswith("stage3_") or k in DS_STAGE3_ONLY)
        if s3:
            errors.append(f"zero_optimization.{', '.join(s3)} only act at ZeRO stage 3, but stage is {stage}")
    if stage == 0 and zero.get("offload_optimizer"):
        errors.append("zero_optimization.offload_optimizer needs ZeRO stage >= 1; stage 0 ignores it")
    for key in ("offload_param", "offload_optimizer"):
        off = zero.get(key) or {}
        if isinstance(off, dict) and off.get("device") == "nvme" and not off.get("nvme_path"):
            errors.append(f"zero_optimization.{key}.device is nvme but nvme_path is missing")
    if "pipeline" in cfg and stage >= 2:
        errors.append(f"a pipeline section with ZeRO stage {stage}: DeepSpeed's PipelineEngine rejects ZeRO-2/3 "
                      "at initialize; use stage 0 or 1")
    if (cfg.get("bf16") or {}).get("enabled") and (cfg.get("fp16") or {}).get("enabled"):
        errors.append("bf16 and fp16 are both enabled")
    tb, mb, gas = (cfg.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"))
    if all(isinstance(x, int) for x in (tb, mb, gas)) and tb != mb * gas * dp:
        errors.append(f"train_batch_size {tb} != train_micro_batch_size_per_gpu {mb} x gradient_accumulation_steps "
                      f"{gas} x data-parallel size {dp}")
    return errors


@contextlib.contextmanager
def _quiet_deepspeed():
    """Import DeepSpeed for config parsing only: CPU accelerator, its logger at ERROR."""
    had = "DS_ACCELERATOR" in os.environ
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.utils import logger

        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)
    finally:
        if not had:
            os.environ.pop("DS_ACCELERATOR", None)


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def deepspeed_parse(cfg: dict, dp: int, model_parallel: bool, world_size: int, pp: int = 1) -> dict:
    """Parse `cfg` with DeepSpeed's own DeepSpeedConfig as rank 0 of a job whose data-parallel size is `dp`.

    With model parallelism (tp or pp > 1) DeepSpeed takes the data-parallel size from the mpu / pipeline
    grid it is given, so a grid object reports `dp`; otherwise `dist.get_world_size()` is patched to `dp`.
    Also runs AutoEP's validator on an expert_parallel section. Returns the batch numbers DeepSpeed derived;
    raises whatever DeepSpeed raises.
    """
    with _quiet_deepspeed():
        import deepspeed.runtime.config as dsc

        class Grid:  # the two methods DeepSpeedConfig asks an mpu / pipeline grid
            def get_data_parallel_world_size(self):
                return dp

            def get_sequence_parallel_world_size(self):
                return 1

        with mock.patch.object(dsc.dist, "get_rank", lambda *a, **k: 0), \
                mock.patch.object(dsc.dist, "get_world_size", lambda *a, **k: dp):
            conf = dsc.DeepSpeedConfig(copy.deepcopy(cfg), mpu=Grid() if model_parallel else None)
        if conf.world_size != dp:
            raise RuntimeError(f"DeepSpeed saw data-parallel size {conf.world_size}, expected {dp}")
        if conf.expert_parallel_config.enabled:
            from deepspeed.module_inject.auto_ep_config import validate_autoep_config

            validate_autoep_config(conf.expert_parallel_config, world_size=world_size, pp_size=pp,
                                   tp_size=max(conf.tensor_parallel_config.autotp_size, 1), sp_size=1,
                                   zero_stage=int(conf.zero_optimization_stage),
                                   zero_offload_optimizer=bool(cfg.get("zero_optimization", {}).get("offload_optimizer")))
        return {"train_batch_size": conf.train_batch_size, "micro_batch": conf.train_micro_batch_size_per_gpu,
                "gradient_accumulation_steps": conf.gradient_accumulation_steps, "zero_stage": int(conf.zero_optimization_stage)}


def check_deepspeed(plan: Plan, cfg: dict) -> list[CheckResult]:
    p = plan.parallel
    out = [check_result("deepspeed: distplan semantic checks", deepspeed_semantic_errors(cfg, p.dp))]
    if not deepspeed_available():
        out.append(CheckResult("deepspeed: DeepSpeedConfig parse", SKIP, "deepspeed is not installed (pip install deepspeed)"))
        return out
    try:
        got = deepspeed_parse(cfg, p.dp, model_parallel=p.tp > 1 or p.pp > 1, world_size=plan.gpus, pp=p.pp)
    except Exception as exc:  # DeepSpeed raises AssertionError, ValueError, pydantic errors...
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        out.append(CheckResult("deepspeed: DeepSpeedConfig parse", FAIL, f"{type(exc).__name__}: {msg}"))
        return out
    out.append(CheckResult("deepspeed: DeepSpeedConfig parse", PASS,
                           f"world_size(dp)={p.dp}, train_batch_size={got['train_batch_size']}, "
                           f"micro={got['micro_batch']}, gas={got['gradient_accumulation_steps']}, zero={got['zero_stage']}"))
    return out


# ---- torchrun / slurm -------------------------------------------------------------------------------


def check_torchrun(plan: Plan, plan_text: str, launch_sh: str) -> list[CheckResult]:
    """The plan reloads, the launch line starts the runner's worker on the plan's GPUs, and the runner accepts it."""
    from emitters.torchrun import RUNNER_WORKER, runner_refusal

    errors = []
    why = runner_refusal(plan)
    if why is not None:
        errors.append(f"distplan's torch engine refuses the plan: {why}")
    try:
        again = plan_from_dict(yaml.safe_load(plan_text), "emitted plan.yaml")
        if again.digest() != plan.digest():
            errors.append(f"emitted plan.yaml reloads with digest {again.digest()}, expected {plan.digest()}")
    except DistplanError as exc:
        errors.append(str(exc))
    module = RUNNER_WORKER[RUNNER_WORKER.index("-m") + 1]
    if module not in launch_sh:
        errors.append(f"launch.sh does not start {module}")
    nproc = re.search(r"--nproc-per-node (\d+)", launch_sh)
    nnodes = re.search(r"--nnodes (\d+)", launch_sh)
    if not nproc or not nnodes or int(nproc.group(1)) * int(nnodes.group(1)) != plan.gpus:
        errors.append(f"torchrun's nnodes x nproc-per-node does not equal the plan's {plan.gpus} GPUs")
    return [check_result("torchrun: the runner accepts the plan; plan reload and launch geometry", errors)]


def check_slurm(plan: Plan, sbatch: str) -> list[CheckResult]:
    opts = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", sbatch, flags=re.M))
    errors = []
    try:
        nodes, per_node = int(opts["nodes"]), int(opts["gpus-per-node"])
        if nodes != plan.nodes or nodes * per_node != plan.gpus:
            errors.append(f"#SBATCH asks {nodes} x {per_node} GPUs; the plan needs {plan.gpus} on {plan.nodes} node(s)")
    except (KeyError, ValueError):
        errors.append("job.sbatch lacks --nodes / --gpus-per-node")
    return [check_result("slurm: allocation matches the plan", errors)]


def check_emission(plan: Plan, em: Emission) -> list[CheckResult]:
    """Run every validator that applies to the files of `em` (a slurm emission is checked with its wrapped target)."""
    out: list[CheckResult] = []
    files = em.files
    if "job.sbatch" in files:
        out += check_slurm(plan, files["job.sbatch"])
    if "ds_config.json" in files:
        out += check_deepspeed(plan, json.loads(files["ds_config.json"]))
    if "megatron_args.txt" in files:
        out += check_megatron(plan, files["megatron_args.txt"])
    if "plan.yaml" in files:
        out += check_torchrun(plan, files["plan.yaml"], files.get("launch.sh", ""))
    return out
