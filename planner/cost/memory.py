"""Per-GPU memory of a pipeline stage: model states (ZeRO), activations (Korthikanti), buffers.

Pure functions. Sources:
- Model states: Rajbhandari et al., ZeRO (SC'20) sec. 3-5: mixed-precision Adam keeps 2 bytes of
  bf16/fp16 weights + 2 bytes of gradients + K = 12 bytes of fp32 master weights, momentum and
  variance per parameter; stage 1 partitions the 12, stage 2 also the gradients, stage 3 also the weights.
- Activations: Korthikanti et al. 2022 (arXiv 2205.05198) sec. 4, Table 2: per layer
  s*b*h*(34 + 5*a*s/h) bytes without parallelism; the stored tensors are enumerated below so the same
  bookkeeping covers GeLU/SwiGLU MLPs, grouped-query attention, flash attention, TP, SP, CP and recompute.
- In-flight micro-batches per schedule: Megatron-LM's 1F1B warm-up count
  (get_num_warmup_microbatches): rank i of p holds min(p - i, m) micro-batches; interleaved with v
  chunks holds 2*(p - i - 1) + (v - 1)*p + 1 chunk-forwards; GPipe holds all m.
- The peak is the largest of four moments of a step (StageMemory.phases), not the sum of every term:
  the end of the forward (activations and logits, gradients only where they already exist), a layer
  recomputed in backward, the end of the backward (all gradients, activations gone) and the optimizer
  step (DeepSpeed's fp32 copy of its gradient partition). On 2xH200 the sum over-predicted FSDP2 with full
  recompute by 11-13% (its peak is the end of the forward, before any gradient exists) and missed
  DeepSpeed ZeRO-2's out-of-memory at 13B, which came in the step (benchmarks/results/campaign_2xh200.md).
"""

from __future__ import annotations

from dataclasses import replace

from planner.core.job import ParallelConfig
from planner.core.model import ModelSpec
from planner.core.prediction import FRAGMENTATION, GIB, StageMemory, host_fits
from planner.core.profile import Profile
from planner.cost.engines import engine_model

BYTES_BF16 = 2
WEIGHT_BYTES = 2  # bf16 weights
GRAD_BYTES = 2  # bf16 gradients (ZeRO paper's accounting)
OPTIMIZER_BYTES = 12  # fp32 master weights + Adam momentum + variance (ZeRO's K = 12)
LOGIT_BYTES = 2 + 4 + 4 + 4  # unfused cross-entropy: bf16 logits, fp32 copy, fp32 log-softmax kept, fp32 grad
# ... where the logits are a temporary of the loss call (the torch and deepspeed engines without a pipeline:
# lm_loss(model(x), y)): the bf16 logits and their fp32 copy are freed once log-softmax has its output, and its
# backward holds the output, its gradient and the input's gradient (4 + 4 + 4); a pipeline stage keeps its output for
# backward (14). Measured 2 bytes x b x s x vocabulary under the 14-byte term (benchmarks/results/cost_model_notes.md)
LOGIT_BYTES_TEMPORARY = 4 + 4 + 4
DDP_BUCKET_BYTES = 2 * 25 * 1024**2  # two 25 MiB gradient buckets in flight (DDP / DeepSpeed defaults)
BUCKET_ELEMENTS = DDP_BUCKET_BYTES // 2 // GRAD_BYTES  # one of those buckets in elements (DeepSpeed's bucket sizes)
# sharded data parallelism (FSDP2, DeepSpeed ZeRO-2/3) allocates and frees gathered and reduced buffers of many
# sizes: on 2xH200 its runs reserved 4-14 GiB above their allocated peak (up to 11% of it; DDP and pipeline runs
# 0.1-4.5 GiB), and an FSDP2 llama-3-8b plan predicted at 93% of capacity (124 GiB allocated, 138 reserved)
# retried allocations 6 times per step and ran 34-42% slower than predicted (benchmarks/results/cost_model_notes.md)
SHARDED_FRAGMENTATION = 0.10


