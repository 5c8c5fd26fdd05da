"""What `solve` owes its user beyond the plan: constraints it honours exactly, every candidate it considered, the
nearest usable GPU count when none uses all the GPUs asked for, a warning naming a batch that uses the GPUs, and a
rationale that says why ZeRO is off where dp > 1."""

import csv
import io
import json

import pytest

from planner.core.cluster import load_cluster
from planner.core.errors import DistplanError
from planner.core.model import load_model
from solvers import solve
from solvers.candidates import COLUMNS, candidates_text
from solvers.oracle import uniform_configs
from planner.cost.predict import predict
from solvers.request import parse_constraints
from solvers.search import Constraints, run_search, search_space

H100 = load_cluster("dgx-h100-80gb")


def test_a_constrained_solve_is_the_best_of_the_constrained_exhaustive_space():
    """The oracle over every uniform configuration the constraints admit: the solver's plan obeys them and is at
    least as fast as the oracle's best."""
    model = load_model("gpt2-medium")
    c = Constraints(tp=(2, 4), pp=(1, 2), zero=(1, 3), max_micro_batch=4, recompute=("none",))
    found = run_search(model, H100, 8, model.default_global_batch, model.seq_len, top_k=0, constraints=c)
    cfg, pred = found.best[0].config, found.best[0].prediction
    assert c.admits(cfg) and cfg.tp in (2, 4) and cfg.pp in (1, 2) and cfg.zero_stage in (1, 3)
    assert cfg.micro_batch_size <= 4 and cfg.recompute == "none"
    admitted = [cfg for cfg in uniform_configs(model, 8, model.default_global_batch, model.seq_len) if c.admits(cfg)]
    assert admitted
    best = min(p.step_time_s for p in (predict(model, H100, x) for x in admitted) if p.fits)
    assert pred.step_time_s <= best * (1 + 1e-12)
    # and the constrained optimum is no faster than the free one (constraints only remove plans)
    free = run_search(model, H100, 8, model.default_global_batch, model.seq_len, top_k=0)
    assert free.best[0].prediction.step_time_s <= pred.step_time_s


def test_pinning_an_axis_lifts_the_searchs_own_shortcut_on_it():
    """ZeRO-0 is dominated at dp > 1 and GPipe by 1F1B, so the free search skips them; pinned, they are searched."""
    model = load_model("gpt2-medium")
    free = search_space(model, H100, 8, 512, 1024)
    assert not any(c.zero_stage == 0 and c.dp > 1 for c in free) and not any(c.schedule == "gpipe" for c in free)
    pinned = search_space(model, H100, 8, 512, 1024, constraints=Constraints(zero=(0,), schedule=("gpipe",), pp=(2,)))
    assert pinned and all(c.zero_stage == 0 and c.schedule == "gpipe" and c.pp == 2 for c in pinned)


def test_constraints_that_exclude_everything_name_the_values_there_are():
    model = load_model("gpt2-xl")  # 25 heads: tp can only be 1
    with pytest.raises(DistplanError, match=r"satisfies --tp 2,4.*--tp 1"):
        solve(model, H100, 64, constraints=Constraints(tp=(2, 4)))


@pytest.mark.parametrize("options,message", [
    (dict(tp="0"), "--tp '0'"), (dict(pp="two"), "--pp 'two'"), (dict(zero="4"), "--zero '4'"),
    (dict(recompute="some"), "--recompute 'some'"), (dict(schedule="zb"), "--schedule 'zb'"),
    (dict(offload_optimizer="maybe"), "--offload-optimizer 'maybe'"), (dict(tp="2,2"), "distinct"),
    (dict(max_micro_batch=0), "--max-micro-batch 0"), (dict(micro_batch="8", max_micro_batch=4), "no value <="),
])
def test_bad_constraints_are_refused_naming_the_option(options, message):
    with pytest.raises(DistplanError, match=message):
        parse_constraints(**options)


