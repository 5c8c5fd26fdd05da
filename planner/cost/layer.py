"""Layer times: one transformer block, the embedding and the LM head for one micro-batch on one GPU.

Per layer and micro-batch: GEMMs, memory-bound kernels and the attention core (planner/cost/terms.py), or the
profile's measured fit of that layer where it applies; then the exposed TP collectives (2 all-reduces forward, 2
backward: Shoeybi et al. 2019 sec. 3; reduce-scatter + all-gather with sequence parallelism: Korthikanti et al. 2022
sec. 4.2.2), the context-parallel KV ring and the expert all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.core.cluster import Cluster
from planner.core.job import ParallelConfig
from planner.core.model import ModelSpec
from planner.core.profile import MEGATRON_BLOCK_KIND, MEGATRON_HEAD_KIND, UNFUSED_ATTENTION_KIND, Profile
from planner.cost import kernels
from planner.cost.engines import engine_model
from planner.cost.mechanisms import at_bound
from planner.cost.terms import BF16, CommModel, fused_attention_pass_s, gemm_time_s, memory_bound_time_s


def measured_fit(profile: Profile | None, kind: str, cfg: ParallelConfig):
    """The profile's compute fit for `kind` at this tp, if it applies to this job.

    Fits are time vs tokens of one layer of the profiled model at its sequence length (attention grows
    with s^2). Whether a profile applies to a job's model and sequence length is decided once, by
    planner.cost.profiled.profile_for_job (refused, or the model-specific fits dropped), and `predict`
    refuses a profile of another recorded shape; a hand-built profile without a recorded shape still
    gets no fit at another sequence length here.
    """
    if profile is None or profile.seq_len != cfg.seq_len:
        return None
    return profile.compute_fit(kind, cfg.tp)


def compute_factor(profile: Profile | None) -> float:
    """Measured/predicted correction for compute from the job's calibration record (planner.core.calibration,
    carried as Profile.calibration; 1.0 if none)."""
    return profile.factor("compute") if profile is not None else 1.0


def fit_factor(profile: Profile | None, engine: str = "any", tokens: float | None = None) -> float:
    """What a measured compute fit of distplan's layers is multiplied by: compute_factor times, for the engines
    that run distplan's own layers (all but megatron), the measured slowdown of distplan's block inside a stack
    on every GPU at `tokens` per micro-batch (Profile.stack_factor: a lone block on one GPU ran 5-10% faster than
    the same block in the runs on 2x H200 where it is compute-bound, slower where its host time bounds it).

    Megatron runs megatron-core's layers, measured alone (megatron_layer_delta_s) and never in a stack; its
    runs showed no such slowdown (gpt2-xl -2.6%, llama-3-8b tp2 -1.6%, over-predicted without the factor;
    benchmarks/results/campaign_2xh200.md), so they keep the lone-layer fits."""
    if profile is None:
        return 1.0
    return compute_factor(profile) * (profile.stack_factor(tokens) if not engine_model(engine).megatron_core_layers else 1.0)


@dataclass(frozen=True)
class LayerTime:
    """Seconds for one layer and one micro-batch on one GPU: compute and exposed communication."""

    fwd: float
    bwd: float
    recompute: float
    tp_comm: float  # forward + backward (+ recomputed forward) TP collectives
    other_comm: float  # context-parallel KV ring and expert all-to-all, exposed part


def _attention_core_s(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig, flash: bool) -> tuple[float, float]:
    """(forward, backward) seconds of one block's attention core (QK^T, softmax, AV) for one micro-batch,
    analytic: fused (flash) or unfused (per-head GEMMs plus the scale-mask-softmax(-dropout) passes over
    the s x s scores). Used for the difference between the two where the block time was measured."""
    t, b = cfg.tp, cfg.micro_batch_size
    s_local = cfg.seq_len / cfg.cp
    tokens = b * s_local
    if flash:
        mm = model.block_matmul_flops_per_token(cfg.seq_len)
        return fused_attention_pass_s(cluster, tokens * mm["attn_core"] / t * (0.5 if not model.is_vit else 1.0))
    # QK^T and AV each one batched matmul over the micro-batch's local heads (torch.baddbmm / bmm, as
    # Megatron's DotProductAttention runs them), so sized by the whole batch, not one head
    per_head = 2 * s_local * cfg.seq_len * model.head_dim
    gemm = gemm_time_s(cluster, per_head * b * model.num_heads / t, calls=2)
    drop = model.dropout > 0
    softmax = memory_bound_time_s(cluster, tokens * (4.5 if drop else 2.0) * model.num_heads * cfg.seq_len / t * BF16)
    return gemm + softmax, 2 * gemm + 2 * softmax


def megatron_layer_delta_s(profile: Profile | None, cfg: ParallelConfig, tokens: float) -> tuple[float, float] | None:
    """(forward, backward) seconds megatron-core's own layer takes beyond distplan's block at this tp, measured
    at tp = 1 (profilers/megatron_layer.py) and divided by tp (the difference is in the attention heads and
    the projections, both sharded by tp); None where the profile did not measure it at this sequence length."""
    if profile is None or profile.seq_len != cfg.seq_len:
        return None
    meg, ours = profile.compute_fit(MEGATRON_BLOCK_KIND, 1), profile.compute_fit("block", 1)
    if meg is None or ours is None:
        return None
    return tuple((meg.time_s(ph, tokens) - ours.time_s(ph, tokens)) / cfg.tp for ph in ("fwd", "bwd"))


def megatron_head_s(profile: Profile | None, cfg: ParallelConfig, tokens: float) -> tuple[float, float] | None:
    """(forward, backward) seconds of megatron-core's head (final norm, output layer, its vocabulary-parallel
    cross-entropy and the engine's mean), measured at tp = 1 as its last stage with one layer less that layer
    (profilers/megatron_layer.profile_head) and divided by tp (the output layer and the loss are vocabulary-parallel);
    None where the profile did not measure both at this sequence length. Why: megatron-core's plans ran 2.3-8.6%
    under predictions that charged distplan's measured head, the more so the more micro-batches passed it (gpt2-xl;
    benchmarks/results/cost_model_notes.md)."""
    if profile is None or profile.seq_len != cfg.seq_len:
        return None
    head, layer = profile.compute_fit(MEGATRON_HEAD_KIND, 1), profile.compute_fit(MEGATRON_BLOCK_KIND, 1)
    if head is None or layer is None:
        return None
    return tuple(max(0.0, head.time_s(ph, tokens) - layer.time_s(ph, tokens)) / cfg.tp for ph in ("fwd", "bwd"))


def block_time(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig, comm: CommModel,
               profile: Profile | None, engine: str = "any") -> LayerTime:
    """One transformer block (dense or MoE) for one micro-batch.

    `engine` "megatron" with unfused attention (megatron-core's local spec, no Transformer Engine): where the
    profile timed megatron-core's own layer, distplan's measured block plus that layer's measured
    difference (`megatron_layer_delta_s`) instead of the unfused-core correction below."""
    t, b = cfg.tp, cfg.micro_batch_size
    s_local = cfg.seq_len / cfg.cp
    tokens = b * s_local
    h, f = model.hidden_size, model.ffn_hidden_size
    kind = "moe_block" if model.is_moe else "block"
    mm = model.block_matmul_flops_per_token(cfg.seq_len)

    # ---- compute: forward, backward, recompute ----
    fit = measured_fit(profile, kind, cfg)
    k = fit_factor(profile, engine, tokens) if fit is not None else compute_factor(profile)
    if fit is not None:
        fwd, bwd = fit.time_s("fwd", tokens) * k, fit.time_s("bwd", tokens) * k
        attn_share = mm["attn_core"] / sum(mm.values())  # attention's share of the measured forward
        attn_fwd = fwd * attn_share
        core_fwd = attn_fwd  # the attention core's forward as the plan runs it: what selective recompute repeats
        own_layer = engine_model(engine).megatron_core_layers and not model.is_moe
        megatron = megatron_layer_delta_s(profile, cfg, tokens) if own_layer else None
        if not cfg.flash_attention and megatron is not None:
            fwd, bwd = max(0.0, fwd + megatron[0] * k), max(0.0, bwd + megatron[1] * k)
            # megatron's layer differs from distplan's block by its unfused attention core (the s x s scores)
            core_fwd = attn_fwd + max(0.0, megatron[0] * k)
        elif not cfg.flash_attention:
            # the profiler times the block with fused (flash) attention; an unfused plan (megatron without
            # Transformer Engine) pays the s x s scores instead: the measured unfused core where profiled
            # (profilers/compute.UnfusedAttentionCore), else the analytic one, less the analytic flash core
            ff, fb = _attention_core_s(model, cluster, cfg, True)
            core = measured_fit(profile, UNFUSED_ATTENTION_KIND, cfg)
            if core is not None:
                uf, ub = core.time_s("fwd", tokens), core.time_s("bwd", tokens)
            else:
                uf, ub = _attention_core_s(model, cluster, cfg, False)
            fwd, bwd = fwd + max(0.0, uf - ff) * k, bwd + max(0.0, ub - fb) * k
            core_fwd = attn_fwd + max(0.0, uf - ff) * k
    elif cluster.kernels is not None:  # the GPU's measured kernels, one by one (planner/cost/kernels.py)
        fwd, bwd = (x * k for x in kernels.layer_times(cluster, kernels.block_kernels, model, cfg))
        attn_fwd = kernels.attention_fwd_s(cluster, model, cfg) * k
    else:
        gemm = gemm_time_s(cluster, tokens * mm["qkv"] / t) + gemm_time_s(cluster, tokens * mm["attn_out"] / t)
        n_mlp = 3 if model.gated_mlp else 2
        if model.is_moe:
            # each local expert gets tokens*top_k*ep/E tokens from the ep group (balanced routing)
            per_expert_tokens = tokens * model.top_k * cfg.ep / model.num_experts
            per_call = per_expert_tokens * 2 * h * f / t
            gemm += gemm_time_s(cluster, per_call, calls=n_mlp * model.num_experts // cfg.ep)
            gemm += gemm_time_s(cluster, tokens * mm["router"])
        else:
            gemm += gemm_time_s(cluster, tokens * mm["mlp"] / t / n_mlp, calls=n_mlp)
        # attention core: QK^T and softmax*V
        if cfg.flash_attention:
            executed = tokens * mm["attn_core"] / t * (0.5 if not model.is_vit else 1.0)  # causal skips half
            attn_fwd, attn_bwd = fused_attention_pass_s(cluster, executed)
        else:
            heads_local = b * model.num_heads / t
            per_call = 2 * s_local * cfg.seq_len * model.head_dim  # one head's QK^T (or AV)
            attn_fwd = gemm_time_s(cluster, per_call, calls=int(2 * heads_local))
            attn_bwd = 2 * attn_fwd
        # memory-bound kernels, forward bytes (elements * 2 bytes); `rep` shards only with SP
        drop = model.dropout > 0
        rep_elems = 2 * 2 * h + 2 * 3 * h  # two norms (r+w) and two residual adds (r 2h, w h) per token
        rep_elems += (2 * 0.5 * h) if drop else 0  # two dropout masks, 1 byte each
        tp_elems = (3 * f if model.gated_mlp else 2 * f) * model.top_k  # SwiGLU (r 2f, w f) or GeLU (r f, w f)
        if not model.learned_positions:
            tp_elems += 2 * (h + model.kv_dim)  # rotary embedding on q and k (r+w)
        if model.is_moe:
            tp_elems += 4 * model.top_k * h  # token permutation to experts and back (r+w twice)
        if not cfg.flash_attention:
            tp_elems += (4.5 if drop else 2.0) * model.num_heads * cfg.seq_len  # scale-mask-softmax (+dropout) per query
        elems = tokens * (rep_elems / (t if cfg.sequence_parallel else 1) + tp_elems / t)
        mem_fwd = memory_bound_time_s(cluster, elems * BF16)
        fwd = (gemm + attn_fwd + mem_fwd) * k
        bwd = (2 * gemm + attn_bwd + 2 * mem_fwd) * k  # backward: dX and dW GEMMs, elementwise grads read+write

    if cfg.recompute == "full":
        # measured extra backward time under checkpointing where profiled, else one more forward
        measured = fit.time_s("recompute", tokens) if fit is not None else None
        recompute = measured * k if measured is not None else fwd
    elif cfg.recompute == "selective" and not cfg.flash_attention:
        # the unfused core again (Korthikanti et al. 2022 sec. 4.2): measured, its forward (core_fwd: megatron
        # llama-2-13b tp2 ran 12% over when this charged the flash share of the block instead,
        # benchmarks/results/campaign_2xh200.md); analytic, the per-head GEMMs plus the softmax(-dropout) passes
        recompute = core_fwd if fit is not None else attn_fwd + memory_bound_time_s(
            cluster, tokens * (4.5 if model.family in ("gpt", "vit") else 2.0) * model.num_heads * cfg.seq_len / t * BF16)
    else:
        recompute = 0.0  # selective with flash attention: the kernel already recomputes scores

    # ---- TP collectives (stride 1: tp is innermost) ----
    act_bytes = tokens * h * BF16
    if cfg.sequence_parallel:
        one = comm.time_s("reduce_scatter", t, 1, act_bytes) + comm.time_s("all_gather", t, 1, act_bytes)
    else:
        one = comm.time_s("all_reduce", t, 1, act_bytes)
    fwd_colls = 2 * one
    tp_comm = 2 * fwd_colls + (fwd_colls if cfg.recompute == "full" else 0.0)

    # ---- context parallel: ring passes K and V chunks, overlapped with attention (ring attention) ----
    other = 0.0
    if cfg.cp > 1:
        kv_bytes = tokens * 2 * model.kv_dim / t * BF16
        # the ring moves in lockstep: where it spans nodes, its slowest hop (one NIC per GPU) sets each step
        hop_stride = t if t * cfg.cp <= cluster.gpus_per_node else cluster.gpus_per_node
        ring = (cfg.cp - 1) * comm.time_s("p2p", 2, hop_stride, kv_bytes)
        if at_bound(cluster, engine, "cp.ring_overlap"):  # unchecked: every exchange exposed
            other += 3 * ring
        else:
            other += max(0.0, ring - attn_fwd) + max(0.0, 2 * ring - 2 * attn_fwd)  # forward and backward exposure
    # ---- expert parallel: dispatch and combine all-to-all, forward and backward ----
    if model.is_moe and cfg.ep > 1:
        a2a_bytes = tokens * model.top_k * h * BF16
        other += 4 * comm.time_s("all_to_all", cfg.ep, t * cfg.cp, a2a_bytes)
        if cfg.recompute == "full":
            other += 2 * comm.time_s("all_to_all", cfg.ep, t * cfg.cp, a2a_bytes)
    return LayerTime(fwd=fwd, bwd=bwd, recompute=recompute, tp_comm=tp_comm, other_comm=other)


def head_time(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig, profile: Profile | None,
              engine: str = "any") -> tuple[float, float]:
    """(forward, backward) seconds of final norm + LM head + cross-entropy for one micro-batch. `engine` "megatron":
    megatron-core's own head and vocabulary-parallel loss where the profile measured them (megatron_head_s)."""
    tokens = cfg.micro_batch_size * cfg.seq_len / cfg.cp
    own = megatron_head_s(profile, cfg, tokens) if engine_model(engine).megatron_core_layers and not model.is_vit else None
    if own is not None:
        k = fit_factor(profile, engine, tokens)
        return own[0] * k, own[1] * k
    fit = measured_fit(profile, "head", cfg)
    k = fit_factor(profile, engine, tokens) if fit is not None else compute_factor(profile)
    if fit is not None:
        return fit.time_s("fwd", tokens) * k, fit.time_s("bwd", tokens) * k
    if cluster.kernels is not None:
        return tuple(x * k for x in kernels.layer_times(cluster, kernels.head_kernels, model, cfg))
    if model.is_vit:
        tokens = cfg.micro_batch_size  # classifier on the class token only
    gemm = gemm_time_s(cluster, tokens * model.head_matmul_flops_per_token() / cfg.tp)
    ce_bytes = tokens * model.vocab_size / cfg.tp * (BF16 + 4 + 4)  # read logits, fp32 softmax, write grad
    mem = memory_bound_time_s(cluster, ce_bytes)
    return (gemm + mem / 2) * k, (2 * gemm + mem / 2) * k


def embedding_time(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig, profile: Profile | None,
                   engine: str = "any") -> tuple[float, float]:
    tokens = cfg.micro_batch_size * cfg.seq_len / cfg.cp
    fit = measured_fit(profile, "embedding", cfg)
    k = fit_factor(profile, engine, tokens) if fit is not None else compute_factor(profile)
    if fit is not None:
        return fit.time_s("fwd", tokens) * k, fit.time_s("bwd", tokens) * k
    if cluster.kernels is not None:
        return tuple(x * k for x in kernels.layer_times(cluster, kernels.embedding_kernels, model, cfg))
    h = model.hidden_size
    if model.is_vit:
        gemm = gemm_time_s(cluster, tokens * 2 * model.num_channels * model.patch_size**2 * h / cfg.tp)
        return gemm * k, 2 * gemm * k
    mem = memory_bound_time_s(cluster, tokens * h * BF16 * 3 / (cfg.tp if cfg.sequence_parallel else 1))
    return mem * k, 2 * mem * k  # lookup (+ positions) forward; scatter-add of gradients backward