def torch_fsdp_states(cfg: ParallelConfig, params: float, partition: float, weights: float, grads: float
                      ) -> tuple[float, float]:
    """(weights, gradients) bytes of the torch engine's FSDP2 (ZeRO >= 1) where they differ from ZeRO's accounting.

    FSDP2 keeps fp32 parameter shards (the masters, counted in the optimizer's 12 bytes) and reduce-scatters
    gradients into fp32 shards (torch's foreach_reduce casts them back to the parameter dtype). Between two
    synchronisations it keeps each parameter's gradient unsharded, in bf16: over a step's m > 1 micro-batches
    with pp = 1 (set_requires_gradient_sync(False) until the last), and with pp > 1 over every micro-batch,
    as torch.distributed.pipelining defers the reduce-scatter and the resharding to the step's end
    (PipelineStage: set_requires_gradient_sync(False), set_reshard_after_backward(False)). So:
    - gradients accumulating: 2 bytes per unsharded parameter. A llama-2-13b dp2 ZeRO-1 plan at micro-batch 2 x 8
      peaked 11.9 GiB (+10.3%) above ZeRO's 2/dp bytes, i.e. 1 byte per parameter more (benchmarks/results/cost_model_notes.md);
    - ZeRO-3 with pp = 1: no bf16 weights outlive their layer (the gathered ones are the buffers), and a step
      without accumulation ends with fp32 shards, 4/dp bytes; with pp > 1 the unsharded bf16 weights stay to
      the step's end. ZeRO-1/2 keep ZeRO's accounting otherwise: their bf16 weights are freed layer by layer in
      backward as the fp32 shards appear, which the 2 + 2/dp bytes bound (a 13B plan at micro-batch 4 x 1 with
      its peak in backward measured -2.8%, benchmarks/results/campaign_2xh200.md)."""
    accumulating = cfg.pp > 1 or cfg.num_microbatches > 1
    if cfg.offload_optimizer:
        # CPUOffloadPolicy: the fp32 parameter and gradient shards live on the host. The GPU holds the unsharded
        # bf16 weights while they are in use (ZeRO-1/2 from forward to backward; ZeRO-3 one layer at a time with
        # pp = 1) and unsharded bf16 gradients only while they accumulate; a synchronising backward reduces each
        # layer's gradients and moves them to the host as it goes
        weights = WEIGHT_BYTES * params if cfg.zero_stage < 3 or cfg.pp > 1 else 0.0
        return weights, GRAD_BYTES * params if accumulating else 0.0
    if cfg.zero_stage >= 3:
        weights = WEIGHT_BYTES * params if cfg.pp > 1 else 0.0
        grads = 4 * partition
    if accumulating:
        grads = max(grads, GRAD_BYTES * params)
    return weights, grads


# CPU memory per offloaded parameter: DeepSpeed's own estimate for ZeRO-Offload (estimate_zero2_model_states_mem_needs,
# deepspeed/runtime/zero/stage_1_and_2.py: total_params x max(4 x GPUs, 16) x 1.5 "additional buffer factor"): fp32
# master weights, Adam's two moments and fp32 gradients on the host (16 B), with half again for its pinned buffers.
# Its 4 x GPUs term is each process loading the whole model into host memory, which distplan's runners do not (they
# build on the meta device). 13B with pp2 ZeRO-1 offload, 2 x 6.5B x 24 B = 290 GiB, was killed by the kernel's
# OOM killer on a 2xH200 host of 252 GiB (benchmarks/results/run_2xh200.md).
OFFLOAD_HOST_BYTES_PER_PARAM = 16 * 1.5


def host_memory_per_gpu(model: ModelSpec, cfg: ParallelConfig) -> float:
    """Bytes of CPU memory one GPU's rank takes for optimizer offload (0 without offload): the offloaded states of the
    model spread over the GPUs, once per data-parallel replica without ZeRO partitioning."""
    if not cfg.offload_optimizer:
        return 0.0
    replicas = 1 if cfg.zero_stage >= 1 else cfg.dp * cfg.cp
    return model.total_params() * replicas * OFFLOAD_HOST_BYTES_PER_PARAM / cfg.gpus


