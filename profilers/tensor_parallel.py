"""What the torch engine's tensor parallelism (DTensor, planner/build/parallelize.apply_tp) costs per block beyond
the local shard's compute, its all-reduces included, measured on stacks of blocks.

Why: on 2x H200 the torch engine's tp=2 plans ran 10-48% over a prediction of the profiled local shard's compute
plus the bandwidth model's all-reduces: llama-3-8b tp2 at micro-batch 2 (+9.3%), llama-2-13b tp2 at micro-batch 1
(+46%, +38%) (benchmarks/results/campaign_2xh200.md), while megatron-core's tp=2 plans landed within 2%. The
compute profiler times a plain shard of the block on one device (profilers/compute.py): neither DTensor's
per-operator dispatch and redistribution nor the exposed collectives are in it.

What: inside the communication profiler's processes, over each group of ranks 0..n-1 it measures (tp = n; NCCL on
GPUs, gloo on CPUs), stacks of 1 and STACK blocks built and sharded as the torch engine does (build_stage, apply_tp without
and with sequence parallelism, materialise, the profile's dtype) run forward + backward on replicated hidden
states (with SP: each rank's part of the sequence), gradients accumulating into the previous run's as in all but
the first micro-batch of the engine's steps,
beside plain stacks of the profiled local shard (profilers.compute.build_layer at tp n). Points go with the
sharding points (impl "tp" / "tp-sp", group_size = the tp degree) and profilers.sharding.fit_sharding splits the
difference into a per-block line and an edge once per micro-batch, as for FSDP2; the cost model charges them in
place of the bandwidth model's tensor-parallel all-reduces for the torch engine (planner/predict.rank_timer).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from profilers.sharding import STACK, ShardingSettings
from profilers.timing import slowest, time_fwd_bwd

def measure(settings: ShardingSettings, group, n: int, device: torch.device, dtype: torch.dtype,
            report=lambda label: None) -> list[dict]:
    """Raw points over the `n` ranks of `group`, tp = n (every rank calls this; all get the same list): [{impl "tp" (or "tp-sp":
    with sequence parallelism), group_size, reshard_after_forward False, blocks, micro_batch, tokens (of the whole
    micro-batch), plain_s, wrapped_s, overhead_s}]."""
    from torch.distributed.device_mesh import DeviceMesh

    from planner.core.model import load_model
    from planner.build.parallelize import apply_tp, build_stage, materialise
    from profilers.compute import build_layer, make_inputs

    spec = load_model(settings.model)
    if spec.is_moe or spec.is_vit or spec.num_heads % n or spec.ffn_hidden_size % n or settings.seq_len % n:
        return []  # dense token models whose heads, FFN and sequence split n ways (the campaign's)
    spec = replace(spec, num_layers=max(spec.num_layers, STACK))  # build_stage takes layers of a whole model
    mesh = DeviceMesh.from_group(group, device.type)
    points = []
    rank = torch.distributed.get_rank(group)
    for blocks in (1, STACK):
        plain = nn.Sequential(*(build_layer(spec, "block", n, device, dtype) for _ in range(blocks)))
        plain_s = {}
        for sp in (False, True):
            stage = build_stage(spec, 0, blocks, has_embed=False, has_head=False)
            apply_tp(stage, mesh, spec, sequence_parallel=sp)
            materialise(stage, device, spec, seed=0)
            stage.to(dtype)
            for mb in settings.micro_batches:
                (x,), grad = make_inputs(spec, "block", 1, mb, settings.seq_len, device, dtype)  # full hidden states
                if mb not in plain_s:
                    plain_s[mb] = slowest(time_fwd_bwd(plain, x, grad, device, settings.warmup, settings.trials,
                                                        zero_grads=True), group, device)
                if sp:  # the residual stream is sharded over the sequence: this rank's half in and out
                    part = settings.seq_len // n
                    x = x.detach()[:, rank * part:(rank + 1) * part].contiguous().requires_grad_(True)
                    grad = grad[:, rank * part:(rank + 1) * part].contiguous()
                t_tp = slowest(time_fwd_bwd(stage, x, grad, device, settings.warmup, settings.trials, zero_grads=True),
                               group, device)
                points.append({"impl": "tp-sp" if sp else "tp", "group_size": n, "reshard_after_forward": False,
                               "blocks": blocks, "micro_batch": mb, "tokens": mb * settings.seq_len,
                               "plain_s": plain_s[mb], "wrapped_s": t_tp, "overhead_s": t_tp - plain_s[mb]})
            report(f"tensor parallel (DTensor{', SP' if sp else ''}) {blocks} block(s) n={n}")
            del stage
        del plain
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return points


def measure_fsdp_tp(settings: ShardingSettings, world: int, tp: int, device: torch.device, dtype: torch.dtype,
                    report=lambda label: None) -> list[dict]:
    """FSDP2 over the data-parallel ranks of TP-sharded blocks, as the torch engine runs dp > 1 with tp > 1 and
    ZeRO >= 1 (apply_tp on the 2D mesh's tp dimension, then apply_fsdp on its dp dimension), over all `world`
    ranks: dp = world / tp groups of tp ranks each, every rank busy as in a run.

    Why: on 4x H200 the torch engine's tp2 x dp2 ZeRO-1 plan (llama-3-8b, SP) ran 3.35 s where dp4 ZeRO-1 ran
    1.95 s, two GPUs idle 20-38% of the step (benchmarks/results/campaign_4xh200.md); the cost model added the TP
    stacks' overhead (dp = 1) to FSDP2's on whole blocks (tp = 1), and neither measured the two together.

    What: stacks of 1 and STACK blocks, TP-sharded alone (bf16, as the engine keeps them without FSDP) and TP-sharded
    then fully_shard per block under the stage (fp32 masters, bf16 compute), with and without resharding after
    forward, the latter also accumulating gradients (set_requires_gradient_sync(False)); timed in turns
    (profilers.sharding.fsdp_points). Points: impl "fsdp2-tp<tp>", group_size dp, the TP-only stack as
    `plain_s`, so fit_sharding's per-block line is what FSDP2 adds to a TP-sharded block.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from planner.core.model import load_model
    from planner.build.parallelize import apply_fsdp, apply_tp, build_stage, materialise
    from profilers.compute import make_inputs
    from profilers.sharding import fsdp_points

    spec = load_model(settings.model)
    dp = world // tp
    if (dp < 2 or world % tp or spec.is_moe or spec.is_vit or spec.num_heads % tp or spec.ffn_hidden_size % tp):
        return []
    spec = replace(spec, num_layers=max(spec.num_layers, STACK))
    mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)
    points = []
    for blocks in (1, STACK):
        tp_only = build_stage(spec, 0, blocks, has_embed=False, has_head=False)
        apply_tp(tp_only, mesh["tp"], spec, sequence_parallel=False)
        materialise(tp_only, device, spec, seed=0)
        tp_only.to(dtype)
        for reshard in (True, False):
            both = build_stage(spec, 0, blocks, has_embed=False, has_head=False)
            apply_tp(both, mesh["tp"], spec, sequence_parallel=False)
            apply_fsdp(both, mesh["dp"], 3 if reshard else 1, policy)
            materialise(both, device, spec, seed=0)
            for mb in settings.micro_batches:
                (x,), grad = make_inputs(spec, "block", 1, mb, settings.seq_len, device, dtype)  # full hidden states
                points += fsdp_points(tp_only, both, x, grad, device, settings, None,
                                      {"impl": f"fsdp2-tp{tp}", "group_size": dp, "reshard_after_forward": reshard,
                                       "blocks": blocks, "micro_batch": mb, "tokens": mb * settings.seq_len})
            del both
            report(f"FSDP2 x tensor parallel {blocks} block(s) dp={dp} tp={tp} reshard={reshard}")
        del tp_only
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return points
