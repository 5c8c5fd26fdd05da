"""`distplan estimate` through typer's CliRunner: output contract and bad input."""

from pathlib import Path

import pytest

from conftest import parse_json

REQUIRED = ("step_time_s", "tokens_per_s", "model_tflops_per_gpu", "hardware_tflops_per_gpu", "mfu",
            "peak_memory_gib", "fits", "stages", "breakdown")


def test_json_contract(cli):
    out = parse_json(cli("estimate", "-m", "llama-3-70b", "-n", 64, "--tp", 8, "--pp", 4, "--micro-batch", 1,
                         "--sequence-parallel", "--zero", 1, "--recompute", "selective", "--layer-split", "19,21,21,19",
                         "--format", "json"))
    for key in REQUIRED:
        assert key in out
    assert [s["layers"] for s in out["stages"]] == [[0, 18], [19, 39], [40, 60], [61, 79]]
    assert out["fits"] is True
    assert sum(out["breakdown"].values()) == pytest.approx(out["step_time_s"], rel=1e-6)
    assert out["parallel"]["dp"] == 2


def test_table_output(cli):
    r = cli("estimate", "-m", "gpt2-xl", "-n", 8)
    assert r.exit_code == 0, r.output
    assert "step time" in r.stdout and "MFU" in r.stdout and "pipeline stage" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["-m", "gpt-9", "-n", 8], "unknown model 'gpt-9'"),
    (["-m", "gpt2", "-n", 8, "-c", "tpu-pod"], "unknown cluster 'tpu-pod'"),
    (["-m", "gpt2", "-n", 0], "--gpus must be a positive integer"),
    (["-m", "gpt2", "-n", -8], "--gpus must be a positive integer"),
    (["-m", "gpt2", "-n", 12], "not a multiple of 8 GPUs per node"),
    (["-m", "gpt2", "-n", 8, "--tp", 2, "--pp", 2, "--dp", 3], "does not equal --gpus 8"),
    (["-m", "gpt2-xl", "-n", 8, "--tp", 2], "tp 2 does not divide the 25 attention heads"),
    (["-m", "gpt2", "-n", 16, "--pp", 16], "fewer than pp*vpp = 16"),
    (["-m", "gpt2", "-n", 8, "--global-batch", 12], "global batch 12 is not divisible by micro_batch*dp"),
    (["-m", "gpt2", "-n", 8, "--schedule", "zigzag"], "schedule 'zigzag' is unknown"),
    (["-m", "gpt2", "-n", 8, "--zero", 4], "zero stage 4 is unknown"),
    (["-m", "gpt2", "-n", 8, "--ep", 2], "needs a mixture-of-experts model"),
    (["-m", "gpt2", "-n", 8, "--format", "xml"], "--format 'xml' is unknown"),
    (["-m", "gpt2", "-n", 8, "--pp", 2, "--layer-split", "5,5"], "sums to 10"),
    (["-m", "gpt2", "-n", 8, "--pp", 2, "--layer-split", "a,b"], "comma-separated integers"),
    (["-m", "gpt2", "-n", 8, "--engine", "jax"], "--engine 'jax' is unknown; valid: any, torch, deepspeed, megatron"),
    (["-m", "llama-3-8b", "-n", 8, "--tp", 2, "--engine", "deepspeed"], "--engine deepspeed does not run tp=2"),
    (["-m", "gpt2", "-n", 8, "--zero", 1, "--offload-optimizer", "--engine", "megatron"], "--engine megatron does not run"),
])
def test_bad_input_is_one_line_exit_2(cli, args, needle):
    r = cli("estimate", *args)
    assert r.exit_code == 2
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output


HF_CONFIGS = Path(__file__).parents[1] / "core" / "hf_configs"  # published config.json files


@pytest.mark.parametrize("config,needle", [
    ("deepseek-v3", "model_type 'deepseek_v3' is refused: multi-head latent attention"),
    ("mistral-7b-v0.1", "sliding_window 4096 is below max_position_embeddings 32768"),
    ("gemma-2-9b", "model_type 'gemma2' is not supported; supported: gpt2, llama, mistral, mixtral, qwen2"),
])
def test_refused_hugging_face_config_is_one_line_exit_2(cli, config, needle):
    r = cli("estimate", "-m", HF_CONFIGS / f"{config}.json", "-n", 8)
    assert r.exit_code == 2 and "Traceback" not in r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {HF_CONFIGS / config}.json: ") and needle in lines[0]