def device_budget_bytes(cluster, model: ModelSpec, cfg: ParallelConfig) -> float:
    """Bytes a rank's device tensors may take (before the allocator's slack): the GPU's usable memory, less the rank's
    offloaded optimizer states where the device is the host's own memory (Cluster.host_is_device: a CPU)."""
    shared = host_memory_per_gpu(model, cfg) if cluster.host_is_device else 0.0
    return cluster.usable_memory_gib * GIB - shared


def allocator_slack(cfg: ParallelConfig, engine: str = "any") -> float:
    """Share of the predicted peak kept free for the caching allocator when checking fit: FRAGMENTATION, or
    SHARDED_FRAGMENTATION for sharded data parallelism (ZeRO-2/3, and ZeRO-1 with the torch engine's FSDP2)."""
    sharded = cfg.dp * cfg.cp > 1 and (cfg.zero_stage >= 2 or (cfg.zero_stage == 1 and engine_model(engine).zero1_shards_gradients))
    return SHARDED_FRAGMENTATION if sharded else FRAGMENTATION


def host_capacity_gib(cluster) -> float:
    """The host memory one GPU's rank may use for offloaded states (0: unknown, not checked; a CPU "device" shares
    one pool with its tensors, counted by device_budget_bytes instead)."""
    return 0.0 if cluster.host_is_device else cluster.host_memory_gib_per_gpu


def fit_budget_bytes(cluster, model: ModelSpec, cfg: ParallelConfig, engine: str = "any") -> float:
    """The largest peak of a rank's device tensors that fits: device_budget_bytes less the allocator's slack on
    top of the peak (allocator_slack)."""
    return device_budget_bytes(cluster, model, cfg) / (1 + allocator_slack(cfg, engine))


def fits(cluster, model: ModelSpec, cfg: ParallelConfig, peak_bytes: float, engine: str = "any") -> bool:
    """The one fit rule, used by predict, the stage DP and the search: a rank's predicted peak within
    fit_budget_bytes, and the offloaded optimizer states within the host's share (host_fits)."""
    return (peak_bytes <= fit_budget_bytes(cluster, model, cfg, engine)
            and host_fits(host_memory_per_gpu(model, cfg) / GIB, host_capacity_gib(cluster)))


def states_fit(model: ModelSpec, cluster, cfg: ParallelConfig, engine: str = "any") -> bool:
    """`fits` for the model states alone (weights, gradients, optimizer) averaged over the pipeline ranks: necessary
    for every layer split, as their sum over the ranks does not depend on the split and every rank's peak holds its
    states (StageMemory.phases' backward and step)."""
    def states(rank: int, layers: int) -> float:
        mem = stage_memory(model, cfg, rank, layers, engine=engine)
        return mem.weights + mem.gradients + mem.optimizer

    total = states(0, model.num_layers) + (states(cfg.pp - 1, 0) if cfg.pp > 1 else 0.0)
    return fits(cluster, model, cfg, total / cfg.pp, engine)


