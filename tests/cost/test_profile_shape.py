"""A profile applies only to a job of the shape and sequence length it measured (planner.cost.profiled, issue 22 item 1):
refused naming both shapes, or with --profile-fallback priced from the preset for its layers and from the profile for
what does not depend on the model; profiles written before shapes were recorded take their zoo model's on load."""

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from conftest import parse_json
from planner.core.cluster import load_cluster
from planner.core.errors import DistplanError
from planner.estimate import EstimateRequest, run_estimate
from planner.core.job import ParallelConfig
from planner.core.model import load_model
from planner.cost.predict import predict
from planner.core.profile import profile_to_dict, save_profile
from planner.core.model import describe_shape, model_shape
from planner.cost.profiled import load_profile, migration_note, profile_for_job, without_model_specific
from test_profile_cluster import gpu_profile

ROOT = Path(__file__).resolve().parents[2]
GPT2_XL_2XH200 = ROOT / "benchmarks/results/profile_2xh200/profile-gpt2-xl-2xh200.yaml"  # no model_shape: written before
ARGS = ("-n", 8, "--global-batch", 64, "--format", "json")


def test_a_gpt2_profile_is_refused_for_gpt2_xl_naming_both_shapes(cli, tmp_path):
    """The issue's case: gpt2's per-block fits priced gpt2-xl (each of whose blocks does ~4.3x the work) at the layer
    ratio alone. Now one line names both shapes and the way out."""
    path = tmp_path / "gpt2.yaml"
    save_profile(gpu_profile(), path)
    r = cli("estimate", "-m", "gpt2-xl", *ARGS, "--profile", path)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    line = " ".join(r.stderr.split())  # rich may wrap the one line at the terminal's width
    assert ("measured gpt2 (gpt, hidden 768, heads 12/12, ffn 3072, vocab 50257, seq 1024, bf16); the job is gpt2-xl "
            "(gpt, hidden 1600, heads 25/25, ffn 6400, vocab 50257, seq 1024)") in line
    assert "profile this model, or pass --profile-fallback" in line


def test_with_the_fallback_flag_gpt2_xl_blocks_are_priced_from_the_preset_and_the_sources_say_so(cli, tmp_path):
    path = tmp_path / "gpt2.yaml"
    prof = gpu_profile()
    save_profile(prof, path)
    got = parse_json(cli("estimate", "-m", "gpt2-xl", *ARGS, "--profile", path, "--profile-fallback"))
    res = run_estimate(EstimateRequest(model="gpt2-xl", cluster="", gpus=8, global_batch=64, profile=str(path),
                                       profile_fallback=True))
    assert got["cluster"] == res.cluster.name == "dgx-h100-80gb+profile"  # the measured matmul curve, memory, links
    # the compute terms are the preset's analytic ones on that cluster: exactly the prediction without a profile
    plain = predict(load_model("gpt2-xl"), res.cluster, res.config, None)
    for term in ("compute_fwd", "compute_bwd"):
        assert got["breakdown"][term] == pytest.approx(dict(plain.breakdown)[term], rel=1e-12)
    src = got["sources"]
    gpt2 = "gpt2 (gpt, hidden 768, heads 12/12, ffn 3072, vocab 50257, seq 1024, bf16)"
    assert src["compute.block.tp1"] == src["compute.head.tp1"] == f"preset (profile measured {gpt2})"
    assert src["comm.all_reduce.n8"] == "profile"  # collectives do not depend on the model: still measured
    assert src["profile.model_specific"].startswith("preset: compute fits")
    assert any("do not apply" in n for n in got["notes"])
    table = " ".join(cli("estimate", "-m", "gpt2-xl", *ARGS[:-2], "--profile", path, "--profile-fallback").stdout.split())
    assert f"measured {gpt2}: its layer fits" in table


def test_another_sequence_length_goes_through_the_same_rule(cli, tmp_path):
    """It used to fall back per fit without a word (costmodel.measured_fit)."""
    path = tmp_path / "gpt2.yaml"
    save_profile(gpu_profile(), path)
    r = cli("estimate", "-m", "gpt2", *ARGS, "--seq-len", 512, "--profile", path)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "the job is gpt2 (gpt, hidden 768, heads 12/12, ffn 3072, vocab 50257, seq 512): profile it at --seq-len 512" \
        in " ".join(r.stderr.split())
    got = parse_json(cli("estimate", "-m", "gpt2", *ARGS, "--seq-len", 512, "--profile", path, "--profile-fallback"))
    assert got["sources"]["compute.block.tp1"].startswith("preset (profile measured gpt2 (")


def test_a_profile_of_the_same_model_is_used_as_before(tmp_path):
    """Same shape and sequence length: the very profile, so every prediction is what it was (the committed campaigns:
    tests/cost/test_replay.py)."""
    prof = load_profile(GPT2_XL_2XH200)
    assert profile_for_job(prof, load_model("gpt2-xl"), 1024) is prof
    reduced = replace(load_model("gpt2-xl"), name="gpt2-xl-8l", num_layers=8)  # a fit is per layer: layer count is free
    assert profile_for_job(prof, reduced, 1024) is prof
    res = run_estimate(EstimateRequest(model="gpt2-xl", cluster="", gpus=2, micro_batch=16, global_batch=32, zero=1,
                                       engine="torch", profile=str(GPT2_XL_2XH200)))
    want = predict(load_model("gpt2-xl"), res.cluster, res.config, prof, engine="torch")
    assert res.prediction == want and res.notes == (migration_note(prof, str(GPT2_XL_2XH200)),)  # a version-1 file


