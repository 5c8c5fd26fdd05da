"""The cost model against every campaign run measured on 2x H200 (benchmarks/replay.py over the committed rows,
plans and profiles of benchmarks/results/campaign_2xh200/): a regression guard for the memory and step-time
models, whose references are real measurements (peak allocated memory, median step time, out-of-memory errors)."""

import functools
import importlib.util
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("replay", ROOT / "benchmarks" / "replay.py")
replay = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(replay)

RESULTS = ROOT / "benchmarks" / "results" / "campaign_2xh200"
MEGATRON_PROFILES = [ROOT / "benchmarks/results/profile_2xh200/session4/profile-gpt2-xl-s1024-quick.yaml",
                     ROOT / "benchmarks/results/profile_2xh200/session4/profile-llama-3-8b-s4096-quick.yaml"]
# the newest llama profiles: llama-3-8b from call 18 (FSDP2's accumulating micro-batches and the pipelining
# schedule's growth with its operations measured), llama-2-13b from call 17 (DTensor TP with SP measured)
TORCH_PROFILES = [ROOT / "benchmarks/results/profile_2xh200/session7/profile-llama-3-8b-s4096.yaml",
                  ROOT / "benchmarks/results/profile_2xh200/session7/profile-llama-2-13b-s4096.yaml"]


@functools.lru_cache(maxsize=1)
def _replayed() -> tuple:
    """The 2xH200 campaign replayed once for every test here (a pure function of committed files)."""
    return tuple(replay.replay(RESULTS, {"megatron": MEGATRON_PROFILES, "torch": TORCH_PROFILES}))


def _rows() -> list[dict]:
    return [dict(r) for r in _replayed()]


def test_every_measured_peak_is_predicted_within_10_percent_and_every_oom_does_not_fit():
    rows = _rows()
    ran = [r for r in rows if r["status"] == "ran"]
    ooms = [r for r in rows if r["status"] == "oom"]
    assert len(ran) >= 36 and len(ooms) >= 4
    misses = [(r["case"], r["plan"], r["measured_gib"], round(r["now_gib"], 1)) for r in ran
              if abs(r["measured_gib"] - r["now_gib"]) > 0.10 * r["now_gib"]]
    assert not misses
    assert all(not r["now_fits"] for r in ooms), [(r["case"], r["plan"], r["now_gib"]) for r in ooms]


def test_step_times_stay_as_close_as_session_9_left_them():
    """44 runs after session 11 (call 31: both gpt2-xl cases again), every one within 10%; 42 besides two offload
    runs after session 10 (calls 27-28: each case's third alternative);
    36 after session 9 (calls 19 and 22 re-ran llama-2-13b-large with today's model; calls 21-22
    gpt2-xl-large; calls 17-18 re-ran llama-3-8b-small, llama-2-13b-small and llama-3-8b-large's distplan plan; the large
    case's baselines are call 12's measurements of the same plans, its other three plans call 24's): every one within
    10% and 31 within 5%, the
    chosen plans within 5% (llama-2-13b-large +3.2% the farthest). Before session 7's fixes FSDP2 ZeRO-3 on
    llama-3-8b at 1 x 4 ran 13% under its prediction (every micro-batch charged the synchronising one's sharding
    cost) and the 13B tp2 plans +24% and +17%. A change that loses any of these fails here."""
    ran = [r for r in _rows() if r["status"] == "ran"]

    def within(r, tol):
        return abs(r["step_measured_s"] - r["step_now_s"]) <= tol * r["step_now_s"]

    def misses(tol):
        return [(r["case"], r["plan"], r["step_measured_s"], round(r["step_now_s"], 3)) for r in ran if not within(r, tol)]

    # session 11 (call 31) re-ran both gpt2-xl cases with a fresh full profile after its two fixes (8-block FSDP2 /
    # DDP / ZeRO-3 stacks on GPUs, the loss temporary's logits): session 10's three misses there are gone (gpt2-xl-
    # large's offload plan, then the per-parameter host AdamW, +554%, now +3.1%; gpt2-xl-small's +10.7% now +7.9%;
    # its FSDP2 ZeRO-3 against call 30's 4-block stacks -13.4%, now -0.4%): every run within 10%
    assert not misses(0.10)
    assert len(ran) >= 44 and sum(within(r, 0.05) for r in ran) >= 38, misses(0.05)
    # the chosen plans within 5% (call 30's gpt2-xl-small at 4 x 4, +23.9% under an older stack factor, re-ran as
    # FSDP2 ZeRO-1 at 16 x 1: -2.4%)
    assert all(within(r, 0.05) for r in ran if r["plan"] == "distplan"), misses(0.05)
    assert all(within(r, 0.07) for r in ran if r["plan"] == "distplan"), misses(0.07)