def activation_bytes_per_layer(model: ModelSpec, cfg: ParallelConfig, micro_batch: int, seq_len: int) -> float:
    """Bytes of activations one layer stores for backward, for one micro-batch.

    Enumerates Korthikanti et al. sec. 4.1's stored tensors; the comment on each line is its term in
    the paper's 34*s*b*h + 5*a*s^2*b (GPT, fp16, no parallelism). `rep` terms are replicated across
    tensor-parallel ranks unless sequence parallel shards them; `tp` terms are always sharded.
    """
    s = seq_len / cfg.cp  # context parallel splits the sequence
    b, h = micro_batch, model.hidden_size
    a, t = model.num_heads, cfg.tp
    kv_ratio = model.kv_dim / h
    f_ratio = model.ffn_hidden_size / h * model.top_k  # each token passes through top_k experts
    sbh = s * b * h
    dropout = 1.0 if model.dropout > 0 else 0.0  # masks only where the recipe uses dropout (ModelSpec.dropout)

    if cfg.recompute == "full":
        # only the layer input is kept (Table 2 last row: 2sbh), sharded by SP
        return 2 * sbh / (t if cfg.sequence_parallel else 1)

    rep = 0.0
    rep += 2 * 2  # two norms' inputs (4sbh)
    rep += 2  # QKV projection input (2sbh)
    rep += 2  # MLP input (2sbh)
    rep += dropout * 2  # attention-output and MLP-output dropout masks (sbh each)

    tp_terms = 0.0
    tp_terms += 2 + 2 * kv_ratio  # Q and K inputs of QK^T (4sbh for MHA)
    tp_terms += 2 * kv_ratio  # V (2sbh)
    tp_terms += 2  # attention output, input of the output projection (2sbh)
    if model.gated_mlp:
        tp_terms += 4 * f_ratio  # gate and up outputs (SwiGLU inputs), 2 bytes each of width f
        tp_terms += 2 * f_ratio  # product, input of the down projection
    else:
        tp_terms += 2 * f_ratio  # GeLU input (8sbh for f = 4h)
        tp_terms += 2 * f_ratio  # GeLU output, input of fc2 (8sbh)

    # attention-score terms: 5*a*s^2*b without flash attention (softmax out 2, dropout mask 1, dropout out 2)
    score = 0.0
    if not cfg.flash_attention and cfg.recompute != "selective":
        score = (2 + dropout * 3) * a * s * s * b
    elif cfg.flash_attention:
        score = 4 * a * s * b  # flash attention keeps the fp32 log-sum-exp per query and head

    shard_rep = t if cfg.sequence_parallel else 1
    return sbh * (rep / shard_rep + tp_terms / t) + score / t


def inflight_microbatch_chunks(cfg: ParallelConfig, rank: int) -> int:
    """Chunk-forwards whose activations pipeline rank `rank` holds at its peak (see module doc)."""
    m = cfg.num_microbatches
    if cfg.schedule == "gpipe":
        return m * cfg.vpp
    if cfg.schedule == "interleaved":
        return min(2 * (cfg.pp - rank - 1) + (cfg.vpp - 1) * cfg.pp + 1, m * cfg.vpp)
    return min(cfg.pp - rank, m)


def torch_pipeline_recv_bytes(model: ModelSpec, cfg: ParallelConfig, rank: int) -> float:
    """Receive buffers torch.distributed.pipelining keeps on pipeline rank `rank` (the torch engine's pp > 1): each
    of its stages allocates, once and for every step, one activation buffer per micro-batch for its input (all
    stages but the first) and one for its output's gradient (all but the last) (PipelineStage's forward and
    backward set-up: `_make_tensor_from_meta` per micro-batch), bf16 b x s x h each (sharded by SP). The received
    input is that buffer, so the in-flight micro-batches' inputs live in it. llama-3-8b pp2 v4 interleaved at
    2 x 16 (4096 tokens) peaked 6.8-7.1 GiB over the prediction on both ranks, 7 buffers x 16 micro-batches x 64 MiB
    = 7.0 GiB; llama-2-13b v5 at 1 x 8 +2.6 GiB (2.8) and v2 at 1 x 32 +3.9 GiB (3.75)
    (benchmarks/results/campaign_2xh200.md)."""
    if cfg.pp == 1:
        return 0.0
    stages = cfg.pp * cfg.vpp
    ids = [j * cfg.pp + rank for j in range(cfg.vpp)]  # global stage ids of this rank's chunks (Megatron order)
    buffers = sum((i > 0) + (i < stages - 1) for i in ids)
    act = BYTES_BF16 * cfg.micro_batch_size * (cfg.seq_len / cfg.cp) * model.hidden_size
    return cfg.num_microbatches * buffers * act / (cfg.tp if cfg.sequence_parallel else 1)


