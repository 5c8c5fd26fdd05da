"""The deepspeed engine: ZeRO and pipeline runs on CPU (gloo) against the single-process reference.

The multi-process runs go through the launcher (`run_plan`, as `distplan run` does) with
`check_numerics`, which replays the same training on one process and compares the losses step by step
(fp32 on CPU: rtol 1e-5). DeepSpeed compiles nothing here: the engine passes torch's AdamW and leaves
DeepSpeed's CPU shared-memory op unbuilt (see the engine's docstring).
"""

import sys

import pytest

from emitters.deepspeed import ds_config, partition
from emitters.common import EmitOptions
from planner.build.deepspeed import import_deepspeed
from planner.core.cluster import load_cluster
from planner.core.errors import DistplanError
from planner.core.job import ParallelConfig, validate_config
from planner.core.model import ModelSpec
from planner.core.plan import make_plan, save_plan
from planner.cost.predict import predict
from planner.runner.engine_api import RunOptions
from planner.runner.engines import deepspeed_engine as de

TINY_GPT = ModelSpec(name="tiny-gpt", family="gpt", num_layers=4, hidden_size=64, ffn_hidden_size=128, num_heads=4,
                     num_kv_heads=4, vocab_size=128, max_seq_len=64, tie_embeddings=True)
TINY_LLAMA = ModelSpec(name="tiny-llama", family="llama", num_layers=4, hidden_size=64, ffn_hidden_size=128, num_heads=4,
                       num_kv_heads=2, vocab_size=128, max_seq_len=64)


def make(spec=TINY_GPT, **par):
    par = {"seq_len": 16, "global_batch_size": 8, "micro_batch_size": 2, **par}
    cfg = ParallelConfig(**par)
    validate_config(spec, cfg, cfg.gpus)
    cluster = load_cluster("dgx-h100-80gb")
    return make_plan(spec, cluster, cfg.gpus, cfg, predict(spec, cluster, cfg), provenance={"command": "test"})


def run(tmp_path, plan, steps=2, warmup=1):
    from planner.runner.launch import run_plan

    path = tmp_path / "plan.yaml"
    save_plan(plan, path)
    opts = RunOptions(engine="deepspeed", steps=steps, warmup=warmup, dtype="fp32", lr=1e-3, timeout_s=300)
    report = run_plan(path, opts, check_numerics=True)
    assert not report.failures, [(f.rank, f.reason, f.log_tail) for f in report.failures]
    return report


def assert_matches_reference(report):
    num = report.numerics
    assert num is not None and num.checked and num.dtype == "fp32"
    assert num.passed, num.note
    assert len(num.parallel_losses) == 3 and num.max_rel_error <= 1e-5


# ---- multi-process runs (CPU, gloo) -------------------------------------------------------------

@pytest.mark.slow
def test_zero2_dp2_matches_single_process(tmp_path):
    report = run(tmp_path, make(dp=2, zero_stage=2))
    assert_matches_reference(report)
    assert [r["dp_rank"] for r in report.ranks] == [0, 1]
    assert "DeepSpeed optimizer DeepSpeedZeroOptimizer over AdamW" in report.notes


@pytest.mark.slow
def test_zero3_with_optimizer_offload_matches_single_process(tmp_path):
    report = run(tmp_path, make(TINY_LLAMA, dp=2, zero_stage=3, offload_optimizer=True, recompute="selective"))
    assert_matches_reference(report)
    assert any(n.startswith("offload_optimizer on CPU: torch AdamW") for n in report.notes)


@pytest.mark.slow
def test_pipeline_pp2_zero1_uneven_tied_matches_single_process(tmp_path):
    # GPT-2's tied embedding / LM head sits on both stages; the split is the plan's, not DeepSpeed's own
    report = run(tmp_path, make(pp=2, zero_stage=1, layer_split=(3, 1), recompute="full"))
    assert_matches_reference(report)
    assert [r["pp_rank"] for r in report.ranks] == [0, 1]
    assert any(n.startswith("pipeline: PipelineModule parts [0, 4, 6]") and n.endswith("interval 1") for n in report.notes)


# ---- what the engine refuses, with the message the CLI prints (exit 2) ----------------------------