def test_the_predicted_order_of_plans_stays_as_session_8_left_it():
    """Spearman of predicted against measured step times per case (the campaign's >= 0.9 target) with today's
    model: 1.0 in four cases, gpt2-xl-small 0.943 and gpt2-xl-large 0.941. gpt2-xl-large's data-parallel plans
    measured within 4% of each other (3.05-3.18 s); until its profile timed micro-batch 32 (call 22) DDP at 32 x 4
    and at 16 x 8 were predicted alike where they ran 3% apart, and Spearman was 0.647."""
    rho = {case: now for case, (_, _, now) in replay.case_spearman(_rows()).items()}
    assert all(v >= 0.9 for v in rho.values()) and len(rho) == 6, rho


ENGINES = RESULTS / "engines"  # issue 6's engine coverage: distplan's plans solved for and run on one engine


def test_every_engine_coverage_run_is_predicted_within_10_percent_or_left_out_of_the_search():
    """Calls 20-26 (2xH200): distplan's plans solved for DeepSpeed and for megatron-core and run there. Before
    session 8's fixes DeepSpeed ZeRO-1 ran +20.5% over its prediction (charged as an all-reduce where DeepSpeed runs
    the ZeRO-2 optimizer) and DeepSpeed's pipeline plan for 13B ran out of memory on its BF16_Optimizer's buffers.
    DeepSpeed's bf16 ZeRO-0 over data parallelism (call 22) ran +44%: its unfused optimizer's per-tensor work is not
    modelled, and the solver no longer offers that layout (planner.cost.engines.modelled). Call 24 re-ran ZeRO-1 with a
    profile whose DeepSpeed ZeRO-2 stacks were 4 blocks long: +11.7%; call 26, profiled with 8-block stacks
    (profilers.sharding.DEEPSPEED_ZERO2_STACK), ran both plans within 2%. Call 25's 13B pipeline plan with optimizer
    offload was killed by the host's OOM killer: now predicted not to fit the host (memory.host_memory_per_gpu)."""
    from planner.core.job import ParallelConfig
    from planner.cost.engines import modelled

    def cfg_of(config: str) -> ParallelConfig:  # "dp2 tp1 pp1 [v8] zero0 ..."
        n = {k: int(v) for k, v in re.findall(r"\b(dp|tp|pp|zero)(\d+)\b", config)}
        return ParallelConfig(dp=n["dp"], tp=n["tp"], pp=n["pp"], zero_stage=n["zero"])

    def stack_blocks(profile: str) -> int:  # the longest DeepSpeed ZeRO-2 stack a committed profile measured
        raw = yaml.safe_load((ROOT / profile).read_text())["raw"]["communication"]["sharding"]
        return max(p["blocks"] for p in raw if p.get("impl") == "deepspeed" and not p["reshard_after_forward"])

    rows = replay.replay(ENGINES, merge=False)
    ran = [r for r in rows if r["status"] == "ran"]
    ooms = [r for r in rows if r["status"] != "ran"]
    assert {r["engine"] for r in ran} == {"deepspeed", "megatron"} and len(ran) >= 10 and len(ooms) >= 2
    assert all(not r["now_fits"] for r in ooms) and any("offload" in r["config"] for r in ooms)
    off = [r for r in ran
           if abs(r["step_measured_s"] / r["step_now_s"] - 1) > 0.10 or abs(r["measured_gib"] / r["now_gib"] - 1) > 0.10]
    assert sorted((r["call"], r["config"]) for r in off) == [("call22-dsgpt", "dp2 tp1 pp1 zero0 mb16x1 1f1b rc=none"),
                                                             ("call24-dsgpt", "dp2 tp1 pp1 zero1 mb16x1 1f1b rc=none")]
    zero0 = next(r for r in off if "zero0" in r["config"])
    assert not modelled("deepspeed", cfg_of(zero0["config"]))
    assert all(modelled(r["engine"], cfg_of(r["config"])) for r in ran if r is not zero0)
    assert stack_blocks(next(r for r in off if "zero1" in r["config"])["profile"]) == 4
    eight = [r for r in ran if r["call"] == "call26-dsgpt"]
    assert len(eight) == 2 and all(abs(r["step_measured_s"] / r["step_now_s"] - 1) <= 0.05 for r in eight)
    assert stack_blocks("benchmarks/results/profile_2xh200/session9/call26/profile-gpt2-xl-s1024.yaml") == 8  # call 26's
    zero1 = next(r for r in ran if r["engine"] == "deepspeed" and "zero1" in r["config"])
    assert abs(zero1["step_measured_s"] / zero1["step_now_s"] - 1) <= 0.05


