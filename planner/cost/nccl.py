"""NCCL's own cost model of a collective across nodes: which algorithm and protocol it picks, and the latency that
grows with ranks and nodes.

NCCL prices every (algorithm, protocol) pair as latency + bytes / bandwidth and runs the cheapest
(src/graph/tuning.cc, ncclTopoTuneModel, with its default tuner constants; NCCL 2.2x). Across nodes:
- ring (every collective): a base latency, then one hop latency per step, a network hop (`NET`) for each of the
  ring's node crossings and an NVLink hop (at least the network's per-step overhead) for the rest: all-reduce runs
  2(n - 1) steps with 2(nodes - 1) crossings, all-gather and reduce-scatter n - 1 steps with nodes - 1;
- tree (all-reduce only): a chain inside each node and a binary tree between nodes, up and down:
  2 ((ranks per node - 1) intra hops + log2(nodes) network hops);
- protocols: LL (8-byte flag + data: lowest latency, half the bandwidth), LL128 (120 of 128 bytes: 0.92 of it),
  Simple (full bandwidth, the highest latency).
The bandwidth itself is the caller's (the cluster's link model): this module adds the latency and the choice. Inside
one node the cluster's measured figures apply instead (planner.cost.terms.CommModel).
"""

from __future__ import annotations

import math

PROTOCOLS = ("LL", "LL128", "Simple")
# NCCL tuning.cc default tuner constants, microseconds, per protocol (LL, LL128, Simple)
BASE_US = {"ring": (6.6, 14.0, 8.4), "tree": (6.8, 14.0, 8.4)}  # baseLatencies
NVLINK_HOP_US = {"ring": (0.6, 1.9, 3.4), "tree": (0.6, 1.25, 4.0)}  # hwLatencies[NVLINK]
NET_HOP_US = {"ring": (2.7, 4.0, 14.0), "tree": (5.0, 8.5, 14.0)}  # hwLatencies[NET]
NET_OVERHEAD_US = 1.0  # getNetOverhead: network post overhead per step on x86 Intel hosts (x3 with Simple)
# bandwidth of each protocol relative to Simple's (tuning.cc "model refinements": ring LL x0.5, LL128 x0.92;
# tree all-reduce x0.92 for every protocol, then LL x1/3.8 and LL128 x120/128 across nodes)
RING_BW = (0.5, 0.92, 1.0)
TREE_BW = (0.92 / 3.8, 0.92 * 120 / 128, 0.92)
# LL's bus bandwidth cap across nodes, bytes/s (tuning.cc llMaxBws, x86 Intel hosts: 2 nodes, more); the per-channel
# caps of LL128 and tree are not applied (they scale with NCCL's channel count, which this model does not know)
LL_MAX_BW = {2: 39.0e9, 3: 20.4e9}


def ring_latency_s(op: str, ranks: int, nodes: int, proto: int) -> float:
    """Latency of a ring collective over `ranks` GPUs on `nodes` nodes (protocol index into PROTOCOLS)."""
    steps = 2 * (ranks - 1) if op == "all_reduce" else ranks - 1 if op in ("all_gather", "reduce_scatter") else ranks
    crossings = 0 if nodes == 1 else 2 * (nodes - 1) if op == "all_reduce" else nodes - 1
    overhead = NET_OVERHEAD_US * (3 if PROTOCOLS[proto] == "Simple" else 1) if nodes > 1 else 0.0
    intra = max(NVLINK_HOP_US["ring"][proto], overhead)
    # one GPU per node: every hop crosses the network, at the tree's network latency (tuning.cc, ppn == 1)
    net = NET_HOP_US["tree" if ranks == nodes else "ring"][proto]
    return 1e-6 * (BASE_US["ring"][proto] + (steps - crossings) * intra + crossings * net)


def tree_latency_s(ranks: int, nodes: int, proto: int) -> float:
    """Latency of NCCL's tree all-reduce over `ranks` GPUs on `nodes` nodes."""
    per_node = ranks / nodes
    return 1e-6 * (BASE_US["tree"][proto] + 2 * ((per_node - 1) * NVLINK_HOP_US["tree"][proto]
                                                 + math.floor(math.log2(nodes)) * NET_HOP_US["tree"][proto]))


def collective_s(op: str, nbytes: float, ranks: int, nodes: int, volume: float, bus_bw: float) -> tuple[float, str]:
    """(seconds, "algorithm/protocol") of the cheapest way NCCL runs `op` on `nbytes` over `ranks` GPUs on `nodes`
    nodes: `volume` bytes per rank over the ring (nccl-tests' bus-bandwidth convention) at `bus_bw` bytes/s
    (Simple's large-message bus bandwidth)."""
    best = None
    for i, proto in enumerate(PROTOCOLS):
        bw = min(bus_bw * RING_BW[i], LL_MAX_BW[min(nodes, 3)]) if proto == "LL" and nodes > 1 else bus_bw * RING_BW[i]
        t = ring_latency_s(op, ranks, nodes, i) + volume / bw
        if best is None or t < best[0]:
            best = (t, f"ring/{proto}")
        if op == "all_reduce" and nodes > 1:
            # tree: each byte goes up and down once at the tree's bandwidth (NCCL: algorithm bandwidth = bus x 0.5)
            tree_bw = bus_bw * TREE_BW[i]
            t = tree_latency_s(ranks, nodes, i) + 2 * nbytes / (min(tree_bw, LL_MAX_BW[min(nodes, 3)]) if proto == "LL"
                                                                else tree_bw)
            if t < best[0]:
                best = (t, f"tree/{proto}")
    return best
