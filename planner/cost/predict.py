"""`predict`: the cost model's entry point, assembling per-rank times and memory into a Prediction.

Pure: no printing, no files. See planner/cost/layer.py for the time terms and planner/cost/memory.py
for the memory terms, each with its source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from planner.core.cluster import Cluster
from planner.core.errors import require
from planner.core.job import ParallelConfig
from planner.core.model import ModelSpec
from planner.core.prediction import BREAKDOWN_KEYS, GIB, Prediction, StagePrediction
from planner.core.profile import Profile, ShardingFit, describe_profile
from planner.cost import kernels, mechanisms
from planner.cost.engines import EngineModel, engine_model
from planner.cost.layer import (LayerTime, block_time, embedding_time, head_time, measured_fit, megatron_head_s,
                                megatron_layer_delta_s)
from planner.cost.memory import (WEIGHT_BYTES, allocator_slack, fits, host_capacity_gib, host_memory_per_gpu,
                                 stage_memory, stage_params)
from planner.cost.pipeline import interleaved_pipeline_s, step_time
from planner.cost.profiled import dropped_note, mismatch
from planner.cost.mechanisms import at_bound, crosses_nodes
from planner.cost.terms import (ADAM_BYTES_PER_PARAM, BF16, DS_BF16_ACCUMULATE_BYTES_PER_PARAM,
                                DS_BF16_STEP_BYTES_PER_PARAM, MASTER_CAST_BYTES_PER_PARAM, OFFLOAD_PCIE_BYTES_PER_PARAM,
                                TORCH_OFFLOAD_H2D_BYTES_PER_PARAM, CommModel, memory_bound_time_s)

def _overlap(comm_s: float, window_s: float, slowdown: float) -> float:
    """Exposed seconds of `comm_s` overlapped with `window_s` of compute that slows by `slowdown` meanwhile."""
    hidden = min(comm_s, window_s)
    return max(0.0, comm_s - window_s) + slowdown * hidden


@dataclass(frozen=True)
class RankTime:
    """One pipeline rank's share of `predict`: its time per micro-batch and its once-per-step tail."""

    terms: tuple[tuple[str, float], ...]  # compute_fwd, compute_bwd, recompute, tp_comm, cp_ep_comm, pp_p2p, zero_comm
    time_per_microbatch_s: float  # t_i: the sum of `terms`
    sync_s: float  # exposed data-parallel gradient sync after the pipeline drains
    optimizer_s: float  # optimizer step


@dataclass(frozen=True)
class _PlanTimes:
    """What every pipeline rank of one plan shares: computed once by rank_timer, read by the per-rank parts."""

    model: ModelSpec
    cluster: Cluster
    cfg: ParallelConfig
    profile: Profile | None
    row: EngineModel  # the engine that runs the plan
    comm: CommModel
    slowdown: float  # compute slowdown while communication overlaps it
    lt: LayerTime  # one block's times
    emb: tuple[float, float]  # the embedding's (forward, backward) seconds, on rank 0
    head: tuple[float, float]  # the head's (forward, backward) seconds, on the last rank
    tokens: float  # tokens per micro-batch and rank
    p2p_one: float  # seconds of one pipeline send/receive per chunk boundary (or the measured runtime's per operation)
    dp_group: int  # ranks gradients are reduced over: data- and context-parallel
    impl: str  # whose measured sharding overhead applies (_sharding_impl)
    measured_sharding: float | None  # measured per-block sharding seconds; None: not measured; 0: held
    shard_overhead: float  # per-block sharding seconds charged, averaged over the step's micro-batches
    shard_edge: float  # per-micro-batch sharding seconds charged beyond the blocks (first gather, last reduce)
    masters: bool  # bf16 weights with fp32 masters cast around the step (EngineModel.master_weight_casts)
    ddp: ShardingFit | None  # the profile's DDP measurement where it applies (_ddp_fit)
    tp_fit: ShardingFit | None  # the profile's DTensor TP measurement where it applies (_tp_fit)


