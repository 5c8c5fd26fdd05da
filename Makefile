# distplan: `make solve` (the main job) and `make test` (the whole suite) each set everything up first.
PY ?= python3
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup solve estimate test bench
setup: .setup-stamp
.setup-stamp: pyproject.toml
	# CPU build of torch first (on the dev/CI machines it lies on disk; any torch >= 2.4 works)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch .setup-stamp

solve: setup
	distplan solve --gpus 64 --model gpt2-xl

estimate: setup
	distplan estimate --model gpt2-xl --gpus 64

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/estimate_accuracy.py
