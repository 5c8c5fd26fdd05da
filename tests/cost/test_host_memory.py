"""Optimizer offload against the host's CPU memory (memory.host_memory_per_gpu): DeepSpeed's 13B pipeline plan with
ZeRO-1 offload was killed by the kernel's OOM killer on a 2xH200 host of 252 GiB (session 9, call 25)."""

from dataclasses import replace
from pathlib import Path

import pytest

from planner.core.cluster import load_cluster
from planner.core.job import ParallelConfig
from planner.core.prediction import GIB
from planner.cost.memory import OFFLOAD_HOST_BYTES_PER_PARAM, host_memory_per_gpu
from planner.core.model import load_model
from planner.cost.predict import predict
from planner.cost.profiled import cluster_for_profile
from planner.cost.memory import states_fit
from planner.cost.profiled import load_profile

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "benchmarks/results/profile_2xh200/profile-llama-2-13b-s4096-quick-2xh200.yaml"
OFFLOAD = ParallelConfig(dp=1, tp=1, pp=2, zero_stage=1, offload_optimizer=True, micro_batch_size=1,
                         global_batch_size=8, seq_len=4096)


def test_deepspeeds_estimate_per_offloaded_parameter():
    """DeepSpeed's estimate_zero2_model_states_mem_needs with cpu_offload: params x max(4 x GPUs, 16) x 1.5 on the
    host; distplan takes its 16-byte term (its runners build on the meta device, not a host copy per process)."""
    model = load_model("llama-2-13b")
    assert OFFLOAD_HOST_BYTES_PER_PARAM == 24
    assert host_memory_per_gpu(model, OFFLOAD) == pytest.approx(model.total_params() * 24 / 2)
    assert host_memory_per_gpu(model, replace(OFFLOAD, offload_optimizer=False)) == 0
    # without ZeRO partitioning each data-parallel replica offloads its own copy
    both = replace(OFFLOAD, dp=2, pp=1, zero_stage=0, global_batch_size=8)
    assert host_memory_per_gpu(model, both) == pytest.approx(model.total_params() * 24 / 2 * 2)


def test_the_oom_killed_plan_does_not_fit_the_profiled_host_but_fits_a_dgx():
    model = load_model("llama-2-13b")
    prof = load_profile(PROFILE)
    here = cluster_for_profile(prof, None)
    assert prof.facts["host_memory_gib"] == pytest.approx(251.77) and prof.facts["gpu_count"] == 2
    assert here.host_memory_gib_per_gpu == pytest.approx(251.77 / 2)
    pred = predict(model, here, OFFLOAD, prof, engine="deepspeed")
    assert pred.host_memory_gib == pytest.approx(model.total_params() * 12 / GIB)  # ~145 GiB per GPU
    assert not pred.host_fits and not pred.fits and "CPU memory" in pred.misfit()
    assert not states_fit(model, here, OFFLOAD)  # the solver's prune: never offered
    dgx = load_cluster("h200-141gb")  # 2 TB per 8 GPUs: 256 GiB per GPU
    assert dgx.host_memory_gib_per_gpu == 256 and predict(model, dgx, OFFLOAD, engine="deepspeed").host_fits
    unknown = replace(dgx, host_memory_gib=0.0)  # a cluster file without host_memory_gib: not checked
    assert predict(model, unknown, OFFLOAD, engine="deepspeed").host_fits


def test_estimate_refuses_the_plan_naming_the_host(cli):
    r = cli("estimate", "-m", "llama-2-13b", "--gpus", 2, "--pp", 2, "--zero", 1, "--offload-optimizer",
            "--micro-batch", 1, "--global-batch", 8, "--seq-len", 4096, "--profile", PROFILE)
    assert r.exit_code == 2
    assert "host memory per GPU (offload)" in r.stdout
    assert "offloaded optimizer states need 145.5 GiB of CPU memory per GPU, above the host's 125.9 GiB" in r.stderr


def test_a_cluster_file_with_a_bad_host_memory_is_one_line_error(tmp_path, cli):
    import yaml

    data = load_cluster("h200-141gb").to_dict()
    data["host_memory_gib"] = "lots"
    bad = tmp_path / "c.yaml"
    bad.write_text(yaml.safe_dump(data))
    r = cli("estimate", "-m", "gpt2", "--gpus", 2, "--cluster", bad)
    assert r.exit_code == 2 and "host_memory_gib" in r.stderr and "Traceback" not in r.output


