"""A prediction, as the cost model (planner/cost/) produces it and the plan file keeps it: step time and its breakdown,
throughput, and memory per pipeline stage with the fit against the GPU (and, for optimizer offload, the host).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3  # bytes per GiB
FRAGMENTATION = 0.05  # caching-allocator slack kept free above the predicted peak when checking fit


def host_fits(need_gib: float, capacity_gib: float) -> bool:
    """Offloaded states fit the host: `need_gib` per GPU within its share `capacity_gib` (0: unknown, not checked)."""
    return capacity_gib <= 0 or need_gib <= capacity_gib


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of a pipeline stage (pipeline rank), by part; `total` is the peak over the step's
    moments (`phases`), not the sum of the parts."""

    weights: float
    gradients: float
    optimizer: float
    activations: float  # stored for backward, at the most micro-batches in flight (and the stage inputs)
    logits: float
    buffers: float  # communication buckets, gathered ZeRO-3 layers
    recompute: float = 0.0  # one layer's transient in backward: its recomputed activations, unfused attention's scores
    step_buffers: float = 0.0  # optimizer-step temporaries (DeepSpeed: flat bf16 and fp32 gradient partition)
    grads_in_forward: bool = True  # gradients exist during a forward: persistent buckets, or accumulated earlier

    def phases(self) -> dict[str, float]:
        """Bytes live at each moment of a step that can be its peak."""
        states = self.weights + self.optimizer + self.buffers
        early = self.gradients if self.grads_in_forward else 0.0
        return {"forward": states + early + self.activations + self.logits,
                "recompute": states + early + self.activations + self.recompute,
                "backward": states + self.gradients + self.recompute,
                "step": states + self.gradients + self.step_buffers}

    @property
    def peak_phase(self) -> str:
        ph = self.phases()
        return max(ph, key=ph.get)

    @property
    def total(self) -> float:
        return max(self.phases().values())

    def at_peak(self) -> dict[str, float]:
        """Bytes of each part live at the peak moment (they sum to `total`): a layer being recomputed counts
        as activations, the step's temporaries as buffers."""
        phase = self.peak_phase
        early = phase in ("forward", "recompute") and not self.grads_in_forward
        return {"weights": self.weights, "gradients": 0.0 if early else self.gradients, "optimizer": self.optimizer,
                "activations": (self.activations if phase in ("forward", "recompute") else 0.0)
                + (self.recompute if phase in ("recompute", "backward") else 0.0),
                "logits": self.logits if phase == "forward" else 0.0,
                "buffers": self.buffers + (self.step_buffers if phase == "step" else 0.0)}

    def as_gib(self) -> dict[str, float]:
        return {k: v / GIB for k, v in self.at_peak().items()}


# the step-time terms of a prediction, in the order shown
BREAKDOWN_KEYS = ("compute_fwd", "compute_bwd", "recompute", "tp_comm", "cp_ep_comm", "pp_p2p", "zero_comm",
                  "pipeline_bubble", "dp_grad_sync", "optimizer")


@dataclass(frozen=True)
class StagePrediction:
    rank: int
    layers: tuple[int, int]  # [first, last] block index held by this pipeline rank
    time_per_microbatch_s: float
    memory: StageMemory

    @property
    def memory_gib(self) -> float:
        return self.memory.total / GIB


@dataclass(frozen=True)
class Prediction:
    step_time_s: float
    breakdown: tuple[tuple[str, float], ...]  # seconds per term on the critical path; sums to step_time_s
    stages: tuple[StagePrediction, ...]
    tokens_per_s: float
    model_tflops_per_gpu: float  # model FLOPs (no recompute) per GPU per second
    hardware_tflops_per_gpu: float  # counting recomputed FLOPs (SC'21's "achieved" numbers)
    mfu: float
    peak_memory_gib: float
    capacity_gib: float  # usable per GPU after the CUDA context, before the allocator's slack
    fits: bool
    sources: tuple[tuple[str, str], ...]  # which numbers came from a profile, which from the preset
    allocator_slack: float = FRAGMENTATION  # share of the peak kept free for the allocator (memory.allocator_slack)
    host_memory_gib: float = 0.0  # CPU memory per GPU for optimizer offload (memory.host_memory_per_gpu)
    host_capacity_gib: float = 0.0  # the node's CPU memory per GPU (0: unknown, not checked)
    host_is_device: bool = False  # the device is the host's CPU: offloaded states share capacity_gib (Cluster)
    # the step with every unchecked mechanism the plan relies on at its conservative bound (planner/cost/
    # mechanisms.py), and those mechanisms' names; None and () where it relies on none
    pessimistic_step_time_s: float | None = None
    unchecked: tuple[str, ...] = ()

    @property
    def over_capacity_gib(self) -> float:
        shared = self.host_memory_gib if self.host_is_device else 0.0
        return max(0.0, self.peak_memory_gib * (1 + self.allocator_slack) + shared - self.capacity_gib)

    @property
    def host_fits(self) -> bool:
        return host_fits(self.host_memory_gib, self.host_capacity_gib)

    def misfit(self) -> str:
        """Why it does not fit, one clause ('' where it fits)."""
        if self.fits:
            return ""
        if not self.host_fits:
            return (f"offloaded optimizer states need {self.host_memory_gib:.1f} GiB of CPU memory per GPU, above the "
                    f"host's {self.host_capacity_gib:.1f} GiB per GPU")
        if self.host_is_device and self.host_memory_gib > 0:
            return (f"peak {self.peak_memory_gib:.1f} GiB (+{100 * self.allocator_slack:.0f}% allocator slack) and "
                    f"{self.host_memory_gib:.1f} GiB of offloaded optimizer states share this CPU's "
                    f"{self.capacity_gib:.1f} GiB per rank (the device is the host): over by {self.over_capacity_gib:.1f} GiB")
        return (f"peak {self.peak_memory_gib:.1f} GiB (+{100 * self.allocator_slack:.0f}% allocator slack) exceeds "
                f"{self.capacity_gib:.1f} GiB usable by {self.over_capacity_gib:.1f} GiB")

    def to_dict(self) -> dict:
        return {
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "model_tflops_per_gpu": self.model_tflops_per_gpu,
            "hardware_tflops_per_gpu": self.hardware_tflops_per_gpu,
            "mfu": self.mfu,
            "peak_memory_gib": self.peak_memory_gib,
            "capacity_gib": self.capacity_gib,
            "fits": self.fits,
            "allocator_slack": self.allocator_slack,
            "host_memory_gib": self.host_memory_gib,
            "host_capacity_gib": self.host_capacity_gib,
            **({"host_is_device": True} if self.host_is_device else {}),
            "stages": [
                {"rank": s.rank, "layers": list(s.layers), "memory_gib": s.memory_gib,
                 "memory_breakdown_gib": s.memory.as_gib(), "memory_peak_at": s.memory.peak_phase,
                 "model_states_gib": {k: getattr(s.memory, k) / GIB for k in ("weights", "gradients", "optimizer")},
                 "time_per_microbatch_s": s.time_per_microbatch_s}
                for s in self.stages
            ],
            "breakdown": dict(self.breakdown),
            "sources": dict(self.sources),
            **({"pessimistic": {"step_time_s": self.pessimistic_step_time_s,
                                "mfu": self.mfu * self.step_time_s / self.pessimistic_step_time_s,
                                "unchecked": list(self.unchecked)}}
               if self.pessimistic_step_time_s is not None else {}),
        }


