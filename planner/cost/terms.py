"""Cost terms: what one GEMM, one memory-bound pass, one fused attention and one collective take on a cluster.

Compute: FLOPs / (peak x the efficiency of the GEMM's size) (Narayanan et al. SC'21 sec. 3); bytes / (HBM bandwidth x
the memory-bound fraction) for elementwise kernels (Korthikanti et al. 2022 sec. 4's tensors); executed FLOPs / (peak
x the attention fraction) for fused attention. Communication: latency + bytes / bandwidth per collective and link
tier (house rule 6), with ring volumes (nccl-tests' bus-bandwidth conventions); inside the sizes a profile measured,
its raw points.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.core.cluster import Cluster
from planner.core.profile import Profile, bus_factor
from planner.cost import nccl
from planner.cost.mechanisms import UNCHECKED_INTER_NODE_OPS, at_bound, members_per_node

BF16 = 2
ADAM_BYTES_PER_PARAM = 30  # fused Adam: r/w fp32 param, m, v (24) + read bf16 grad (2) + write bf16 param (2) + fp32 grad cast (2)
OFFLOAD_PCIE_BYTES_PER_PARAM = 4  # bf16 gradient to host + bf16 updated weight back (ZeRO-Offload sec. 4)
TORCH_OFFLOAD_H2D_BYTES_PER_PARAM = 4  # the torch engine's offload: the fp32 shard to the GPU for each further micro-batch
# the torch engine's MasterWeightsOptimizer around the AdamW step the profile measures on fp32 parameters:
# bf16 gradient read (2) + fp32 gradient write (4), fp32 master read (4) + bf16 weight write (2)
MASTER_CAST_BYTES_PER_PARAM = 12
# DeepSpeed's BF16_Optimizer (bf16 without ZeRO; runtime/bf16_optimizer.py) around the same AdamW step: per
# micro-batch each parameter's bf16 gradient is added into a flat bf16 accumulation buffer (read 2, read and write
# 2 + 2); per step that buffer is cast to a fp32 gradient (2 + 4), the fp32 master copied back into the bf16
# weight (4 + 2), and the buffer and the parameters' gradients zeroed (2 + 2)
DS_BF16_ACCUMULATE_BYTES_PER_PARAM = 6
DS_BF16_STEP_BYTES_PER_PARAM = 16
FLASH_BACKWARD_OVER_FORWARD = 2.5  # FlashAttention-2 backward: 5 matmuls to the forward's 2 (Dao 2023 sec. 3.2)


# ---- communication primitives (ring algorithms, nccl-tests conventions) -----------------------


def ring_volume_factor(op: str, n: int) -> float:
    """Bytes each rank sends per byte of the full buffer: all-reduce 2(n-1)/n, AG/RS/A2A (n-1)/n, p2p 1."""
    return bus_factor(op, n)


def group_link(cluster: Cluster, size: int, stride: int, one_nic: bool = False) -> tuple[float, float]:
    """(latency_s, bandwidth_bytes_s) of a group of `size` ranks spaced `stride` apart (rank order tp-cp-dp-pp).

    Inside a node: the NVLink tier. Across nodes: each node's members share their NICs, one NIC per GPU,
    so the ring's bandwidth is min(intra, inter * members_per_node) (hierarchical bound, Alpa/Calculon);
    `one_nic`: each GPU's traffic through its own NIC only (mechanisms.inter_node.sharded_bandwidth's bound).
    """
    gpn = cluster.gpus_per_node
    intra, inter = cluster.link("intra_node"), cluster.link("inter_node")
    if size * stride <= gpn:
        return intra.latency_s, intra.bandwidth_bytes_s
    per_node = 1 if one_nic else members_per_node(cluster, stride)
    return inter.latency_s, min(intra.bandwidth_bytes_s, inter.bandwidth_bytes_s * per_node)


@dataclass(frozen=True)
class CommModel:
    cluster: Cluster
    profile: Profile | None
    engine: str = "any"  # who runs the collectives: what checked their mechanisms (planner/cost/mechanisms.py)

    def time_s(self, op: str, size: int, stride: int, nbytes: float, calls: int = 1) -> float:
        """Time of `calls` collectives of `op` over `size` ranks moving `nbytes` buffer bytes in all (each call its
        share: each pays its own latency, and its size picks NCCL's algorithm across nodes)."""
        if size <= 1 or nbytes <= 0:
            return 0.0
        if calls > 1:
            return calls * self.time_s(op, size, stride, nbytes / calls)
        within_node = size * stride <= self.cluster.gpus_per_node
        if self.profile is not None and within_node:
            measured = self.profile.measured_collective_s(op, size, nbytes)
            if measured is not None:  # inside the measured sizes: the raw points (see Profile)
                return measured * self.profile.factor(op)
            fit = self.profile.collective_fit(op, size)
            if fit is not None:
                t = fit.latency_s + nbytes * ring_volume_factor(op, size) / (fit.bus_bandwidth_gb_s * 1e9)
                return t * self.profile.factor(op)
        one_nic = op in UNCHECKED_INTER_NODE_OPS and at_bound(self.cluster, self.engine, "inter_node.sharded_bandwidth")
        latency, bw = group_link(self.cluster, size, stride, one_nic)
        bw *= self.cluster.efficiency.collective(op)
        volume = nbytes * ring_volume_factor(op, size)
        if within_node or op == "p2p":
            t = latency + volume / bw
        else:  # across nodes: NCCL's algorithm and protocol choice, its latency growing with ranks and nodes
            nodes = -(-size // members_per_node(self.cluster, stride))
            t, _ = nccl.collective_s(op, nbytes, size, nodes, volume, bw)
        return t * (self.profile.factor(op) if self.profile else 1.0)


# ---- compute primitives -----------------------------------------------------------------------


def gemm_time_s(cluster: Cluster, flops: float, calls: int = 1) -> float:
    """`calls` GEMMs of `flops` FLOPs each, at the efficiency of their size."""
    if flops <= 0:
        return 0.0
    gflop = flops / 1e9
    frac = cluster.efficiency.matmul_fraction(gflop)
    return calls * flops / (cluster.gpu.peak_bf16_tflops * 1e12 * frac)


def memory_bound_time_s(cluster: Cluster, nbytes: float) -> float:
    return nbytes / (cluster.gpu.hbm_bandwidth_gb_s * 1e9 * cluster.efficiency.memory_bound_fraction)


def fused_attention_time_s(cluster: Cluster, executed_flops: float) -> float:
    """Fused (flash) attention forward: the FLOPs the kernel executes at the cluster's attention fraction of peak."""
    return executed_flops / (cluster.gpu.peak_bf16_tflops * 1e12 * cluster.efficiency.attention_fraction)


def fused_attention_pass_s(cluster: Cluster, executed_flops: float) -> tuple[float, float]:
    """(forward, backward) seconds of fused (flash) attention executing `executed_flops` in its forward; the backward
    is FLASH_BACKWARD_OVER_FORWARD times the forward."""
    fwd = fused_attention_time_s(cluster, executed_flops)
    return fwd, FLASH_BACKWARD_OVER_FORWARD * fwd


def gemm_pass_s(cluster: Cluster, fwd_flops: float, bwd_flops: float, calls: int = 1) -> tuple[float, float]:
    """(forward, backward) seconds of `calls` equal GEMMs of `fwd_flops` in all and their backward of `bwd_flops`:
    two GEMMs (dX and dW) per forward one, each at the efficiency of its own size."""
    fwd = gemm_time_s(cluster, fwd_flops / calls, calls)
    return fwd, gemm_time_s(cluster, bwd_flops / (2 * calls), 2 * calls) if bwd_flops > 0 else 0.0


