"""distplan's mirror of Megatron-LM's argument rules, and Megatron's own validation where it is installed.

`megatron_rule_errors` mirrors the rules of megatron/training/arguments.py validate_args, TransformerConfig and
ModelParallelConfig that a parallel plan can break, on the emitted argument list; it runs everywhere (CI).
`megatron_native` runs benchmarks/megatron_args_check.py, i.e. Megatron's parse_args + validate_args +
core_transformer_config_from_args, where megatron.training is importable (megatron-core >= 0.17, Python >= 3.12).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from emitters.common import FAIL, PASS, SKIP, CheckResult, check_result
from planner.core.errors import DistplanError
from planner.core.plan import Plan

WORLD_TAG = re.compile(r"^#\s*distplan-world-size:\s*(\d+)\s*$")
ENV_TAG = re.compile(r"^#\s*distplan-env:\s*(\w+)=(\S*)\s*$")
# megatron-core's valid --recompute-modules (megatron/training/arguments.py)
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


# checks emitted arguments against an installed Megatron-LM's parser
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
    return [check_result("megatron: distplan mirror of Megatron's rules", errors), megatron_native(args_text)]