def test_an_old_profile_without_a_shape_takes_its_zoo_models_and_predicts_the_same(tmp_path):
    raw = yaml.safe_load(GPT2_XL_2XH200.read_text())
    assert "model_shape" not in raw
    old = load_profile(GPT2_XL_2XH200)
    assert old.model_shape == model_shape(load_model("gpt2-xl"))
    assert "derived on load from the zoo model 'gpt2-xl'" in old.facts["model_shape"]
    save_profile(old, tmp_path / "new.yaml")  # written as the profiler writes it now: with the shape
    assert yaml.safe_load((tmp_path / "new.yaml").read_text())["model_shape"]["hidden_size"] == 1600
    new = load_profile(tmp_path / "new.yaml")
    assert new == old
    model, cluster = load_model("gpt2-xl"), load_cluster("h200-141gb")
    cfg = ParallelConfig(dp=2, micro_batch_size=16, global_batch_size=32, seq_len=1024, zero_stage=1)
    for engine in ("any", "torch", "deepspeed", "megatron"):
        assert predict(model, cluster, cfg, new, engine=engine) == predict(model, cluster, cfg, old, engine=engine)


def test_an_old_profile_of_a_model_file_has_no_shape_and_is_refused_unless_the_fallback_is_asked(cli, tmp_path):
    d = profile_to_dict(gpu_profile())
    del d["model_shape"]
    d["model"] = "my-gpt"  # `distplan profile -m my-gpt.yaml` names it by the file: no zoo model to take a shape from
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(d))
    assert load_profile(path).model_shape == ()
    r = cli("estimate", "-m", "gpt2", *ARGS, "--profile", path)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "measured my-gpt at seq 1024 without recording its shape" in " ".join(r.stderr.split())
    got = parse_json(cli("estimate", "-m", "gpt2", *ARGS, "--profile", path, "--profile-fallback"))
    assert got["sources"]["compute.block.tp1"] == "preset (profile measured my-gpt (shape not recorded, seq 1024, bf16))"


def test_the_fallback_keeps_what_does_not_depend_on_the_model():
    prof = load_profile(GPT2_XL_2XH200)
    assert prof.sharding and prof.pipeline and prof.stack_factor() > 1.0
    kept = without_model_specific(prof)
    assert kept.compute == () and kept.sharding == () and kept.stack_factor() == 1.0
    for field in ("collectives", "pipeline", "matmul_tflops_by_gflop", "hbm_bandwidth_gb_s", "host_bandwidth_gb_s",
                  "optimizer_s_per_param", "host_optimizer_s_per_param", "overlap_slowdown", "memory_gib", "inter_node"):
        assert getattr(kept, field) == getattr(prof, field), field
    nbytes = 64 * 2**20
    assert kept.measured_collective_s("all_reduce", 2, nbytes) == prof.measured_collective_s("all_reduce", 2, nbytes) > 0


def test_predict_refuses_a_profile_of_another_recorded_shape():
    """The cost model's own guard, for callers that skip profile_for_job: no silent fallback there either."""
    cfg = ParallelConfig(dp=8, global_batch_size=64, seq_len=1024)
    with pytest.raises(DistplanError, match="measured gpt2 .* the job is gpt2-xl"):
        predict(load_model("gpt2-xl"), load_cluster("dgx-h100-80gb"), cfg, gpu_profile())


@pytest.mark.parametrize("name,needle", [("mixtral-8x7b", "experts 8 top-2"), ("vit-huge", "image 224 patch 14")])
def test_shapes_name_experts_and_image_sizes(name, needle):
    model = load_model(name)
    assert needle in describe_shape(model.name, model_shape(model), model.seq_len)
    other = replace(model, top_k=1) if model.is_moe else replace(model, patch_size=16)
    assert model_shape(other) != model_shape(model)


def test_solve_applies_the_same_rule(cli, tmp_path):
    path = tmp_path / "gpt2.yaml"
    save_profile(gpu_profile(), path)
    plan = tmp_path / "plan.yaml"
    r = cli("solve", "-m", "gpt2-medium", "-n", 8, "--profile", path, "-o", plan)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and not plan.exists()
    assert "the job is gpt2-medium (gpt, hidden 1024" in " ".join(r.stderr.split())
    r = cli("solve", "-m", "gpt2-medium", "-n", 8, "--top-k", 1, "--profile", path, "--profile-fallback", "-o", plan)
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load(plan.read_text())
    assert saved["prediction"]["sources"]["compute.block.tp1"].startswith("preset (profile measured gpt2 (")
    assert "--profile-fallback" in saved["provenance"]["command"]
    assert any("do not apply" in n for n in saved["provenance"]["notes"])
