"""The mechanisms a prediction relies on beyond its measured numbers, as data: what the expected estimate assumes,
what checked it (a measurement of this project or a public one), and, where nothing did, the conservative bound the
pessimistic estimate charges instead and the measurement that would settle it.

A planner is an optimiser: it finds every place where its cost model is too cheap. `solve` therefore ranks plans by
the pessimistic estimate (Cluster.pessimistic(): every unchecked mechanism at its bound), so a plan never wins on a
term nobody has checked, and says where the expected and the pessimistic estimate disagree. The cost model reads
`Cluster.assume` where each mechanism is priced (planner/cost/terms.py, layer.py, predict.py); this table is what
the prediction's `sources` and `unchecked` list say about them.

Pure: no framework, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from planner.core.cluster import Cluster
from planner.core.job import ParallelConfig
from planner.core.model import ModelSpec

# collectives whose bandwidth across nodes no measurement has checked with several GPUs of a node in the group
# (all-reduce has: nccl-tests on DGX A100, see INTER_NODE_ALL_REDUCE below)
UNCHECKED_INTER_NODE_OPS = ("all_gather", "reduce_scatter", "all_to_all")


def crosses_nodes(cluster: Cluster, size: int, stride: int) -> bool:
    """A group of `size` ranks spaced `stride` apart spans more than one node (rank order tp-cp-dp-pp)."""
    return size > 1 and size * stride > cluster.gpus_per_node


def members_per_node(cluster: Cluster, stride: int) -> int:
    """GPUs of one node in a group whose ranks are `stride` apart."""
    return max(1, cluster.gpus_per_node // stride) if stride < cluster.gpus_per_node else 1


def _sharded_across_nodes(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig) -> bool:
    """The plan gathers or reduce-scatters over a data-parallel group with several GPUs per node across nodes
    (ZeRO-2/3), or its experts exchange tokens all-to-all across nodes."""
    dp_group, stride = cfg.dp * cfg.cp, cfg.tp
    sharded = cfg.zero_stage >= 2 and crosses_nodes(cluster, dp_group, stride) and members_per_node(cluster, stride) > 1
    ep_stride = cfg.tp * cfg.cp
    moe = (model.is_moe and cfg.ep > 1 and crosses_nodes(cluster, cfg.ep, ep_stride)
           and members_per_node(cluster, ep_stride) > 1)
    return sharded or moe


TORCHTITAN_FSDP2 = ("torchtitan's FSDP2 on 64 A100s (8 nodes; docs/performance.md): Llama 3 70B and Llama 2 70B with "
                    "full activation checkpointing within 3.0% and 2.3% (`distplan validate` torchtitan)")


@dataclass(frozen=True)
class Mechanism:
    name: str
    assumes: str  # what the expected estimate charges
    evidence: str  # what checked it; "" where nothing has
    pessimistic: str  # what the pessimistic estimate charges instead ("" for a checked mechanism)
    settle: str  # the measurement that would settle it
    applies: Callable[[ModelSpec, Cluster, ParallelConfig], bool]
    by_engine: tuple[tuple[str, str], ...] = ()  # (engine, evidence) where one engine's runs checked it

    def evidence_for(self, engine: str) -> str:
        """What checked this mechanism as `engine` runs it ("" where nothing did)."""
        return self.evidence or dict(self.by_engine).get(engine, "")

    def checked(self, engine: str) -> bool:
        return bool(self.evidence_for(engine))


MECHANISMS: tuple[Mechanism, ...] = (
    Mechanism(
        "cp.ring_overlap",
        assumes="ring attention passes each K/V chunk to the next context-parallel rank while attention runs on the "
                "current one (Liu et al. 2023, ring attention): only the exchange beyond the attention's time shows",
        evidence="",
        pessimistic="every K/V exchange exposed, forward and backward (no engine of `distplan run` executes context "
                    "parallelism, so no run has checked the overlap)",
        settle="time a ring-attention step at this cp on the cluster (torch's context_parallel) against its "
               "attention kernels",
        applies=lambda model, cluster, cfg: cfg.cp > 1),
    Mechanism(
        "inter_node.sharded_bandwidth",
        assumes="an all-gather, reduce-scatter or all-to-all over several GPUs of each node runs at the node's "
                "aggregate NIC bandwidth (NCCL spreads its rings over every NIC of the node)",
        evidence="",
        pessimistic="one NIC per GPU: Megatron-LM SC'21 Table 2's ZeRO-3 rows (DeepSpeed, 384-1536 A100s) ran near "
                    "that rate, not the aggregate",
        settle="nccl-tests all_gather_perf and reduce_scatter_perf across two or more of the cluster's nodes, or a "
               "ZeRO-3 / FSDP2 run across them",
        applies=_sharded_across_nodes, by_engine=(("torch", TORCHTITAN_FSDP2),)),
    Mechanism(
        "zero3.inter_node_overlap",
        assumes="ZeRO-3 / FSDP all-gathers and reduce-scatters across nodes are prefetched behind the compute of "
                "other layers, as the profiled FSDP2 runs inside one node were",
        evidence="",
        pessimistic="the collectives across nodes not overlapped (no ZeRO-3 run of this project has crossed nodes)",
        settle="a ZeRO-3 / FSDP2 run of the plan across the cluster's nodes (`distplan run` with a rendezvous)",
        applies=lambda model, cluster, cfg: cfg.zero_stage >= 3 and crosses_nodes(cluster, cfg.dp * cfg.cp, cfg.tp),
        by_engine=(("torch", TORCHTITAN_FSDP2),)),
    Mechanism(
        "inter_node.all_reduce",
        assumes="a data-parallel all-reduce across nodes runs at the node's aggregate NIC bandwidth, overlapped with "
                "the backward where the engine does",
        evidence="Megatron-LM SC'21 Table 1 (data-parallel all-reduce across up to 384 DGX A100 nodes; "
                 "`distplan validate` sc21_table1) and nccl-tests on DGX A100 (192 GB/s all-reduce bus bandwidth on "
                 "8 x 200 Gb/s, NVIDIA/nccl#812)",
        pessimistic="",
        settle="",
        applies=lambda model, cluster, cfg: cfg.zero_stage <= 1 and crosses_nodes(cluster, cfg.dp * cfg.cp, cfg.tp)),
)


def applying(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig) -> tuple[Mechanism, ...]:
    """The mechanisms `cfg` relies on, checked and unchecked."""
    return tuple(m for m in MECHANISMS if m.applies(model, cluster, cfg))


def unchecked(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig, engine: str = "any") -> tuple[Mechanism, ...]:
    """The mechanisms `cfg` relies on that nothing checked as `engine` runs them: where its expected and pessimistic
    estimates can differ."""
    return tuple(m for m in applying(model, cluster, cfg) if not m.checked(engine))


def at_bound(cluster: Cluster, engine: str, name: str) -> bool:
    """Whether the cost model prices mechanism `name` at its conservative bound: the cluster is the pessimistic view
    and nothing checked the mechanism as `engine` runs it."""
    return cluster.assume == "pessimistic" and not BY_NAME[name].checked(engine)


def sources(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig, engine: str = "any") -> dict[str, str]:
    """Provenance entries of the mechanisms `cfg` relies on, for Prediction.sources."""
    out = {}
    for m in applying(model, cluster, cfg):
        out[f"mechanism.{m.name}"] = (f"validated: {m.evidence_for(engine)}" if m.checked(engine) else
                                      f"unchecked: {m.assumes}; pessimistic bound: {m.pessimistic}; "
                                      f"to settle: {m.settle}")
    return out


BY_NAME = {m.name: m for m in MECHANISMS}
