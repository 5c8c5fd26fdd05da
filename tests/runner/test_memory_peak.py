"""planner/runner/memory_peak.py: what is live at a step's peak, from the caching allocator's history (CUDA); the
replay of the events is checked here on a hand-made history with a known answer, the flag's refusals on the CPU."""

import os

import pytest

from planner.runner import memory_peak
from planner.runner.engine_api import RunOptions
from planner.runner.launch import run_plan

GIB = 1024**3
OWN = os.sep.join(["", "repo", "planner", "runner", "parallelize.py"])
TORCH = os.sep.join(["", "site", "torch", "nn", "functional.py"])


def ev(action, addr, gib, where=OWN, line=10, name="forward"):
    return {"action": action, "addr": addr, "size": int(gib * GIB), "frames": [
        {"filename": TORCH, "line": 1, "name": "linear"}, {"filename": where, "line": line, "name": name}]}


def test_the_peak_is_the_highest_running_total_and_its_live_blocks_are_grouped_by_place():
    events = [ev("alloc", 1, 2.0), ev("alloc", 2, 1.0, line=20, name="attn"), ev("free_requested", 1, 2.0),
              ev("alloc", 3, 0.5),  # still below the peak: block 1 is only queued for freeing
              ev("alloc", 4, 0.25, line=20, name="attn"),  # 3.75 GiB: the peak
              {"action": "segment_alloc", "addr": 99, "size": 8 * GIB, "frames": []},  # reserves, allocates nothing
              ev("free_completed", 1, 2.0), ev("alloc", 5, 1.0)]  # 2.75 GiB after
    got = memory_peak.summarize(events, before_bytes=10 * GIB)
    assert got["before_step_gib"] == 10 and got["step_peak_gib"] == pytest.approx(13.75)
    places = {p["where"]: (p["gib"], p["blocks"]) for p in got["live_at_peak"]}
    own = os.path.join("planner", "runner", "parallelize.py")
    torch_frame = "functional.py:1 linear"  # the innermost frame, outside distplan: the call that allocated
    assert places == {f"{own}:10 forward <- {torch_frame}": (2.5, 2), f"{own}:20 attn <- {torch_frame}": (1.25, 2)}
    assert [p["gib"] for p in got["live_at_peak"]] == [2.5, 1.25] and got["live_at_peak_other_gib"] == 0


def test_places_outside_distplan_name_the_innermost_frame_and_the_list_is_cut_at_top():
    events = [{"action": "alloc", "addr": a, "size": (a + 1) * GIB, "frames": [{"filename": TORCH, "line": a, "name": "f"}]}
              for a in range(4)]
    got = memory_peak.summarize(events, before_bytes=0, top=2)
    assert [p["where"] for p in got["live_at_peak"]] == ["functional.py:3 f", "functional.py:2 f"]
    assert got["live_at_peak_other_gib"] == pytest.approx(3.0) and got["step_peak_gib"] == pytest.approx(10.0)
    assert memory_peak.summarize([], 0)["live_at_peak"] == []


def test_the_flag_is_refused_without_cuda_and_for_other_engines(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("unused: the request is refused before the plan is read\n")
    from planner.core.errors import DistplanError

    with pytest.raises(DistplanError, match="--memory-peak records the torch engine's step only; engine is 'deepspeed'"):
        run_plan(plan, RunOptions(engine="deepspeed", memory_peak=True))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(DistplanError, match="--memory-peak needs CUDA"):
            run_plan(plan, RunOptions(memory_peak=True))
