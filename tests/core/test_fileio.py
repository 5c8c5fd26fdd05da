"""planner/core/fileio.py and the loaders on it: every way a file can be wrong is one DistplanError line naming it;
planner/core/fields.py: every number a loader reads is checked by key; atomic multi-file writes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

import planner.core.fileio
from planner.core.calibration import load_calibration
from planner.core.cluster import load_cluster
from planner.core.errors import DistplanError
from planner.core.fileio import MAX_INPUT_BYTES, atomic_write_files, check_writable, dump_yaml, read_yaml
from planner.core.model import load_model
from planner.core.plan import load_plan, plan_from_dict
from planner.core.profile import profile_to_dict
from planner.cost.profiled import load_profile, profile_from_dict
from planner.show import load_measurements

ROOT = Path(__file__).parents[2]
PROFILE = ROOT / "benchmarks/results/profile_2xh200/profile-gpt2-xl-2xh200.yaml"
LOADERS = {  # name: (loader, file suffix)
    "plan": (load_plan, ".yaml"), "profile": (load_profile, ".yaml"), "cluster": (load_cluster, ".yaml"),
    "model": (load_model, ".yaml"), "hf-config": (load_model, ".json"), "measurements": (load_measurements, ".yaml"),
    "calibration": (load_calibration, ".yaml"),
}
BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(15))


def refused(loader, path, needle: str) -> str:
    with pytest.raises(DistplanError) as info:
        loader(str(path))
    message = str(info.value)
    assert "\n" not in message and needle in message, message
    return message


@pytest.mark.parametrize("kind", sorted(LOADERS))
@pytest.mark.parametrize("content,needle", [
    (None, "does not exist"),
    ("folder", "is a folder"),
    (bytes(range(256)), "is not UTF-8 text (byte 0x80 at offset 128)"),
    ("{unclosed: [1\n", "is malformed"),
    ("[" * 200_000, "deeper than 32"),
])
def test_every_loader_refuses_a_bad_file_in_one_line(tmp_path, kind, content, needle):
    loader, suffix = LOADERS[kind]
    path = tmp_path / f"input{suffix}"
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert str(path) in refused(loader, path, needle)


@pytest.mark.parametrize("kind", [k for k in sorted(LOADERS) if k != "hf-config"])
@pytest.mark.parametrize("content,needle", [
    (BILLION_LAUGHS, "uses a YAML alias (*a) at line 2"),
    ("version: 1\nwhen: 2024-01-01\n", "the value at 'when' is a YAML date"),
    ("version: 1\nblob: !!binary aGVsbG8=\n", "is a YAML bytes"),
    ("1: one\nversion: 1\n", "key 1 is not text"),
    ("version: 1\nbig: 1" + "0" * 5000 + "\n", "is malformed YAML"),
    ("version: 1\n---\nversion: 1\n", "is malformed YAML"),
    ("version: 1\nnul: \x00\n", "is malformed YAML"),
])
def test_yaml_loaders_refuse_aliases_odd_types_and_odd_documents_at_once(tmp_path, kind, content, needle):
    loader, _ = LOADERS[kind]
    path = tmp_path / "input.yaml"
    path.write_text(content)
    start = time.monotonic()
    refused(loader, path, needle)
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("kind", ["plan", "profile", "cluster", "model", "calibration"])
def test_a_top_level_that_is_not_a_mapping_is_refused(tmp_path, kind):
    loader, _ = LOADERS[kind]
    for text, needle in (("- 1\n- 2\n", "got list"), ("", "an empty document"), ("just text\n", "got str")):
        (tmp_path / "x.yaml").write_text(text)
        refused(loader, tmp_path / "x.yaml", needle)


def test_unreadable_huge_and_special_files(tmp_path, monkeypatch):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(MAX_INPUT_BYTES + 1)  # sparse: nothing is written, the size alone refuses it
    refused(load_plan, big, "distplan reads files up to 8 MiB")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    refused(load_profile, fifo, "is not a regular file")  # reading it would block for ever
    good = tmp_path / "good.yaml"
    good.write_text("version: 1\n")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(planner.core.fileio, "open", denied, raising=False)
    refused(load_cluster, good, "cannot read cluster file")
    refused(load_model, good, "Permission denied")


def test_a_plan_with_aliased_rationale_is_refused_by_show_at_once(cli, tmp_path):
    plan = tmp_path / "plan.yaml"
    assert cli("estimate", "-m", "gpt2", "-n", "2", "-o", plan).exit_code == 0
    text = plan.read_text().replace("rationale:\n", "rationale: &r0 [x, x, x, x, x, x, x, x]\nlaughs:\n", 1)
    for i in range(1, 20):
        text += f"r{i}: &r{i} [*r{i - 1}, *r{i - 1}, *r{i - 1}, *r{i - 1}]\n"
    plan.write_text(text)
    start = time.monotonic()
    r = cli("show", plan)
    assert r.exit_code == 2 and "uses a YAML alias" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert time.monotonic() - start < 5


def test_distplan_writes_no_aliases():
    shared = {"a": 1}
    assert "&" not in dump_yaml({"x": shared, "y": shared}) and "&" in yaml.safe_dump({"x": shared, "y": shared})
    profile = load_profile(PROFILE)
    assert profile_from_dict(yaml.safe_load(dump_yaml(profile_to_dict(profile))), "again") == profile


# ---- numbers inside validation --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def profile_dict():
    return yaml.safe_load(PROFILE.read_text())


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["compute"][0]["fwd"].update(intercept_s=-0.2), "compute[0].fwd.intercept_s must be a number >= 0, got -0.2"),
    (lambda d: d["compute"][0]["bwd"].update(slope_s_per_token=-1e-9), "compute[0].bwd.slope_s_per_token must be a number >= 0"),
    (lambda d: d["compute"][0].update(fwd={"intercept_s": 0, "slope_s_per_token": 0}), "cannot be 0 at every size"),
    (lambda d: d["compute"][0].update(tp="null"), "compute[0].tp must be an integer from 1 to"),
    (lambda d: d["compute"][0].update(fwd=[1, 2]), "compute[0].fwd must be a mapping, got [1, 2]"),
    (lambda d: d["collectives"][0].update(latency_s="0.17 ]"), "collectives[0].latency_s must be a number >= 0, got '0.17 ]'"),
    (lambda d: d["collectives"][0].update(bus_bandwidth_gb_s=float("inf")), "bus_bandwidth_gb_s must be a number > 0, got inf"),
    (lambda d: d.update(matmul_tflops=float("nan")), "'matmul_tflops' must be a number >= 0, got nan"),
    (lambda d: d.update(matmul_tflops=True), "'matmul_tflops' must be a number >= 0, got True"),
    (lambda d: d.update(matmul_tflops_by_gflop=[[1, "x"]]), "matmul_tflops_by_gflop[0] must be a [GFLOP > 0"),
    (lambda d: d.update(calibration=[1]), "calibration must be a mapping"),
    (lambda d: d.update(seq_len=0), "'seq_len' must be an integer >= 1"),
    (lambda d: d.update(device="tpu"), "'device' must be one of cuda, cpu"),
    (lambda d: d.update(gpu_name="[/]"), "'gpu_name' must be a name"),
    (lambda d: d.update(facts=[1]), "'facts' must be a mapping"),
    (lambda d: d["raw"]["communication"]["points"][0].update(bytes="1 KiB"), "raw.communication.points[0].bytes"),
    (lambda d: d["raw"]["communication"]["sharding"][0].update(blocks="eight"), "raw.communication.sharding[0].blocks"),
    (lambda d: d["raw"]["compute"][0]["points"][0].pop("tokens"), "missing key 'tokens'"),
    (lambda d: d["raw"]["compute"][0]["points"][0].update(gpu_fwd_s=None), "gpu_fwd_s must be a number"),
    (lambda d: d["sharding"][0].update(reshard_after_forward="yes"), "reshard_after_forward must be true or false"),
    (lambda d: d["pipeline"][0].update(schedule="zb"), "schedule must be one of 1f1b, interleaved"),
])
def test_profile_numbers_are_checked_by_key(profile_dict, edit, needle):
    d = yaml.safe_load(dump_yaml(profile_dict))
    edit(d)
    with pytest.raises(DistplanError, match=None) as info:
        profile_from_dict(d, "p.yaml")
    assert needle in str(info.value), str(info.value)


def test_a_profile_with_negative_fits_is_refused_by_estimate(cli, tmp_path, profile_dict):
    d = yaml.safe_load(dump_yaml(profile_dict))
    for c in d["compute"]:
        c["fwd"]["intercept_s"] = -abs(c["fwd"]["intercept_s"]) - 1e-3
    path = tmp_path / "neg.yaml"
    path.write_text(yaml.safe_dump(d))
    r = cli("estimate", "-m", "gpt2-xl", "-n", "2", "--profile", path)
    assert r.exit_code == 2 and "fwd.intercept_s must be a number >= 0" in r.stderr


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["efficiency"].update(matmul_gflop_fraction=[[0.5, "0.17 ]"]]), "matmul_gflop_fraction must be a list"),
    (lambda d: d["efficiency"].update(memory_bound_fraction=1.5), "memory_bound_fraction must be a number > 0 and <= 1"),
    (lambda d: d["gpu"].update(memory_gib="80"), "gpu.memory_gib must be a number > 0, got '80'"),
    (lambda d: d.update(gpus_per_node=True), "'gpus_per_node' must be an integer from 1 to"),
    (lambda d: d["links"].update(host=[1, 2]), "links.host must be a mapping"),
])
def test_cluster_numbers_are_checked_by_key(tmp_path, edit, needle):
    d = yaml.safe_load((ROOT / "configs/clusters/dgx-h100-80gb.yaml").read_text())
    edit(d)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    refused(load_cluster, tmp_path / "c.yaml", needle)


@pytest.mark.parametrize("cfg,needle", [
    ({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 10, "n_positions": 16, "n_inner": "x"},
     "'n_inner' must be an integer"),
    ({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
      "num_attention_heads": 4, "vocab_size": 10, "max_position_embeddings": 16, "num_key_value_heads": 2.5},
     "'num_key_value_heads' must be an integer"),
    ({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
      "num_attention_heads": 4, "vocab_size": 10, "max_position_embeddings": 16, "tie_word_embeddings": "false"},
     "'tie_word_embeddings' must be true or false"),
    ({"model_type": "llama", "num_hidden_layers": 10**9, "hidden_size": 64, "intermediate_size": 128,
      "num_attention_heads": 4, "vocab_size": 10, "max_position_embeddings": 16},
     "num_layers must be an integer from 1 to 4096"),
])
def test_hugging_face_config_values_are_checked(tmp_path, cfg, needle):
    import json

    path = tmp_path / "m" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(cfg))
    refused(load_model, path, needle)


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["prediction"].update(step_time_s="fast"), "prediction.step_time_s must be a number >= 0"),
    (lambda d: d["prediction"]["breakdown"].update(compute_fwd=None), "breakdown.compute_fwd must be a number"),
    (lambda d: d["prediction"]["stages"][0].update(memory_breakdown_gib=[1]), "stages[0].memory_breakdown_gib must be a mapping"),
    (lambda d: d["stages"][0].update(layers=[0, "x"]), "stages[0].layers must be [first, last], two integers"),
    (lambda d: d.update(rationale=5), "'rationale' must be a list"),
    (lambda d: d.update(alternatives=[{"step_time_s": "x"}]), "alternatives[0].step_time_s must be a number"),
    (lambda d: d.update(provenance=[1]), "'provenance' must be a mapping"),
    (lambda d: d["provenance"].update(command="distplan solve\nrm -rf /"), "provenance.command must be one line"),
    (lambda d: d["cluster"].update(gpus=True), "cluster.gpus must be an integer from 1 to"),
    (lambda d: d["job"].update(global_batch_size=10**18), "job.global_batch_size must be an integer from 1 to 1048576"),
    (lambda d: d["model"].update(num_layers=10**9), "num_layers must be an integer from 1 to 4096"),
])
def test_plan_values_are_checked_as_show_and_emit_read_them(cli, tmp_path, edit, needle):
    path = tmp_path / "plan.yaml"
    assert cli("estimate", "-m", "gpt2", "-n", "2", "-o", path).exit_code == 0
    d = yaml.safe_load(path.read_text())
    edit(d)
    with pytest.raises(DistplanError) as info:
        plan_from_dict(d, "plan.yaml")
    assert needle in str(info.value), str(info.value)


# ---- writing ---------------------------------------------------------------------------------------------


def test_atomic_write_files_writes_all_or_none(tmp_path):
    (tmp_path / "blocker").write_text("a file")
    with pytest.raises(DistplanError, match="cannot write"):
        atomic_write_files({tmp_path / "a.yaml": "a", tmp_path / "blocker" / "b.html": "b"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]
    atomic_write_files({tmp_path / "a.yaml": "a", tmp_path / "sub" / "b.html": "b"})
    assert (tmp_path / "a.yaml").read_text() == "a" and (tmp_path / "sub" / "b.html").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml", "blocker", "sub"]


@pytest.mark.parametrize("make,needle", [
    (lambda t: t / "folder", "it is a folder"),
    (lambda t: t / "blocker" / "x.yaml", "is a file, not a folder"),
    (lambda t: t / "blocker" / "deeper" / "x.yaml", "is a file, not a folder"),
    (lambda t: Path("/dev/null"), "not a regular file"),
])
def test_check_writable_refuses_before_any_work(tmp_path, make, needle):
    (tmp_path / "folder").mkdir()
    (tmp_path / "blocker").write_text("a file")
    with pytest.raises(DistplanError, match="cannot write --output") as info:
        check_writable(make(tmp_path), "--output")
    assert needle in str(info.value)
    check_writable(tmp_path / "new" / "deeper" / "x.yaml", "--output")  # created on writing
    assert not (tmp_path / "new").exists()


def test_read_yaml_returns_plain_documents(tmp_path):
    (tmp_path / "x.yaml").write_text("\ufeffa: [1, 2.5, null, true, 'text']\n")  # a byte-order mark is fine
    assert read_yaml(tmp_path / "x.yaml", "file") == {"a": [1, 2.5, None, True, "text"]}