def test_four_gpu_campaign_stays_as_session_9_measured_it():
    """llama-3-8b on 4x H200 with a profile of the node (session 9, calls 2-3): every run measured slower than
    predicted (+1.4% to +14.8%); the chosen plan +2.9%; one miss, dp2 x pp2 interleaved +14.8% (campaign_4xh200.md,
    open); every peak within 10%; Spearman 0.929. A change that loses any of these fails here."""
    rows = replay.replay(RESULTS.parent / "campaign_4xh200")
    ran = [r for r in rows if r["status"] == "ran"]
    err = {r["plan"]: r["step_measured_s"] / r["step_now_s"] - 1 for r in ran}
    assert len(ran) == 8 and abs(err["distplan"]) <= 0.05
    assert [p for p, e in err.items() if abs(e) > 0.10] == ["alt1"]
    assert all(abs(r["measured_gib"] / r["now_gib"] - 1) <= 0.10 for r in ran)
    rho = replay.spearman([-r["step_now_s"] for r in ran], [-r["step_measured_s"] for r in ran])
    assert rho >= 0.9


def test_one_gpu_campaign_stays_as_session_10_measured_it():
    """gpt2-xl and llama-3-8b on one H200, each with a fresh profile of it (session 10, calls 5-6): every step within
    10% of today's prediction, the chosen plans within 5% (+0.9%, +1.3%), the offload plans within 3% (the torch
    engine's FSDP2 offload at dp = 1 with the fused host AdamW), every peak within 10% and the torch engine's within 2%
    (gpt2-xl's alt3 was -10.1% with 14 bytes per logit where the loss call's temporary holds 12, session 11); DeepSpeed at dp = 1 charged its measured ZeRO machinery (-8.5%; +21.9%
    without it, call 1) and llama-3-8b at micro-batch 1 x 2048, host-bound alone, within 6% (-9.2% with its lone
    block's host time, call 2). A change that loses any of these fails here."""
    rows = replay.replay(RESULTS.parent / "campaign_1xh200")
    ran = [r for r in rows if r["status"] == "ran"]
    err = {(r["case"], r["plan"]): r["step_measured_s"] / r["step_now_s"] - 1 for r in ran}
    mem = {(r["case"], r["plan"]): r["measured_gib"] / r["now_gib"] - 1 for r in ran}
    assert len(ran) == 12 and all(abs(e) <= 0.10 for e in err.values()), err
    assert abs(err[("gpt2-xl-1gpu", "distplan")]) <= 0.05 and abs(err[("llama-3-8b-1gpu", "distplan")]) <= 0.05
    # the offload plans: call 7's alt2 at 8 x 4 ran +38.7% with one host-to-GPU copy of the fp32 shards charged per
    # step (FSDP2's offload copies them for every micro-batch): +3.8% now
    assert abs(err[("gpt2-xl-1gpu", "alt2")]) <= 0.05 and abs(err[("gpt2-xl-1gpu", "alt3")]) <= 0.03
    assert abs(err[("llama-3-8b-1gpu", "alt1")]) <= 0.06
    assert all(abs(e) <= 0.10 for e in mem.values()), mem
    assert all(abs(mem[k]) <= 0.02 for k in err if k[1] not in ("deepspeed-zero2", "megatron-heuristic")), mem


