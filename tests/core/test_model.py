"""ModelSpec: zoo, zoo YAML, analytic counts against published numbers (HF config.json: test_hf_import.py)."""

import pytest

from planner.core.errors import DistplanError
from planner.core.model import load_model, zoo_names

# Published parameter counts (model cards / papers), in billions.
PUBLISHED_PARAMS_B = {
    "gpt2": 0.124, "gpt2-medium": 0.355, "gpt2-large": 0.774, "gpt2-xl": 1.558, "gpt3-175b": 175.0,
    "llama-2-7b": 6.74, "llama-2-13b": 13.0, "llama-2-70b": 69.0, "llama-3-8b": 8.03, "llama-3-70b": 70.6,
    "llama-3.1-405b": 405.0, "mixtral-8x7b": 46.7, "vit-huge": 0.632,
}


def test_zoo_has_every_model_the_issue_names():
    assert set(PUBLISHED_PARAMS_B) <= set(zoo_names())


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_B))
def test_param_count_matches_published(name):
    got = load_model(name).total_params() / 1e9
    assert got == pytest.approx(PUBLISHED_PARAMS_B[name], rel=0.01)


def test_mixtral_active_params_published():
    # Mistral AI: 46.7B total, 12.9B active per token (top-2 of 8 experts)
    assert load_model("mixtral-8x7b").active_params() / 1e9 == pytest.approx(12.9, rel=0.01)


@pytest.mark.parametrize("name", ["gpt2", "gpt2-xl", "gpt3-175b"])
def test_gpt_params_follow_sc21_formula(name):
    m = load_model(name)
    l, h, V, s = m.num_layers, m.hidden_size, m.vocab_size, m.max_seq_len
    formula = 12 * l * h**2 * (1 + 13 / (12 * h) + (V + s) / (12 * l * h))
    assert m.total_params() == pytest.approx(formula, rel=1e-3)


@pytest.mark.parametrize("name", ["gpt2-xl", "gpt3-175b"])
def test_gpt_flops_follow_sc21_formula(name):
    m = load_model(name)
    B, s, l, h, V = 8, m.seq_len, m.num_layers, m.hidden_size, m.vocab_size
    assert m.training_flops(B, s) == pytest.approx(72 * B * s * l * h**2 * (1 + s / (6 * h) + V / (12 * l * h)), rel=1e-6)
    with_rc = 96 * B * s * l * h**2 * (1 + s / (6 * h) + V / (16 * l * h))
    assert m.training_flops(B, s, recompute_forward=True) == pytest.approx(with_rc, rel=1e-6)


def test_zoo_yaml_roundtrip_and_bad_keys(tmp_path):
    import yaml

    spec = load_model("llama-3-8b")
    p = tmp_path / "mine.yaml"
    p.write_text(yaml.safe_dump(spec.to_dict()))
    assert load_model(str(p)) == spec
    p.write_text("num_layers: 2\nhidden_size: 64\nnum_heads: 4\nvocab_size: 10\nmax_seq_len: 16\nbogus: 1\n")
    with pytest.raises(DistplanError, match="bogus"):
        load_model(str(p))
    p.write_text("num_layers: [2\n")
    with pytest.raises(DistplanError, match="malformed"):
        load_model(str(p))


def test_unknown_model_lists_valid_names():
    with pytest.raises(DistplanError, match="gpt2-xl"):
        load_model("gpt-5")
