"""Each `distplan run` engine as data: what it runs, what it overlaps, its buffers and optimizer copies, and which
measured overheads apply. One row per engine (ENGINES), read by the cost model (layer, memory, predict), the
solver's engine filter (`solve --engine`), `estimate --engine`'s refusal and each runner engine's `check_supported`.
"any" is the cost model's reference behaviour: no engine in particular, every configuration runnable.

A new engine is a new row here plus its runner (planner/runner/engines/<name>_engine.py, named by `runner`).
This module imports no framework (the solver must stay importable where torch's distributed stacks are not), and
lives in planner/cost so that `estimate` does not import the solver package (importing solvers took ~1.4 s of
`distplan estimate`'s 1.7 s: benchmarks/results/estimate_accuracy.md's speed row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from planner.core.errors import DistplanError
from planner.core.job import ParallelConfig

Rule = Callable[[ParallelConfig], bool]


@dataclass(frozen=True)
class Limit:
    """One thing an engine cannot run: `allows(cfg)` is False for the configurations it refuses."""

    allows: Rule  # True where the engine runs cfg as planned
    says: str  # the limit in a few words, for ENGINE_LIMITS
    refusal: str  # the runner's refusal: str.format fields {cfg} (the plan's ParallelConfig) and {on_cpu} (see message)
    # True: the runner runs such a plan, but as another layout (its refusal text says which), so the solver and
    # `estimate --engine` leave it out and the runner's check_supported lets it through
    substituted: bool = False

    def message(self, cfg: ParallelConfig, device: str = "cuda") -> str:
        """The refusal for `cfg` on a runner of `device` type ("cuda", "cpu": {on_cpu} says " on CPU (gloo)")."""
        return self.refusal.format(cfg=cfg, on_cpu=" on CPU (gloo)" if device == "cpu" else "")


def _never(cfg: ParallelConfig) -> bool:
    return False


def _always(cfg: ParallelConfig) -> bool:
    return True


def torch_pipeline_ok(cfg: ParallelConfig) -> bool:
    """What torch.distributed.pipelining accepts: single-stage schedules (1F1B, GPipe) need at least as
    many micro-batches as pipeline ranks; the interleaved schedule runs its micro-batches in rounds of
    pp and needs m divisible by the number of rounds, max(1, m // pp) (torch's ScheduleInterleaved1F1B)."""
    m, pp = cfg.num_microbatches, cfg.pp
    if pp == 1:
        return True
    if cfg.schedule == "interleaved":
        return m % max(1, m // pp) == 0
    return m >= pp


def torch_engine_fsdp(cfg: ParallelConfig) -> bool:
    """Whether the torch engine runs `cfg` through FSDP2's machinery (fully_shard, or replicate for tp > 1):
    data parallelism with ZeRO >= 1 or tensor parallelism, and optimizer offload at any data-parallel size (FSDP2's
    CPUOffloadPolicy is the engine's offload; with one rank it shards nothing and moves the states to the host: an
    offload plan without it ran with every state on the GPU, benchmarks/results/campaign_1xh200.md). Otherwise it runs
    DDP or no data parallelism, with bf16 weights and fp32 masters in its optimizer (parallelize.MasterWeightsOptimizer)."""
    return (cfg.dp > 1 and (cfg.zero_stage >= 1 or cfg.tp > 1)) or (cfg.offload_optimizer and cfg.zero_stage >= 1)


def _deepspeed_modelled(cfg: ParallelConfig) -> bool:
    """DeepSpeed's bf16 ZeRO-0 over data parallelism without a pipeline is not modelled: DeepSpeed runs it through its
    unfused fp16 optimizer (engine._do_optimizer_sanity_check: DDP_BFLOAT16 -> FP16_UnfusedOptimizer), an overflow
    check, a norm and fp32 copies per parameter tensor that the profiler does not measure: gpt2-xl dp2 at 16 x 1 ran
    0.611 s against 0.423 s predicted (+44%), where ZeRO-1, with the same weights and gradients and sharded optimizer
    states, ran 0.481 s (benchmarks/results/run_2xh200.md). ZeRO-1 is what the solver offers instead."""
    return not (cfg.zero_stage == 0 and cfg.pp == 1 and cfg.dp * cfg.cp > 1)


@dataclass(frozen=True)
class EngineModel:
    """What one engine runs and how, as far as the cost model and the solver need to know. A field's default is the
    cost model's reference behaviour (the "any" row); a row names where its engine differs."""

    name: str
    runner: str | None  # module of its `distplan run` engine (train, check_supported); None: no runner ("any")
    runs: str  # how it parallelises, in words (ENGINE_LIMITS' first half)
    # ---- what it can run ----
    limits: tuple[Limit, ...] = ()  # configurations it does not run as planned, in its runner's checking order
    modelled: Rule = _always  # False: it runs cfg but the cost model does not predict it (the solver leaves it out)
    forced_without_te: tuple[tuple[str, object], ...] = ()  # ParallelConfig values it imposes without TE (--te)
    checkpoints: bool = False  # `distplan run --checkpoint-dir/--resume` saves and resumes it (planner/runner/checkpoint)
    # ---- layers and compute ----
    megatron_core_layers: bool = False  # megatron-core's layers: their measured layer and head, no stack factor
    # ---- pipelining ----
    torch_pipelining: bool = False  # torch.distributed.pipelining: its measured cost per operation, its receive buffers
    # ---- data parallelism and sharding ----
    zero1_shards_gradients: bool = False  # runs ZeRO-1 as ZeRO-2: gradients sharded, the sharded allocator slack
    zero1_pays_sharding_overhead: bool = False  # its ZeRO-1 pays the measured per-block sharding overhead
    zero1_costs_beyond_ddp: bool = False  # its ZeRO-1 costs more than DDP, so the solver keeps ZeRO-0 beside it
    zero0_allreduce_overlaps_backward: bool = True  # ZeRO-0's gradient all-reduce overlaps the backward
    own_sharding_measurement: str | None = None  # impl name of the profile's measurement of its own ZeRO (else FSDP2's)
    fsdp_over_tp_shards: bool = False  # with tp > 1 it shards with FSDP2 over tp-sharded blocks ("fsdp2-tp<N>")
    sharded_sync_last_microbatch: bool = False  # FSDP2 layouts reduce-scatter on a step's last micro-batch only
    measured_ddp: bool = False  # its ZeRO-0 at tp = 1 is torch's DDP: the profile's DDP stack measurement applies
    measured_tp: bool = False  # its tp is DTensor's: the profile's tensor-parallel stack measurement applies
    # ZeRO-3 collectives per block and pass, each paying its own latency: one where a block's parameters are one flat
    # buffer (FSDP2's fully_shard per block); 0: one per module holding parameters (DeepSpeed's ZeRO-3 fetches each
    # sub-module's parameters: runtime/zero/partitioned_param_coordinator.py)
    zero3_calls_per_block: int = 1
    # parameters per data-parallel gradient bucket, the last of which (the first layers' gradients, produced last in
    # the backward) cannot overlap anything: 0 for one block's parameters
    grad_bucket_params: Callable[[int], float] = lambda dp: 0.0
    # ---- buffers and optimizer copies ----
    fsdp2_layout: Rule = _never  # where it runs FSDP2 (fp32 shards, deferred reduce-scatter: memory.torch_fsdp_states)
    master_weight_casts: bool = False  # outside FSDP2, bf16 weights with fp32 masters cast around each step
    persistent_grad_buffers: bool = True  # gradients live in buffers kept from step to step (else freed each step)
    replicated_logits: bool = False  # its head gathers the whole vocabulary on every tp rank (no vocab-parallel loss)
    loss_frees_logits: bool = False  # without a pipeline the logits are the loss call's temporary (LOGIT_BYTES_TEMPORARY)
    # ZeRO-0: an fp32 copy of the gradients in the step; with pp > 1 BF16_Optimizer's flat buffer and copies
    zero0_fp32_step_copies: bool = False
    zero12_partition_step_copy: bool = False  # ZeRO-1/2: the step flattens its gradient partition and copies it to fp32
    offload_torch_adamw: bool = False  # offload steps torch's AdamW on the host's fp32 shards (else DeepSpeed's CPUAdam)
    offload_copy_per_microbatch: bool = False  # offload copies the fp32 shards to the GPU for every micro-batch

    def refusals(self, cfg: ParallelConfig) -> tuple[Limit, ...]:
        """The limits `cfg` breaks, in checking order."""
        return tuple(limit for limit in self.limits if not limit.allows(cfg))

    def check(self, cfg: ParallelConfig, device: str = "cuda") -> None:
        """Raise the runner's refusal for the first limit `cfg` breaks that the runner does not run another way."""
        for limit in self.refusals(cfg):
            if not limit.substituted:
                raise DistplanError(limit.message(cfg, device))

    def describe_limits(self) -> str:
        return f"{self.runs}: " + ", ".join(limit.says for limit in self.limits)


_LOCAL_SPEC = "this engine builds megatron-core's local layer spec (torch norms and attention, no Transformer Engine)"

ENGINES: dict[str, EngineModel] = {
    "any": EngineModel(name="any", runner=None, runs="every configuration the cost model knows"),
    "torch": EngineModel(
        name="torch", runner="planner.runner.engines.torch_engine",
        runs="DDP/FSDP2, DTensor TP+SP and torch.distributed.pipelining",
        limits=(
            Limit(lambda c: c.cp == 1, "no cp",
                  "context parallel cp={cfg.cp} is not supported by the torch engine{on_cpu}; re-plan with cp=1, or "
                  "use --engine megatron on GPUs"),
            Limit(lambda c: c.ep == 1, "no ep",
                  "expert parallel ep={cfg.ep} is not supported by the torch engine; re-plan with ep=1 (MoE models run "
                  "with their experts replicated or TP-sharded), or use --engine megatron"),
            Limit(torch_pipeline_ok, "pipelining needs at least pp micro-batches (interleaved: a multiple of its rounds)",
                  "pp={cfg.pp} with {cfg.num_microbatches} micro-batches ({cfg.schedule}): torch.distributed.pipelining "
                  "needs at least pp micro-batches, and the interleaved schedule a multiple of its rounds "
                  "max(1, m // pp); re-plan with more micro-batches"),
        ),
        torch_pipelining=True, zero1_shards_gradients=True, zero1_pays_sharding_overhead=True,
        zero1_costs_beyond_ddp=True, fsdp_over_tp_shards=True, sharded_sync_last_microbatch=True,
        measured_ddp=True, measured_tp=True, fsdp2_layout=torch_engine_fsdp, master_weight_casts=True,
        grad_bucket_params=lambda dp: 12.5e6,  # DDP's bucket_cap_mb=25 of bf16 gradients (FSDP2: one block)
        persistent_grad_buffers=False, replicated_logits=True, loss_frees_logits=True,
        offload_torch_adamw=True, offload_copy_per_microbatch=True, checkpoints=True),
    "deepspeed": EngineModel(
        name="deepspeed", runner="planner.runner.engines.deepspeed_engine",
        runs="ZeRO 0-3 and offload; its pipeline engine 1f1b",
        limits=(
            Limit(lambda c: c.tp == 1, "no tp",
                  "tp={cfg.tp}: DeepSpeed's engine has no tensor parallelism of its own (it needs Megatron's mpu); run "
                  "this plan with --engine torch or --engine megatron, or re-plan with tp=1"),
            Limit(lambda c: c.cp == 1, "no cp",
                  "context parallel cp={cfg.cp} is not supported by the deepspeed engine; use --engine megatron, or "
                  "re-plan with cp=1"),
            Limit(lambda c: c.ep == 1, "no ep",
                  "expert parallel ep={cfg.ep} is not supported by the deepspeed engine (the zoo's MoE layers are not "
                  "deepspeed.moe layers); use --engine megatron, or re-plan with ep=1"),
            Limit(lambda c: c.vpp == 1, "no vpp",
                  "vpp={cfg.vpp}: DeepSpeed's pipeline engine has no interleaved schedule; use --engine torch or "
                  "megatron, or re-plan with vpp=1"),
            Limit(lambda c: c.pp == 1 or c.zero_stage <= 1, "pipeline with ZeRO <= 1",
                  "pp={cfg.pp} with ZeRO-{cfg.zero_stage}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 "
                  "only; re-plan with zero_stage <= 1, or use --engine torch"),
            Limit(lambda c: c.schedule != "gpipe", "no gpipe",
                  "schedule '{cfg.schedule}' planned; DeepSpeed's pipeline engine runs its own 1F1B TrainSchedule",
                  substituted=True),
        ),
        modelled=_deepspeed_modelled,
        zero1_pays_sharding_overhead=True, zero1_costs_beyond_ddp=True, zero0_allreduce_overlaps_backward=False,
        own_sharding_measurement="deepspeed", zero3_calls_per_block=0, grad_bucket_params=lambda dp: 5e8, zero0_fp32_step_copies=True, zero12_partition_step_copy=True,
        loss_frees_logits=True),
    "megatron": EngineModel(
        name="megatron", runner="planner.runner.engines.megatron_engine",
        runs="megatron-core's local layer spec",
        limits=(
            Limit(lambda c: c.schedule != "gpipe", "no gpipe",
                  "schedule 'gpipe': megatron-core runs 1F1B or interleaved 1F1B; re-plan with 1f1b"),
            Limit(lambda c: not c.sequence_parallel, "no sequence parallel (needs Transformer Engine)",
                  "sequence parallel needs Transformer Engine's or Apex's norms, and " + _LOCAL_SPEC
                  + "; re-plan without it, or use --engine torch"),
            Limit(lambda c: c.cp == 1, "no cp",
                  "context parallel cp={cfg.cp} needs Transformer Engine's attention, and " + _LOCAL_SPEC),
            Limit(lambda c: c.ep == 1 or c.tp == 1, "not ep with tp",
                  "ep={cfg.ep} with tp={cfg.tp}: Megatron requires sequence parallelism for expert and tensor "
                  "parallelism together, and " + _LOCAL_SPEC + "; re-plan with tp=1"),
            Limit(lambda c: not c.offload_optimizer, "no offload",
                  "optimizer offload needs Transformer Engine's FusedAdam (Megatron's precision-aware optimizer), and "
                  + _LOCAL_SPEC + "; use --engine deepspeed"),
            Limit(lambda c: c.zero_stage <= 1, "ZeRO <= 1",
                  "ZeRO-{cfg.zero_stage}: megatron's distributed optimizer shards the optimizer states only (ZeRO-1)",
                  substituted=True),
        ),
        forced_without_te=(("flash_attention", False),), megatron_core_layers=True, zero1_costs_beyond_ddp=True,
        # megatron-core DistributedDataParallel: bucket_size max(40M, 1M x data-parallel size) parameters
        grad_bucket_params=lambda dp: max(40e6, 1e6 * dp)),
}
ENGINE_CHOICES = tuple(ENGINES)
# what `runnable` allows per engine, in words (for refusals such as `estimate --engine`)
ENGINE_LIMITS = {name: row.describe_limits() for name, row in ENGINES.items() if row.limits}


def engine_model(engine: str) -> EngineModel:
    """The row of `engine`; an unknown name is refused, naming the valid ones."""
    if engine not in ENGINES:
        raise DistplanError(f"--engine '{engine}' is unknown; valid: {', '.join(ENGINE_CHOICES)}")
    return ENGINES[engine]


def runnable(engine: str, cfg: ParallelConfig) -> bool:
    """True when `engine` runs `cfg` as planned (for "any": every configuration the cost model knows); ENGINE_LIMITS
    in words."""
    return not engine_model(engine).refusals(cfg)


def modelled(engine: str, cfg: ParallelConfig) -> bool:
    """False for a configuration `engine` runs but whose step time the cost model does not predict, which the
    solver leaves out (`distplan estimate` still prices it, as a bound from below): EngineModel.modelled."""
    return engine_model(engine).modelled(cfg)


def forced_settings(engine: str, transformer_engine: bool = False) -> dict[str, object]:
    """Fixed solver settings (ParallelConfig field -> value) that `engine` imposes on every plan; {} for none.

    megatron without Transformer Engine: megatron-core's local layer spec computes attention unfused
    (DotProductAttention materialises the seq x seq scores), so a plan for it must assume
    flash_attention=False; on 2x H200 a flash-attention plan for this engine was 34-50% short on memory
    and 62% short on time (benchmarks/results/run_2xh200.md, miss 3). `transformer_engine` (solve --te):
    TE is installed and its fused attention runs, so flash attention is kept.
    """
    row = engine_model(engine)
    return {} if transformer_engine else dict(row.forced_without_te)
