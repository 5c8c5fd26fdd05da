"""DeepSpeed target: DeepSpeed's own DeepSpeedConfig accepts every emitted config for the planned data-parallel
size; distplan's checks catch what DeepSpeed accepts silently; plans DeepSpeed cannot run are refused with the
nearest plan it can."""

from __future__ import annotations

import copy
import json
from unittest import mock

import pytest

from emit_cases import CASES, case_plan, variant_plan
from emitters import emit_plan
from emitters.checks import DS_TOP_LEVEL_KEYS, check_deepspeed, deepspeed_parse, deepspeed_semantic_errors
from emitters.common import EmitOptions
from emitters.deepspeed import BUCKET_ELEMENTS, ds_config, partition
from planner.core.errors import DistplanError

pytest.importorskip("deepspeed", reason="deepspeed is in the test extra: pip install -e '.[test]'")

REFUSED = {  # variant -> words the refusal must contain (what, and the nearest plan)
    "cp": ["context parallelism cp=2", "cp=1 with dp=4"],
    "vpp_even": ["interleaved pipeline", "vpp=1"],
    "gpipe": ["GPipe", "schedule 1f1b"],
    "pp_zero3": ["ZeRO-3", "ZeRO-1 (zero_stage=1)"],
    "zero3_sp": ["sequence parallelism", "sequence_parallel=false"],
    "moe_tp_nosp": ["expert_tensor_parallel_size=1", "tp=1 with the same ep"],
}


def all_expressible_plans():
    plans = [(c, case_plan(c)) for c in CASES]
    plans += [(v, variant_plan(v)) for v in ("layout", "single_node_pp", "zero3_autotp", "offload", "zero0_unfused",
                                             "pp2_uneven", "vit")]
    return plans


@pytest.mark.parametrize("name,plan", all_expressible_plans(), ids=lambda x: x if isinstance(x, str) else "")
def test_deepspeed_parser_accepts(name, plan):
    """DeepSpeedConfig (patched to the planned data-parallel size) accepts the config and derives the plan's batch."""
    p = plan.parallel
    cfg = json.loads(emit_plan(plan, "deepspeed").files["ds_config.json"])
    got = deepspeed_parse(cfg, p.dp, model_parallel=p.tp > 1 or p.pp > 1, world_size=plan.gpus, pp=p.pp)
    assert got == {"train_batch_size": p.global_batch_size, "micro_batch": p.micro_batch_size,
                   "gradient_accumulation_steps": p.num_microbatches, "zero_stage": p.zero_stage}
    assert deepspeed_semantic_errors(cfg, p.dp) == []
    assert [r.status for r in check_deepspeed(plan, cfg)] == ["pass", "pass"]


def test_deepspeed_parser_really_parses():
    """The patched parse is DeepSpeed's: it rejects a batch that does not multiply out and an unknown ZeRO key."""
    cfg = ds_config(case_plan("gpt2-xl-64"))
    bad = {**cfg, "train_batch_size": 513}
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        deepspeed_parse(bad, 64, model_parallel=False, world_size=64)
    bad = copy.deepcopy(cfg)
    bad["zero_optimization"]["no_such_key"] = 1
    with pytest.raises(Exception, match="no_such_key"):
        deepspeed_parse(bad, 64, model_parallel=False, world_size=64)
    # AutoEP's validator runs too: ep must tile the stage
    moe = ds_config(case_plan("mixtral-8x7b-64"))
    moe["expert_parallel"]["autoep_size"] = 7
    with pytest.raises(ValueError, match="autoep_size"):
        deepspeed_parse(moe, 64, model_parallel=False, world_size=64)


