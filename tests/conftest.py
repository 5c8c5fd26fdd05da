"""Shared fixtures: the CLI runner and small helpers."""

import json

import pytest
from typer.testing import CliRunner

from planner.cli import app


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
