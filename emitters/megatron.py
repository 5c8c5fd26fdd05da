"""Megatron-LM target: megatron_args.txt (the pretrain_gpt.py arguments, one per line) and launch.sh (torchrun).

Flag names are Megatron-LM's (megatron/training/arguments.py and the TransformerConfig-generated flags of
megatron-core 0.17-0.19). The plan maps as follows:
- parallel degrees: --tensor/pipeline/context/expert-model-parallel-size; the expert tensor-parallel size is
  left at Megatron's default (= tp), which is how distplan's cost model shards experts (over ep*tp).
- pipeline split: an even split needs no flag (plus --num-virtual-stages-per-pipeline-rank for vpp > 1). An
  uneven split whose middle stages are equal uses --decoder-first/last-pipeline-num-layers (Megatron then
  divides the rest evenly over the middle stages); any other split uses --pipeline-model-parallel-layout,
  one `|`-separated entry per virtual stage in Megatron's order (stage v*pp + r is chunk v of rank r), with
  the embedding (E) on the first and the loss (L) on the last. The args file says which one it used.
- ZeRO: 1 -> --use-distributed-optimizer (Megatron's ZeRO-1); 2 and 3 -> Megatron-FSDP with
  --data-parallel-sharding-strategy optim_grads / optim_grads_params. Offloaded optimizer ->
  --optimizer-cpu-offload (which Megatron requires with --use-precision-aware-optimizer).
- recompute: selective -> --recompute-granularity selective --recompute-modules core_attn (Korthikanti's
  selective recompute); full -> granularity full, method uniform, 1 layer per unit (every block recomputed).
- attention: flash (no s*s scores stored) -> --attention-backend auto (Transformer Engine picks its flash or
  cuDNN fused kernel; both are memory-efficient); unfused -> --attention-backend unfused.
- data: mock data with the plan's vocabulary, so the emitted run measures the plan; replace those lines with
  --data-path/--tokenizer-type for real training.
Machine-readable comments for checkers: `# distplan-world-size: N` and `# distplan-env: KEY=VALUE`.
"""

from __future__ import annotations

from emitters.common import (
    EmitOptions,
    Emission,
    commented,
    header_lines,
    inexpressible,
    launch_geometry,
    shell_line,
    shell_script,
    torchrun_prefix,
    torchrun_shell,
)
from planner.core.plan import Plan

TARGET = "megatron"  # this emitter's --target name
ARGS_FILE = "megatron_args.txt"  # the arguments file, one per line
DEFAULT_SCRIPT = "$MEGATRON_LM/pretrain_gpt.py"  # Megatron-LM's GPT training entry point
WORLD_SIZE_TAG = "distplan-world-size:"  # comment tag giving the world size in ARGS_FILE
ENV_TAG = "distplan-env:"  # comment tag giving an environment variable in ARGS_FILE
# run-length arguments the launch script adds after the plan's (not part of the plan: a short timing run by
# default): (flag, environment variable that overrides it or None, default)
RUN_ARGS = (("--train-iters", "TRAIN_ITERS", "100"), ("--lr", "LR", "1.0e-4"), ("--log-interval", None, "1"),
            ("--eval-iters", None, "0"))


def run_args_shell() -> str:
    return " ".join(f'{flag} "${{{env}:-{default}}}"' if env else f"{flag} {default}" for flag, env, default in RUN_ARGS)


def _refuse(plan: Plan) -> None:
    p, m = plan.parallel, plan.model
    if m.is_vit:
        raise inexpressible(TARGET, f"{m.name} is a ViT; pretrain_gpt.py trains decoder language models",
                            "the same plan with --target torchrun (distplan's runner)")
    if p.pp > 1 and p.schedule == "gpipe":
        raise inexpressible(TARGET, "the GPipe schedule (Megatron-LM runs 1F1B or interleaved 1F1B)",
                            "schedule 1f1b (same predicted step time, fewer micro-batches in flight)")
    if p.cp > 1 and not p.flash_attention:
        raise inexpressible(TARGET, f"context parallelism cp={p.cp} with unfused attention (Megatron runs context "
                            "parallelism inside Transformer Engine's fused attention)", "flash_attention=true")


