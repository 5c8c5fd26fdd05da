"""The data-parallel gradient sync overlaps the backward bucket by bucket, and the last bucket (the first layers'
gradients, produced last) follows it: each engine's bucket size from the engine table (EngineModel.
grad_bucket_params: DDP's 25 MB, megatron-core's max(40M, 1M x dp) parameters, one block for the reference)."""

import pytest

from planner.core.cluster import load_cluster
from planner.core.job import ParallelConfig
from planner.core.model import load_model
from planner.cost.engines import engine_model
from planner.cost.predict import predict, stage_params
from planner.cost.terms import BF16, CommModel

H100 = load_cluster("dgx-h100-80gb")


def _sync_parts(model, cfg, engine):
    comm = CommModel(H100, None, engine)
    dense, _ = stage_params(model, cfg, 0, model.num_layers)
    bucket = engine_model(engine).grad_bucket_params(cfg.dp) or dense / model.num_layers
    whole = comm.time_s("all_reduce", cfg.dp, cfg.tp, dense * BF16)
    last = comm.time_s("all_reduce", cfg.dp, cfg.tp, min(bucket, dense) * BF16)
    return whole, last


@pytest.mark.parametrize("engine", ["any", "megatron"])
def test_the_last_bucket_is_exposed_the_rest_hides_behind_the_backward(engine):
    model = load_model("gpt2-xl")
    cfg = ParallelConfig(dp=64, zero_stage=1, micro_batch_size=8, global_batch_size=512, seq_len=1024,
                         flash_attention=engine != "megatron")
    pred = predict(model, H100, cfg, engine=engine)
    whole, last = _sync_parts(model, cfg, engine)
    bwd = dict(pred.breakdown)["compute_bwd"]
    assert whole < bwd  # all but the last bucket can hide
    slowdown = H100.efficiency.overlap_slowdown
    assert dict(pred.breakdown)["dp_grad_sync"] == pytest.approx(last + slowdown * (whole - last), rel=1e-9)


def test_larger_buckets_expose_more():
    model = load_model("gpt2-xl")
    cfg = ParallelConfig(dp=64, zero_stage=1, micro_batch_size=8, global_batch_size=512, seq_len=1024)
    per_block, megatron = (_sync_parts(model, cfg, e)[1] for e in ("any", "megatron"))
    assert megatron > per_block  # 40M parameters against one 1600-wide block's 31M