def test_refused_hugging_face_config_as_a_process():
    """`python3 -m planner.cli`: the process exits 2 with one stderr line, no traceback."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "planner.cli", "estimate", "-m", str(HF_CONFIGS / "deepseek-v3.json"),
                           "-n", "8"], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "deepseek_v3" in done.stderr


def test_qwen2_config_estimates_with_its_q_k_v_biases(cli):
    args = ("-n", 8, "--tp", 2, "--micro-batch", 1, "--zero", 1, "--format", "json")
    out = parse_json(cli("estimate", "-m", HF_CONFIGS / "qwen2.5-7b.json", *args))
    assert out["model"] == "qwen2.5-7b" and out["fits"] is True
    # bf16 weights, halved by tp=2: the 7,615,616,512 parameters of Qwen2.5-7B (tests/core/test_hf_import.py)
    assert out["stages"][0]["memory_breakdown_gib"]["weights"] == pytest.approx(7_615_616_512 * 2 / 2 / 2**30, rel=1e-9)


def test_does_not_fit_prints_estimate_and_says_by_how_much(cli):
    r = cli("estimate", "-m", "llama-3-70b", "-n", 8, "--format", "json")
    assert r.exit_code == 2
    out = parse_json(r, exit_codes=(2,))
    assert out["fits"] is False
    assert "does not fit" in r.stderr and "GiB" in r.stderr


def test_malformed_cluster_yaml(cli, tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\ngpus_per_node: 4\ngpu: {name: X, peak_bf16_tflops: 100}\n")
    r = cli("estimate", "-m", "gpt2", "-n", 4, "-c", p)
    assert r.exit_code == 2 and "memory_gib" in r.stderr


def test_unwritable_output_is_one_line_exit_2(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for cmd in (("estimate", "-m", "gpt2", "-n", 8), ("solve", "-m", "gpt2", "-n", 8)):
        r = cli(*cmd, "-o", blocker / "plan.yaml")
        assert r.exit_code == 2 and "cannot write" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not (blocker.parent / "plan.yaml").exists()


def test_engine_prices_what_that_engine_runs(cli):
    """--engine: the engine's own measured costs apply, as `solve --engine` and `distplan run` use them. gpt2-xl ZeRO-1
    at dp2 on the committed 2xH200 profile: the torch engine runs it as FSDP2 and pays its measured per-block cost,
    DeepSpeed its own ZeRO optimizer; 'any' (the default) charges the bandwidth model's reduce-scatter and all-gather."""
    from pathlib import Path

    from planner.core.model import load_model
    from planner.cost.predict import predict
    from planner.cost.profiled import load_profile
    from planner.estimate import EstimateRequest, run_estimate

    prof = str(Path(__file__).resolve().parents[2] / "benchmarks/results/profile_2xh200/profile-gpt2-xl-2xh200.yaml")
    args = ["-m", "gpt2-xl", "-n", 2, "--micro-batch", 16, "--global-batch", 32, "--seq-len", 1024, "--zero", 1,
            "--profile", prof, "--format", "json"]
    got = {e: parse_json(cli("estimate", *args, "--engine", e)) for e in ("any", "torch", "deepspeed")}
    assert got["any"] == parse_json(cli("estimate", *args))
    res = run_estimate(EstimateRequest(model="gpt2-xl", cluster="", gpus=2, micro_batch=16, global_batch=32,
                                       seq_len=1024, zero=1, profile=prof))
    for engine, out in got.items():
        want = predict(load_model("gpt2-xl"), res.cluster, res.config, load_profile(prof), engine=engine)
        assert out["step_time_s"] == pytest.approx(want.step_time_s, rel=1e-6)
    assert len({round(out["step_time_s"], 4) for out in got.values()}) == 3
    assert [out["engine"] for out in got.values()] == ["any", "torch", "deepspeed"]
    table = " ".join(cli("estimate", *args[:-2], "--engine", "deepspeed").stdout.split())  # rich wraps the title
    assert "as the deepspeed engine runs it" in table and "engine runs it" not in " ".join(cli("estimate", *args[:-2]).stdout.split())


def test_estimate_does_not_import_the_solver():
    """`estimate --engine` checks what the engine runs (planner.cost.engines) without the solver package, whose
    import (ILP backends, the operator graph) took 1.4 s of estimate's 1.7 s (benchmarks/results/estimate_accuracy.md)."""
    import subprocess
    import sys

    code = ("import sys; from planner.estimate import EstimateRequest, run_estimate; "
            "run_estimate(EstimateRequest(model='gpt2-xl', cluster='h200-141gb', gpus=2, zero=1, engine='torch')); "
            "print(sorted(m for m in sys.modules if m == 'solvers' or m.startswith('solvers.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
