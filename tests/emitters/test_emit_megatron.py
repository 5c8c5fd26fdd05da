"""Megatron-LM target: the pipeline split mechanism, the flag mapping, distplan's mirror of Megatron's rules,
and (where megatron.training is importable) Megatron's own parse_args + validate_args + TransformerConfig."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from emit_cases import CASES, case_plan, variant_plan
from emitters import emit_plan
from emitters.checks_megatron import (
    MEGATRON_CHECK_SCRIPT,
    megatron_native_available,
    megatron_rule_errors,
    parse_flags,
    parse_layout,
    read_args_file,
)
from emitters.megatron import megatron_argv, pipeline_split
from planner.core.errors import DistplanError

EXPRESSIBLE = ["layout", "vpp_even", "vpp_first_last", "vpp_layout", "pp2_uneven", "cp", "zero3_sp", "zero3_autotp",
               "offload", "zero0_unfused", "single_node_pp", "moe_tp", "moe_tp_nosp", "moe_pp", "pp_zero3"]


def args_of(plan):
    return read_args_file(emit_plan(plan, "megatron").files["megatron_args.txt"])


def flags_of(plan):
    return parse_flags(args_of(plan)[0])


def stage_layer_counts(flags: dict, layers: int, pp: int) -> list[int]:
    """Layers per pipeline rank as Megatron will place them, from the emitted flags (independent of the emitter)."""
    if "--pipeline-model-parallel-layout" in flags:
        stages = parse_layout(flags["--pipeline-model-parallel-layout"][0])
        return [sum(stages[v * pp + r].count("t") for v in range(len(stages) // pp)) for r in range(pp)]
    first = int(flags.get("--decoder-first-pipeline-num-layers", [0])[0]) or None
    last = int(flags.get("--decoder-last-pipeline-num-layers", [0])[0]) or None
    if first is None and last is None:
        return [layers // pp] * pp
    n_middle = pp - (first is not None) - (last is not None)
    middle = (layers - (first or 0) - (last or 0)) // n_middle if n_middle else 0
    return [first or middle] + [middle] * (pp - 2) + [last or middle]


@pytest.mark.parametrize("name", EXPRESSIBLE + ["cases"])
def test_mirror_accepts_and_split_matches_plan(name):
    plans = [case_plan(c) for c in CASES] if name == "cases" else [variant_plan(name)]
    for plan in plans:
        argv, world, env = args_of(plan)
        assert world == plan.gpus
        assert megatron_rule_errors(argv, world, env) == []
        p = plan.parallel
        if p.pp > 1:
            flags = parse_flags(argv)
            assert stage_layer_counts(flags, plan.model.num_layers, p.pp) == list(p.layers_per_stage(plan.model.num_layers))


def test_split_mechanism_choice():
    assert "--decoder-first-pipeline-num-layers" in flags_of(case_plan("llama-3-70b-64"))
    assert "--pipeline-model-parallel-layout" not in flags_of(case_plan("llama-3-70b-64"))
    lay = flags_of(variant_plan("layout"))
    assert lay["--pipeline-model-parallel-layout"] == ["Et*20|t*22|t*18|t*20L"]
    assert "--decoder-first-pipeline-num-layers" not in lay
    even = flags_of(variant_plan("vpp_even"))
    assert even["--num-virtual-stages-per-pipeline-rank"] == ["5"] and "--decoder-first-pipeline-num-layers" not in even
    fl = flags_of(variant_plan("vpp_first_last"))
    assert fl["--num-virtual-stages-per-pipeline-rank"] == ["2"] and fl["--decoder-first-pipeline-num-layers"] == ["18"]
    vl = flags_of(variant_plan("vpp_layout"))  # [18, 24, 20, 18] over 2 chunks per rank, in Megatron's stage order
    assert vl["--pipeline-model-parallel-layout"] == ["Et*9|t*12|t*10|t*9|t*9|t*12|t*10|t*9L"]
    assert "--num-virtual-stages-per-pipeline-rank" not in vl
    two = flags_of(variant_plan("pp2_uneven"))
    assert two["--decoder-first-pipeline-num-layers"] == ["15"] and two["--decoder-last-pipeline-num-layers"] == ["17"]
    why, _ = pipeline_split(variant_plan("layout"))
    assert "middle stages differ" in why


def test_flag_mapping():
    llama = flags_of(case_plan("llama-3-70b-64"))
    for flag in ("--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--group-query-attention"):
        assert flag in llama
    assert llama["--position-embedding-type"] == ["rope"] and llama["--normalization"] == ["RMSNorm"]
    gpt = flags_of(case_plan("gpt2-xl-64"))  # ZeRO-2 -> Megatron-FSDP optim_grads; tied embeddings, biases
    assert gpt["--data-parallel-sharding-strategy"] == ["optim_grads"] and gpt["--ckpt-format"] == ["fsdp_dtensor"]
    assert "--untie-embeddings-and-output-weights" not in gpt and "--disable-bias-linear" not in gpt
    assert "--add-qkv-bias" not in gpt and "--add-qkv-bias" not in llama
    qwen2 = dataclasses.replace(LLAMA.model, qkv_bias=True)  # Qwen2: biases on q/k/v alone
    qwen2_flags = flags_of(dataclasses.replace(LLAMA, model=qwen2))
    assert "--add-qkv-bias" in qwen2_flags and "--disable-bias-linear" in qwen2_flags
    assert flags_of(variant_plan("zero3_sp"))["--data-parallel-sharding-strategy"] == ["optim_grads_params"]
    full = flags_of(case_plan("mixtral-8x7b-64"))
    assert full["--recompute-granularity"] == ["full"] and full["--recompute-method"] == ["uniform"]
    assert full["--recompute-num-layers"] == ["1"] and full["--moe-token-dispatcher-type"] == ["alltoall"]
    off = flags_of(variant_plan("offload"))
    assert {"--optimizer-cpu-offload", "--use-precision-aware-optimizer", "--use-distributed-optimizer"} <= set(off)
    z0 = flags_of(variant_plan("zero0_unfused"))
    assert z0["--attention-backend"] == ["unfused"]
    assert not {"--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"} & set(z0)
    cp = flags_of(variant_plan("cp"))
    assert cp["--context-parallel-size"] == ["2"]
    _, _, env = args_of(variant_plan("cp"))
    assert env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    _, _, env = args_of(variant_plan("zero3_sp"))  # Megatron-FSDP wants more than one CUDA connection
    assert env == {}


def test_launch_script():
    em = emit_plan(case_plan("llama-3-70b-64"), "megatron")
    sh = em.files["launch.sh"]
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in sh
    assert "--nnodes 8 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint" in sh and "MASTER_ADDR" in sh
    assert em.launch.startswith("CUDA_DEVICE_MAX_CONNECTIONS=1 torchrun --nnodes 8 --nproc-per-node 8")
    single = emit_plan(variant_plan("single_node_pp"), "megatron")
    assert "torchrun --standalone --nnodes 1 --nproc-per-node 8" in single.files["launch.sh"]
    # the args file round-trips through launch.sh's reader: same words as megatron_argv
    argv, _, _ = read_args_file(em.files["megatron_args.txt"])
    assert argv == megatron_argv(case_plan("llama-3-70b-64"))
    lay = emit_plan(variant_plan("layout"), "megatron").launch
    assert "'Et*20|t*22|t*18|t*20L'" in lay  # quoted for the shell


def test_launch_script_reads_args_like_bash(tmp_path):
    """Run launch.sh's own argument reader in bash and compare with the args file."""
    em = emit_plan(variant_plan("layout"), "megatron")
    (tmp_path / "megatron_args.txt").write_text(em.files["megatron_args.txt"])
    sh = em.files["launch.sh"].replace("exec torchrun", 'printf "%s\\n" "${ARGS[@]}"; exit 0; torchrun')
    (tmp_path / "launch.sh").write_text(sh)
    out = subprocess.run(["bash", str(tmp_path / "launch.sh")], capture_output=True, text=True,
                         env={"MEGATRON_LM": "/x", "PATH": "/usr/bin:/bin"}, check=True).stdout.split("\n")
    assert out[:-1] == megatron_argv(variant_plan("layout"))