def rank_timer(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig,
               profile: Profile | None = None, *, engine: str = "any") -> Callable[[int, int], RankTime]:
    """`timer(rank, layers)`: what `predict` charges pipeline rank `rank` of `cfg` when it holds `layers` blocks.

    `predict` itself sums these, so the solvers' stage DP (which asks for other layer counts than
    `cfg.layer_split`) and the prediction cannot disagree. Pure; block/embedding/head times computed once.

    `engine`: who runs the plan ("torch", "deepspeed", "megatron"; "any": none in particular; its row in
    planner.cost.engines.ENGINES). Sharded data parallelism (ZeRO-2/3; ZeRO-1 too where the engine runs it through
    its sharding machinery: EngineModel.zero1_pays_sharding_overhead) also pays a fixed cost per block and
    micro-batch that the bandwidth terms do not see: collective launches, copy-in/copy-out of the flat buffers,
    bf16 <-> fp32 casts. Where the profile measured it (Profile.sharding, profilers/sharding.py) `zero_comm` is
    layers x that overhead + the measured edge (first all-gather, last reduce-scatter) per micro-batch: FSDP2's, or
    the engine's own (EngineModel.own_sharding_measurement: DeepSpeed's), whose once-per-step part
    (Profile.sharding_step_s) then replaces the bandwidth model's all-gather of updated weights. Without a
    measurement nothing is invented and the bandwidth model alone under-predicts these layouts: 2.0-2.3x on 2x H200
    for gpt2-xl (benchmarks/results/run_2xh200.md, miss 1).
    """
    if profile is not None and profile.model_shape:
        why = mismatch(profile, model, cfg.seq_len)
        require(why is None, f"profile {why}: planner.cost.profiled.profile_for_job refuses it or drops its "
                             "model-specific measurements")
    shared = _plan_times(model, cluster, cfg, profile, engine_model(engine))

    def timer(rank: int, layers: int) -> RankTime:
        fwd, bwd, rec = _compute_s(shared, rank, layers)
        tpc = _tp_comm_s(shared, layers)
        oth = layers * shared.lt.other_comm
        p2p = 2 * cfg.vpp * shared.p2p_one if cfg.pp > 1 else 0.0
        dense, expert = stage_params(model, cfg, rank, layers)
        z3 = _sharding_comm_s(shared, layers, dense, fwd, bwd, rec)
        t_i = fwd + bwd + rec + tpc + oth + p2p + z3
        sync = _dp_sync_s(shared, rank, layers, dense, expert, bwd)
        opt = _optimizer_s(shared, dense, expert)
        terms = (("compute_fwd", fwd), ("compute_bwd", bwd), ("recompute", rec), ("tp_comm", tpc),
                 ("cp_ep_comm", oth), ("pp_p2p", p2p), ("zero_comm", z3))
        return RankTime(terms=terms, time_per_microbatch_s=t_i, sync_s=sync, optimizer_s=opt)

    return timer


def _plan_times(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig, profile: Profile | None,
               row: EngineModel) -> _PlanTimes:
    """The plan's shared times: one block, the embedding and the head, one pipeline transfer, the sharding overhead."""
    comm = CommModel(cluster, profile, row.name)
    slowdown = profile.overlap_slowdown if profile and profile.overlap_slowdown is not None else cluster.efficiency.overlap_slowdown
    tokens = cfg.micro_batch_size * cfg.seq_len / cfg.cp
    dp_group = cfg.dp * cfg.cp  # gradients are reduced over data- and context-parallel ranks
    impl = _sharding_impl(cfg, profile, dp_group, row)
    measured_sharding = _sharding_overhead_s(cfg, profile, dp_group, tokens, row)
    shard_overhead, shard_edge = _sharding_per_microbatch_s(cfg, profile, dp_group, tokens, row, impl,
                                                            measured_sharding)
    return _PlanTimes(
        model=model, cluster=cluster, cfg=cfg, profile=profile, row=row, comm=comm, slowdown=slowdown,
        lt=block_time(model, cluster, cfg, comm, profile, row.name),
        emb=embedding_time(model, cluster, cfg, profile, row.name),
        head=head_time(model, cluster, cfg, profile, row.name),
        tokens=tokens, p2p_one=_p2p_s(model, cfg, profile, row, comm), dp_group=dp_group, impl=impl,
        measured_sharding=measured_sharding, shard_overhead=shard_overhead, shard_edge=shard_edge,
        masters=row.master_weight_casts and not row.fsdp2_layout(cfg),
        ddp=_ddp_fit(cfg, profile, dp_group, row), tp_fit=_tp_fit(cfg, profile, row))


def _p2p_s(model: ModelSpec, cfg: ParallelConfig, profile: Profile | None, row: EngineModel,
           comm: CommModel) -> float:
    """Seconds of one pipeline transfer per micro-batch and chunk boundary (0 without a pipeline): activations
    forward, their gradients backward; scatter/gather optimisation (SC'21 sec. 4.1) sends 1/tp of the tensor per rank.
    With torch.distributed.pipelining, its runtime measured per forward/backward operation beyond the chunk's
    compute, its transfer included (profilers/pipeline.py), where the profile has it: 1.2-1.3 ms per operation where
    the p2p bandwidth said 0.1-0.2 ms (benchmarks/results/cost_model_notes.md)."""
    pp, v = cfg.pp, cfg.vpp
    tokens = cfg.micro_batch_size * cfg.seq_len / cfg.cp
    p2p_bytes = tokens * model.hidden_size * BF16 / cfg.tp
    p2p_one = comm.time_s("p2p", 2, cfg.tp * cfg.cp * cfg.dp, p2p_bytes) if pp > 1 else 0.0
    # operations per rank of one step: each of the rank's v chunks runs a forward and a backward per micro-batch
    ops = 2 * v * cfg.num_microbatches
    measured_op = (profile.pipeline_action_s(cfg.schedule, p2p_bytes, ops)
                   if pp > 1 and row.torch_pipelining and profile is not None else None)
    return measured_op if measured_op is not None else p2p_one