def test_candidates_list_every_configuration_once_ranked_with_the_chosen_first():
    model = load_model("gpt2-medium")
    result = solve(model, H100, 8, top_k=2, candidates=True)
    rows = result.candidates
    space = search_space(model, H100, 8, model.default_global_batch, model.seq_len)
    assert len(rows) == len(space)  # every configuration of the space, once
    assert rows[0]["status"] == "chosen" and rows[0]["why_lost"] == "chosen"
    assert rows[0]["step_time_s"] == pytest.approx(result.prediction.step_time_s)
    fitting = [r for r in rows if r["status"] in ("chosen", "fits")]
    # ranked as the search ranks: by the step with unchecked mechanisms at their bounds (the expected one elsewhere)
    assert [r["pessimistic_step_s"] for r in fitting] == sorted(r["pessimistic_step_s"] for r in fitting)
    assert all(r["pessimistic_step_s"] >= r["step_time_s"] * (1 - 1e-12) for r in fitting)
    for r in fitting[1:]:
        assert r["pessimistic_step_s"] >= rows[0]["pessimistic_step_s"]
        assert r["why_lost"].startswith(("slower", "faster but"))
    pruned = [r for r in rows if r["status"] == "pruned"]
    assert pruned and all(r["step_time_s"] is None and "lower bound" in r["why_lost"] for r in pruned)
    # the lower bound of every evaluated configuration is a true bound on the step the search ranked it by
    assert all(r["lower_bound_s"] <= r["pessimistic_step_s"] * (1 + 1e-9) for r in fitting)
    # both file formats carry the same rows and columns
    parsed = list(csv.DictReader(io.StringIO(candidates_text(list(rows), ".csv"))))
    assert len(parsed) == len(rows) and tuple(parsed[0]) == COLUMNS and parsed[0]["status"] == "chosen"
    assert json.loads(candidates_text(list(rows), ".json")) == json.loads(json.dumps(list(rows)))


def test_no_configuration_on_1000_gpus_plans_on_992_and_names_the_usable_counts():
    """gpt2-xl (25 heads, 48 layers, batch 512) on 8-GPU nodes: an exhaustive check of every count in between."""
    model = load_model("gpt2-xl")
    result = solve(model, H100, 1000, top_k=0)
    assert result.plan.gpus == 992 and result.plan.provenance["gpus_requested"] == 1000
    for n in range(993, 1024, 8):  # whole nodes between: none has a configuration
        assert not search_space(model, H100, n, 512, 1024, wide_cp=True)
    assert search_space(model, H100, 992, 512, 1024, wide_cp=True) and search_space(model, H100, 1024, 512, 1024)
    assert any("uses 992 of them" in w and "992, 1024" in w for w in result.warnings)
    assert result.plan.rationale[0].startswith("warning: no configuration uses all 1000 GPUs")


def test_too_small_a_batch_is_warned_with_a_batch_that_uses_the_gpus():
    model = load_model("gpt2-xl")
    result = solve(model, H100, 64, global_batch=7, top_k=0)
    [warning] = [w for w in result.warnings if "too small" in w]
    assert "--global-batch 64" in warning and f"MFU {100 * result.prediction.mfu:.1f}%" in warning
    better = run_search(model, H100, 64, 64, model.seq_len, top_k=0).best[0].prediction
    assert f"reaches MFU {100 * better.mfu:.1f}%" in warning and better.mfu > 1.25 * result.prediction.mfu
    assert not solve(model, H100, 64, top_k=0).warnings  # the default batch keeps the GPUs busy: no warning


def test_rationale_says_why_zero_is_off_at_several_data_parallel_ranks():
    model = load_model("gpt2-medium")
    result = solve(model, H100, 8, top_k=0, constraints=Constraints(zero=(0,), pp=(1,), tp=(1,)))
    assert result.plan.parallel.dp == 8 and result.plan.parallel.zero_stage == 0
    text = "\n".join(result.plan.rationale)
    assert "one data-parallel rank" not in text and "each of the 8 data-parallel ranks" in text
    assert "the search was limited to --dp" not in text and "--tp 1 --pp 1 --zero 0" in text
