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
# the newest llama profiles (call 16): the torch engine's pipelining and DTensor TP measured
TORCH_PROFILES = [ROOT / "benchmarks/results/profile_2xh200/session6/profile-llama-3-8b-s4096.yaml",
                  ROOT / "benchmarks/results/profile_2xh200/session6/profile-llama-2-13b-s4096.yaml"]


def _rows():
    return replay.replay(RESULTS, {"megatron": MEGATRON_PROFILES, "torch": TORCH_PROFILES})


def test_every_measured_peak_is_predicted_within_10_percent_and_every_oom_does_not_fit():
    rows = _rows()
    ran = [r for r in rows if r["status"] == "ran"]
    ooms = [r for r in rows if r["status"] == "oom"]
    assert len(ran) >= 33 and len(ooms) >= 4
    misses = [(r["case"], r["plan"], r["measured_gib"], round(r["now_gib"], 1)) for r in ran
              if abs(r["measured_gib"] - r["now_gib"]) > 0.10 * r["now_gib"]]
    assert not misses
    assert all(not r["now_fits"] for r in ooms), [(r["case"], r["plan"], r["now_gib"]) for r in ooms]


def test_step_times_stay_as_close_as_session_6_left_them():
    """33 runs after session 6 (calls 13-16 re-ran five cases): 31 within 10% and 24 within 5%. The two beyond 10%
    are the torch engine's tp2 without data parallelism on llama-2-13b (+24%, +17%): its DTensor overhead, now
    measured on stacks of blocks (profilers/tensor_parallel.py), accounts for about half of what the runs lost
    (+46%, +38% before). Chosen plans: within 6.5% (llama-3-8b-small's pp2 interleaved +6.4%, the 13B pp2 plans
    +5.7% and +5.2% with call 16's profiles, whose block-in-a-stack factor measured 3 points lower than call 9's on
    another machine). A change that loses any of these fails here."""
    ran = [r for r in _rows() if r["status"] == "ran"]

    def within(r, tol):
        return abs(r["step_measured_s"] - r["step_now_s"]) <= tol * r["step_now_s"]

    def misses(tol):
        return [(r["case"], r["plan"], r["step_measured_s"], round(r["step_now_s"], 3)) for r in ran if not within(r, tol)]

    assert sum(within(r, 0.10) for r in ran) >= 31, misses(0.10)
    assert all(within(r, 0.25) for r in ran), misses(0.25)
    assert sum(within(r, 0.05) for r in ran) >= 24, misses(0.05)
    assert all(within(r, 0.065) for r in ran if r["plan"] == "distplan"), misses(0.065)


def test_the_predicted_order_of_plans_stays_as_session_6_left_it():
    """Spearman of predicted against measured step times per case (the campaign's >= 0.9 target) with today's
    model: 1.0 in three cases, 0.943 gpt2-xl-small; llama-3-8b-small 0.857 (the pp2 interleaved plan predicted
    2.5% faster than FSDP2 ZeRO-1 ran 3.8% slower); gpt2-xl-large 0.647, four data-parallel plans measured within
    2% of each other (3.11-3.17 s), within one plan's spread between calls (FSDP2: 3.11, 3.14, 3.17 s)."""
    rho = {case: now for case, (_, _, now) in replay.case_spearman(_rows()).items()}
    assert all(rho[c] >= 0.9 for c in ("gpt2-xl-small", "llama-3-8b-large", "llama-2-13b-small", "llama-2-13b-large")), rho
    assert rho["llama-3-8b-small"] >= 0.85 and rho["gpt2-xl-large"] >= 0.6, rho
