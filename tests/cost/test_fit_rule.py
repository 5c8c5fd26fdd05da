"""planner/cost/memory.py's one fit rule: the search's states check never refuses a configuration the stage DP would
fit (it is necessary for every split), and the DP's splits pass the rule predict applies."""

import pytest

from planner.core.cluster import load_cluster
from planner.core.job import with_changes
from planner.core.model import load_model
from planner.cost.engines import modelled, runnable
from planner.cost.memory import states_fit
from planner.cost.predict import predict
from solvers.inter_op import best_layer_split
from solvers.search import search_space

STRIDE = 17  # every 17th configuration of the space (a prime: it walks every axis of the canonical order)


@pytest.mark.parametrize("name,gpus", [("llama-2-13b", 4), ("gpt2-xl", 2)])  # states too large for some plans; for none
@pytest.mark.parametrize("engine", ["any", "torch", "deepspeed"])
def test_states_check_is_necessary_and_splits_fit(name, gpus, engine):
    model, cluster = load_model(name), load_cluster("dgx-h100-80gb")
    refused = fitted = 0
    for cfg in search_space(model, cluster, gpus, model.default_global_batch, model.seq_len)[::STRIDE]:
        if not (runnable(engine, cfg) and modelled(engine, cfg)):
            continue
        split = best_layer_split(model, cluster, cfg, engine=engine)
        if not states_fit(model, cluster, cfg, engine):
            assert split is None, cfg
            refused += 1
        elif split is not None:
            assert predict(model, cluster, with_changes(cfg, layer_split=split.layer_split), engine=engine).fits, cfg
            fitted += 1
    assert fitted > 0 and (refused > 0) == (name == "llama-2-13b")
