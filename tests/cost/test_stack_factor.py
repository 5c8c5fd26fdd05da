"""Profile.stack_factor: distplan's block inside a stack on every GPU over the same block alone (the compute fits),
and the cost model applying it (costmodel.fit_factor) to the engines that run distplan's layers, not megatron's."""

import dataclasses
import statistics
from pathlib import Path

import pytest

from planner.core.job import ParallelConfig
from planner.cost.terms import CommModel
from planner.cost.layer import block_time, fit_factor, head_time
from planner.core.model import load_model
from planner.cost.profiled import cluster_for_profile, load_profile, with_derived

ROOT = Path(__file__).resolve().parents[2]
GPT2_XL_2XH200 = ROOT / "benchmarks/results/profile_2xh200/session5/profile-gpt2-xl-s1024.yaml"


def _ratios_by_hand(profile):
    """The plain stacks of STACK blocks at their largest token count, per block, over the block fit there."""
    stacks = [p for p in profile.raw["communication"]["sharding"] if p["blocks"] > 1]
    n = max(p["tokens"] for p in stacks)
    raw = next(r for r in profile.raw["compute"] if r["kind"] == "block" and r["tp"] == 1)
    alone = next(p["fwd_s"] + p["bwd_s"] for p in raw["points"] if p["tokens"] == n)  # a measured point, no fit
    return [p["plain_s"] / p["blocks"] / alone for p in stacks if p["tokens"] == n]


def test_the_2xh200_gpt2_xl_profile_says_a_block_in_a_stack_is_7_percent_slower():
    profile = load_profile(GPT2_XL_2XH200)
    ratios = _ratios_by_hand(profile)
    assert len(ratios) == 4  # FSDP2 (two modes), DDP and DeepSpeed stacks: the plain stack timed before each
    assert profile.stack_factor() == pytest.approx(statistics.median(ratios), rel=1e-9)
    assert 1.05 < profile.stack_factor() < 1.10  # 6.33 ms per block in a stack of 4 against 5.89 alone


def test_the_factor_scales_distplan_layers_for_torch_and_deepspeed_not_megatron():
    profile = load_profile(GPT2_XL_2XH200)
    model, k = load_model("gpt2-xl"), profile.stack_factor()
    cluster = cluster_for_profile(profile, None)
    cfg = ParallelConfig(dp=2, micro_batch_size=16, global_batch_size=32, seq_len=1024)
    comm = CommModel(cluster, profile)
    plain = dataclasses.replace(profile, stack=None)  # no stack measured: the fits alone
    assert plain.stack_factor() == 1.0
    for engine in ("torch", "deepspeed", "any"):
        assert fit_factor(profile, engine) == pytest.approx(k)
        got, ref = block_time(model, cluster, cfg, comm, profile, engine), block_time(model, cluster, cfg, comm, plain, engine)
        assert got.fwd == pytest.approx(k * ref.fwd) and got.bwd == pytest.approx(k * ref.bwd)
        assert head_time(model, cluster, cfg, profile, engine)[1] == pytest.approx(k * head_time(model, cluster, cfg, plain, engine)[1])
    assert fit_factor(profile, "megatron") == 1.0
    meg = dataclasses.replace(cfg, flash_attention=False)
    assert block_time(model, cluster, meg, comm, profile, "megatron") == block_time(model, cluster, meg, comm, plain, "megatron")


def test_a_stack_faster_than_a_lone_block_gives_no_speed_up():
    """At host-bound sizes a lone block's time is its host's (the fits take max(GPU, host)); a stack hides it."""
    profile = load_profile(GPT2_XL_2XH200)
    raw = dict(profile.raw)
    comm = dict(raw["communication"])
    comm["sharding"] = [{**p, "plain_s": p["plain_s"] * 0.5} for p in comm["sharding"]]
    raw["communication"] = comm
    assert with_derived(dataclasses.replace(profile, raw=raw)).stack_factor() == 1.0


GPT2_XL_CALL26 = ROOT / "benchmarks/results/profile_2xh200/session9/call26/profile-gpt2-xl-s1024.yaml"


