"""`distplan profile` bad input: one line on stderr, exit code 2, nothing measured."""

import pytest


@pytest.mark.parametrize("args,needle", [
    (["-m", "gpt-9"], "unknown model 'gpt-9'"),
    (["-m", "gpt2", "--dtype", "int8"], "--dtype 'int8' is unknown"),
    (["-m", "gpt2", "--device", "tpu"], "--device 'tpu' is unknown"),
    (["-m", "gpt2", "--seq-len", "4096"], "exceeds the 1024 learned positions"),
    (["-m", "gpt2", "--micro-batches", "1,x"], "--micro-batches '1,x' must be comma-separated integers"),
    (["-m", "gpt2", "--micro-batches", "0,2"], "micro-batches must be >= 1"),
    (["-m", "gpt2", "--gpus-per-node", "0"], "--gpus-per-node must be >= 1"),
])
def test_bad_input_is_one_line_exit_2(cli, tmp_path, args, needle):
    out = tmp_path / "p.yaml"
    r = cli("profile", *args, "-o", out)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