def test_solve_names_the_host_when_only_the_host_is_too_small(tmp_path, cli):
    """llama-3-8b on one H100 of a host with 128 GiB per GPU (the device tool's 1xH100): the GPU holds the leanest
    plan (ZeRO-3 with offload, full recompute) but the host not its 179.5 GiB of offloaded states; two GPUs would."""
    import yaml

    data = load_cluster("dgx-h100-80gb").to_dict()
    data["host_memory_gib"] = 8 * 128
    path = tmp_path / "h100.yaml"
    path.write_text(yaml.safe_dump(data))
    r = cli("solve", "-m", "llama-3-8b", "--gpus", 1, "--cluster", path, "--seq-len", 4096, "--global-batch", 8,
            "-o", tmp_path / "plan.yaml")
    assert r.exit_code == 2 and not (tmp_path / "plan.yaml").exists()
    err = r.stderr.strip()
    assert "\n" not in err and "fits its GPUs at" in err
    assert "offloaded optimizer states need 179.5 GiB of CPU memory per GPU, above the host's 128.0 GiB" in err
    assert err.endswith("the fewest GPUs that would fit is 2")


@pytest.mark.parametrize("zero,pp,mbs,weights_bytes,grad_bytes", [
    (1, 1, (32, 1), 2, 0),   # ZeRO-1/2: bf16 weights on the GPU from forward to backward; gradients go to the host
    (3, 1, (32, 1), 0, 0),   # ZeRO-3, pp = 1: one layer's weights at a time (the gathered buffers)
    (1, 1, (16, 2), 2, 2),   # accumulating micro-batches keep unsharded bf16 gradients on the GPU
])
def test_torch_engine_offload_keeps_its_shards_on_the_host(zero, pp, mbs, weights_bytes, grad_bytes):
    """The torch engine's offload (FSDP2's CPUOffloadPolicy, one rank included): no optimizer states and no fp32
    shards on the GPU, only the bf16 weights and gradients in use, per parameter of the stage."""
    from planner.cost.memory import stage_memory, stage_params

    model = load_model("gpt2-xl")
    mb, m = mbs
    cfg = ParallelConfig(dp=1, pp=pp, zero_stage=zero, offload_optimizer=True, micro_batch_size=mb,
                         global_batch_size=mb * m, seq_len=1024)
    mem = stage_memory(model, cfg, 0, model.num_layers, engine="torch")
    params = sum(stage_params(model, cfg, 0, model.num_layers))
    assert mem.optimizer == 0
    assert mem.weights == pytest.approx(weights_bytes * params)
    assert mem.gradients == pytest.approx(grad_bytes * params)


def test_torch_engine_offload_steps_at_the_measured_host_rate():
    """The torch engine's offloaded step is AdamW on the host's fp32 shards at the profile's measured rate
    (profilers.facts.host_optimizer_s_per_param), not DeepSpeed's CPUAdam rate: torch's per-parameter loop ran
    gpt2-xl's 0.78 B parameters per rank in 20.7 s where 1.0 s was predicted (2x H200, call 27)."""
    profile = load_profile(PROFILE)
    cluster = cluster_for_profile(profile, None)
    model = load_model("llama-2-13b")
    cfg = ParallelConfig(dp=2, zero_stage=3, offload_optimizer=True, micro_batch_size=1, global_batch_size=8,
                         seq_len=4096, recompute="full")
    slow = replace(profile, host_optimizer_s_per_param=26e-9)
    fast = replace(profile, host_optimizer_s_per_param=2e-9)
    opt = {k: dict(predict(model, cluster, cfg, p, engine="torch").breakdown)["optimizer"]
           for k, p in (("slow", slow), ("fast", fast), ("none", profile))}
    per_rank = model.total_params() / 2
    assert opt["slow"] - opt["fast"] == pytest.approx(per_rank * 24e-9, rel=0.02)
    ds = dict(predict(model, cluster, cfg, slow, engine="deepspeed").breakdown)["optimizer"]
    # DeepSpeed's CPUAdam keeps the preset's rate; the torch engine's FSDP2 offload also copies the fp32 shards to the
    # GPU for each micro-batch after the first (4 bytes per parameter of the rank's shard each)
    copies = (cfg.num_microbatches - 1) * per_rank * 4 / cluster.link("host").bandwidth_bytes_s
    assert cfg.num_microbatches == 4 and ds + copies == pytest.approx(opt["none"])


