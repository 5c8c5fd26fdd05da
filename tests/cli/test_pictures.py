"""Pictures: real PNG/SVG files of sensible size, not blank, with each phase's colour where it should be."""

import re
import time

import numpy as np
import pytest
import yaml
from matplotlib.colors import to_rgb
from matplotlib.image import imread
from matplotlib.text import Text
from review_plans import review_plan

from planner.core.errors import DistplanError
from planner.pictures import PHASE_COLORS, comparison_figure, figure_bytes, memory_figure, save_figure, timeline_figure
from planner.core.plan import load_plan, plan_to_yaml
from planner.cost.timeline import plan_schedule
from planner.show import memory_chart_of, timeline_of


def png_pixels(path):
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] >= 300 and img.shape[1] >= 600, img.shape
    return img[..., :3]


def share_of_colour(rgb, colour, tol=0.04) -> float:
    return float((np.abs(rgb - np.array(to_rgb(colour))).max(axis=-1) < tol).mean())


def assert_not_blank(rgb):
    assert rgb.std() > 0.1, "picture is (nearly) one colour"
    assert (rgb.min(axis=-1) < 0.9).mean() > 0.05, "picture is (nearly) all white"


@pytest.mark.parametrize("kw", [dict(schedule="1f1b"), dict(schedule="gpipe"),
                                dict(schedule="interleaved", vpp=2, recompute="full")])
def test_timeline_png_shows_every_phase(tmp_path, kw):
    plan = review_plan(**kw)
    path = save_figure(timeline_of(plan), tmp_path / "timeline.png")
    assert 20_000 < path.stat().st_size < 2_000_000
    rgb = png_pixels(path)
    assert_not_blank(rgb)
    for phase in ("forward", "backward", "grad_sync", "optimizer"):
        assert share_of_colour(rgb, PHASE_COLORS[phase]) > 0.002, phase
    if kw.get("recompute") == "full":
        assert share_of_colour(rgb, PHASE_COLORS["recompute"]) > 0.002


def test_gpipe_and_1f1b_draw_different_schedules(tmp_path):
    a = save_figure(timeline_of(review_plan(schedule="1f1b")), tmp_path / "a.png")
    b = save_figure(timeline_of(review_plan(schedule="gpipe")), tmp_path / "b.png")
    assert np.abs(png_pixels(a) - png_pixels(b)).mean() > 0.005


def test_large_schedule_draws_quickly_and_stays_readable(tmp_path):
    plan = review_plan(dp=1, pp=8, micro_batch_size=1, global_batch_size=256)  # 256 micro-batches x 8 ranks
    sched = plan_schedule(plan)
    assert len([e for e in sched.events if e.phase == "forward"]) == 256 * 8
    path = save_figure(timeline_figure(sched, title="large"), tmp_path / "large.png")
    assert_not_blank(png_pixels(path))


def test_timeline_svg_is_an_svg_document(tmp_path):
    path = save_figure(timeline_of(review_plan()), tmp_path / "timeline.svg")
    text = path.read_text()
    assert "<svg" in text and text.rstrip().endswith("</svg>")
    assert 10_000 < len(text) < 3_000_000


def test_memory_chart_shows_stacked_parts_and_capacity(tmp_path):
    plan = review_plan()
    path = save_figure(memory_chart_of(plan), tmp_path / "memory.png")
    rgb = png_pixels(path)
    assert_not_blank(rgb)
    for colour in ("#4C72B0", "#DD8452", "#C44E52"):  # weights, optimizer, activations
        assert share_of_colour(rgb, colour) > 0.001
    assert share_of_colour(rgb, "#B22222") > 0.0005  # the capacity lines


def test_memory_chart_marks_a_stage_over_the_limit():
    stages = [{"rank": 0, "layers": [0, 3], "memory_breakdown_gib": {"weights": 40.0, "activations": 50.0}},
              {"rank": 1, "layers": [4, 7], "memory_breakdown_gib": {"weights": 40.0, "activations": 10.0}}]
    fig = memory_figure(stages, capacity_gib=78.0)
    texts = [t for t in fig.axes[0].texts if t.get_text() == "90.0"]
    assert texts and to_rgb(texts[0].get_color()) == to_rgb("#B22222")


