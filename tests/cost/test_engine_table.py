"""The engine table (planner.cost.engines.ENGINES) against the code that acts on it: what `runnable` says an engine
runs agrees with that engine's own `check_supported` over a grid of layouts, every limit is exercised and named in
ENGINE_LIMITS, and the registries that list engines elsewhere list the table's rows."""

import importlib.util
import itertools
from types import SimpleNamespace

import pytest

from planner.core import calibration
from planner.core.errors import DistplanError
from planner.core.job import ParallelConfig
from planner.core.model import load_model
from planner.cost.engines import ENGINE_CHOICES, ENGINE_LIMITS, ENGINES, engine_model, modelled, runnable
from planner.runner import engines as runner_engines
from planner.runner.engines import deepspeed_engine, megatron_engine, torch_engine

# llama-3-8b: 8 KV heads, so the torch engine's own model check (KV heads divisible by tp) passes for tp <= 8, and a
# decoder language model, which megatron's own model check asks for; only the table's limits can refuse
MODEL = load_model("llama-3-8b")


def _grid():
    """Layouts over every axis a limit reads, with micro-batch counts below, at and above pp."""
    out = []
    for dp, tp, pp, cp, ep in itertools.product((1, 2), (1, 2), (1, 2, 4), (1, 2), (1, 2)):
        if ep > dp * cp:
            continue
        schedules = [("1f1b", 1), ("gpipe", 1)] + ([("interleaved", 2)] if pp > 1 else [])
        for (schedule, vpp), sp, zero, offload, m in itertools.product(
                schedules, (False, True), (0, 1, 2, 3), (False, True), (1, 2, 3, 4, 6)):
            if sp and tp == 1:
                continue
            out.append(ParallelConfig(dp=dp, tp=tp, pp=pp, cp=cp, ep=ep, vpp=vpp, sequence_parallel=sp,
                                      zero_stage=zero, offload_optimizer=offload, micro_batch_size=1,
                                      global_batch_size=m * dp, seq_len=1024, schedule=schedule))
    return out


GRID = _grid()


