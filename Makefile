# `make demo`: install everything and run the main job. `make test`: install everything and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export PYTHONHASHSEED := 0

.PHONY: demo test test-slow test-hf4 lint bench-smoke clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt requirements-nnx.txt
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -r requirements-nnx.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) -m aroma_jax.cli demo

# `make test`: the library, the CLI and the run pipeline, within the 15-minute budget;
# `make test-slow`: the longest end-to-end runs (tests marked `slow`: the experiments' scripts,
# and the heaviest runner and mesh runs; see pyproject.toml). CI runs both. Both run on
# transformers 5.x (requirements.txt); the tests marked `hf4` need its removed Flax classes and
# run in `make test-hf4`.
test: $(VENV)/.installed-test
	$(PY) -m ruff check aroma_jax tests experiments
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow and not hf4" tests

test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --dist worksteal -m "slow and not hf4" tests

# A second environment with transformers 4.57 (requirements-hf4.txt) for `model.impl: hf`:
# the tests marked `hf4` (transformers' Flax classes, the fixed Flax LLaMA, native-vs-HF-Flax
# runs), slow ones included.
VENV4 := .venv-hf4
PY4 := $(VENV4)/bin/python

$(VENV4)/.installed: requirements-hf4.txt pyproject.toml
	test -x $(PY4) || $(PYTHON) -m venv $(VENV4)
	$(PY4) -m pip install -q --upgrade pip
	$(PY4) -m pip install -q -r requirements-hf4.txt
	$(PY4) -m pip install -q --no-deps -e .
	touch $@

test-hf4: $(VENV4)/.installed
	$(PY4) -c "import transformers; print('transformers', transformers.__version__)"
	$(PY4) -m pytest -q -n 2 --dist worksteal -m hf4 tests

lint: $(VENV)/.installed-test
	$(PY) -m ruff check aroma_jax tests experiments

clean:
	rm -rf $(VENV) $(VENV4) .pytest_cache
