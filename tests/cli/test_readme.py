"""The README works as written: its first two commands are the set-up + main job and the set-up + tests, and its
walk-through runs top to bottom in a fresh folder, each step using only what the steps before it wrote."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_the_first_two_commands_are_setup_and_main_job_then_setup_and_tests():
    first = [ln.split("#")[0].strip() for ln in _blocks(README)[0].splitlines() if ln.split("#")[0].strip()]
    assert first[:2] == ["make solve", "make test"]
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^solve: setup\n\t\$\(VENV\)/bin/distplan solve --gpus 64 --model gpt2-xl$", make, flags=re.M)
    assert re.search(r"^test: setup\n\t\$\(PY\) -m pytest", make, flags=re.M)
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


@pytest.mark.slow
def test_the_walkthrough_runs_top_to_bottom(tmp_path):
    section = README.split("## Walk-through", 1)[1]
    script = _blocks(section)[0]
    script = "\n".join(ln for ln in script.splitlines() if not ln.startswith(". .venv/bin/activate"))
    # `distplan` as this checkout's CLI (the console script may belong to another install)
    prelude = f'distplan() {{ "{sys.executable}" -m planner.cli "$@"; }}\nset -euo pipefail\n'
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120")
    done = subprocess.run(["bash", "-c", prelude + script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    here = tmp_path / "walkthrough"
    for name in ("baseline.yaml", "plan.yaml", "report.html", "candidates.csv", "timeline.png", "memory.png",
                 "llama.yaml", "emit-deepspeed/ds_config.json", "profile.yaml", "tiny-plan.yaml", "tiny-report.yaml",
                 "profile.calibration.yaml", "tiny-report.html"):
        assert (here / name).is_file(), name
    assert "calibration" in done.stdout and "training time" in done.stdout