def _sharding_per_microbatch_s(cfg: ParallelConfig, profile: Profile | None, dp_group: int, tokens: float,
                               row: EngineModel, impl: str, measured: float | None) -> tuple[float, float]:
    """(per block, edge) measured sharding seconds charged per micro-batch, (0, 0) where not measured.

    FSDP2 reduce-scatters the gradients on a step's last micro-batch only (EngineModel.sharded_sync_last_microbatch:
    the torch engine's set_requires_gradient_sync; pipelining's last backward): the other m - 1 pay the accumulating
    micro-batch's measured cost, where the profile has it (ShardingFit.accumulate; else the synchronising one).
    llama-3-8b FSDP2 ZeRO-3 at 1 x 4 ran 13% under the synchronising cost on every micro-batch (2.027 s against
    2.340 s; benchmarks/results/replay_2xh200.md)."""
    shard_overhead = measured or 0.0
    shard_edge = profile.sharding_edge_s(dp_group, cfg.zero_stage >= 3, tokens, impl) if measured is not None else 0.0
    m = cfg.num_microbatches
    if measured is not None and row.sharded_sync_last_microbatch and impl.startswith("fsdp2") and m > 1:
        accum = _sharding_overhead_s(cfg, profile, dp_group, tokens, row, sync=False) or 0.0
        accum_edge = profile.sharding_edge_s(dp_group, cfg.zero_stage >= 3, tokens, impl, sync=False)
        shard_overhead = ((m - 1) * accum + shard_overhead) / m
        shard_edge = ((m - 1) * accum_edge + shard_edge) / m
    return shard_overhead, shard_edge


def _compute_s(s: _PlanTimes, rank: int, layers: int) -> tuple[float, float, float]:
    """(forward, backward, recompute) seconds of rank `rank`'s `layers` blocks, its embedding and its head."""
    pp = s.cfg.pp
    fwd = layers * s.lt.fwd + (s.emb[0] if rank == 0 else 0.0) + (s.head[0] if rank == pp - 1 else 0.0)
    bwd = layers * s.lt.bwd + (s.emb[1] if rank == 0 else 0.0) + (s.head[1] if rank == pp - 1 else 0.0)
    return fwd, bwd, layers * s.lt.recompute


def _tp_comm_s(s: _PlanTimes, layers: int) -> float:
    """Exposed tensor-parallel seconds per micro-batch of `layers` blocks: the bandwidth model's all-reduces, or
    where measured (EngineModel.measured_tp) DTensor TP over the local shard's compute, its all-reduces included
    (profilers/tensor_parallel.py), per block (again for the recomputed forward) and once per micro-batch. llama-2-13b
    tp2 ran 38-46% over the bandwidth model (benchmarks/results/cost_model_notes.md)."""
    lt = s.lt
    if s.tp_fit is None or not layers:
        return layers * lt.tp_comm
    redo = 1.0 + (lt.recompute / (lt.fwd + lt.bwd) if lt.fwd + lt.bwd > 0 else 0.0)
    return layers * s.tp_fit.per_block_s(s.tokens) * redo + s.tp_fit.edge_s(s.tokens)  # each tp rank: the whole micro-batch


