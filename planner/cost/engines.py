"""What each `distplan run` engine can execute: the solver's filter and `estimate --engine`'s refusal.

`distplan solve --engine E` keeps only plans engine E runs, so a solved plan can be launched as is.
These mirror the engines' own `check_supported` refusals (planner/runner/engines/*) without importing
any framework (the solver must stay importable where torch's distributed stacks are not), and live in
planner/ so that `estimate` does not import the solver package (importing solvers took ~1.4 s of
`distplan estimate`'s 1.7 s: benchmarks/results/estimate_accuracy.md's speed row).
"""

from __future__ import annotations

from planner.core.errors import DistplanError
from planner.core.job import ParallelConfig

ENGINE_CHOICES = ("any", "torch", "deepspeed", "megatron")
# what `runnable` allows per engine, in words (for refusals such as `estimate --engine`)
ENGINE_LIMITS = {
    "torch": "DDP/FSDP2, DTensor TP+SP and torch.distributed.pipelining: no cp or ep, and pipelining needs at least "
             "pp micro-batches (interleaved: a multiple of its rounds)",
    "deepspeed": "ZeRO 0-3 and offload, no tp, cp or ep; its pipeline engine 1f1b without vpp and with ZeRO <= 1",
    "megatron": "megatron-core's local layer spec: no sequence parallel (needs Transformer Engine), no cp, no offload, "
                "ZeRO <= 1, no gpipe, not ep with tp",
}


def runnable(engine: str, cfg: ParallelConfig) -> bool:
    """True when `engine` runs `cfg` (for "any": every configuration the cost model knows); ENGINE_LIMITS in words."""
    if engine == "any":
        return True
    if engine == "torch":
        return cfg.cp == 1 and cfg.ep == 1 and torch_pipeline_ok(cfg)
    if engine == "deepspeed":
        return (cfg.tp == 1 and cfg.cp == 1 and cfg.ep == 1 and cfg.vpp == 1 and cfg.schedule == "1f1b"
                and (cfg.pp == 1 or cfg.zero_stage <= 1))
    if engine == "megatron":
        # ZeRO-2/3 would run as the distributed optimizer (ZeRO-1), so only 0/1
        return (not cfg.sequence_parallel and cfg.cp == 1 and not cfg.offload_optimizer and cfg.zero_stage <= 1
                and cfg.schedule != "gpipe" and not (cfg.ep > 1 and cfg.tp > 1))
    raise DistplanError(f"--engine '{engine}' is unknown; valid: {', '.join(ENGINE_CHOICES)}")


def modelled(engine: str, cfg: ParallelConfig) -> bool:
    """False for a configuration `engine` runs but whose step time the cost model does not predict, which the
    solver leaves out (`distplan estimate` still prices it, as a bound from below).

    DeepSpeed's bf16 ZeRO-0 over data parallelism without a pipeline: DeepSpeed runs it through its unfused fp16
    optimizer (engine._do_optimizer_sanity_check: DDP_BFLOAT16 -> FP16_UnfusedOptimizer), an overflow check, a
    norm and fp32 copies per parameter tensor that the profiler does not measure. gpt2-xl dp2 at 16 x 1 ran 0.611 s
    against 0.423 s predicted (+44%), where ZeRO-1, with the same weights and gradients and sharded optimizer states,
    ran 0.4805 s (2xH200, calls 20 and 22): ZeRO-1 is what the solver offers instead."""
    if engine == "deepspeed" and cfg.zero_stage == 0 and cfg.pp == 1 and cfg.dp * cfg.cp > 1:
        return False
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


def forced_settings(engine: str, transformer_engine: bool = False) -> dict[str, object]:
    """Fixed solver settings (ParallelConfig field -> value) that `engine` imposes on every plan; {} for none.

    megatron without Transformer Engine: megatron-core's local layer spec computes attention unfused
    (DotProductAttention materialises the seq x seq scores), so a plan for it must assume
    flash_attention=False; on 2x H200 a flash-attention plan for this engine was 34-50% short on memory
    and 62% short on time (benchmarks/results/run_2xh200.md, miss 3). `transformer_engine` (solve --te):
    TE is installed and its fused attention runs, so flash attention is kept.
    """
    if engine not in ENGINE_CHOICES:
        raise DistplanError(f"--engine '{engine}' is unknown; valid: {', '.join(ENGINE_CHOICES)}")
    if engine == "megatron" and not transformer_engine:
        return {"flash_attention": False}
    return {}
