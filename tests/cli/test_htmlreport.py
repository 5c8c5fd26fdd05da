"""The HTML report's GPU map: every GPU's index on every parallel axis, readable at hundreds of GPUs."""

import re
from html import unescape

from review_plans import review_plan

from planner.htmlreport import report_html
from planner.show import gpu_indices, parallel_layout


def gpu_map(html: str) -> list[tuple[str, str]]:
    """(title, text) of every box in the report's GPU map."""
    section = html[html.index('<section id="layout">'):html.index('<section id="stages">')]
    return [(unescape(t), unescape(x).replace("<br>", " | "))
            for t, x in re.findall(r'<div class="gpu"[^>]*title="([^"]*)">(.*?)</div>', section)]


def test_gpu_map_names_every_axis_of_every_gpu_with_context_parallelism():
    plan = review_plan(model="llama-3-8b", dp=2, tp=2, pp=2, cp=2, micro_batch_size=1, global_batch_size=8,
                       seq_len=8192)
    html = report_html(plan)
    boxes = gpu_map(html)
    assert len(boxes) == 16
    texts = [text for _, text in boxes]
    assert len(set(texts)) == 16, texts
    # Megatron-LM's rank order: tp innermost, then cp, dp, pp
    expected = [f"{g} | s{g // 8} d{g // 4 % 2} c{g // 2 % 2} t{g % 2}" for g in range(16)]
    assert texts == expected
    assert "context-parallel rank 1" in boxes[2][0]
    assert "<b>c</b> context-parallel rank" in html and "stage 1: layers 16-31, GPUs 8-15" in html


def test_gpu_map_shows_expert_parallel_ranks():
    plan = review_plan(model="mixtral-8x7b", dp=4, tp=2, pp=1, ep=4, micro_batch_size=1, global_batch_size=8,
                       seq_len=4096)
    where = gpu_indices(parallel_layout(plan))
    assert [where[g]["ep"] for g in range(0, 8, 2)] == [0, 1, 2, 3]  # consecutive dp ranks after tp
    texts = [text for _, text in gpu_map(report_html(plan))]
    assert len(set(texts)) == 8 and texts[3] == "3 | s0 d1 c0 t1 e1"


def test_gpu_map_of_512_gpus_draws_one_labelled_box_per_node():
    plan = review_plan(model="llama-3-70b", dp=4, tp=1, pp=8, cp=16, micro_batch_size=2, global_batch_size=64,
                       seq_len=8192, zero_stage=1)
    boxes = gpu_map(report_html(plan))
    assert len(boxes) == 64  # every node, none left out
    texts = [text for _, text in boxes]
    assert len(set(texts)) == 64
    assert texts[0] == "node 0 | GPUs 0-7 | s0 d0 c0-7 t0" and texts[9] == "node 9 | GPUs 72-79 | s1 d0 c8-15 t0"
    assert texts[-1] == "node 63 | GPUs 504-511 | s7 d3 c8-15 t0"