def _sharding_comm_s(s: _PlanTimes, layers: int, dense: float, fwd: float, bwd: float, rec: float) -> float:
    """Exposed seconds per micro-batch of sharded data parallelism (ZeRO-2/3) for `layers` blocks of `dense`
    non-expert parameters: the bandwidth model's collectives, or the measured overhead (see rank_timer)."""
    cfg, comm, dp_group = s.cfg, s.comm, s.dp_group
    z3 = 0.0
    if cfg.zero_stage >= 3 and dp_group > 1:
        # FSDP / ZeRO-3 per micro-batch: all-gather weights for forward and again for backward,
        # reduce-scatter gradients; prefetched, so overlapped with the compute of other layers
        w_bytes = dense * WEIGHT_BYTES
        stride = cfg.tp
        calls = max(1, layers) * (s.row.zero3_calls_per_block or s.model.modules_with_params_per_block())
        coll = (2 * comm.time_s("all_gather", dp_group, stride, w_bytes, calls)
                + comm.time_s("reduce_scatter", dp_group, stride, w_bytes, calls))
        # the first layer's all-gather and the last layer's reduce-scatter have no compute to hide behind
        edge = coll / max(layers, 1) * 2 / 3
        across = at_bound(s.cluster, s.row.name, "zero3.inter_node_overlap") and crosses_nodes(s.cluster, dp_group,
                                                                                               stride)
        # mechanisms zero3.inter_node_overlap: unchecked across nodes, its bound charges the collectives whole
        z3 = coll + edge if across else _overlap(coll, fwd + bwd + rec, s.slowdown) + edge
    elif cfg.zero_stage == 2 and dp_group > 1:
        # ZeRO-2 reduce-scatters gradients during every micro-batch's backward (DeepSpeed, FSDP SHARD_GRAD_OP)
        rs = comm.time_s("reduce_scatter", dp_group, cfg.tp, dense * BF16)
        if cfg.overlap_grad_reduce:  # the last bucket's reduce-scatter follows the backward (as _dp_sync_s)
            last = comm.time_s("reduce_scatter", dp_group, cfg.tp, _last_bucket_params(s, dense, layers) * BF16)
            z3 = last + _overlap(max(0.0, rs - last), bwd, s.slowdown)
        else:
            z3 = rs
    if s.measured_sharding is not None and layers:
        # the measured cost replaces the bandwidth terms above: the wrapped stacks ran the real collectives beside the
        # compute, so what they expose and how much they slow the compute is already in it; added on top, the overlap
        # model counted it twice (llama-3-8b FSDP2 at 1 x 16: -8.9% with it, -3.3% without; campaign_2xh200.md).
        # A data-parallel group across nodes keeps them: the stacks measured the group inside one node.
        measured = layers * s.shard_overhead + s.shard_edge
        z3 = measured if dp_group * cfg.tp <= s.cluster.gpus_per_node else z3 + measured
    return z3


def _last_bucket_params(s: _PlanTimes, dense: float, layers: int) -> float:
    """Parameters in the rank's last gradient bucket: the engine's bucket size (EngineModel.grad_bucket_params), or
    one block's share of the rank's parameters, never more than the rank holds."""
    bucket = s.row.grad_bucket_params(s.dp_group) or dense / max(layers, 1)
    return min(dense, bucket)