def test_known_top_level_keys_match_deepspeed():
    """Every top-level key DeepSpeedConfig reads is in distplan's list (so the unknown-key check never flags a
    real key), and every key distplan emits is one DeepSpeed reads."""
    import deepspeed.runtime.config as dsc

    seen = set()

    class Recording(dict):
        def get(self, key, *default):
            seen.add(key)
            return super().get(key, *default)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

    cfg = Recording(train_batch_size=8, train_micro_batch_size_per_gpu=1)
    with mock.patch.object(dsc.dist, "get_rank", lambda *a, **k: 0), \
            mock.patch.object(dsc.dist, "get_world_size", lambda *a, **k: 8):
        dsc.DeepSpeedConfig(cfg)  # its copy.copy of a dict subclass keeps the subclass, so reads are recorded
    read = {k for k in seen if isinstance(k, str)}
    assert len(read) > 40 and {"zero_optimization", "pipeline", "bf16", "tensor_parallel"} <= read
    assert read - DS_TOP_LEVEL_KEYS == set()
    emitted = set()
    for _, plan in all_expressible_plans():
        emitted |= set(ds_config(plan))
    assert emitted <= read | {"activation_checkpointing"}  # read through param_dict.keys()


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c.update(distplan_header="x"), "unknown top-level key(s) distplan_header"),
    (lambda c: c["zero_optimization"].update(stage=2, offload_param={"device": "cpu"}), "offload_param only act at ZeRO stage 3"),
    (lambda c: c["zero_optimization"].update(stage3_max_live_parameters=10), "stage3_max_live_parameters only act at ZeRO stage 3"),
    (lambda c: c["zero_optimization"].update(stage=3, offload_param={"device": "nvme"}), "offload_param.device is nvme but nvme_path is missing"),
    (lambda c: c["zero_optimization"].update(stage=0, offload_optimizer={"device": "cpu"}), "needs ZeRO stage >= 1"),
    (lambda c: c.update(pipeline={"stages": 2}), "PipelineEngine rejects ZeRO-2/3"),
    (lambda c: c.update(pipeline={"stages": 2, "partition_method": "uniform"}), "unknown key(s) partition_method in 'pipeline'"),
    (lambda c: c.update(fp16={"enabled": True}), "bf16 and fp16 are both enabled"),
    (lambda c: c.update(gradient_accumulation_steps=2), "train_batch_size 512 != "),
])
def test_semantic_checks_catch_what_deepspeed_accepts(mutate, needle):
    cfg = copy.deepcopy(ds_config(case_plan("gpt2-xl-64")))  # ZeRO-2, dp 64
    mutate(cfg)
    errors = deepspeed_semantic_errors(cfg, 64)
    assert any(needle in e for e in errors), errors


def test_deepspeed_accepts_silently_what_distplan_flags():
    """The first three mistakes above pass DeepSpeed's own parser: that is why distplan checks them."""
    cfg = copy.deepcopy(ds_config(case_plan("gpt2-xl-64")))
    cfg["distplan_header"] = "x"
    cfg["zero_optimization"]["stage3_max_live_parameters"] = 10
    cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    deepspeed_parse(cfg, 64, model_parallel=False, world_size=64)  # no exception


@pytest.mark.parametrize("variant", sorted(REFUSED))
def test_inexpressible_plans_are_refused(variant):
    with pytest.raises(DistplanError) as exc:
        emit_plan(variant_plan(variant), "deepspeed")
    msg = str(exc.value)
    assert msg.startswith("deepspeed cannot express this plan:") and "nearest expressible plan:" in msg
    for word in REFUSED[variant]:
        assert word in msg, msg


def test_zero_and_recompute_mapping():
    z3 = ds_config(variant_plan("zero3_autotp"))
    assert z3["zero_optimization"]["stage"] == 3 and z3["tensor_parallel"] == {"autotp_size": 2}
    assert z3["zero_optimization"]["stage3_max_live_parameters"] == 2 * z3["zero_optimization"]["stage3_prefetch_bucket_size"]
    off = ds_config(variant_plan("offload"))
    assert off["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in off["zero_optimization"]
    z0 = ds_config(variant_plan("zero0_unfused"))
    assert z0["zero_optimization"] == {"stage": 0} and "activation_checkpointing" not in z0
    full = ds_config(variant_plan("single_node_pp"))
    assert full["pipeline"]["activation_checkpoint_interval"] == 1 and full["pipeline"]["pipe_partitioned"] is False
    gpt = ds_config(case_plan("gpt2-xl-64"))["zero_optimization"]
    assert gpt["reduce_bucket_size"] == BUCKET_ELEMENTS == 25 * 1024**2 // 2  # 25 MiB of bf16 gradients


def test_partition_sidecar_uneven():
    plan = variant_plan("layout")  # [20, 22, 18, 20]
    part = partition(plan, EmitOptions())
    assert part["parts"] == [0, 21, 43, 61, 82]
    sizes = [b - a for a, b in zip(part["parts"], part["parts"][1:])]
    assert sizes == [20 + 1, 22, 18, 20 + 1]  # embedding on the first stage, head on the last
    assert part["topology"] == {"num_pp": 4, "num_mp": 8, "num_dp": 2}


def test_launch_single_and_multi_node():
    single = emit_plan(variant_plan("single_node_pp"), "deepspeed")
    assert single.launch == "deepspeed --num_nodes 1 --num_gpus 8 train.py --deepspeed_config ds_config.json"
    assert "hostfile" not in single.files
    multi = emit_plan(case_plan("gpt2-xl-64"), "deepspeed", EmitOptions(script="pretrain.py",
                                                                         hosts=tuple(f"gpu{i}" for i in range(8))))
    assert multi.launch == ("deepspeed --num_nodes 8 --num_gpus 8 --hostfile hostfile pretrain.py "
                            "--deepspeed_config ds_config.json")
    assert "gpu7 slots=8" in multi.files["hostfile"] and "Placeholder" not in multi.files["hostfile"]
    assert 'SCRIPT="${SCRIPT:-pretrain.py}"' in multi.files["launch.sh"]
    with pytest.raises(DistplanError, match="--hosts names 2 host"):
        emit_plan(case_plan("gpt2-xl-64"), "deepspeed", EmitOptions(hosts=("a", "b")))