def stage_params(model: ModelSpec, cfg: ParallelConfig, rank: int, layers: int) -> tuple[float, float]:
    """(non-expert, expert) parameters on one GPU of pipeline rank `rank` holding `layers` blocks."""
    expert = model.expert_params_per_block() * layers / (cfg.ep * cfg.tp)
    dense = (model.block_params() - model.expert_params_per_block()) * layers / cfg.tp
    if rank == 0:
        dense += model.embedding_params() / cfg.tp  # vocab-parallel embedding
    if rank == cfg.pp - 1:
        head = model.head_params()
        if model.tie_embeddings and cfg.pp > 1:
            head += model.vocab_size * model.hidden_size  # Megatron keeps a copy of tied embeddings on the last stage
        dense += head / cfg.tp
    return dense, expert


def activation_scale(model: ModelSpec, cfg: ParallelConfig, profile: Profile | None, engine: str = "any") -> float:
    """Measured over analytic activation bytes of one block without the attention scores, where the profile
    measured this block (same sequence length and tp; the profiler runs it with fused attention), else 1.

    Korthikanti's enumeration matches gpt2-xl's block as distplan's runners build it to 1%, but a llama
    block stores 1.5-1.6x more (RMSNorm's fp32 intermediates, rotary embeddings, SwiGLU's products):
    on 2xH200 a llama-3-8b pipeline plan peaked 20-24% above the analytic prediction
    (benchmarks/results/campaign_2xh200.md). The profiler's allocator measurement is what these runners
    store. Unfused attention (megatron without Transformer Engine) stores its score tensors beside that
    (stage_memory keeps them analytic): megatron-core's llama layers store what distplan's do plus 2 bytes per
    score (a llama-3-8b megatron plan ran out of memory mid-forward 5 GiB above the analytic count), and its
    gpt2-xl layers the analytic count (within 2.2%; the measured ratio is 1.00 there). Profiles of megatron's
    layer built with TransformerConfig's fp32 softmax stored 6 bytes per score (Megatron-LM's arguments, which the
    engine parses, leave the softmax in bf16; benchmarks/results/campaign_2xh200.md), so it is not used here;
    `engine` changes nothing yet.
    """
    if profile is None or profile.seq_len != cfg.seq_len:
        return 1.0
    fit = profile.compute_fit("moe_block" if model.is_moe else "block", cfg.tp)
    if fit is None or fit.peak_activation_bytes_per_token <= 0:
        return 1.0
    plain = replace(cfg, recompute="none", sequence_parallel=False, cp=1, layer_split=(), flash_attention=True)
    analytic = activation_bytes_per_layer(model, plain, 1, cfg.seq_len) / cfg.seq_len
    return fit.peak_activation_bytes_per_token / analytic if analytic > 0 else 1.0


def scaled_activation_bytes(model: ModelSpec, cfg: ParallelConfig, micro_batch: int, seq_len: int, scale: float) -> float:
    """activation_bytes_per_layer with everything but unfused attention's score tensors scaled by `scale`
    (activation_scale: measured on a fused-attention block)."""
    total = activation_bytes_per_layer(model, cfg, micro_batch, seq_len)
    if cfg.flash_attention or scale == 1.0:
        return total * scale
    fused = activation_bytes_per_layer(model, replace(cfg, flash_attention=True), micro_batch, seq_len)
    lse = 4 * model.num_heads * (seq_len / cfg.cp) * micro_batch / cfg.tp  # flash attention's log-sum-exp
    rest = fused - lse
    return rest * scale + (total - rest)