def _dp_sync_s(s: _PlanTimes, rank: int, layers: int, dense: float, expert: float, bwd: float) -> float:
    """Exposed once-per-step data-parallel gradient synchronisation of rank `rank` (and the tied embedding's)."""
    model, cfg, comm, dp_group, pp = s.model, s.cfg, s.comm, s.dp_group, s.cfg.pp
    sync = 0.0
    if s.impl == s.row.own_sharding_measurement:  # e.g. a deepspeed fit at this group size (one rank included)
        # DeepSpeed's measured step beyond the plain AdamW step (its bucketed all-gather included; ZeRO-3's
        # its own, profilers/sharding.measure_deepspeed). ZeRO-1 runs through the same optimizer as ZeRO-2
        # (runtime/zero/stage_1_and_2.py: flat buffers, fp32 partition copies, the all-gather of updated weights)
        # and is charged its figures: gpt2-xl at 16 x 1 measured 0.4805 s at ZeRO-1 and 0.479 s at ZeRO-2, where
        # ZeRO-1 charged as an all-reduce predicted 0.399 s (+20.4%; benchmarks/results/cost_model_notes.md)
        sync = s.profile.sharding_step_s(dp_group, dense + expert, s.impl, cfg.zero_stage >= 3) or 0.0
    elif dp_group > 1 and cfg.zero_stage <= 1:
        # ZeRO-0 all-reduce; ZeRO-1 (distributed optimizer) reduce-scatter + all-gather: same ring volume
        coll = comm.time_s("all_reduce", dp_group, cfg.tp, dense * BF16)
        if expert:
            coll += comm.time_s("all_reduce", max(dp_group // cfg.ep, 1), cfg.tp * cfg.ep, expert * BF16)
        # an engine whose ZeRO-0 all-reduces at the accumulation boundary, after the backward (DeepSpeed's
        # engine.allreduce_gradients; its overlap_comm applies to ZeRO stages only), does not overlap it
        overlapped = cfg.overlap_grad_reduce and (s.row.zero0_allreduce_overlaps_backward or cfg.zero_stage != 0)
        if overlapped:  # bucket by bucket behind the backward; the last bucket (the first layers') after it
            last = comm.time_s("all_reduce", dp_group, cfg.tp, _last_bucket_params(s, dense, layers) * BF16)
            sync = last + _overlap(max(0.0, coll - last), bwd, s.slowdown)
        else:
            sync = coll
        if s.ddp is not None and layers:
            # measured: what DDP's bucketed all-reduce adds to the synchronising micro-batch of `layers` blocks
            # (per block and once; profilers/sharding: stacks of 1 and 4), and the embedding's gradient,
            # produced last in the backward and reduced after it
            emb = model.embedding_params() / cfg.tp * BF16 if rank == 0 else 0.0
            sync = (layers * s.ddp.per_block_s(s.tokens) + s.ddp.edge_s(s.tokens)
                    + (comm.time_s("all_reduce", dp_group, cfg.tp, emb) if emb else 0.0))
    elif dp_group > 1 and cfg.zero_stage == 2:
        # the bandwidth model's all-gather of the updated weight shards
        sync = comm.time_s("all_gather", dp_group, cfg.tp, dense * BF16)
    if model.tie_embeddings and pp > 1 and rank in (0, pp - 1):
        # tied embedding gradients all-reduced between first and last stage (Megatron)
        sync += comm.time_s("all_reduce", 2, cfg.tp * cfg.cp * cfg.dp * (pp - 1),
                            model.vocab_size * model.hidden_size / cfg.tp * BF16)
    return sync


def measured_adamw_s_per_param(cluster: Cluster, profile: Profile | None) -> float:
    """The fused AdamW step's measured seconds per parameter: the profile's, else the cluster's kernel database's
    (both profilers/facts.optimizer_s_per_param); 0 where neither measured it."""
    if profile is not None and profile.optimizer_s_per_param > 0:
        return profile.optimizer_s_per_param
    return (cluster.kernels.adamw or 0.0) if cluster.kernels is not None else 0.0


def _optimizer_s(s: _PlanTimes, dense: float, expert: float) -> float:
    """Seconds of the optimizer step over this rank's share of `dense` + `expert` parameters, the engine's
    copies around it included."""
    cfg, cluster, profile, row, dp_group = s.cfg, s.cluster, s.profile, s.row, s.dp_group
    m = cfg.num_microbatches
    opt_params = dense / (dp_group if cfg.zero_stage >= 1 else 1) + expert / (max(dp_group // cfg.ep, 1) if cfg.zero_stage >= 1 else 1)
    if cfg.offload_optimizer:
        host = cluster.link("host")
        rate = cluster.efficiency.cpu_adam_params_per_s  # DeepSpeed's CPUAdam
        if row.offload_torch_adamw:
            # AdamW on the host's fp32 shards (FSDP2's CPUOffloadPolicy): the profile's measured rate, else the
            # preset's. Not DeepSpeed's: torch's per-parameter loop ran gpt2-xl's 0.78 B parameters per rank in
            # 20.7 s where 1.0 s was predicted at DeepSpeed's rate (benchmarks/results/campaign_2xh200.md)
            measured = profile.host_optimizer_s_per_param if profile is not None else 0.0
            rate = 1.0 / measured if measured > 0 else rate
        opt = opt_params / rate + opt_params * OFFLOAD_PCIE_BYTES_PER_PARAM / host.bandwidth_bytes_s
        if row.offload_copy_per_microbatch and m > 1:
            # FSDP2's CPUOffloadPolicy keeps the fp32 shards on the host and copies them to the GPU for every
            # micro-batch's all-gather (each backward reshards): gpt2-xl on one H200 at 8 x 4 ran 38.7% over one
            # copy per step; charged whole (not overlapped), +9.5% (benchmarks/results/campaign_1xh200.md)
            opt += (m - 1) * opt_params * TORCH_OFFLOAD_H2D_BYTES_PER_PARAM / host.bandwidth_bytes_s
    elif measured_adamw_s_per_param(cluster, profile) > 0:
        opt = opt_params * measured_adamw_s_per_param(cluster, profile)  # measured step rate (profilers/facts.py)
    else:
        opt = memory_bound_time_s(cluster, opt_params * ADAM_BYTES_PER_PARAM)
    if s.masters and measured_adamw_s_per_param(cluster, profile) > 0 and not cfg.offload_optimizer:
        # the measured rate is AdamW on fp32 parameters; bf16 layouts with fp32 masters (the torch engine outside
        # FSDP2: parallelize.MasterWeightsOptimizer) also cast the gradients to the masters and the masters back
        # to bf16: gpt2-xl's DDP step measured 24 ms against 20 predicted without these 12 bytes/parameter
        # (benchmarks/results/campaign_2xh200.md)
        opt += memory_bound_time_s(cluster, opt_params * MASTER_CAST_BYTES_PER_PARAM)
    if row.zero0_fp32_step_copies and cfg.zero_stage == 0 and cfg.pp > 1 and not cfg.offload_optimizer:
        # DeepSpeed's pipeline engine runs BF16_Optimizer: its copies around the step (terms.DS_BF16_*): gpt2-xl pp2
        # at 8 x 4 measured 0.540 s, 0.536 predicted without them, 0.546 with (benchmarks/results/run_2xh200.md).
        # Without a pipeline DeepSpeed's bf16 ZeRO-0 is not modelled (EngineModel.modelled)
        opt += memory_bound_time_s(cluster, (dense + expert) * (DS_BF16_STEP_BYTES_PER_PARAM
                                                                + m * DS_BF16_ACCUMULATE_BYTES_PER_PARAM))
    return opt


def _ddp_fit(cfg: ParallelConfig, profile: Profile | None, dp_group: int, row: EngineModel) -> ShardingFit | None:
    """The profile's measured DDP overhead (ShardingFit, impl "ddp") where the engine runs this layout with torch's
    DistributedDataParallel (EngineModel.measured_ddp; ZeRO-0, tp = 1, parallelize.ZERO_MAPPING), else None (the
    bandwidth model applies)."""
    if profile is None or not row.measured_ddp or cfg.zero_stage != 0 or cfg.tp != 1 or dp_group <= 1:
        return None
    return profile.sharding_fit(dp_group, False, "ddp")


def _tp_fit(cfg: ParallelConfig, profile: Profile | None, row: EngineModel) -> ShardingFit | None:
    """The profile's measured DTensor tensor-parallel overhead (ShardingFit, impl "tp", or "tp-sp" with sequence
    parallelism) where the engine runs tp with DTensor (EngineModel.measured_tp) at the degree measured, else None
    (the bandwidth model applies). A sequence-parallel plan takes the plain measurement where the profile has no SP
    one: SP runs the same DTensor plan plus its norms' (SequenceParallel) and the same collective volume, and left to
    the bandwidth model it ran 10.9% over (llama-3-8b tp2, benchmarks/results/campaign_2xh200.md)."""
    if profile is None or not row.measured_tp or cfg.tp <= 1:
        return None
    plain = profile.sharding_fit(cfg.tp, False, "tp")
    return (profile.sharding_fit(cfg.tp, False, "tp-sp") or plain) if cfg.sequence_parallel else plain


def _sharding_impl(cfg: ParallelConfig, profile: Profile | None, dp_group: int, row: EngineModel) -> str:
    """Whose measured sharding overhead applies: the engine's own (EngineModel.own_sharding_measurement: DeepSpeed's
    for its ZeRO-1/2, one optimizer, stage_1_and_2.py, running both, and ZeRO-3) where the profile measured it
    (profilers/sharding.measure_deepspeed); with tensor parallelism FSDP2's over blocks sharded that way where the
    engine runs that (EngineModel.fsdp_over_tp_shards) and the profile measured it
    (profilers/tensor_parallel.measure_fsdp_tp: "fsdp2-tp<N>"); FSDP2's over whole blocks otherwise."""
    own = row.own_sharding_measurement
    if (own is not None and cfg.zero_stage >= 1 and profile is not None
            and profile.sharding_fit(dp_group, cfg.zero_stage == 3, own) is not None):
        return own
    if (row.fsdp_over_tp_shards and cfg.tp > 1 and profile is not None
            and profile.sharding_fit(dp_group, cfg.zero_stage >= 3, f"fsdp2-tp{cfg.tp}") is not None):
        return f"fsdp2-tp{cfg.tp}"
    return "fsdp2"


def _sharding_overhead_s(cfg: ParallelConfig, profile: Profile | None, dp_group: int, tokens: float,
                         row: EngineModel, sync: bool = True) -> float | None:
    """Measured seconds one sharded block adds per micro-batch (Profile.sharding), or None where this layout
    shards nothing per block or the profile did not measure it at this data-parallel group size.

    ZeRO-3 reshards after forward (FSDP2 reshard_after_forward=True); ZeRO-2, and ZeRO-1 where the engine runs it
    through its sharding machinery (EngineModel.zero1_pays_sharding_overhead), keep the weights to backward (False).
    The profile measured a tp = 1 block at `tokens` tokens per micro-batch and rank; `sync` False: a micro-batch
    that accumulates its gradients without reducing them (ShardingFit.per_block_s).
    """
    sharded = cfg.zero_stage >= 2 or (cfg.zero_stage == 1 and row.zero1_pays_sharding_overhead)
    if profile is None or not sharded:
        return None
    impl = _sharding_impl(cfg, profile, dp_group, row)
    if dp_group <= 1 and impl != row.own_sharding_measurement:
        # one data-parallel rank shards nothing; DeepSpeed still runs its ZeRO machinery (flat buffers, hooks, its
        # own step), which a one-device profile measures on a world of one: gpt2-xl ZeRO-2 on one H200 ran 21.9%
        # over a prediction without it (benchmarks/results/campaign_1xh200.md)
        return None
    return profile.sharding_overhead_s(dp_group, cfg.zero_stage >= 3, tokens, impl, sync)


def predict(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig, profile: Profile | None = None, *,
            engine: str = "any") -> Prediction:
    """Step time, memory per pipeline rank and throughput of `cfg` (validated by the caller).

    `engine`: who runs the plan ("torch", "deepspeed", "megatron", "any"); it picks whose measured sharding
    overhead applies (see rank_timer).
    """
    m, v = cfg.num_microbatches, cfg.vpp
    timer = rank_timer(model, cluster, cfg, profile, engine=engine)
    per_rank, terms_per_rank, stages = [], [], []
    layer_counts = cfg.layers_per_stage(model.num_layers)
    ranges = cfg.stage_layer_ranges(model.num_layers)
    for rank, layers in enumerate(layer_counts):
        rt = timer(rank, layers)
        per_rank.append(rt.time_per_microbatch_s)
        terms_per_rank.append(dict(rt.terms))
        stages.append((rank, ranges[rank], rt.time_per_microbatch_s, stage_memory(model, cfg, rank, layers, profile, engine), rt))

    t_max = max(per_rank)
    slowest = per_rank.index(t_max)
    simulated = (interleaved_pipeline_s(model, cluster, cfg, profile, terms_per_rank, engine)
                 if cfg.pp > 1 and v > 1 else None)  # uneven chunks: the schedule simulated (pipeline.py)
    # once-per-step data-parallel sync and optimizer: the slowest rank sets the step's end
    st = step_time(per_rank, [(rt.sync_s, rt.optimizer_s) for *_, rt in stages], m, v, simulated)
    pipeline, step = st.pipeline_s, st.step_s

    terms = terms_per_rank[slowest]
    breakdown = {k: m * terms[k] for k in terms}
    breakdown["pipeline_bubble"] = pipeline - m * t_max
    breakdown["dp_grad_sync"] = st.sync_s
    breakdown["optimizer"] = st.optimizer_s
    breakdown = tuple((k, breakdown[k]) for k in BREAKDOWN_KEYS)

    gpus = cfg.gpus
    tokens_step = cfg.global_batch_size * cfg.seq_len
    model_flops = model.training_flops(cfg.global_batch_size, cfg.seq_len)
    extra = 0.0
    if cfg.recompute == "full":
        extra = model.training_flops(cfg.global_batch_size, cfg.seq_len, recompute_forward=True) - model_flops
    elif cfg.recompute == "selective" and not cfg.flash_attention:
        extra = tokens_step * model.block_matmul_flops_per_token(cfg.seq_len)["attn_core"] * model.num_layers
    model_tflops = model_flops / step / gpus / 1e12
    hw_tflops = (model_flops + extra) / step / gpus / 1e12

    stage_preds = tuple(StagePrediction(rank=r, layers=rng, time_per_microbatch_s=t, memory=mem)
                        for r, rng, t, mem, _ in stages)
    peak = max(s.memory_gib for s in stage_preds)
    capacity = cluster.usable_memory_gib
    slack = allocator_slack(cfg, engine)
    sources = kernels.label_sources(cluster, model, cfg, _sources(model, cfg, profile, engine))
    sources = tuple(sorted({**dict(sources), **mechanisms.sources(model, cluster, cfg, engine)}.items()))
    unchecked = tuple(m.name for m in mechanisms.unchecked(model, cluster, cfg, engine))
    pessimistic = None
    if unchecked:  # the same plan with every unchecked mechanism at its bound (the search ranks by it)
        pessimistic = step if cluster.assume == "pessimistic" else predict(
            model, cluster.pessimistic(), cfg, profile, engine=engine).step_time_s
    host = host_memory_per_gpu(model, cfg) / GIB
    host_capacity = host_capacity_gib(cluster)
    return Prediction(
        step_time_s=step, breakdown=breakdown, stages=stage_preds, tokens_per_s=tokens_step / step,
        model_tflops_per_gpu=model_tflops, hardware_tflops_per_gpu=hw_tflops,
        mfu=model_tflops / cluster.gpu.peak_bf16_tflops, peak_memory_gib=peak, capacity_gib=capacity,
        fits=fits(cluster, model, cfg, max(s.memory.total for s in stage_preds), engine), sources=sources,
        allocator_slack=slack, host_memory_gib=host, host_capacity_gib=host_capacity,
        host_is_device=cluster.host_is_device, pessimistic_step_time_s=pessimistic, unchecked=unchecked,
    )


def _sources(model: ModelSpec, cfg: ParallelConfig, profile: Profile | None,
             engine: str = "any") -> tuple[tuple[str, str], ...]:
    """Say, per number the prediction used, whether it was measured (profile) or taken from the preset."""
    row = engine_model(engine)
    kind = "moe_block" if model.is_moe else "block"
    out = {}
    for k in (kind, "embedding", "head"):
        if measured_fit(profile, k, cfg) is not None:
            out[f"compute.{k}.tp{cfg.tp}"] = "profile"
        elif profile is not None and profile.model_specific_dropped:
            out[f"compute.{k}.tp{cfg.tp}"] = f"preset (profile measured {describe_profile(profile)})"
        elif profile is not None and profile.compute_fit(k, cfg.tp) is not None:
            out[f"compute.{k}.tp{cfg.tp}"] = f"preset (profile measured seq_len {profile.seq_len}, job has {cfg.seq_len})"
        else:
            out[f"compute.{k}.tp{cfg.tp}"] = "preset"
    for op, size in (("all_reduce", cfg.tp), ("all_reduce", cfg.dp * cfg.cp), ("p2p", 2)):
        if size > 1:
            out[f"comm.{op}.n{size}"] = "profile" if profile and profile.collective_fit(op, size) else "preset"
    stack = profile.stack_factor(cfg.micro_batch_size * cfg.seq_len / cfg.cp) if profile is not None else 1.0
    if measured_fit(profile, kind, cfg) is not None and not row.megatron_core_layers and stack != 1.0:
        out["compute.in_stack"] = (f"profile: measured layer times x {stack:.3f}, a block inside a stack on every "
                                   f"GPU over one alone (costmodel.fit_factor)")
    if row.megatron_core_layers and not cfg.flash_attention and not model.is_moe:
        tokens = cfg.micro_batch_size * cfg.seq_len / cfg.cp
        out["compute.megatron_layer"] = ("profile (megatron-core's layer, tp 1)" if megatron_layer_delta_s(profile, cfg, tokens)
                                         else "not measured: block + unfused attention core")
    if row.megatron_core_layers and not model.is_vit:
        tokens = cfg.micro_batch_size * cfg.seq_len / cfg.cp
        out["compute.megatron_head"] = ("profile (megatron-core's head and loss, tp 1)"
                                        if megatron_head_s(profile, cfg, tokens) is not None
                                        else "not measured: distplan's head")
    if _tp_fit(cfg, profile, row) is not None:
        sp_measured = profile.sharding_fit(cfg.tp, False, "tp-sp") is not None
        out[f"comm.tp_dtensor.n{cfg.tp}"] = ("profile (the torch engine's DTensor TP on stacks of blocks"
                                              + ("" if not cfg.sequence_parallel else
                                                 ", with SP" if sp_measured else "; SP not measured: without SP's")
                                              + ")")
    if cfg.pp > 1 and row.torch_pipelining and profile is not None and profile.pipeline_action_s(cfg.schedule, 0.0) is not None:
        kind_op = "interleaved" if cfg.schedule == "interleaved" else "1f1b"
        out["comm.pipeline_op"] = f"profile (torch.distributed.pipelining {kind_op}, per operation)"
    if profile is not None and profile.optimizer_s_per_param > 0 and not cfg.offload_optimizer:
        out["optimizer"] = "profile"  # said only where measured (older profiles leave the sources as before)
    if profile is not None and profile.model_specific_dropped:
        out["profile.model_specific"] = dropped_note(profile)
    for key, factor in profile.calibration if profile is not None else ():
        out[f"calibration.{key}"] = f"x{factor:.3f} from {profile.calibration_source or 'the profile'}"
    # the per-block sharding overhead: said only where the profile measured some (older profiles and no profile
    # leave the sources exactly as before); without it the bandwidth terms alone are charged (rank_timer)
    dp_group = cfg.dp * cfg.cp
    if _ddp_fit(cfg, profile, dp_group, row) is not None:
        out[f"comm.ddp_overlap.n{dp_group}"] = "profile (DDP on stacks of blocks)"
    if profile is not None and profile.sharding and dp_group > 1 and (
            cfg.zero_stage >= 2 or (cfg.zero_stage == 1 and row.zero1_shards_gradients)):
        tokens = cfg.micro_batch_size * cfg.seq_len / cfg.cp
        measured = _sharding_overhead_s(cfg, profile, dp_group, tokens, row) is not None
        impl = _sharding_impl(cfg, profile, dp_group, row)
        if not measured:
            out[f"sharding.per_layer.n{dp_group}"] = f"not measured at n={dp_group} (bandwidth model only)"
        elif impl == row.own_sharding_measurement:
            out[f"sharding.per_layer.n{dp_group}"] = f"profile ({impl})"
            out[f"sharding.step.n{dp_group}"] = f"profile ({impl})"
        elif row.own_sharding_measurement is not None:
            out[f"sharding.per_layer.n{dp_group}"] = f"profile (fsdp2's: {row.own_sharding_measurement} not measured)"
        elif impl != "fsdp2":
            out[f"sharding.per_layer.n{dp_group}"] = f"profile ({impl}: FSDP2 over tp-{cfg.tp} shards)"
        else:
            out[f"sharding.per_layer.n{dp_group}"] = "profile"
    return tuple(sorted(out.items()))
