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
    (["-m", "gpt2", "--only", "compute"], "--only compute needs --base PROFILE"),
    (["-m", "gpt2", "--only", "all", "--base", "x.yaml"], "--only 'all': one of communication, compute"),
    (["-m", "gpt2", "--only", "compute", "--base", "/nonexistent/p.yaml"], "/nonexistent/p.yaml"),
])
def test_bad_input_is_one_line_exit_2(cli, tmp_path, args, needle):
    out = tmp_path / "p.yaml"
    r = cli("profile", *args, "-o", out)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("model,seq,quick,ends", [("llama-2-13b", 4096, True, (1, 4)), ("gpt2-xl", 1024, True, (1, 8)),
                                                  ("llama-2-13b", 4096, False, (1, 16)), ("gpt2-xl", 1024, False, (1, 16))])
def test_gpu_plan_keeps_quick_sharding_stacks_small(monkeypatch, model, seq, quick, ends):
    """--quick on GPUs: the sharding stacks stop at 16384 tokens (llama-2-13b's quick profile took 66.5 s on
    2xH200 with micro-batch 8, past the 1-minute target); a full profile measures them up to micro-batch 16 (a line
    to gpt2-xl's micro-batch 32 over-charged micro-batch 16 3.4x, calls 21-22), its layers up to 32768 tokens."""
    import torch

    from profilers import megatron_layer, run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(megatron_layer, "available", lambda spec, device: "not here")
    plan = run.plan_profile(run.ProfileRequest(model=model, seq_len=seq, quick=quick, device="cuda"))
    assert plan.cuda and plan.comm.sharding.micro_batches == ends
    # a full profile reaches 32768 tokens per micro-batch (gpt2-xl: micro-batch 32), and micro-batch 16 at least
    assert plan.compute.micro_batches[-1] == (8 if quick else max(16, 32768 // seq))
    assert plan.compute.skip_kinds == () and not plan.megatron
    # where megatron-core's layer is measured, --quick leaves out the stand-in unfused attention core
    monkeypatch.setattr(megatron_layer, "available", lambda spec, device: None)
    plan = run.plan_profile(run.ProfileRequest(model=model, seq_len=seq, quick=quick, device="cuda"))
    assert plan.megatron and plan.compute.skip_kinds == (("attention_unfused",) if quick else ())
    # and its layer at the smallest and largest micro-batch only; the sharding stacks with 2 trials
    assert run.megatron_settings(plan).micro_batches == ((1, 8) if quick else plan.compute.micro_batches)
    assert plan.comm.sharding.trials == (2 if quick else plan.compute.repeats)
    # the pipelining runtime: --quick measures the interleaved schedule only (1F1B's operations cost ~0 there)
    assert plan.comm.sharding.pipeline_schedules == (("interleaved",) if quick else ("1f1b", "interleaved"))
    assert plan.comm.sharding.pipeline and plan.comm.sharding.tensor_parallel
    # DeepSpeed (where installed): ZeRO-2, the practitioners' baseline; a full profile ZeRO-3 too
    assert plan.comm.sharding.deepspeed_stages == ((2,) if quick else (2, 3))
    # FSDP2's, DDP's and ZeRO-3's larger stack: GPU_STACK blocks on GPUs (held to what fits by the profiler),
    # unless --stack-blocks says otherwise
    assert plan.comm.sharding.stack == 8
    plan = run.plan_profile(run.ProfileRequest(model=model, seq_len=seq, quick=quick, device="cuda", stack_blocks=4))
    assert plan.comm.sharding.stack == 4