def grads_in_forward(cfg: ParallelConfig, rank: int, engine: str = "any") -> bool:
    """Whether gradients exist while the stage's activations peak (StageMemory.phases): always where they live
    in persistent buffers (DDP's bucket views for the torch engine's ZeRO-0 over data parallel, megatron-core's
    contiguous gradient buffer, DeepSpeed's gradient partition, kept from step to step); otherwise only where a
    micro-batch's forward runs after an earlier one's backward made them (gradient accumulation, or a pipeline
    rank with more micro-batches than it holds in flight). The torch engine frees them each step
    (zero_grad(set_to_none=True)), so one micro-batch per step peaks at the end of its forward without them.
    "any" (no engine in particular) assumes the persistent buffers of the other engines."""
    if engine_model(engine).persistent_grad_buffers:
        return True
    if cfg.zero_stage == 0 and cfg.dp * cfg.cp > 1 and cfg.tp == 1:
        return True  # DistributedDataParallel(gradient_as_bucket_view=True)
    return cfg.num_microbatches * cfg.vpp > inflight_microbatch_chunks(cfg, rank)


def stage_memory(model: ModelSpec, cfg: ParallelConfig, rank: int, layers: int,
                 profile: Profile | None = None, engine: str = "any") -> StageMemory:
    """Peak bytes on one GPU of pipeline rank `rank` (holding `layers` transformer blocks); a profile that
    measured the block's activations scales the activation terms to them (activation_scale). `engine` ("any",
    "torch", "deepspeed", "megatron"): who runs the plan, for what only it allocates (the torch engine runs ZeRO-1
    as FSDP2's ZeRO-2, so its gradients are sharded; DeepSpeed's step copies; persistent gradient buffers)."""
    row = engine_model(engine)
    dense, expert = stage_params(model, cfg, rank, layers)
    shard = cfg.dp * cfg.cp  # ZeRO partitions over the data-parallel (and context-parallel) ranks
    expert_shard = max(shard // cfg.ep, 1)
    z = cfg.zero_stage
    gz = 2 if z == 1 and row.zero1_shards_gradients else z  # gradients' sharding
    partition = dense / shard + expert / expert_shard  # parameters of this GPU's ZeRO partition
    weights = WEIGHT_BYTES * (dense / (shard if z >= 3 else 1) + expert / (expert_shard if z >= 3 else 1))
    grads = GRAD_BYTES * (dense / (shard if gz >= 2 else 1) + expert / (expert_shard if gz >= 2 else 1))
    if row.fsdp2_layout(cfg) and z >= 1:
        weights, grads = torch_fsdp_states(cfg, dense + expert, partition, weights, grads)
    optim = 0.0 if cfg.offload_optimizer else OPTIMIZER_BYTES * (dense / (shard if z >= 1 else 1) + expert / (expert_shard if z >= 1 else 1))

    b, s = cfg.micro_batch_size, cfg.seq_len
    scale = activation_scale(model, cfg, profile, engine)
    per_layer = scaled_activation_bytes(model, cfg, b, s, scale if cfg.recompute != "full" else 1.0)
    chunks = inflight_microbatch_chunks(cfg, rank)
    acts = per_layer * (layers / cfg.vpp) * chunks
    recompute = 0.0
    if cfg.recompute == "full":
        # while one layer is recomputed its full activations are live (one micro-batch)
        recompute = scaled_activation_bytes(model, replace(cfg, recompute="none", layer_split=()), b, s, scale)
    if not cfg.flash_attention:
        # unfused attention's backward of one layer holds score-sized bf16 tensors beside the stored ones: the
        # gradients of the probabilities and of the scores, and with selective recompute the recomputed scores
        # and probabilities too. Megatron tp2 llama-2-13b (selective, 4096 tokens) ran out of memory on 2xH200
        # allocating one such tensor (b * heads/tp * s^2 * 2 bytes = 1.25 GiB) 4.5 GiB above the prediction
        # without this term (benchmarks/results/cost_model_notes.md).
        per_score = model.num_heads * (s / cfg.cp) ** 2 * b / cfg.tp
        recompute += (4 + (4 if cfg.recompute == "selective" else 0)) * per_score
    # stage input kept per in-flight micro-batch (received activation / embedding output)
    acts += 2 * b * (s / cfg.cp) * model.hidden_size * chunks / (cfg.tp if cfg.sequence_parallel else 1)

    logits = 0.0
    if rank == cfg.pp - 1 and not model.is_vit:
        # Megatron and DeepSpeed: vocabulary-parallel logits and loss, 1/tp per rank. The torch engine's head
        # gathers the whole vocabulary row on every TP rank (parallelize.apply_tp: output Replicate) and takes the
        # loss on it: llama-3-8b tp2 at micro-batch 8 (128k vocabulary) peaked 20.4 GiB above the 1/tp term
        # (108.4 against 88.0 GiB predicted; benchmarks/results/campaign_2xh200.md).
        vocab_split = 1 if row.replicated_logits else cfg.tp
        per_logit = LOGIT_BYTES_TEMPORARY if row.loss_frees_logits and cfg.pp == 1 else LOGIT_BYTES
        logits = per_logit * b * (s / cfg.cp) * model.vocab_size / vocab_split

    if z >= 3:
        # gathered full weights of the current and the prefetched layer, and one layer's unsharded grads
        layer_bytes = (model.block_params() / cfg.tp) * WEIGHT_BYTES
        buffers = 2 * layer_bytes + layer_bytes
    else:
        buffers = float(DDP_BUCKET_BYTES)
    if row.torch_pipelining:
        buffers += torch_pipeline_recv_bytes(model, cfg, rank)
    step = 0.0
    if row.zero0_fp32_step_copies and z == 0:
        # DeepSpeed without ZeRO in bf16. Its pipeline engine runs BF16_Optimizer: a flat bf16 buffer the
        # parameters' gradients are accumulated into after each backward (grad_acc_dtype bf16), allocated at start
        # beside the parameters' own gradients, and in the step a fp32 copy of it handed to Adam
        # (runtime/bf16_optimizer.py, step()). A llama-2-13b pp2 plan at 1 x 8 ran out of memory on its last stage
        # (6.84e9 parameters) allocating Adam's second moment (25.43 GiB) with 115.16 GiB allocated: 18 bytes per
        # parameter, 2 + 4 + 2 + 2 + 4 + 4 (benchmarks/results/run_2xh200.md). Without a pipeline it runs FP16_UnfusedOptimizer
        # (engine._do_optimizer_sanity_check: DDP_BFLOAT16), which copies each gradient to fp32 in the step only.
        if cfg.pp > 1:
            buffers += GRAD_BYTES * (dense + expert)
        step = 4 * (dense + expert)
    elif row.zero12_partition_step_copy and z in (1, 2) and not cfg.offload_optimizer:
        # DeepSpeed's step (stage_1_and_2.py, step()): the partition's bf16 gradients are flattened into a new
        # tensor and that copied to fp32 (2 + 4 bytes per partition parameter) while the gradient partition
        # lives; ZeRO-1 first frees the gradients outside its partition. A 13B ZeRO-2 run on 2xH200 ran out of
        # memory allocating the fp32 copy (24.24 GiB) at 121.3 GiB, the sum of the states and the flat copy.
        step = max(0.0, (GRAD_BYTES + 4) * partition - (grads - GRAD_BYTES * partition))
    return StageMemory(weights=weights, gradients=grads, optimizer=optim, activations=acts, logits=logits,
                       buffers=buffers, recompute=recompute, step_buffers=step,
                       grads_in_forward=grads_in_forward(cfg, rank, engine))


def zero_model_state_bytes(params: float, dp: int, stage: int) -> float:
    """ZeRO paper sec. 5 model-state bytes per GPU: 16P, 4P + 12P/Nd, 2P + 14P/Nd, 16P/Nd."""
    w, g, o = WEIGHT_BYTES * params, GRAD_BYTES * params, OPTIMIZER_BYTES * params
    if stage >= 1:
        o /= dp
    if stage >= 2:
        g /= dp
    if stage >= 3:
        w /= dp
    return w + g + o
