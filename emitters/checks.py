"""Validators for emitted files: the frameworks' own parsers where installed, and distplan's mirrors of their rules.

- DeepSpeed: `deepspeed_semantic_errors` catches what DeepSpeedConfig accepts silently (unknown top-level or
  section keys, offload_param or stage3_* keys below ZeRO-3, NVMe offload without a path, offload at stage 0,
  a pipeline section with ZeRO >= 2, batch sizes that do not multiply out); `deepspeed_parse` runs DeepSpeed's
  own DeepSpeedConfig for the planned data-parallel size (its two distributed calls, get_rank and
  get_world_size, are patched, so this works on CPU without a process group), and AutoEP's validator.
- Megatron-LM: `megatron_rule_errors` mirrors Megatron's argument and TransformerConfig rules on the emitted
  argument list (runs everywhere, in CI); `megatron_native` runs benchmarks/megatron_args_check.py, i.e.
  Megatron's own parse_args + validate_args + TransformerConfig, where megatron.training is importable
  (megatron-core >= 0.17, Python >= 3.12).
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
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import yaml

from emitters.common import Emission
from planner.errors import DistplanError
from planner.plan import Plan, plan_from_dict

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # pass | fail | skip
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL


def _result(name: str, errors: list[str], ok_detail: str = "") -> CheckResult:
    return CheckResult(name, FAIL, "; ".join(errors)) if errors else CheckResult(name, PASS, ok_detail)


# ---- DeepSpeed ------------------------------------------------------------------------------------

# Top-level keys DeepSpeed 0.19's DeepSpeedConfig and deepspeed.initialize read (recorded from
# deepspeed/runtime/config.py; tests/test_emit_deepspeed.py re-records them from the installed DeepSpeed).
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
    out = [_result("deepspeed: distplan semantic checks", deepspeed_semantic_errors(cfg, p.dp))]
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


# ---- Megatron-LM ----------------------------------------------------------------------------------

WORLD_TAG = re.compile(r"^#\s*distplan-world-size:\s*(\d+)\s*$")
ENV_TAG = re.compile(r"^#\s*distplan-env:\s*(\w+)=(\S*)\s*$")
RECOMPUTE_MODULES = frozenset({"core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts"})


def read_args_file(text: str) -> tuple[list[str], int | None, dict[str, str]]:
    """(argv, world size, environment) from a megatron_args.txt: one argument per line, '#' comments."""
    argv, world, env = [], None, {}
    for raw in text.splitlines():
        line = raw.strip()
        if m := WORLD_TAG.match(line):
            world = int(m.group(1))
        elif m := ENV_TAG.match(line):
            env[m.group(1)] = m.group(2)
        elif line and not line.startswith("#"):
            argv += line.split()
    return argv, world, env


def parse_flags(argv: list[str]) -> dict[str, list[str]]:
    """{--flag: [values]}; a flag without values maps to []."""
    flags: dict[str, list[str]] = {}
    key = None
    for word in argv:
        if word.startswith("--"):
            key = word
            flags[key] = []
        elif key is None:
            raise DistplanError(f"argument '{word}' does not follow a --flag")
        else:
            flags[key].append(word)
    return flags


def parse_layout(layout: str) -> list[str]:
    """Megatron's PipelineParallelLayerLayout.parse_str_to_list: unroll (..)*n and x*n, split on '|'."""
    s = layout.replace(",", "")
    s = re.sub(r"\(([^)]+)\)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), s)
    s = re.sub(r"(.)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), s)
    return s.split("|")


def megatron_rule_errors(argv: list[str], world: int, env: dict[str, str] | None = None) -> list[str]:
    """distplan's mirror of the Megatron-LM rules (arguments.validate_args, TransformerConfig, ModelParallelConfig)
    that a parallel plan can break. Each message names the flags involved."""
    env = env or {}
    f = parse_flags(argv)
    errors: list[str] = []

    def num(flag: str, default: int | None = None) -> int | None:
        if flag not in f or not f[flag]:
            return default
        try:
            return int(f[flag][0])
        except ValueError:
            errors.append(f"{flag} {f[flag][0]!r} is not an integer")
            return default

    tp, pp, cp = num("--tensor-model-parallel-size", 1), num("--pipeline-model-parallel-size", 1), num("--context-parallel-size", 1)
    ep = num("--expert-model-parallel-size", 1)
    etp = num("--expert-tensor-parallel-size", tp)
    layers, heads, hidden = num("--num-layers"), num("--num-attention-heads"), num("--hidden-size")
    mb, gbs, seq = num("--micro-batch-size"), num("--global-batch-size"), num("--seq-length")
    for flag, value in (("--num-layers", layers), ("--num-attention-heads", heads), ("--hidden-size", hidden),
                        ("--micro-batch-size", mb), ("--seq-length", seq)):
        if value is None:
            errors.append(f"{flag} is missing")
    if errors:
        return errors
    if world % (tp * pp * cp):
        return [f"world size {world} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}"]
    dp = world // (tp * pp * cp)
    if heads % tp:
        errors.append(f"--num-attention-heads {heads} is not a multiple of --tensor-model-parallel-size {tp}")
    if hidden % heads:
        errors.append(f"--hidden-size {hidden} is not divisible by --num-attention-heads {heads}")
    if "--group-query-attention" in f:
        groups = num("--num-query-groups", heads)
        if groups % tp and tp % groups:
            errors.append(f"--num-query-groups {groups} must be a multiple or divisor of --tensor-model-parallel-size {tp}")
    # pipeline split
    nlpv, nvs = num("--num-layers-per-virtual-pipeline-stage"), num("--num-virtual-stages-per-pipeline-rank")
    layout = f.get("--pipeline-model-parallel-layout", [None])[0] if "--pipeline-model-parallel-layout" in f else None
    first, last = num("--decoder-first-pipeline-num-layers"), num("--decoder-last-pipeline-num-layers")
    if sum(x is not None for x in (nlpv, nvs, layout)) > 1:
        errors.append("only one of --num-layers-per-virtual-pipeline-stage, --num-virtual-stages-per-pipeline-rank, "
                      "--pipeline-model-parallel-layout may be set")
    vpp = 1
    if layout is not None:
        stages = parse_layout(layout)
        if len(stages) % pp:
            errors.append(f"--pipeline-model-parallel-layout has {len(stages)} stages, not a multiple of pp {pp}")
        vpp = max(len(stages) // pp, 1)
        flat = "".join(stages)
        if set(flat) - set("ELtm"):
            errors.append(f"--pipeline-model-parallel-layout has unknown layer characters {sorted(set(flat) - set('ELtm'))}")
        if not flat.startswith("E") or not flat.endswith("L") or flat.count("E") != 1 or flat.count("L") != 1:
            errors.append("--pipeline-model-parallel-layout must start with the embedding E and end with the loss L, once each")
        if flat.count("t") != layers:
            errors.append(f"--pipeline-model-parallel-layout places {flat.count('t')} blocks, --num-layers is {layers}")
        if first is not None or last is not None:
            errors.append("--pipeline-model-parallel-layout cannot be combined with --decoder-first/last-pipeline-num-layers")
    elif nlpv is not None:
        if first is not None or last is not None:
            errors.append("an uneven split (--decoder-first/last-pipeline-num-layers) needs "
                          "--num-virtual-stages-per-pipeline-rank, not --num-layers-per-virtual-pipeline-stage")
        elif layers % pp or (layers // pp) % nlpv:
            errors.append(f"--num-layers {layers} must split into pp {pp} stages of a multiple of "
                          f"--num-layers-per-virtual-pipeline-stage {nlpv} layers")
        else:
            vpp = layers // pp // nlpv
    elif nvs is not None:
        vpp = nvs
    if layout is None and (first is not None or last is not None):
        rest, middle = layers, pp
        for flag, value in (("--decoder-first-pipeline-num-layers", first), ("--decoder-last-pipeline-num-layers", last)):
            if value is None:
                continue
            if value <= 0:
                errors.append(f"{flag} must be > 0")
            if value % vpp:
                errors.append(f"{flag} {value} is not divisible by the {vpp} virtual stages per rank")
            rest, middle = rest - value, middle - 1
        if bool(rest) != bool(middle):
            errors.append(f"{rest} layers remain for {middle} middle pipeline stages")
        elif middle and rest % middle:
            errors.append(f"the {rest} middle layers do not divide evenly over {middle} middle pipeline stages")
        elif middle and (rest // middle) % vpp:
            errors.append(f"{rest // middle} layers per middle stage are not divisible by the {vpp} virtual stages")
    elif layout is None and layers % pp:
        errors.append(f"--num-layers {layers} is not divisible by --pipeline-model-parallel-size {pp}; "
                      "give an uneven split with --decoder-first/last-pipeline-num-layers or a layout")
    elif layout is None and vpp > 1 and (layers // pp) % vpp:
        errors.append(f"{layers // pp} layers per pipeline rank are not divisible by {vpp} virtual stages")
    if vpp > 1 and pp <= 1:
        errors.append("virtual pipeline stages need --pipeline-model-parallel-size > 1")
    if vpp > 1 and "--no-overlap-p2p-communication" in f and pp <= 2:
        errors.append("the interleaved schedule without p2p overlap needs --pipeline-model-parallel-size > 2")
    # batch
    if gbs is not None and gbs % (mb * dp):
        errors.append(f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mb} x data-parallel size {dp}")
    if cp > 1 and seq % (2 * cp):
        errors.append(f"--seq-length {seq} is not divisible by 2 x --context-parallel-size {cp}")
    maxpos = num("--max-position-embeddings")
    if maxpos is not None and maxpos < seq:
        errors.append(f"--max-position-embeddings {maxpos} is below --seq-length {seq}")
    # experts
    experts = num("--num-experts")
    if ep > 1:
        if experts is None:
            errors.append("--expert-model-parallel-size > 1 needs --num-experts")
        elif experts % ep:
            errors.append(f"--num-experts {experts} is not divisible by --expert-model-parallel-size {ep}")
        if world % (etp * ep * pp):
            errors.append(f"world size {world} is not divisible by expert-tensor x expert x pipeline = {etp}*{ep}*{pp}")
    if "--sequence-parallel" in f and tp == 1:
        errors.append("--sequence-parallel with --tensor-model-parallel-size 1 (Megatron turns it off silently)")
    # recompute
    gran = (f.get("--recompute-granularity") or [None])[0]
    method = (f.get("--recompute-method") or [None])[0]
    rnl = num("--recompute-num-layers")
    if gran == "selective":
        if method is not None or rnl is not None:
            errors.append("selective recompute takes neither --recompute-method nor --recompute-num-layers")
        bad = sorted(set(f.get("--recompute-modules", [])) - RECOMPUTE_MODULES)
        if bad:
            errors.append(f"--recompute-modules {', '.join(bad)} unknown; valid: {', '.join(sorted(RECOMPUTE_MODULES))}")
    elif gran == "full":
        if method not in ("uniform", "block"):
            errors.append("full recompute needs --recompute-method uniform or block")
        if rnl is None or rnl < 1:
            errors.append("full recompute needs --recompute-num-layers >= 1")
    elif gran is not None:
        errors.append(f"--recompute-granularity {gran} unknown; valid: full, selective")
    # data-parallel sharding and its environment
    fsdp = "--use-megatron-fsdp" in f
    if "--overlap-param-gather" in f:
        if "--use-distributed-optimizer" not in f and not fsdp:
            errors.append("--overlap-param-gather needs --use-distributed-optimizer or Megatron-FSDP")
        if "--overlap-grad-reduce" not in f:
            errors.append("--overlap-param-gather needs --overlap-grad-reduce")
    if "--optimizer-cpu-offload" in f and "--use-precision-aware-optimizer" not in f:
        errors.append("--optimizer-cpu-offload needs --use-precision-aware-optimizer")
    if "--use-precision-aware-optimizer" in f and "--use-distributed-optimizer" not in f:
        errors.append("--use-precision-aware-optimizer needs --use-distributed-optimizer")
    if fsdp:
        if (f.get("--ckpt-format") or [None])[0] != "fsdp_dtensor":
            errors.append("Megatron-FSDP needs --ckpt-format fsdp_dtensor")
        if env.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1":
            errors.append("Megatron-FSDP needs CUDA_DEVICE_MAX_CONNECTIONS unset or > 1")
    elif (tp > 1 or cp > 1) and env.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1":
        errors.append("tensor or context parallelism needs CUDA_DEVICE_MAX_CONNECTIONS=1 (Hopper and older)")
    if "--bf16" in f and "--fp16" in f:
        errors.append("--bf16 and --fp16 are both set")
    return errors


MEGATRON_CHECK_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "megatron_args_check.py"


def megatron_native_available() -> bool:
    try:
        return importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.training") is not None
    except (ImportError, ValueError):
        return False


def megatron_native(args_text: str) -> CheckResult:
    """Megatron's own parse_args + validate_args + TransformerConfig, via benchmarks/megatron_args_check.py."""
    name = "megatron: Megatron-LM parse_args/validate_args/TransformerConfig"
    if not megatron_native_available():
        return CheckResult(name, SKIP, "megatron.training is not importable (megatron-core >= 0.17 on Python >= 3.12); "
                                       "run benchmarks/megatron_args_check.py where it is")
    if not MEGATRON_CHECK_SCRIPT.exists():
        return CheckResult(name, SKIP, f"{MEGATRON_CHECK_SCRIPT} not found (not a source checkout)")
    with tempfile.TemporaryDirectory() as tmp:
        args_path, out_path = Path(tmp) / "megatron_args.txt", Path(tmp) / "result.json"
        args_path.write_text(args_text)
        proc = subprocess.run([sys.executable, str(MEGATRON_CHECK_SCRIPT), str(args_path), "-o", str(out_path)],
                              capture_output=True, text=True, timeout=600)
        if not out_path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return CheckResult(name, FAIL, f"check script failed: {tail[0]}")
        res = json.loads(out_path.read_text())["results"][0]
    shims = f" (shims: {', '.join(res['shims'])})" if res.get("shims") else ""
    return CheckResult(name, PASS if res["ok"] else FAIL, (res.get("error") or "accepted") + shims)


def check_megatron(plan: Plan, args_text: str) -> list[CheckResult]:
    argv, world, env = read_args_file(args_text)
    errors = megatron_rule_errors(argv, world or plan.gpus, env)
    if world != plan.gpus:
        errors.append(f"# distplan-world-size is {world}, the plan has {plan.gpus} GPUs")
    return [_result("megatron: distplan mirror of Megatron's rules", errors), megatron_native(args_text)]


# ---- torchrun / slurm -------------------------------------------------------------------------------


def check_torchrun(plan: Plan, plan_text: str, launch_sh: str) -> list[CheckResult]:
    from emitters.torchrun import RUNNER_WORKER

    errors = []
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
    return [_result("torchrun: plan reload and launch geometry", errors)]


def check_slurm(plan: Plan, sbatch: str) -> list[CheckResult]:
    opts = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", sbatch, flags=re.M))
    errors = []
    try:
        nodes, per_node = int(opts["nodes"]), int(opts["gpus-per-node"])
        if nodes != plan.nodes or nodes * per_node != plan.gpus:
            errors.append(f"#SBATCH asks {nodes} x {per_node} GPUs; the plan needs {plan.gpus} on {plan.nodes} node(s)")
    except (KeyError, ValueError):
        errors.append("job.sbatch lacks --nodes / --gpus-per-node")
    return [_result("slurm: allocation matches the plan", errors)]


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