def test_offloaded_optimizer_is_the_fused_cpu_kernel_and_its_rate_is_measured():
    """make_optimizer(offloaded=True): fused AdamW on the host's fp32 shards (the loop was 11x slower); the
    profiler times that very optimizer (profilers.facts.host_optimizer_s_per_param) and it updates the weights."""
    import torch

    from planner.build.parallelize import make_optimizer
    from profilers.facts import host_optimizer_s_per_param

    p = torch.nn.Parameter(torch.ones(1024))
    p.grad = torch.full_like(p, 1e-3)
    opt = make_optimizer([p], lr=1e-2, offloaded=True)
    assert opt.defaults["fused"] is True and not opt.defaults.get("foreach")
    opt.step()
    assert float(p.detach().max()) < 1.0  # stepped: AdamW's first update moves every weight by about lr
    assert make_optimizer([torch.nn.Parameter(torch.ones(4))], lr=1e-2).defaults["foreach"] is False
    rate = host_optimizer_s_per_param(2**18, repeats=2)
    assert 0 < rate < 1e-6  # seconds per parameter: under a microsecond on any host


def cpu_machine(memory_gib_per_rank: float = 11.8):
    """The measured cluster of a 2-process CPU + gloo profile (what `distplan profile` writes on a machine without
    GPUs): each rank's "device" is its share of the host's memory."""
    from planner.core.profile import CollectiveFit, Profile
    from planner.cost.profiled import measured_cluster

    prof = Profile(gpu_name="AMD EPYC", device="cpu", model="gpt2-xl", seq_len=1024, dtype="fp32",
                   collectives=(CollectiveFit("all_reduce", 2, 1e-4, 2.0), CollectiveFit("p2p", 2, 5e-5, 4.0)),
                   matmul_tflops=0.5, hbm_bandwidth_gb_s=10.0, matmul_tflops_by_gflop=((0.03, 0.2), (2.1, 0.5)),
                   overlap_slowdown=0.5, device_count=2, memory_gib=memory_gib_per_rank)
    return measured_cluster(prof)


def test_on_a_cpu_the_offloaded_states_share_the_ranks_memory():
    """A 2-rank gpt2-xl plan with ZeRO-1 offload on a CPU host of 2 x 11.8 GiB: its device peak alone fits, but the
    offloaded states live in the same RAM, so together they do not (the kernel killed such a rank at step 0)."""
    model = load_model("gpt2-xl")
    here = cpu_machine()
    assert here.host_is_device and here.host_memory_gib_per_gpu == 0
    cfg = ParallelConfig(dp=2, zero_stage=1, offload_optimizer=True, micro_batch_size=1, global_batch_size=8,
                         seq_len=1024, recompute="full")
    pred = predict(model, here, cfg)
    host = model.total_params() * OFFLOAD_HOST_BYTES_PER_PARAM / 2 / GIB
    assert pred.host_memory_gib == pytest.approx(host)
    assert pred.peak_memory_gib * (1 + pred.allocator_slack) < pred.capacity_gib  # the device part alone "fits"
    assert pred.peak_memory_gib * (1 + pred.allocator_slack) + host > pred.capacity_gib
    assert not pred.fits and "share this CPU's" in pred.misfit()
    assert pred.over_capacity_gib == pytest.approx(pred.peak_memory_gib * (1 + pred.allocator_slack) + host
                                                   - pred.capacity_gib)
    assert not states_fit(model, here, cfg)


def test_a_solve_on_a_cpu_never_returns_a_plan_over_the_machines_memory():
    from planner.core.errors import DistplanError
    from solvers import solve

    model = load_model("gpt2-xl")
    with pytest.raises(DistplanError, match=r"offloaded optimizer states in the same memory.*above the 11.8 GiB"):
        solve(model, cpu_machine(), 2, global_batch=8, top_k=0)  # 16 bytes per parameter over 2 x 11.8 GiB: none
    here = cpu_machine(24.0)
    result = solve(model, here, 2, global_batch=8, top_k=0)
    pred = result.prediction
    used = pred.peak_memory_gib * (1 + pred.allocator_slack) + pred.host_memory_gib
    assert pred.fits and used <= pred.capacity_gib
    # with the same memory split as two "GPUs" and a separate host (the old reading), offload looked free
    gpu_like = replace(here, host_is_device=False)
    offload = ParallelConfig(dp=2, zero_stage=1, offload_optimizer=True, micro_batch_size=1, global_batch_size=8,
                             seq_len=1024, recompute="full")
    assert predict(model, gpu_like, offload).fits and not predict(model, here, offload).fits


def test_the_cpu_flag_survives_the_plan_file(tmp_path):
    from planner.core.plan import load_plan, make_plan, save_plan

    model = load_model("gpt2-medium")
    here = cpu_machine()
    cfg = ParallelConfig(dp=2, zero_stage=1, micro_batch_size=1, global_batch_size=8, seq_len=1024)
    save_plan(make_plan(model, here, 2, cfg, predict(model, here, cfg)), tmp_path / "p.yaml")
    again = load_plan(tmp_path / "p.yaml")
    assert again.cluster.host_is_device and again.cluster == here