def test_comparison_chart_handles_missing_measurements(tmp_path):
    records = [{"name": "chosen", "predicted_step_s": 1.2, "measured_step_s": 1.3, "predicted_mem_gib": 60.0,
                "measured_mem_gib": 58.5},
               {"name": "runner-up", "predicted_step_s": 1.4, "measured_step_s": None, "predicted_mem_gib": 70.0,
                "measured_mem_gib": None}]
    fig = comparison_figure(records)
    labels = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "+8.3%" in labels and "not measured" in labels
    path = save_figure(fig, tmp_path / "cmp.png")
    assert_not_blank(png_pixels(path))
    with pytest.raises(DistplanError, match="lacks 'predicted_step_s'"):
        comparison_figure([{"name": "x"}])


def test_picture_format_comes_from_the_suffix(tmp_path):
    fig = memory_chart_of(review_plan())
    with pytest.raises(DistplanError, match=r"suffix must be \.png or \.svg"):
        save_figure(fig, tmp_path / "memory.jpg")
    assert figure_bytes(fig, "png")[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the timeline agrees with the plan, and stays readable at scale -----------------------------------

AGREEMENT_CASES = {
    "1f1b": dict(schedule="1f1b"),
    "gpipe": dict(schedule="gpipe"),
    "interleaved": dict(schedule="interleaved", vpp=2, recompute="full"),
    "interleaved-64x4": dict(dp=4, pp=4, vpp=4, schedule="interleaved", micro_batch_size=1, global_batch_size=256),
    "1f1b-uneven": dict(schedule="1f1b", layer_split=(16, 12, 12, 8)),
    "interleaved-uneven": dict(schedule="interleaved", vpp=2, layer_split=(14, 10, 10, 14)),
}


@pytest.mark.parametrize("kw", AGREEMENT_CASES.values(), ids=AGREEMENT_CASES.keys())
def test_timeline_title_and_drawing_state_the_plans_prediction(kw):
    plan = review_plan(**kw)
    pred = plan.prediction
    step, bubble = pred["step_time_s"], pred["breakdown"]["pipeline_bubble"]
    fig = timeline_of(plan)
    title = fig.axes[0].get_title(loc="left")
    assert f"predicted step {step:.3f} s, bubble {bubble:.3f} s ({100 * bubble / step:.1f}% of the step)" in title, title
    sched = plan_schedule(plan)
    assert sched.step_s == pytest.approx(step, rel=1e-9)
    br = pred["breakdown"]
    assert sched.pipeline_s == pytest.approx(step - br["dp_grad_sync"] - br["optimizer"], rel=1e-9)
    # every row's drawn idle time is the plan's: the slowest stage's is the bubble, and its label says so
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    times = [s["time_per_microbatch_s"] for s in pred["stages"]]
    m = plan.parallel.num_microbatches
    for r in range(plan.parallel.pp):
        plan_idle = (sched.pipeline_s - m * times[r]) / step
        assert sched.bubble_s(r) / step == pytest.approx(plan_idle, abs=1e-4)
        assert labels[r].endswith(f"idle {100 * plan_idle:.1f}%"), labels[r]
    slowest = times.index(max(times))
    assert sched.bubble_s(slowest) == pytest.approx(bubble, rel=1e-3, abs=1e-9)


def test_timeline_says_when_the_plans_pipeline_differs_from_its_simulation(tmp_path):
    # h200-141gb prices layers with the efficiency fractions (no kernel database): gpt2-xl's stages stay near balance
    # there, where the H100's database makes its odd-vocabulary head the pipeline's bottleneck
    agree = review_plan(schedule="1f1b", cluster="h200-141gb")
    assert "simulation" not in timeline_of(agree).axes[0].get_title(loc="left")
    uneven = review_plan(schedule="1f1b", layer_split=(16, 12, 12, 8), cluster="h200-141gb")
    title = timeline_of(uneven).axes[0].get_title(loc="left")
    assert re.search(r"pipeline is \d+\.\d% longer than this schedule's simulation", title), title
    data = yaml.safe_load(plan_to_yaml(agree))  # a hand-edited plan: 20% more step time than its stages add up to
    data["prediction"]["step_time_s"] *= 1.2
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(data))
    edited = load_plan(path)
    assert plan_schedule(edited).step_s == pytest.approx(data["prediction"]["step_time_s"], rel=1e-9)
    assert f"predicted step {data['prediction']['step_time_s']:.3f} s" in timeline_of(edited).axes[0].get_title(loc="left")


