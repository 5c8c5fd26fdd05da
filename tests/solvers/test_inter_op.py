"""The inter-op stage DP: exactly predict()'s step time, never worse than the even split, optimal on small
cases against brute force, every stage within memory."""

import itertools

import pytest

from planner.core.cluster import load_cluster
from planner.core.job import ParallelConfig, validate_config, with_changes
from planner.core.prediction import FRAGMENTATION
from planner.core.model import load_model
from planner.cost.predict import predict
from solvers.inter_op import best_layer_split, stage_submesh_ok, submesh_shapes

H100 = load_cluster("dgx-h100-80gb")
A100 = load_cluster("dgx-a100-80gb")

CASES = [
    ("gpt2-xl", H100, ParallelConfig(dp=16, tp=1, pp=4, micro_batch_size=4, global_batch_size=512, seq_len=1024, zero_stage=1)),
    ("llama-3-8b", H100, ParallelConfig(dp=4, tp=1, pp=2, micro_batch_size=1, global_batch_size=512, seq_len=8192, zero_stage=1)),
    ("llama-3-8b", H100, ParallelConfig(dp=4, tp=1, pp=4, micro_batch_size=1, global_batch_size=512, seq_len=8192, zero_stage=3)),
    ("gpt3-175b", A100, ParallelConfig(dp=8, tp=8, pp=16, vpp=2, schedule="interleaved", micro_batch_size=1,
                                       global_batch_size=1536, seq_len=2048, recompute="full")),
    ("llama-2-70b", H100, ParallelConfig(dp=2, tp=8, pp=4, micro_batch_size=1, global_batch_size=8, seq_len=4096,
                                         zero_stage=2, schedule="gpipe")),
    ("mixtral-8x7b", H100, ParallelConfig(dp=8, tp=2, pp=4, ep=4, micro_batch_size=1, global_batch_size=256, seq_len=4096,
                                          zero_stage=1, sequence_parallel=True)),
]


@pytest.mark.parametrize("name,cluster,cfg", CASES)
def test_split_is_timed_by_predict_fits_and_beats_even(name, cluster, cfg):
    model = load_model(name)
    validate_config(model, cfg)
    split = best_layer_split(model, cluster, cfg)
    assert split is not None
    chosen = with_changes(cfg, layer_split=split.layer_split)
    validate_config(model, chosen)
    pred = predict(model, cluster, chosen)
    assert split.step_time_s == pred.step_time_s  # the same numbers, not an approximation
    for stage in pred.stages:  # memory respected on every stage, with the in-flight micro-batches of its schedule
        assert stage.memory_gib * (1 + FRAGMENTATION) <= pred.capacity_gib
    even = predict(model, cluster, cfg)
    if even.fits:
        assert pred.step_time_s <= even.step_time_s


@pytest.mark.parametrize("pp,zero,schedule", [(3, 1, "1f1b"), (4, 1, "1f1b"), (4, 3, "1f1b"), (3, 2, "gpipe")])
def test_dp_matches_brute_force(pp, zero, schedule):
    """Every split of gpt2's 12 layers over pp stages, predicted one by one: the DP finds the fastest that fits."""
    model = load_model("gpt2")
    cfg = ParallelConfig(dp=2, pp=pp, micro_batch_size=8, global_batch_size=128, seq_len=1024, zero_stage=zero, schedule=schedule)
    best = None
    for split in itertools.product(range(1, 13), repeat=pp):
        if sum(split) != 12:
            continue
        pred = predict(model, H100, with_changes(cfg, layer_split=split))
        if pred.fits and (best is None or pred.step_time_s < best):
            best = pred.step_time_s
    got = best_layer_split(model, H100, cfg)
    assert got.step_time_s == pytest.approx(best, rel=1e-12)


def test_memory_forces_an_uneven_split():
    """1F1B keeps p - i micro-batches on rank i: with activations dominant the first stages take fewer layers."""
    model = load_model("llama-2-13b")
    cfg = ParallelConfig(dp=2, tp=1, pp=8, micro_batch_size=4, global_batch_size=64, seq_len=4096, zero_stage=1)
    split = best_layer_split(model, H100, cfg)
    assert split is not None and split.layer_split
    assert not predict(model, H100, cfg).fits  # the even split does not fit
    pred = predict(model, H100, with_changes(cfg, layer_split=split.layer_split))
    assert pred.fits and split.layer_split[0] < split.layer_split[-2]


def test_no_split_fits_is_none():
    model = load_model("gpt3-175b")
    cfg = ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=1, global_batch_size=8, seq_len=2048)
    assert best_layer_split(model, H100, cfg) is None


def test_alpa_submesh_shapes():
    assert submesh_shapes(3, 8) == [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (3, 8)]
    assert stage_submesh_ok(64, 8, 8) and stage_submesh_ok(64, 64, 8) and stage_submesh_ok(24, 3, 8)
    assert not stage_submesh_ok(24, 8, 8)  # 3 GPUs per stage is not a submesh shape