@pytest.mark.parametrize("variant,needle", [
    ("vit", "ViT"),
    ("gpipe", "schedule 1f1b"),
])
def test_inexpressible(variant, needle):
    with pytest.raises(DistplanError, match="megatron cannot express this plan") as exc:
        emit_plan(variant_plan(variant), "megatron")
    assert needle in str(exc.value)


def test_moe_tp_without_sp_is_emitted_with_a_note():
    em = emit_plan(variant_plan("moe_tp_nosp"), "megatron")
    assert any("sequence parallelism" in n for n in em.notes)


LLAMA = case_plan("llama-3-70b-64")


def mutate(replace: dict[str, str | None], add: list[str] = (), plan=LLAMA, world=None):
    argv, w, env = args_of(plan)
    text = " ".join(argv)
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new or "")
    return megatron_rule_errors(text.split() + list(add), world or w, env)


@pytest.mark.parametrize("replace,add,needle", [
    ({"--num-attention-heads 64": "--num-attention-heads 60"}, [], "--num-attention-heads 60 is not a multiple of --tensor-model-parallel-size 8"),
    ({"--num-query-groups 8": "--num-query-groups 3"}, [], "--num-query-groups 3 must be a multiple or divisor"),
    ({"--decoder-first-pipeline-num-layers 19": "--decoder-first-pipeline-num-layers 18"}, [], "middle layers do not divide"),
    ({"--decoder-first-pipeline-num-layers 19 --decoder-last-pipeline-num-layers 19": ""},
     ["--num-layers-per-virtual-pipeline-stage", "3"], "--num-layers-per-virtual-pipeline-stage 3"),
    ({"--decoder-first-pipeline-num-layers 19 --decoder-last-pipeline-num-layers 19": ""},
     ["--num-virtual-stages-per-pipeline-rank", "3"], "not divisible by 3 virtual stages"),
    ({"--decoder-last-pipeline-num-layers 19": ""}, ["--num-layers-per-virtual-pipeline-stage", "1"],
     "needs --num-virtual-stages-per-pipeline-rank"),
    ({"--global-batch-size 512": "--global-batch-size 513"}, [], "not divisible by --micro-batch-size 1 x data-parallel size 2"),
    ({"--use-distributed-optimizer": ""}, [], "--overlap-param-gather needs --use-distributed-optimizer"),
    ({"--recompute-modules core_attn": "--recompute-modules core_attn --recompute-method uniform"}, [],
     "selective recompute takes neither"),
    ({"--recompute-modules core_attn": "--recompute-modules attention"}, [], "--recompute-modules attention unknown"),
    ({"--recompute-granularity selective --recompute-modules core_attn": "--recompute-granularity full"}, [],
     "full recompute needs --recompute-method"),
    ({"--seq-length 8192": "--seq-length 16384"}, [], "--max-position-embeddings 8192 is below --seq-length 16384"),
    ({"--bf16": "--bf16 --fp16"}, [], "--bf16 and --fp16 are both set"),
])
def test_mirror_rules(replace, add, needle):
    errors = mutate(replace, add)
    assert any(needle in e for e in errors), errors


