"""Lower bounds on `predict`'s step time over every layer split: what the search orders and prunes with.

Built on `predict.rank_timer`, the per-rank times predict itself sums, so a change to the cost model moves the
bound with it. For pipeline ranks i holding l_i layers (sum_i l_i = L, every l_i >= 1), predict charges

    step = max(m * t_max + (sum_i t_i - t_max) / v, simulated) + max_i tail_i        (pipeline.step_time)
         >= (m - 1/v) * S / pp + S / v + O / pp

as t_max >= sum_i t_i / pp, m >= 1 >= 1/v and max_i tail_i >= the average tail >= the average optimizer step, with
  S = sum_i (t_i less its zero_comm term): the compute, tensor/context/expert-parallel and pipeline send terms
      are affine in a rank's layer count (a fixed part per rank: embedding, head, sends, measured edges), so S is
      the same for every split; zero_comm (ZeRO/FSDP traffic, partly overlapped) is >= 0 and left out;
  O = sum_i optimizer_s: affine in the rank's parameters, so the same for every split too; the gradient sync
      (>= 0, partly overlapped with the backward) is left out.
With one pipeline rank there is one split, and the bound is predict's step time itself.

`QuickBound` is a looser bound for ordering many configurations at little cost: the same formula with S replaced
by the compute of the blocks, the embedding and the head alone (layer.py's block_time, embedding_time, head_time:
the compute terms of S, which rank_timer charges per layer and per end), computed once per layer shape.
tests/test_bounds.py checks quick <= step bound <= predict over a grid of models, configurations, splits, engines
and profiles, and that the search pruning with them finds the best of every configuration evaluated.
"""

from __future__ import annotations

from planner.core.cluster import Cluster
from planner.core.job import ParallelConfig
from planner.core.model import ModelSpec
from planner.core.profile import Profile
from planner.cost.layer import block_time, embedding_time, head_time
from planner.cost.pipeline import step_time
from planner.cost.predict import RankTime, rank_timer
from planner.cost.terms import CommModel

SPLIT_FREE_TERMS = ("compute_fwd", "compute_bwd", "recompute", "tp_comm", "cp_ep_comm", "pp_p2p")  # all but zero_comm


def _affine_s(rt: RankTime) -> float:
    return sum(t for k, t in rt.terms if k in SPLIT_FREE_TERMS)


def step_lower_bound(model: ModelSpec, cluster: Cluster, cfg: ParallelConfig, profile: Profile | None = None, *,
                     engine: str = "any") -> float:
    """A lower bound on predict(model, cluster, cfg with any layer split, profile, engine=engine).step_time_s."""
    L, pp, v, m = model.num_layers, cfg.pp, cfg.vpp, cfg.num_microbatches
    timer = rank_timer(model, cluster, cfg, profile, engine=engine)
    if pp == 1:
        rt = timer(0, L)
        return step_time([rt.time_per_microbatch_s], [(rt.sync_s, rt.optimizer_s)], m, v).step_s
    # any split gives the same S and O: v layers on every rank but the last, which holds the rest
    first, last = timer(0, v), timer(pp - 1, L - (pp - 1) * v)
    middle = timer(1, v) if pp > 2 else None
    work = _affine_s(first) + _affine_s(last) + ((pp - 2) * _affine_s(middle) if middle else 0.0)
    opt = first.optimizer_s + last.optimizer_s + ((pp - 2) * middle.optimizer_s if middle else 0.0)
    return (m - 1 / v) * work / pp + work / v + opt / pp


class QuickBound:
    """`bound(cfg)` <= step_lower_bound(model, cluster, cfg, profile, engine=engine) for every configuration of one
    model, cluster, profile and engine (module doc), computing each layer shape's compute once."""

    def __init__(self, model: ModelSpec, cluster: Cluster, profile: Profile | None = None, engine: str = "any"):
        self.model, self.cluster, self.profile, self.engine = model, cluster, profile, engine
        self.comm = CommModel(cluster, profile, engine)
        self._work: dict[tuple, float] = {}

    def bound(self, cfg: ParallelConfig) -> float:
        # what block_time, embedding_time and head_time read of the configuration
        key = (cfg.tp, cfg.cp, cfg.ep, cfg.micro_batch_size, cfg.seq_len, cfg.sequence_parallel, cfg.recompute,
               cfg.flash_attention)
        if key not in self._work:
            model, cluster, profile, engine = self.model, self.cluster, self.profile, self.engine
            lt = block_time(model, cluster, cfg, self.comm, profile, engine)
            ends = sum(embedding_time(model, cluster, cfg, profile, engine)) + sum(head_time(model, cluster, cfg, profile, engine))
            self._work[key] = model.num_layers * (lt.fwd + lt.bwd + lt.recompute) + ends
        work, m, v, pp = self._work[key], cfg.num_microbatches, cfg.vpp, cfg.pp
        return (m - 1 / v) * work / pp + work / v