def test_tp_is_rejected_with_a_pointer_to_other_engines(tmp_path, cli):
    plan = make(tp=2)
    with pytest.raises(DistplanError, match=r"tp=2.*Megatron's mpu.*--engine torch or --engine megatron"):
        de.check_supported(plan, "cpu")
    save_plan(plan, tmp_path / "plan.yaml")
    result = cli("run", tmp_path / "plan.yaml", "--engine", "deepspeed", "--steps", 1, "--warmup", 0)
    assert result.exit_code == 2
    assert "DeepSpeed's engine has no tensor parallelism" in result.stderr


@pytest.mark.parametrize("par,match", [
    ({"pp": 2, "zero_stage": 2}, "supports ZeRO stage 0 or 1 only"),
    ({"pp": 2, "vpp": 2, "schedule": "interleaved", "global_batch_size": 8}, "no interleaved schedule"),
    ({"dp": 2, "cp": 2}, "context parallel cp=2"),
])
def test_unsupported_layouts_are_rejected(par, match):
    with pytest.raises(DistplanError, match=match):
        de.check_supported(make(**par), "cpu")


def test_missing_deepspeed_is_a_clear_error(tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now raises ImportError
    with pytest.raises(DistplanError, match=r"^engine 'deepspeed' needs DeepSpeed: pip install deepspeed$"):
        de.check_supported(make(dp=2), "cpu")
    with pytest.raises(DistplanError, match=r"^engine 'deepspeed' needs DeepSpeed: pip install deepspeed"):
        import_deepspeed("cpu")
    save_plan(make(dp=2), tmp_path / "plan.yaml")
    result = cli("run", tmp_path / "plan.yaml", "--engine", "deepspeed")
    assert result.exit_code == 2
    assert "engine 'deepspeed' needs DeepSpeed: pip install deepspeed" in result.stderr


# ---- the config as the run uses it (pure) ---------------------------------------------------------

def test_runtime_config_keeps_the_plan_and_swaps_what_the_reference_needs():
    plan = make(dp=2, zero_stage=2, micro_batch_size=1, offload_optimizer=True)
    emitted = {**ds_config(plan), "optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}, "gradient_clipping": 1.0}
    conf, notes = de.runtime_config(plan, emitted, "fp32", "cpu")
    assert (conf["train_batch_size"], conf["train_micro_batch_size_per_gpu"], conf["gradient_accumulation_steps"]) == (8, 1, 4)
    assert conf["zero_optimization"]["stage"] == 2 and conf["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert conf["bf16"]["enabled"] is False and "fp16" not in conf
    assert "optimizer" not in conf and "scheduler" not in conf and conf["gradient_clipping"] == 0.0
    assert conf["zero_allow_untested_optimizer"] and conf["zero_force_ds_cpu_optimizer"] is False
    assert any("bf16 turned off" in n for n in notes) and any("gradient_clipping 1.0" in n for n in notes)
    assert emitted["bf16"]["enabled"] is True  # the emitted dict is not modified
    cuda, _ = de.runtime_config(plan, ds_config(plan), "bf16", "cuda")
    assert cuda["bf16"]["enabled"] is True and "zero_force_ds_cpu_optimizer" not in cuda  # DeepSpeedCPUAdam on GPUs


def test_runtime_config_refuses_an_emitted_config_that_disagrees_with_the_plan():
    plan = make(dp=2, zero_stage=1)
    with pytest.raises(DistplanError, match="gradient_accumulation_steps 3 but the plan needs 2"):
        de.runtime_config(plan, {**ds_config(plan), "gradient_accumulation_steps": 3}, "fp32", "cpu")
    with pytest.raises(DistplanError, match="ZeRO stage 3 but the plan says 1"):
        de.runtime_config(plan, {**ds_config(plan), "zero_optimization": {"stage": 3}}, "fp32", "cpu")


@pytest.mark.parametrize("split", [(2, 2), (3, 1), (1, 1, 2)])
def test_pipeline_parts_are_the_emitted_partition(split):
    plan = make(pp=len(split), layer_split=split)
    assert de.pipeline_parts(split) == partition(plan, EmitOptions())["parts"]
