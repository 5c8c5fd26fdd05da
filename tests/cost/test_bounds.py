"""planner/cost/bounds.py: the search's lower bounds never exceed predict's step time (any layer split, engine or
profile), and branch and bound with them keeps the best plan (against every configuration evaluated)."""

from pathlib import Path

import pytest

from planner.core.cluster import load_cluster
from planner.core.job import with_changes
from planner.core.model import load_model
from planner.cost.profiled import load_profile
from planner.cost.bounds import QuickBound, step_lower_bound
from planner.cost.engines import modelled, runnable
from planner.cost.memory import states_fit
from planner.cost.predict import predict
from planner.cost.profiled import cluster_for_profile
from solvers.inter_op import best_layer_split
from solvers.search import config_key, run_search, search_space

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
GPT2_XL = RESULTS / "profile_2xh200/session11/profile-gpt2-xl-s1024.yaml"
LLAMA_8B = RESULTS / "profile_2xh200/session7/profile-llama-3-8b-s4096.yaml"
CASES = [("gpt2-xl", 8, "dgx-h100-80gb", None), ("gpt2-xl", 2, "h200-141gb", GPT2_XL),
         ("llama-3-8b", 2, "h200-141gb", LLAMA_8B), ("llama-2-7b", 16, "dgx-h100-80gb", None),
         ("mixtral-8x7b", 16, "dgx-h100-80gb", None), ("gpt3-175b", 1024, "dgx-a100-80gb", None)]
ENGINES = ("any", "torch", "deepspeed", "megatron")
STRIDE = 41  # every 41st configuration of a search space (a prime: it walks every axis of the canonical order)
REL = 1e-9  # floating-point order: the bound sums the same terms as predict in another order


def _setting(name, gpus, cluster_name, profile_path):
    model, cluster = load_model(name), load_cluster(cluster_name)
    profile = load_profile(profile_path) if profile_path else None
    return model, (cluster_for_profile(profile, cluster) if profile else cluster), profile


def _splits(model, cfg):
    """The even split, and one moving v layers from the last rank to the first."""
    even = list(cfg.layers_per_stage(model.num_layers))
    out = [cfg]
    if cfg.pp > 1 and even[-1] > cfg.vpp:
        even[0], even[-1] = even[0] + cfg.vpp, even[-1] - cfg.vpp
        out.append(with_changes(cfg, layer_split=tuple(even)))
    return out


@pytest.mark.parametrize("name,gpus,cluster_name,profile_path", CASES, ids=lambda x: getattr(x, "name", str(x)))
def test_bounds_never_exceed_the_predicted_step(name, gpus, cluster_name, profile_path):
    _check_bounds(*_setting(name, gpus, cluster_name, profile_path), gpus)


@pytest.mark.parametrize("name,gpus,cluster_name,profile_path", [c for c in CASES if c[1] > 8],
                         ids=lambda x: getattr(x, "name", str(x)))
def test_bounds_hold_in_the_pessimistic_view_the_search_ranks_by(name, gpus, cluster_name, profile_path):
    model, cluster, profile = _setting(name, gpus, cluster_name, profile_path)
    _check_bounds(model, cluster.pessimistic(), profile, gpus)


def _check_bounds(model, cluster, profile, gpus):
    seq = profile.seq_len if profile else model.seq_len  # the sequence the profile measured
    space = search_space(model, cluster, gpus, model.default_global_batch, seq, wide_cp=True)
    checked = 0
    for engine in ENGINES:
        quick = QuickBound(model, cluster, profile, engine)
        for cfg in space[::STRIDE]:
            if not (runnable(engine, cfg) and modelled(engine, cfg)):
                continue
            lb = step_lower_bound(model, cluster, cfg, profile, engine=engine)
            assert 0 < quick.bound(cfg) <= lb * (1 + REL), (engine, cfg)
            for split in _splits(model, cfg):
                step = predict(model, cluster, split, profile, engine=engine).step_time_s
                assert lb <= step * (1 + REL), (engine, split, lb, step)
                checked += 1
    assert checked > 40


def test_with_one_pipeline_rank_the_bound_is_the_prediction():
    model, cluster = load_model("llama-2-7b"), load_cluster("dgx-h100-80gb")
    for cfg in [c for c in search_space(model, cluster, 8, 512, 4096) if c.pp == 1][::29]:
        assert step_lower_bound(model, cluster, cfg) == pytest.approx(predict(model, cluster, cfg).step_time_s, rel=REL)


@pytest.mark.parametrize("name,gpus,cluster_name,profile_path,engine",
                         [("gpt2", 2, "dgx-h100-80gb", None, "any"), ("gpt2-xl", 2, "h200-141gb", GPT2_XL, "torch")])
def test_pruning_keeps_the_best_plan(name, gpus, cluster_name, profile_path, engine):
    """Every configuration of the space through the stage DP, against branch and bound with top_k = 0 (the most
    pruning): the same best step time and configuration."""
    model, cluster, profile = _setting(name, gpus, cluster_name, profile_path)
    batch, seq = model.default_global_batch, profile.seq_len if profile else model.seq_len
    best = None
    for cfg in search_space(model, cluster, gpus, batch, seq, engine=engine):
        split = best_layer_split(model, cluster, cfg, profile, engine=engine) if states_fit(model, cluster, cfg, engine) else None
        if split is not None and (best is None or (split.step_time_s, config_key(cfg)) < best):
            best = (split.step_time_s, config_key(cfg))
    found = run_search(model, cluster, gpus, batch, seq, profile, top_k=0, engine=engine)
    assert best is not None and found.best
    assert found.stats["pruned_by_bound"] > 0
    assert found.best[0].prediction.step_time_s == pytest.approx(best[0], rel=1e-12)
    assert config_key(found.best[0].config) == best[1]