def drawn_shapes(fig) -> int:
    return sum(len(ax.patches) + sum(max(1, len(c.get_paths())) for c in ax.collections) + len(ax.texts)
               for ax in fig.axes)


def test_timeline_of_64_microbatches_x_4_chunks_is_aggregated_and_bounded(tmp_path):
    plan = review_plan(**AGREEMENT_CASES["interleaved-64x4"], cluster="h200-141gb")  # balanced stages (see above)
    assert len([e for e in plan_schedule(plan).events if e.phase == "forward"]) == 64 * 4 * 4
    start = time.perf_counter()
    fig = timeline_of(plan)
    path = save_figure(fig, tmp_path / "t.png")
    assert time.perf_counter() - start < 20
    assert drawn_shapes(fig) < 60 * plan.parallel.pp
    assert "aggregated" in fig.axes[0].get_title(loc="left")
    rgb = png_pixels(path)
    for phase in ("forward", "backward", "grad_sync", "optimizer"):
        assert share_of_colour(rgb, PHASE_COLORS[phase]) > 0.002, phase
    small = timeline_of(review_plan(schedule="1f1b"))  # 8 micro-batches: every pass drawn, numbered
    assert "aggregated" not in small.axes[0].get_title(loc="left")
    assert any(t.get_text() == "7" for t in small.axes[0].texts)


def test_aggregated_timeline_keeps_each_ranks_time_shares():
    plan = review_plan(dp=1, pp=8, micro_batch_size=1, global_batch_size=256, recompute="full")
    sched = plan_schedule(plan)
    fig = timeline_figure(sched)
    assert "aggregated" in fig.axes[0].get_title(loc="left") and drawn_shapes(fig) < 60 * 8
    # drawn area per phase (width x band height) equals the schedule's seconds in that phase, per step
    area = {}
    for c in fig.axes[0].collections:
        colour = tuple(np.round(c.get_facecolor()[0][:3], 3))
        area[colour] = area.get(colour, 0.0) + sum(
            (p.vertices[:, 0].max() - p.vertices[:, 0].min()) * (p.vertices[:, 1].max() - p.vertices[:, 1].min())
            for p in c.get_paths())
    scale = 1e3 if sched.step_s < 2 else 1.0
    for phase in ("forward", "backward", "recompute"):
        seconds = sum(e.duration_s for e in sched.events if e.phase == phase)
        assert area[tuple(np.round(to_rgb(PHASE_COLORS[phase]), 3))] / 0.8 == pytest.approx(seconds * scale, rel=1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(model="llama-2-7b", dp=1, pp=16, micro_batch_size=1, global_batch_size=64,
                                            schedule="interleaved", vpp=2, recompute="full")])
def test_memory_chart_legend_stays_clear_of_the_title_and_the_bars(kw):
    fig = memory_chart_of(review_plan(**kw))
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()
    legend = fig.legends[0].get_window_extent(renderer)
    ax = fig.axes[0]
    title = next(t for t in ax.get_children() if isinstance(t, Text) and t.get_text() == ax.get_title(loc="left"))
    assert title.get_text() and not legend.overlaps(title.get_window_extent(renderer))
    assert not legend.overlaps(ax.get_window_extent(renderer))
    page = fig.bbox
    assert page.x0 <= legend.x0 and legend.x1 <= page.x1 and page.y0 <= legend.y0 and legend.y1 <= page.y1


def test_memory_chart_numbers_are_the_plans():
    plan = review_plan(zero_stage=3)  # sharded data parallelism keeps 10% allocator slack, not 5%
    pred = plan.prediction
    fig = memory_chart_of(plan)
    limit = pred["capacity_gib"] / (1 + pred["allocator_slack"])
    assert pred["allocator_slack"] != 0.05
    names = fig.legends[0].get_texts()
    assert any(t.get_text() == f"fit limit {limit:.1f} GiB ({100 * pred['allocator_slack']:.0f}% allocator slack)"
               for t in names), [t.get_text() for t in names]
    assert f"peak {pred['peak_memory_gib']:.2f} GiB of {pred['capacity_gib']:.1f} usable, fits" in fig.axes[0].get_title(loc="left")
    totals = [t.get_text() for t in fig.axes[0].texts]
    assert totals == [f"{s['memory_gib']:.1f}" for s in pred["stages"]]
