"""The exhaustive oracle: every uniform configuration, each predicted with `planner.cost.predict`.

It exists to check the solver (house rule 10: each solver against an exhaustive oracle): on small
cases the solver's plan must be as fast as the oracle's best or faster (the solver may also split
layers unevenly, which the oracle never does).

Enumerated, with none of the solver's pruning rules: every (dp, tp, pp, cp) with dp*tp*pp*cp = N (tp
across nodes, cp for any sequence, pp on any submesh); ep dividing the experts and dp*cp; ZeRO 0-3
with and without optimizer offload; recompute none, selective and full; sequence parallel on and off;
GPipe, 1F1B and interleaved 1F1B; layers spread evenly (`ParallelConfig`'s default split).
The domains of two integer knobs are bounded as in the solver: micro-batch sizes are the powers of two
up to 16 dividing B/dp, and interleaving uses at most 8 virtual stages per rank.
Invalid configurations are skipped by `planner.core.job.validate_config`, the same rules `estimate` applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from planner.core.cluster import Cluster
from planner.core.errors import DistplanError
from planner.core.job import RECOMPUTE, ParallelConfig, validate_config
from planner.core.model import ModelSpec
from planner.core.prediction import Prediction
from planner.cost.predict import predict
from planner.core.profile import Profile
from solvers.search import MAX_MICRO_BATCH, MAX_VPP, config_key


@dataclass(frozen=True)
class OracleResult:
    config: ParallelConfig | None  # None when no uniform configuration fits
    prediction: Prediction | None
    enumerated: int  # valid configurations predicted
    fitting: int  # of which fit in memory


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def uniform_configs(model: ModelSpec, gpus: int, global_batch: int, seq_len: int, *, flash_attention: bool = True,
                    overlap_grad_reduce: bool = True):
    """Every valid uniform configuration of `gpus` GPUs (module doc), in canonical order."""
    for tp, cp, pp in product(_divisors(gpus), repeat=3):
        if gpus % (tp * cp * pp):
            continue
        dp = gpus // (tp * cp * pp)
        if global_batch % dp:
            continue
        eps = [e for e in _divisors(model.num_experts) if (dp * cp) % e == 0] if model.is_moe else [1]
        mbs = [2**k for k in range(MAX_MICRO_BATCH.bit_length()) if (global_batch // dp) % 2**k == 0]
        scheds = [("1f1b", 1), ("gpipe", 1)] + [("interleaved", v) for v in range(2, MAX_VPP + 1)]
        for ep, mb, (schedule, vpp), sp, zero, offload, rec in product(
                eps, mbs, scheds, (False, True), (0, 1, 2, 3), (False, True), RECOMPUTE):
            cfg = ParallelConfig(dp=dp, tp=tp, pp=pp, cp=cp, ep=ep, vpp=vpp, sequence_parallel=sp, zero_stage=zero,
                                 offload_optimizer=offload, micro_batch_size=mb, global_batch_size=global_batch,
                                 seq_len=seq_len, schedule=schedule, recompute=rec, flash_attention=flash_attention,
                                 overlap_grad_reduce=overlap_grad_reduce)
            try:
                validate_config(model, cfg, gpus)
            except DistplanError:
                continue
            yield cfg


def oracle(model: ModelSpec, cluster: Cluster, gpus: int, global_batch: int, seq_len: int,
           profile: Profile | None = None, *, flash_attention: bool = True, overlap_grad_reduce: bool = True) -> OracleResult:
    """The fastest fitting uniform configuration (ties: the canonical key decides)."""
    best: tuple | None = None
    enumerated = fitting = 0
    for cfg in uniform_configs(model, gpus, global_batch, seq_len, flash_attention=flash_attention,
                               overlap_grad_reduce=overlap_grad_reduce):
        pred = predict(model, cluster, cfg, profile)
        enumerated += 1
        if not pred.fits:
            continue
        fitting += 1
        key = (pred.step_time_s, config_key(cfg))
        if best is None or key < best[0]:
            best = (key, cfg, pred)
    if best is None:
        return OracleResult(None, None, enumerated, 0)
    return OracleResult(best[1], best[2], enumerated, fitting)
