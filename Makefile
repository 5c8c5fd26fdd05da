# distplan: `make solve` (the main job) and `make test` (the whole suite) each set everything up first, in a virtual
# environment of its own (.venv; `. .venv/bin/activate` puts `distplan` on your PATH). PYTHON picks the interpreter
# that makes it (>= 3.11); VENV its folder.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# test workers: one per core, at most 2 (the suite's CPU-distributed tests start 2-4 processes each)
JOBS ?= $(shell $(PYTHON) -c "import os; print(min(2, len(os.sched_getaffinity(0))))")

.PHONY: setup solve estimate test bench
setup: $(VENV)/.setup-stamp
$(VENV)/.setup-stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# CPU build of torch first (on the dev/CI machines it lies on disk; any torch >= 2.4 works)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@

solve: setup
	$(VENV)/bin/distplan solve --gpus 64 --model gpt2-xl

estimate: setup
	$(VENV)/bin/distplan estimate --model gpt2-xl --gpus 64

test: setup
	$(PY) -m pytest -n $(JOBS)

bench: setup
	$(PY) benchmarks/estimate_accuracy.py
