"""Shared fixtures: the CLI runner and small helpers."""

import json

import pytest
from typer.testing import CliRunner

from planner.cli import app
from planner.core.model import ModelSpec

TINY_VOCAB = 50


@pytest.fixture
def cli():
    """Invoke `distplan ARGS...`; returns the click Result (stdout and stderr kept apart)."""
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def parse_json(result, exit_codes=(0,)) -> dict:
    """The JSON a command printed; a config that does not fit still prints its estimate and exits 2."""
    assert result.exit_code in exit_codes, result.output
    return json.loads(result.stdout)


def tiny(family: str) -> ModelSpec:
    """Small specs of each family: GQA (2 KV heads for 4 Q heads) for llama/mixtral, 4 experts top-2."""
    extra = {
        "gpt": dict(num_kv_heads=4, max_seq_len=16, tie_embeddings=True),
        "llama": dict(num_kv_heads=2, max_seq_len=16),
        "mixtral": dict(num_kv_heads=2, max_seq_len=16, num_experts=4, top_k=2),
        "vit": dict(num_kv_heads=4, max_seq_len=17, image_size=16, patch_size=4),
    }[family]
    return ModelSpec(name=f"tiny-{family}", family=family, num_layers=2, hidden_size=32, ffn_hidden_size=64,
                     num_heads=4, vocab_size=TINY_VOCAB, **extra)
