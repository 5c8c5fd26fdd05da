"""planner/cost/mechanisms.py: the pessimistic estimate charges each unchecked mechanism its conservative bound (and
nothing else), an engine whose runs checked a mechanism keeps the expected price, and the published SC'21 Table 2
ZeRO-3 rows lie between the two estimates."""

import pytest

from planner.core.cluster import load_cluster
from planner.core.job import ParallelConfig
from planner.core.model import load_model
from planner.cost import mechanisms
from planner.cost.layer import block_time
from planner.cost.predict import predict
from planner.cost.terms import CommModel, group_link
from planner.validate import run_validation

H100 = load_cluster("dgx-h100-80gb")


def _cfg(**kw) -> ParallelConfig:
    base = dict(global_batch_size=512, seq_len=8192, micro_batch_size=1)
    return ParallelConfig(**{**base, **kw})


def test_a_plan_inside_one_node_relies_on_nothing_unchecked():
    model = load_model("llama-3-8b")
    pred = predict(model, H100, _cfg(dp=8, zero_stage=3, global_batch_size=64))
    assert pred.unchecked == () and pred.pessimistic_step_time_s is None
    assert predict(model, H100.pessimistic(), _cfg(dp=8, zero_stage=3, global_batch_size=64)).step_time_s == \
        pred.step_time_s


def test_ring_attention_at_its_bound_exposes_every_exchange():
    model = load_model("llama-3-8b")
    cfg = _cfg(dp=8, cp=8, zero_stage=1)
    comm = CommModel(H100, None)
    kv_bytes = cfg.micro_batch_size * cfg.seq_len / cfg.cp * 2 * model.kv_dim * 2
    ring = (cfg.cp - 1) * comm.time_s("p2p", 2, 1, kv_bytes)
    bounded = block_time(model, H100.pessimistic(), cfg, CommModel(H100.pessimistic(), None), None)
    assert bounded.other_comm == pytest.approx(3 * ring, rel=1e-12)
    expected = block_time(model, H100, cfg, comm, None)
    assert expected.other_comm < bounded.other_comm  # the attention hides some of it
    pred = predict(model, H100, cfg)
    assert pred.unchecked == ("cp.ring_overlap",)
    assert pred.pessimistic_step_time_s > pred.step_time_s
    assert "unchecked" in dict(pred.sources)["mechanism.cp.ring_overlap"]


def test_a_ring_across_nodes_pays_the_nic_for_its_slowest_hop():
    model = load_model("llama-3-8b")
    inside, across = _cfg(dp=8, cp=8, zero_stage=1), _cfg(dp=4, cp=16, zero_stage=1)
    per_hop = lambda cfg: block_time(model, H100.pessimistic(), cfg, CommModel(H100.pessimistic(), None), None
                                     ).other_comm / (3 * (cfg.cp - 1))
    nic, nvlink = group_link(H100, 2, 8)[1], group_link(H100, 2, 1)[1]
    assert nic < nvlink
    # a KV chunk of half the size over the slower link: the hop takes longer across nodes
    assert per_hop(across) > per_hop(inside)


def test_sharded_collectives_across_nodes_at_their_bound_use_one_nic_per_gpu():
    comm, bounded = CommModel(H100, None), CommModel(H100.pessimistic(), None)
    nbytes = 2e9
    assert bounded.time_s("all_gather", 16, 1, nbytes) > 7 * comm.time_s("all_gather", 16, 1, nbytes)
    # the checked all-reduce keeps the node's aggregate bandwidth; inside one node nothing changes
    assert bounded.time_s("all_reduce", 16, 1, nbytes) == comm.time_s("all_reduce", 16, 1, nbytes)
    assert bounded.time_s("all_gather", 8, 1, nbytes) == comm.time_s("all_gather", 8, 1, nbytes)


def test_an_engine_whose_runs_checked_a_mechanism_keeps_the_expected_price():
    """FSDP2 across nodes is checked by torchtitan's published 64-A100 rows (mechanisms.TORCHTITAN_FSDP2): the
    torch engine's ZeRO-3 plan across nodes has no pessimistic step, where the reference engine's has."""
    model = load_model("llama-2-7b")
    cfg = _cfg(dp=16, zero_stage=3, seq_len=4096, global_batch_size=64)
    torch_pred = predict(model, H100, cfg, engine="torch")
    any_pred = predict(model, H100, cfg)
    assert torch_pred.unchecked == ()
    assert predict(model, H100.pessimistic(), cfg, engine="torch").step_time_s == torch_pred.step_time_s
    assert set(any_pred.unchecked) == {"inter_node.sharded_bandwidth", "zero3.inter_node_overlap"}
    assert any_pred.pessimistic_step_time_s > any_pred.step_time_s
    assert dict(torch_pred.sources)["mechanism.zero3.inter_node_overlap"].startswith("validated: torchtitan")


def test_every_mechanism_says_what_would_settle_it():
    for m in mechanisms.MECHANISMS:
        assert m.assumes
        if not m.evidence:
            assert m.pessimistic and m.settle, m.name


def test_sc21_table2_zero3_lies_between_the_pessimistic_and_the_expected_estimate():
    """The published DeepSpeed ZeRO-3 throughput (Narayanan et al. SC'21 Table 2) at 384, 768 and 1536 A100s: above
    the pessimistic bound, below the expected estimate; the PTD-P rows rely on nothing unchecked."""
    suite = next(s for s in run_validation(("sc21_table2",)).suites)
    zero3 = [r for r in suite.rows if r.case.startswith("ZeRO-3")]
    assert len(zero3) == 3 and all(r.bracketed for r in zero3)
    assert all(r.pessimistic is None for r in suite.rows if r.case.startswith("PTD-P"))