@pytest.fixture
def checkers(monkeypatch):
    """Each runner engine's check_supported on this machine, its framework presence checks answered yes (deepspeed
    and megatron-core need not be installed: the check of the layout is what is compared)."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: object() if name == "deepspeed" else real_find_spec(name, *a, **k))
    monkeypatch.setattr(megatron_engine, "_has", lambda module: True)
    return {"torch": lambda plan: torch_engine.check_supported(plan, "cuda"),
            "deepspeed": lambda plan: deepspeed_engine.check_supported(plan, "cuda"),
            "megatron": lambda plan: megatron_engine.check_supported(plan, "cuda")}


def _refusal(check, cfg) -> str | None:
    try:
        check(SimpleNamespace(parallel=cfg, model=MODEL))
    except DistplanError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("engine", ["torch", "deepspeed", "megatron"])
def test_runnable_agrees_with_the_engines_own_check(engine, checkers):
    """runnable(engine, cfg) exactly where the runner accepts cfg and runs it as planned; the runner also accepts
    what it runs as another layout (a substituted limit), which `runnable` keeps from the solver."""
    row = ENGINES[engine]
    accepted = refused = substituted = 0
    for cfg in GRID:
        why = _refusal(checkers[engine], cfg)
        broken = row.refusals(cfg)
        if runnable(engine, cfg):
            assert why is None, (cfg, why)
            accepted += 1
        elif all(limit.substituted for limit in broken):
            assert why is None, (cfg, why)
            substituted += 1
        else:
            first = next(limit for limit in broken if not limit.substituted)
            assert why == first.message(cfg, "cuda"), (cfg, why)
            refused += 1
    assert accepted and refused  # the grid holds both sides
    assert bool(substituted) == any(limit.substituted for limit in row.limits)


@pytest.mark.parametrize("engine", ["torch", "deepspeed", "megatron"])
def test_every_limit_is_exercised_and_in_the_limits_text(engine):
    """Each limit refuses some layout of the grid that breaks no other limit (so the predicate is what refuses it),
    and ENGINE_LIMITS, the words `estimate --engine` refuses with, names it."""
    row = ENGINES[engine]
    for limit in row.limits:
        alone = [cfg for cfg in GRID if row.refusals(cfg) == (limit,)]
        assert alone, f"{engine}: no layout breaks only '{limit.says}'"
        assert limit.says in ENGINE_LIMITS[engine]
    assert ENGINE_LIMITS[engine].startswith(row.runs + ": ")


def test_limits_say_what_their_predicates_do():
    """The limits text, read as a user would, against the predicate on layouts that differ from a runnable one in
    one setting."""
    base = ParallelConfig(dp=2, micro_batch_size=1, global_batch_size=8, seq_len=1024)
    assert all(runnable(e, base) for e in ENGINE_CHOICES)
    cases = {  # engine -> (one setting changed, runnable?)
        "torch": [({"cp": 2}, False), ({"ep": 2}, False), ({"dp": 1, "pp": 4, "global_batch_size": 3}, False),
                  ({"dp": 1, "pp": 2, "vpp": 2, "schedule": "interleaved", "global_batch_size": 5}, False),
                  ({"dp": 1, "pp": 2, "vpp": 2, "schedule": "interleaved", "global_batch_size": 4}, True),
                  ({"tp": 2, "sequence_parallel": True}, True), ({"zero_stage": 3, "offload_optimizer": True}, True)],
        "deepspeed": [({"tp": 2}, False), ({"cp": 2}, False), ({"ep": 2}, False),
                      ({"pp": 2, "vpp": 2, "schedule": "interleaved"}, False), ({"pp": 2, "zero_stage": 2}, False),
                      ({"pp": 2, "schedule": "gpipe"}, False), ({"pp": 2, "zero_stage": 1}, True),
                      ({"zero_stage": 3, "offload_optimizer": True}, True)],
        "megatron": [({"tp": 2, "sequence_parallel": True}, False), ({"cp": 2}, False),
                     ({"offload_optimizer": True, "zero_stage": 1}, False), ({"zero_stage": 2}, False),
                     ({"pp": 2, "schedule": "gpipe"}, False), ({"tp": 2, "ep": 2}, False), ({"ep": 2}, True),
                     ({"tp": 2, "pp": 2, "vpp": 2, "schedule": "interleaved"}, True)],
    }
    for engine, changes in cases.items():
        for change, expected in changes:
            cfg = ParallelConfig(**{**base.__dict__, **change})
            assert runnable(engine, cfg) is expected, (engine, change)


def test_any_is_the_reference_that_runs_everything():
    row = ENGINES["any"]
    assert row.runner is None and not row.limits and "any" not in ENGINE_LIMITS
    assert all(runnable("any", cfg) and modelled("any", cfg) for cfg in GRID)


def test_unknown_engine_is_refused_naming_the_rows():
    with pytest.raises(DistplanError, match="--engine 'jax' is unknown; valid: any, torch, deepspeed, megatron"):
        engine_model("jax")
    with pytest.raises(DistplanError, match="unknown"):
        runnable("jax", ParallelConfig())


def test_registries_list_the_rows_with_a_runner():
    """The runner registry and the calibration file's engines are the rows that name a runner, and each runner module
    is the one the row names (a new engine: a new row plus its runner)."""
    with_runner = tuple(name for name, row in ENGINES.items() if row.runner is not None)
    assert tuple(runner_engines.ENGINES) == with_runner == calibration.ENGINES
    for name in with_runner:
        assert runner_engines.ENGINES[name] == (ENGINES[name].runner, "train")
    modules = {"torch": torch_engine, "deepspeed": deepspeed_engine, "megatron": megatron_engine}
    assert {name: modules[name].__name__ for name in with_runner} == {n: ENGINES[n].runner for n in with_runner}
