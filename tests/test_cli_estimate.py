"""`distplan estimate` through typer's CliRunner: output contract and bad input."""

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
])
def test_bad_input_is_one_line_exit_2(cli, args, needle):
    r = cli("estimate", *args)
    assert r.exit_code == 2
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output


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
