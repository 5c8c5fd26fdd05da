"""Plans the emitter tests share: the three golden cases and variants covering every mapping branch.

Built with make_plan + predict + a hand ParallelConfig (not the solver). The golden cases are also
committed as tests/emitters/golden/emit/<case>/plan.yaml, so cost-model changes do not churn the golden files:
the golden tests load that file, and `test_golden_plans_match_cases` checks it still holds the hand config.
Regenerate the golden files with DISTPLAN_UPDATE_GOLDEN=1 python3 -m pytest tests/emitters/test_emit_golden.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from planner.core.cluster import load_cluster
from planner.core.job import ParallelConfig, validate_config
from planner.core.model import load_model
from planner.core.plan import Plan, make_plan
from planner.cost.predict import predict

GOLDEN = Path(__file__).parent / "golden" / "emit"
UPDATE = os.environ.get("DISTPLAN_UPDATE_GOLDEN") == "1"
CLUSTER = "dgx-h100-80gb"

# case -> (model, gpus, ParallelConfig fields, target that the slurm golden wraps)
CASES = {
    "gpt2-xl-64": ("gpt2-xl", 64, dict(dp=64, zero_stage=2, micro_batch_size=8, global_batch_size=512, seq_len=1024),
                   "deepspeed"),
    # TP + PP + uneven split + selective recompute
    "llama-3-70b-64": ("llama-3-70b", 64, dict(dp=2, tp=8, pp=4, sequence_parallel=True, zero_stage=1,
                                               micro_batch_size=1, global_batch_size=512, seq_len=8192,
                                               recompute="selective", layer_split=(19, 21, 21, 19)), "megatron"),
    # expert parallelism
    "mixtral-8x7b-64": ("mixtral-8x7b", 64, dict(dp=64, ep=8, zero_stage=1, micro_batch_size=1,
                                                 global_batch_size=1024, seq_len=4096, recompute="full"), "torchrun"),
}

# name -> (model, gpus, ParallelConfig fields): one per branch of the mappings
VARIANTS = {
    "layout": ("llama-3-70b", 64, dict(dp=2, tp=8, pp=4, sequence_parallel=True, zero_stage=1, global_batch_size=512,
                                       seq_len=8192, recompute="selective", layer_split=(20, 22, 18, 20))),
    "vpp_even": ("llama-3-70b", 64, dict(dp=2, tp=8, pp=4, vpp=5, schedule="interleaved", sequence_parallel=True,
                                         zero_stage=1, global_batch_size=512, seq_len=8192)),
    "vpp_first_last": ("llama-3-70b", 64, dict(dp=2, tp=8, pp=4, vpp=2, schedule="interleaved", sequence_parallel=True,
                                               zero_stage=1, global_batch_size=512, seq_len=8192,
                                               layer_split=(18, 22, 22, 18))),
    "vpp_layout": ("llama-3-70b", 64, dict(dp=2, tp=8, pp=4, vpp=2, schedule="interleaved", sequence_parallel=True,
                                           zero_stage=1, global_batch_size=512, seq_len=8192,
                                           layer_split=(18, 24, 20, 18))),
    "pp2_uneven": ("llama-3-8b", 16, dict(dp=4, tp=2, pp=2, sequence_parallel=True, zero_stage=1,
                                          global_batch_size=512, layer_split=(15, 17))),
    "cp": ("llama-3-8b", 16, dict(dp=2, tp=4, cp=2, sequence_parallel=True, zero_stage=1, global_batch_size=512,
                                  seq_len=8192, recompute="full")),
    "zero3_autotp": ("llama-3-8b", 16, dict(dp=8, tp=2, zero_stage=3, global_batch_size=512)),
    "zero3_sp": ("llama-3-8b", 16, dict(dp=8, tp=2, sequence_parallel=True, zero_stage=3, global_batch_size=512)),
    "offload": ("gpt2-xl", 8, dict(dp=8, zero_stage=1, offload_optimizer=True, global_batch_size=512,
                                   micro_batch_size=8, seq_len=1024)),
    "zero0_unfused": ("gpt2", 4, dict(dp=4, global_batch_size=64, micro_batch_size=4, flash_attention=False,
                                      overlap_grad_reduce=False, seq_len=1024)),
    "single_node_pp": ("gpt2-xl", 8, dict(dp=4, pp=2, zero_stage=1, global_batch_size=512, micro_batch_size=4,
                                          seq_len=1024, recompute="full")),
    "moe_tp": ("mixtral-8x7b", 64, dict(dp=16, tp=4, ep=8, sequence_parallel=True, zero_stage=1,
                                        global_batch_size=1024, recompute="selective")),
    "moe_tp_nosp": ("mixtral-8x7b", 64, dict(dp=16, tp=4, ep=8, zero_stage=1, global_batch_size=1024)),
    "moe_pp": ("mixtral-8x7b", 64, dict(dp=16, tp=2, pp=2, ep=4, sequence_parallel=True, zero_stage=1,
                                        global_batch_size=1024, recompute="full")),
    "pp_zero3": ("llama-3-8b", 16, dict(dp=4, tp=2, pp=2, zero_stage=3, global_batch_size=512)),
    "gpipe": ("llama-3-8b", 16, dict(dp=4, tp=2, pp=2, schedule="gpipe", zero_stage=1, global_batch_size=512)),
    "vit": ("vit-huge", 8, dict(dp=8, global_batch_size=512, seq_len=257)),
}


def build(model_name: str, gpus: int, fields: dict) -> Plan:
    model, cluster = load_model(model_name), load_cluster(CLUSTER)
    cfg = ParallelConfig(**fields)
    validate_config(model, cfg, gpus)
    return make_plan(model, cluster, gpus, cfg, predict(model, cluster, cfg))


def case_plan(case: str) -> Plan:
    model, gpus, fields, _ = CASES[case]
    return build(model, gpus, fields)


def variant_plan(name: str) -> Plan:
    return build(*VARIANTS[name])