def test_host_bound_sizes_take_the_stacks_own_figure():
    """Where the lone block is host-bound, a block in a model costs what the stacks measured there (the host's
    fixed cost per call overlaps the blocks before): gpt2-xl at 1024 tokens on 2x H200, 1.72 ms per block in a
    stack against 2.04 ms alone (its host time; 0.70 ms of GPU). From the smallest GPU-bound micro-batch up, the
    compute-bound factor of the largest stacks; between, linear in log tokens (gpt2-xl at 4 x 1024 on 2x H200 ran
    24% over the stacks' figure and 17% under the compute-bound one: benchmarks/results/campaign_2xh200.md)."""
    profile = load_profile(GPT2_XL_CALL26)
    raw = next(r for r in profile.raw["compute"] if r["kind"] == "block" and r["tp"] == 1)["points"]
    fit = profile.compute_fit("block", 1)
    alone = lambda t: fit.time_s("fwd", t) + fit.time_s("bwd", t)  # noqa: E731
    gpu_bound = sorted(p["tokens"] for p in raw if (p["gpu_fwd_s"] + p["gpu_bwd_s"]) / alone(p["tokens"]) >= 0.99)
    assert gpu_bound[0] == 8192 and gpu_bound == [p["tokens"] for p in raw if p["tokens"] >= 8192]
    small = [p for p in profile.raw["communication"]["sharding"]
             if p["blocks"] > 1 and p["tokens"] == 1024 and not str(p.get("impl", "")).startswith("tp")]
    want = statistics.median(p["plain_s"] / p["blocks"] / alone(1024) for p in small)
    assert 0.8 < want < 0.9
    assert profile.stack_factor(1024) == pytest.approx(want) and profile.stack_factor(512) == pytest.approx(want)
    top = profile.stack_factor()
    for tokens in (8192, 16384, 32768):
        assert profile.stack_factor(tokens) == top > 1.05
    # between the host-bound stacks (1024) and the first GPU-bound micro-batch (8192): linear in log tokens
    assert profile.stack_factor(2048) == pytest.approx(want + (top - want) / 3)
    assert profile.stack_factor(4096) == pytest.approx(want + 2 * (top - want) / 3)
    # and the cost model takes it per micro-batch: gpt2-xl at 1 x 1024 runs its blocks at the stacks' figure
    model, cluster = load_model("gpt2-xl"), cluster_for_profile(profile, None)
    cfg = ParallelConfig(dp=2, micro_batch_size=1, global_batch_size=32, seq_len=1024)
    plain = dataclasses.replace(profile, stack=None)
    comm = CommModel(cluster, profile)
    got, ref = block_time(model, cluster, cfg, comm, profile, "torch"), block_time(model, cluster, cfg, comm, plain, "torch")
    assert got.fwd == pytest.approx(want * ref.fwd) and fit_factor(profile, "torch", 1024) == pytest.approx(want)


def test_a_nearly_gpu_bound_block_is_charged_at_least_its_gpu_share_of_the_compute_bound_factor():
    """One H200's gpt2-xl profile (benchmarks/results/campaign_1xh200.md): alone, the block at 8192 tokens is just
    host-bound (GPU share 0.973 of its fit), so the first GPU-bound micro-batch is 16384 and the interpolation from
    the 8-block stacks' 0.51 at 1024 tokens gave 0.933 at 8192; the solver chose 8 x 4 and it ran 8.9% over
    (0.838 s). The floor is the GPU share times the compute-bound factor: 1.045 at 8192, and the solver chooses
    32 x 1 again (it ran 0.762 s)."""
    profile = load_profile(ROOT / "benchmarks/results/campaign_1xh200/call7-both/profiles/profile-gpt2-xl-s1024.yaml")
    raw = next(r for r in profile.raw["compute"] if r["kind"] == "block" and r["tp"] == 1)["points"]
    fit = profile.compute_fit("block", 1)
    share = {p["tokens"]: (p["gpu_fwd_s"] + p["gpu_bwd_s"]) / (fit.time_s("fwd", p["tokens"]) + fit.time_s("bwd", p["tokens"]))
             for p in raw}
    top = profile.stack_factor()
    assert 0.95 < share[8192] < 0.99 and top > 1.05
    assert profile.stack_factor(8192) == pytest.approx(share[8192] * top)
    assert profile.stack_factor(16384) == top
    # where the interpolation is above the floor it stands: 1024 tokens keeps the stacks' own figure
    assert share[1024] * top < 0.3 and profile.stack_factor(1024) == pytest.approx(0.51, abs=0.01)