def pipeline_split(plan: Plan) -> tuple[str, list[list[str]]]:
    """(explanation, flags) placing the planned layers on pipeline stages the way Megatron reads them."""
    p = plan.parallel
    counts = list(p.layers_per_stage(plan.model.num_layers))
    vflag = [["--num-virtual-stages-per-pipeline-rank", str(p.vpp)]] if p.vpp > 1 else []
    if p.pp == 1:
        return "", []
    if len(set(counts)) == 1:
        return f"even split: {counts[0]} blocks per stage", vflag
    middle = counts[1:-1]
    if len(set(middle)) <= 1:
        why = (f"uneven split {counts}: only the first and last stages differ, so "
               "--decoder-first/last-pipeline-num-layers (Megatron divides the rest evenly over the middle stages)")
        return why, vflag + [["--decoder-first-pipeline-num-layers", str(counts[0])],
                             ["--decoder-last-pipeline-num-layers", str(counts[-1])]]
    stages = []
    for v in range(p.vpp):
        for r in range(p.pp):
            entry = f"t*{counts[r] // p.vpp}"
            if v == 0 and r == 0:
                entry = "E" + entry
            if v == p.vpp - 1 and r == p.pp - 1:
                entry += "L"
            stages.append(entry)
    why = (f"uneven split {counts}: the middle stages differ, so --pipeline-model-parallel-layout "
           "(one entry per virtual stage; E embedding, t block, L loss)")
    return why, [["--pipeline-model-parallel-layout", "|".join(stages)]]


def sections(plan: Plan) -> list[tuple[str, list[list[str]]]]:
    """The arguments grouped under a comment each; every inner list is one line of the args file."""
    p, m = plan.parallel, plan.model
    par = [["--tensor-model-parallel-size", str(p.tp)], ["--pipeline-model-parallel-size", str(p.pp)],
           ["--context-parallel-size", str(p.cp)]]
    if m.is_moe:
        par.append(["--expert-model-parallel-size", str(p.ep)])
    if p.sequence_parallel:
        par.append(["--sequence-parallel"])
    out = [(f"parallelism: world {plan.gpus} = tp {p.tp} x pp {p.pp} x cp {p.cp} x dp {p.dp}", par)]
    why, split = pipeline_split(plan)
    if why:
        out.append((f"pipeline {why}", split))
    out.append((f"batch: {p.global_batch_size} sequences = micro-batch {p.micro_batch_size} x {p.num_microbatches} "
                f"micro-batches x dp {p.dp}", [["--micro-batch-size", str(p.micro_batch_size)],
                                               ["--global-batch-size", str(p.global_batch_size)],
                                               ["--seq-length", str(p.seq_len)]]))
    dp_args: list[list[str]] = []
    if p.zero_stage == 1:
        dp_args.append(["--use-distributed-optimizer"])
    elif p.zero_stage >= 2:
        strategy = "optim_grads" if p.zero_stage == 2 else "optim_grads_params"
        dp_args += [["--use-megatron-fsdp"], ["--data-parallel-sharding-strategy", strategy],
                    ["--use-distributed-optimizer"], ["--no-gradient-accumulation-fusion"],
                    ["--ckpt-format", "fsdp_dtensor"]]
    if p.overlap_grad_reduce:
        dp_args.append(["--overlap-grad-reduce"])
        if p.zero_stage >= 1:
            dp_args.append(["--overlap-param-gather"])
    if p.offload_optimizer:
        dp_args += [["--optimizer-cpu-offload"], ["--optimizer-offload-fraction", "1.0"],
                    ["--use-precision-aware-optimizer"]]
    zero_name = {0: "DDP (ZeRO-0)", 1: "ZeRO-1 = distributed optimizer", 2: "ZeRO-2 = Megatron-FSDP optim_grads",
                 3: "ZeRO-3 = Megatron-FSDP optim_grads_params"}[p.zero_stage]
    if dp_args:
        out.append((f"data-parallel state sharding: {zero_name}" + (", optimizer on the host" if p.offload_optimizer else ""),
                    dp_args))
    if p.recompute == "selective":
        out.append(("activation recompute: selective (attention core, Korthikanti et al. 2022)",
                    [["--recompute-granularity", "selective"], ["--recompute-modules", "core_attn"]]))
    elif p.recompute == "full":
        out.append(("activation recompute: full, every block",
                    [["--recompute-granularity", "full"], ["--recompute-method", "uniform"],
                     ["--recompute-num-layers", "1"]]))
    shape = [["--num-layers", str(m.num_layers)], ["--hidden-size", str(m.hidden_size)],
             ["--ffn-hidden-size", str(m.ffn_hidden_size)], ["--num-attention-heads", str(m.num_heads)]]
    if m.num_kv_heads != m.num_heads:
        shape += [["--group-query-attention"], ["--num-query-groups", str(m.num_kv_heads)]]
    shape.append(["--max-position-embeddings", str(m.max_seq_len)])
    if m.learned_positions:
        shape += [["--position-embedding-type", "learned_absolute"], ["--normalization", "LayerNorm"]]
    else:
        shape += [["--position-embedding-type", "rope"], ["--normalization", "RMSNorm"]]
    if m.gated_mlp:
        shape.append(["--swiglu"])
    if not m.uses_bias:
        shape.append(["--disable-bias-linear"])
    if m.qkv_bias:
        shape.append(["--add-qkv-bias"])  # Qwen2: biases on q/k/v alone
    if not m.tie_embeddings:
        shape.append(["--untie-embeddings-and-output-weights"])
    if m.is_moe:
        shape += [["--num-experts", str(m.num_experts)], ["--moe-router-topk", str(m.top_k)],
                  ["--moe-ffn-hidden-size", str(m.ffn_hidden_size)], ["--moe-token-dispatcher-type", "alltoall"]]
    # dropout as the plan's memory model counts it (ModelSpec.dropout); Megatron's own default is 0.1
    shape += [["--attention-dropout", f"{m.dropout:g}"], ["--hidden-dropout", f"{m.dropout:g}"]]
    out.append((f"model shape: {m.name} ({m.family})", shape))
    out.append(("precision and kernels", [["--bf16"], ["--attention-backend", "auto" if p.flash_attention else "unfused"]]))
    out.append(("data: mock data with the plan's vocabulary (Megatron pads it); for real training replace these "
                "lines with --data-path/--tokenizer-type", [["--mock-data"], ["--tokenizer-type", "NullTokenizer"],
                                                            ["--vocab-size", str(m.vocab_size)]]))
    return out


