"""Fuzzed input files: hundreds of mutations of a valid plan, profile, cluster and model file each (keys deleted,
values replaced by random scalars or wrapped in the wrong container, unknown keys added at any depth; the text
truncated, garbled, re-encoded or given YAML aliases), loaded through the loader and through the command that
reads the file. The only outcomes allowed: success or one DistplanError line (exit code 0 or 2), in time.

Deterministic (derandomize): CI sees the same files every run.
"""

from __future__ import annotations

import copy
import json
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from planner.cli import app
from planner.core.cluster import load_cluster
from planner.core.errors import DistplanError
from planner.core.model import load_model
from planner.core.plan import load_plan
from planner.cost.profiled import load_profile

ROOT = Path(__file__).parents[2]
EXAMPLES = 200  # per file kind (150 for the 35 KB profile: 0.1 s each); each is loaded and run through the CLI
SECONDS = 10  # per example: more is a hang
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))
FUZZ_PROFILES = settings(FUZZ, max_examples=150)

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from([0, -1, 1, 2, 10**18, -1e-9, 1e308, "0.17 ]", "null", "nan", "1e999", "", "[/]", "\n", "2024-01-01"]),
)
HF_GPT2 = {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024,
           "n_inner": None, "tie_word_embeddings": True}
HF_LLAMA = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 512, "intermediate_size": 1376,
            "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 4096,
            "tie_word_embeddings": False}
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(12))


@contextmanager
def time_limit(seconds: float):
    """Fail an example that runs longer than `seconds` (a hang never returns to a deadline check)."""
    def expire(signum, frame):
        raise TimeoutError(f"example ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---- mutations ---------------------------------------------------------------------------------------------


def _children(node) -> list:
    if isinstance(node, dict):
        return list(node)
    if isinstance(node, list):
        return list(range(len(node)))
    return []


def _pick_path(data, doc) -> list:
    """A path into `doc`: from the top, go on into a child or stop (shallow keys are picked as often as deep ones)."""
    path, node = [], doc
    while _children(node) and (not path or data.draw(st.booleans(), label="deeper")):
        key = data.draw(st.sampled_from(_children(node)), label="child")
        path.append(key)
        node = node[key]
    return path


def _mutate(data, doc):
    """`doc` (changed in place) with one structural change at a drawn path."""
    path = _pick_path(data, doc)
    if not path:
        return data.draw(st.sampled_from([[doc], "text", 7, None, []]), label="top")
    *parent_path, key = path
    parent = doc
    for k in parent_path:
        parent = parent[k]
    node = parent[key]
    how = data.draw(st.sampled_from(["delete", "scalar", "wrap", "stringify", "container", "add"]), label="how")
    if how == "delete":
        del parent[key]
    elif how == "scalar":
        parent[key] = data.draw(SCALARS, label="scalar")
    elif how == "wrap":
        parent[key] = data.draw(st.sampled_from([[node], {"value": node}, [node, node]]), label="wrap")
    elif how == "stringify":
        parent[key] = str(node)
    elif how == "container":
        parent[key] = list(node.values()) if isinstance(node, dict) else {str(i): v for i, v in enumerate(node)} \
            if isinstance(node, list) else {}
    elif isinstance(node, dict):
        node[data.draw(st.text(min_size=1, max_size=8), label="new key")] = data.draw(SCALARS, label="new value")
    else:
        parent[key] = data.draw(SCALARS, label="scalar")
    return doc


def _garble(data, text: str) -> bytes:
    """`text` as bytes, perhaps truncated, with bytes spliced in, re-encoded, or with YAML aliases."""
    how = data.draw(st.sampled_from(["none", "none", "truncate", "splice", "utf16", "alias", "laughs", "nul"]), label="text")
    raw = text.encode()
    at = data.draw(st.integers(0, len(raw)), label="at")
    if how == "truncate":
        return raw[:at]
    if how == "splice":
        return raw[:at] + data.draw(st.binary(min_size=1, max_size=16), label="bytes") + raw[at:]
    if how == "utf16":
        return text.encode("utf-16")
    if how == "alias":
        return raw + b"\nanchored: &a0 [1, 2]\nagain: *a0\n"
    if how == "laughs":
        return LAUGHS.encode()
    if how == "nul":
        return raw[:at] + b"\x00" + raw[at:]
    return raw


def _document(data, valid: dict, as_json: bool) -> bytes:
    doc = copy.deepcopy(valid)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        doc = _mutate(data, doc)
    text = json.dumps(doc, default=str) if as_json else yaml.dump(doc, Dumper=DUMPER, sort_keys=False)
    return _garble(data, text)


# ---- the checks ----------------------------------------------------------------------------------------------


def _load(loader, path: Path) -> None:
    try:
        loader(str(path))
    except DistplanError as exc:
        assert "\n" not in str(exc).strip(), str(exc)


def _run(argv: list[str]) -> None:
    result = CliRunner().invoke(app, argv)
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 2:
        assert len([line for line in result.stderr.splitlines() if line.strip()]) <= 1, result.stderr


def fuzz(data, valid: dict, path: Path, loader, argv: list[str], as_json: bool = False) -> None:
    path.write_bytes(_document(data, valid, as_json))
    with time_limit(SECONDS):
        _load(loader, path)
        _run(argv)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid_plan(folder):
    """A solved plan (rationale, runners-up, the ILP's sharding and the training cost inputs included)."""
    path = folder / "solved.yaml"
    r = CliRunner().invoke(app, ["solve", "-m", "gpt2", "-n", "2", "-o", str(path), "--format", "json",
                                 "--train-tokens", "2e12", "--gpu-hour-price", "2.5"])
    assert r.exit_code == 0, r.output
    return yaml.safe_load(path.read_text())


@given(data=st.data())
@FUZZ
def test_fuzzed_plans(data, folder, valid_plan):
    path = folder / "plan.yaml"
    fuzz(data, valid_plan, path, load_plan, ["show", str(path)])


@pytest.fixture(scope="module")
def valid_profile():
    """A measured profile (2x H200, gpt2-xl): fits, collectives, sharding and pipeline entries, raw points."""
    return yaml.safe_load((ROOT / "benchmarks/results/profile_2xh200/profile-gpt2-xl-2xh200.yaml").read_text())


@given(data=st.data())
@FUZZ_PROFILES
def test_fuzzed_profiles(data, folder, valid_profile):
    path = folder / "profile.yaml"
    fuzz(data, valid_profile, path, load_profile, ["estimate", "-m", "gpt2-xl", "-n", "2", "--profile", str(path)])


@given(data=st.data())
@FUZZ
def test_fuzzed_clusters(data, folder):
    valid = yaml.safe_load((ROOT / "configs/clusters/dgx-h100-80gb.yaml").read_text())
    path = folder / "cluster.yaml"
    fuzz(data, valid, path, load_cluster, ["estimate", "-m", "gpt2", "-n", "2", "-c", str(path)])


@given(data=st.data())
@FUZZ
def test_fuzzed_zoo_models(data, folder):
    valid = yaml.safe_load((ROOT / "configs/models/llama-2-7b.yaml").read_text())
    path = folder / "model.yaml"
    fuzz(data, valid, path, load_model, ["estimate", "-m", str(path), "-n", "2"])


@given(data=st.data(), valid=st.sampled_from([HF_GPT2, HF_LLAMA]))
@FUZZ
def test_fuzzed_hugging_face_configs(data, valid, folder):
    path = folder / "hf" / "config.json"
    path.parent.mkdir(exist_ok=True)
    fuzz(data, valid, path, load_model, ["estimate", "-m", str(path), "-n", "2"], as_json=True)
