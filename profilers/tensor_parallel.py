"""What the torch engine's tensor parallelism (DTensor, planner/runner/parallelize.apply_tp) costs per block beyond
the local shard's compute, its all-reduces included, measured on stacks of blocks.

Why: on 2x H200 the torch engine's tp=2 plans ran 10-48% over a prediction of the profiled local shard's compute
plus the bandwidth model's all-reduces: llama-3-8b tp2 at micro-batch 2 (+9.3%), llama-2-13b tp2 at micro-batch 1
(+46%, +38%) (campaign of 2026-11-22, calls 14-15), while megatron-core's tp=2 plans landed within 2%. The
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

from profilers.sharding import STACK, ShardingSettings, _slowest, _time_fwd_bwd

def measure(settings: ShardingSettings, group, n: int, device: torch.device, dtype: torch.dtype,
            report=lambda label: None) -> list[dict]:
    """Raw points over the `n` ranks of `group`, tp = n (every rank calls this; all get the same list): [{impl "tp" (or "tp-sp":
    with sequence parallelism), group_size, reshard_after_forward False, blocks, micro_batch, tokens (of the whole
    micro-batch), plain_s, wrapped_s, overhead_s}]."""
    from torch.distributed.device_mesh import DeviceMesh

    from planner.model import load_model
    from planner.runner.parallelize import apply_tp, build_stage, materialise
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
                    plain_s[mb] = _slowest(_time_fwd_bwd(plain, x, grad, device, settings.warmup, settings.trials,
                                                         zero_grads=True), group, device)
                if sp:  # the residual stream is sharded over the sequence: this rank's half in and out
                    part = settings.seq_len // n
                    x = x.detach()[:, rank * part:(rank + 1) * part].contiguous().requires_grad_(True)
                    grad = grad[:, rank * part:(rank + 1) * part].contiguous()
                t_tp = _slowest(_time_fwd_bwd(stage, x, grad, device, settings.warmup, settings.trials, zero_grads=True),
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