def test_one_h100_campaign_stays_as_session_11_measured_it():
    """gpt2-xl on one H100 80GB with a fresh profile of it (session 11, call 1): every step within 10% of today's
    prediction (offload at 16 x 2 -8.7% the farthest: its per-micro-batch shard copies are charged whole), the chosen
    plan within 5% (-0.4%), every peak within 2%, Spearman >= 0.9. A change that loses any of these fails here."""
    rows = replay.replay(RESULTS.parent / "campaign_1xh100")
    ran = [r for r in rows if r["status"] == "ran"]
    err = {r["plan"]: r["step_measured_s"] / r["step_now_s"] - 1 for r in ran}
    assert len(ran) == 8 and all(abs(e) <= 0.10 for e in err.values()), err
    assert abs(err["distplan"]) <= 0.05
    assert all(abs(r["measured_gib"] / r["now_gib"] - 1) <= 0.02 for r in ran)
    rho = replay.spearman([-r["step_now_s"] for r in ran], [-r["step_measured_s"] for r in ran])
    assert rho >= 0.9


def _session11_megatron_profile(tmp_path, head: bool) -> Path:
    """The compute-only gpt2-xl profile of 2xH200 session 11 (megatron-core's head measured), its optimizer rate
    replaced by call 31's full profile of the same machine: the compute-only run timed the optimizer step beside
    megatron-core's import (8x slow; fixed since, profilers/run.py). `head` False drops the megatron head's points."""
    prof = yaml.safe_load((RESULTS.parent / "profile_2xh200/session11/profile-gpt2-xl-s1024.yaml").read_text())
    clean = yaml.safe_load((RESULTS / "call31-gpt2xl/profiles/profile-gpt2-xl-s1024.yaml").read_text())
    prof["optimizer_s_per_param"] = clean["optimizer_s_per_param"]
    if not head:
        prof["compute"] = [c for c in prof["compute"] if c.get("kind") != "megatron_head"]
        prof["raw"]["compute"] = [c for c in prof["raw"]["compute"] if c.get("kind") != "megatron_head"]
    path = tmp_path / f"profile-gpt2-xl-s1024-{'head' if head else 'nohead'}.yaml"
    path.write_text(yaml.safe_dump(prof))
    return path


def test_megatrons_measured_head_brings_its_gpt2_xl_runs_within_3_percent(tmp_path):
    """megatron-core's plans ran under predictions that charged distplan's head (unfused cross-entropy with fp32
    copies: 75 ms per 16 x 1024-token micro-batch on H200 where megatron's own head and loss took 24). With its head
    measured (session 11) the four gpt2-xl megatron runs on 2xH200 (engine coverage calls 20: dp2 16 x 1, pp2 v8
    16 x 2; the campaign's heuristic baselines at 16 x 1 and 16 x 8) are re-predicted within 3%; with the same
    profile without it, 4-12% over."""
    rows = {}
    for head in (False, True):
        prof = _session11_megatron_profile(tmp_path, head)
        got = replay.replay(RESULTS / "engines", {"megatron": [prof]}, merge=False)
        got += replay.replay(RESULTS, {"megatron": [prof]})
        rows[head] = {(r["case"], r["plan"], r["config"]): r["step_measured_s"] / r["step_now_s"] - 1
                      for r in got if r["engine"] == "megatron" and r["case"].startswith("gpt2-xl") and r["status"] == "ran"}
    assert len(rows[True]) == 4 and all(abs(e) <= 0.03 for e in rows[True].values()), rows[True]
    assert all(e < -0.04 for e in rows[False].values()), rows[False]
