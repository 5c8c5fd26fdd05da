"""The plan file: write-then-reload gives the same plan; loading validates and names bad keys."""

import pytest
import yaml

from planner.core.cluster import load_cluster
from planner.core.errors import DistplanError
from planner.core.job import ParallelConfig, validate_config
from planner.core.model import load_model
from planner.core.plan import load_plan, make_plan, plan_to_yaml, save_plan
from planner.cost.predict import predict


def _plan():
    m, c = load_model("llama-3-70b"), load_cluster("dgx-h100-80gb")
    cfg = ParallelConfig(dp=2, tp=8, pp=4, sequence_parallel=True, zero_stage=1, micro_batch_size=1,
                         global_batch_size=512, seq_len=8192, recompute="selective", layer_split=(19, 21, 21, 19))
    validate_config(m, cfg, 64)
    return make_plan(m, c, 64, cfg, predict(m, c, cfg), rationale=["hand-made for the test"],
                     provenance={"command": "test"})


def test_roundtrip_is_exact(tmp_path):
    plan = _plan()
    save_plan(plan, tmp_path / "plan.yaml")
    again = load_plan(tmp_path / "plan.yaml")
    assert again == plan
    assert plan_to_yaml(again) == plan_to_yaml(plan)
    assert again.digest() == plan.digest()


def test_file_has_required_top_level_keys_and_units(tmp_path):
    save_plan(_plan(), tmp_path / "plan.yaml")
    d = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    for key in ("version", "model", "cluster", "job", "parallel", "stages", "prediction", "provenance", "rationale"):
        assert key in d
    assert [s["layers"] for s in d["stages"]] == [[0, 18], [19, 39], [40, 60], [61, 79]]
    assert "step_time_s" in d["prediction"] and "peak_memory_gib" in d["prediction"]
    assert d["stages"][1]["devices"] == "16-31"


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d["parallel"].update(tp=3), r"dp\*tp\*pp\*cp = 2\*3\*4\*1 = 24"),
    (lambda d: d["parallel"].update(dp=3), "does not equal --gpus 64"),
    (lambda d: d["stages"][1].update(layers=[20, 39]), "must start at layer 19"),
    (lambda d: d.update(extra=1), "unknown top-level key"),
    (lambda d: d.pop("parallel"), "missing top-level key 'parallel'"),
    (lambda d: d["parallel"].update(zero_stage="two"), "zero_stage must be an integer"),
    (lambda d: d.update(version=99), "version 99"),
])
def test_tampered_plans_are_rejected_naming_the_key(tmp_path, mutate, match):
    save_plan(_plan(), tmp_path / "plan.yaml")
    d = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    mutate(d)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(DistplanError, match=match):
        load_plan(tmp_path / "bad.yaml")


def test_missing_and_malformed_plan(tmp_path):
    with pytest.raises(DistplanError, match="does not exist"):
        load_plan(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("version: [1\n")
    with pytest.raises(DistplanError, match="malformed"):
        load_plan(tmp_path / "bad.yaml")