def test_mirror_rules_layout_experts_env():
    lay = variant_plan("layout")
    assert any("places 79 blocks" in e for e in mutate({"t*20L": "t*19L"}, plan=lay))
    assert any("must start with the embedding" in e for e in mutate({"Et*20": "t*20"}, plan=lay))
    assert any("not a multiple of pp 4" in e for e in mutate({"t*22|": "t*22"}, plan=lay))
    moe = case_plan("mixtral-8x7b-64")
    assert any("--num-experts 8 is not divisible by --expert-model-parallel-size 16" in e
               for e in mutate({"--expert-model-parallel-size 8": "--expert-model-parallel-size 16"}, plan=moe))
    assert any("world size 60 is not divisible" in e for e in mutate({}, plan=moe, world=60))
    assert any("turns it off silently" in e for e in mutate({"--context-parallel-size 1": "--context-parallel-size 1 --sequence-parallel"},
                                                            plan=case_plan("gpt2-xl-64")))
    argv, world, _ = args_of(LLAMA)
    assert any("CUDA_DEVICE_MAX_CONNECTIONS=1" in e for e in megatron_rule_errors(argv, world, {}))
    gpt = case_plan("gpt2-xl-64")
    assert any("fsdp_dtensor" in e for e in mutate({"--ckpt-format fsdp_dtensor": ""}, plan=gpt))
    argv, world, _ = args_of(gpt)
    assert any("Megatron-FSDP needs CUDA_DEVICE_MAX_CONNECTIONS" in e
               for e in megatron_rule_errors(argv, world, {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}))


@pytest.mark.skipif(not megatron_native_available(), reason="megatron.training needs megatron-core >= 0.17 (Python >= 3.12)")
def test_megatron_native_accepts_goldens_and_rejects_a_bad_file(tmp_path):
    files = []
    for case in CASES:
        path = tmp_path / f"{case}.txt"
        path.write_text(emit_plan(case_plan(case), "megatron").files["megatron_args.txt"])
        files.append(path)
    bad = tmp_path / "bad.txt"
    bad.write_text(files[1].read_text().replace("--tensor-model-parallel-size 8", "--tensor-model-parallel-size 3")
                   .replace("world-size: 64", "world-size: 48"))
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(MEGATRON_CHECK_SCRIPT), *map(str, files + [bad]), "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    res = json.loads(out.read_text())
    assert [r["ok"] for r in res["results"]] == [True, True, True, False], proc.stdout
    assert "tensor_model_parallel_size" in res["results"][-1]["error"]
