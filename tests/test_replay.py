"""The cost model against every campaign run measured on 2x H200 (benchmarks/replay.py over the committed rows,
plans and profiles of benchmarks/results/campaign_2xh200/): a regression guard for the memory and step-time
models, whose references are real measurements (peak allocated memory, median step time, out-of-memory errors)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("replay", ROOT / "benchmarks" / "replay.py")
replay = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(replay)

RESULTS = ROOT / "benchmarks" / "results" / "campaign_2xh200"
MEGATRON_PROFILES = [ROOT / "benchmarks/results/profile_2xh200/session4/profile-gpt2-xl-s1024-quick.yaml",
                     ROOT / "benchmarks/results/profile_2xh200/session4/profile-llama-3-8b-s4096-quick.yaml"]


def _rows():
    return replay.replay(RESULTS, {"megatron": MEGATRON_PROFILES})


def test_every_measured_peak_is_predicted_within_10_percent_and_every_oom_does_not_fit():
    rows = _rows()
    ran = [r for r in rows if r["status"] == "ran"]
    ooms = [r for r in rows if r["status"] == "oom"]
    assert len(ran) >= 28 and len(ooms) >= 4
    misses = [(r["case"], r["plan"], r["measured_gib"], round(r["now_gib"], 1)) for r in ran
              if abs(r["measured_gib"] - r["now_gib"]) > 0.10 * r["now_gib"]]
    assert not misses
    assert all(not r["now_fits"] for r in ooms), [(r["case"], r["plan"], r["now_gib"]) for r in ooms]


def test_step_times_stay_as_close_as_session_5_left_them():
    """All 28 within 10% and 25 within 5% after session 5 (the block-in-a-stack factor, Profile.stack_factor, and
    selective recompute repeating megatron's unfused core, the measured sharding overhead in place of the bandwidth
    terms; beyond 5%: gpt2-xl-large megatron -9.3% and its pp2 v2 alternative +6.7%, llama-3-8b-large DeepSpeed
    ZeRO-2 +6.4%), and every distplan plan within 5% (the issue's bar for chosen plans); a change that loses any
    of them fails here."""
    ran = [r for r in _rows() if r["status"] == "ran"]

    def within(r, tol):
        return abs(r["step_measured_s"] - r["step_now_s"]) <= tol * r["step_now_s"]

    def misses(tol):
        return [(r["case"], r["plan"], r["step_measured_s"], round(r["step_now_s"], 3)) for r in ran if not within(r, tol)]

    assert all(within(r, 0.10) for r in ran), misses(0.10)
    assert sum(within(r, 0.05) for r in ran) >= 25, misses(0.05)
    assert all(within(r, 0.05) for r in ran if r["plan"] == "distplan"), misses(0.05)


def test_the_predicted_order_of_plans_stays_as_session_5_left_it():
    """Spearman of predicted against measured step times per case (the campaign's >= 0.9 target) with today's
    model: at least 0.9 in five cases; gpt2-xl-large (0.714) has four data-parallel plans measured within 4% of
    each other and predicted within 1%, where the order is run-to-run noise."""
    rho = {case: now for case, (_, _, now) in replay.case_spearman(_rows()).items()}
    assert all(rho[c] >= 0.9 for c in ("gpt2-xl-small", "llama-3-8b-small", "llama-3-8b-large", "llama-2-13b-small",
                                       "llama-2-13b-large")), rho
    assert rho["gpt2-xl-large"] >= 0.7, rho