def launch_env(plan: Plan) -> dict[str, str]:
    """Environment Megatron checks: TP/CP comm overlap needs one CUDA work queue (validate_args, pre-Blackwell),
    while Megatron-FSDP needs more than one."""
    p = plan.parallel
    if (p.tp > 1 or p.cp > 1) and p.zero_stage < 2:
        return {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    return {}


def megatron_argv(plan: Plan) -> list[str]:
    return [word for _, lines in sections(plan) for line in lines for word in line]


def args_text(plan: Plan, opts: EmitOptions) -> str:
    text = commented(header_lines(plan, opts, TARGET))
    text += commented(["pretrain_gpt.py arguments, one per line; launch.sh passes them in this order.",
                       f"{WORLD_SIZE_TAG} {plan.gpus}"] + [f"{ENV_TAG} {k}={v}" for k, v in launch_env(plan).items()])
    for title, lines in sections(plan):
        text += f"\n# {title}\n" + "".join(" ".join(line) + "\n" for line in lines)
    return text


def emit_megatron(plan: Plan, opts: EmitOptions) -> Emission:
    _refuse(plan)
    nodes, _ = launch_geometry(plan)
    script = opts.script or DEFAULT_SCRIPT
    env = launch_env(plan)
    body = []
    if script == DEFAULT_SCRIPT:
        body.append(': "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout (core_r0.17 or newer)}"')
    body.append(f'SCRIPT="${{SCRIPT:-{script}}}"')
    body += [f"export {k}={v}" for k, v in env.items()]
    body += ["ARGS=()",
             "while read -r line; do  # one argument (and its value) per line; '#' lines are comments",
             '  [[ -z "$line" || "$line" == \\#* ]] && continue',
             '  read -ra words <<< "$line"',
             '  ARGS+=("${words[@]}")',
             f'done < "$HERE/{ARGS_FILE}"',
             f"RUN_ARGS=({run_args_shell()})  # run length: not part of the plan",
             "exec " + torchrun_shell(plan) + ' "$SCRIPT" "${ARGS[@]}" "${RUN_ARGS[@]}" "$@"']
    where = "on every node (MASTER_ADDR = the first node; job.sbatch does this under SLURM)" if nodes > 1 else "on the node"
    purpose = [f"Starts Megatron-LM's pretrain_gpt.py for this plan {where}.",
               "Extra arguments are appended to pretrain_gpt.py's (later ones win)."]
    files = {ARGS_FILE: args_text(plan, opts), "launch.sh": shell_script(plan, opts, TARGET, body, purpose)}
    why, _ = pipeline_split(plan)
    notes = [f"pipeline {why}"] if why else []
    if plan.parallel.ep > 1 and plan.parallel.tp > 1 and not plan.parallel.sequence_parallel:
        notes.append("Megatron warns that expert parallelism with tensor parallelism should use sequence "
                     "parallelism; this plan has it off (consider re-planning with sequence_parallel=true)")
    run_args = [word for flag, _, default in RUN_ARGS for word in (flag, default)]
    launch = shell_line([f"{k}={v}" for k, v in env.items()] + torchrun_prefix(plan) + [script] + megatron_argv(plan)
                        + run_args)
    return Emission(target=TARGET, files=files, launch=launch, executable=("launch.sh",), notes=tuple(notes), env=env)
