"""planner/cost/nccl.py: NCCL's tuning model across nodes (src/graph/tuning.cc's formulas and default constants):
tree for small all-reduces at scale, ring for large ones, latency growing with ranks and nodes, each call of a
split collective paying its own latency."""

import pytest

from planner.core.cluster import load_cluster
from planner.cost import nccl
from planner.cost.terms import CommModel, group_link, ring_volume_factor

H100 = load_cluster("dgx-h100-80gb")


def test_ring_latency_follows_nccls_formula():
    # all-gather over 16 nodes of 8 (128 ranks), Simple: base 8.4 + (127 - 15) NVLink steps at max(3.4, 3 x 1.0)
    # + 15 network crossings at 14 us
    assert nccl.ring_latency_s("all_gather", 128, 16, 2) == pytest.approx(1e-6 * (8.4 + 112 * 3.4 + 15 * 14.0))
    # all-reduce goes round twice: 2 x 127 steps, 2 x 15 crossings; LL: NVLink hop 0.6 raised to the 1.0 net overhead
    assert nccl.ring_latency_s("all_reduce", 128, 16, 0) == pytest.approx(1e-6 * (6.6 + 224 * 1.0 + 30 * 2.7))
    # one GPU per node: every hop is a network hop, at the tree's network latency
    assert nccl.ring_latency_s("all_gather", 16, 16, 2) == pytest.approx(1e-6 * (8.4 + 15 * 14.0))


def test_ring_latency_grows_linearly_with_ranks_tree_latency_with_log_nodes():
    small, large = nccl.ring_latency_s("all_gather", 384, 48, 0), nccl.ring_latency_s("all_gather", 1536, 192, 0)
    assert large / small == pytest.approx(4, rel=0.02)
    t64, t1024 = nccl.tree_latency_s(64 * 8, 64, 2), nccl.tree_latency_s(1024 * 8, 1024, 2)
    assert t1024 - t64 == pytest.approx(1e-6 * 2 * 4 * 14.0)  # four more tree levels, up and down


@pytest.mark.parametrize("nbytes,algo", [(1e4, "tree"), (1e6, "tree")])
def test_small_all_reduces_at_scale_take_the_tree(nbytes, algo):
    n, nodes, bw = 1024, 128, 300e9
    t, how = nccl.collective_s("all_reduce", nbytes, n, nodes, nbytes * ring_volume_factor("all_reduce", n), bw)
    assert how.startswith(algo)
    ring = nccl.ring_latency_s("all_reduce", n, nodes, 0)
    assert t < ring  # the ring's latency alone exceeds the tree's whole time


def test_large_all_reduce_on_two_nodes_takes_the_ring_at_full_bandwidth():
    n, nbytes, bw = 16, 4e9, 300e9
    t, how = nccl.collective_s("all_reduce", nbytes, n, 2, nbytes * ring_volume_factor("all_reduce", n), bw)
    assert how == "ring/Simple"
    assert t == pytest.approx(nccl.ring_latency_s("all_reduce", n, 2, 2) + nbytes * 2 * 15 / 16 / bw)


def test_comm_model_inside_a_node_keeps_the_clusters_link():
    comm, nbytes = CommModel(H100, None), 1e8
    latency, bw = group_link(H100, 8, 1)
    expected = latency + nbytes * ring_volume_factor("all_gather", 8) / (bw * H100.efficiency.collective("all_gather"))
    assert comm.time_s("all_gather", 8, 1, nbytes) == pytest.approx(expected, rel=1e-12)


def test_each_call_of_a_split_collective_pays_its_latency():
    comm, nbytes = CommModel(H100, None), 2e9
    one, per_layer = comm.time_s("all_gather", 512, 1, nbytes), comm.time_s("all_gather", 512, 1, nbytes, calls=96)
    assert per_layer == pytest.approx(96 * comm.time_s("all_gather", 512, 1, nbytes / 96), rel=1e-12)
    assert per_layer - one > 90 * nccl.ring_latency_s("all_gather", 512, 64, 0)
