# `make demo`: install everything and run the main job. `make test`: install everything and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export PYTHONHASHSEED := 0

.PHONY: demo test test-slow test-v5 lint bench-smoke clean

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
# and the heaviest runner and mesh runs; see pyproject.toml). CI runs both.
test: $(VENV)/.installed-test
	$(PY) -m ruff check aroma_jax tests experiments
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow" tests

test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --dist worksteal -m slow tests

# A second environment with transformers 5.x (no Flax models there): the native LLaMA-family
# tests, PyTorch parity included. `make test` covers everything on the pinned transformers 4.57.
VENV5 := .venv-v5
PY5 := $(VENV5)/bin/python
NATIVE_TESTS := tests/models/test_native_parity.py tests/models/test_native_partitioning.py \
	tests/models/test_native_generate.py tests/models/test_native_sampling.py \
	tests/models/test_native_scan.py tests/models/test_native_encoder.py \
	tests/models/test_native_bart.py tests/models/test_native_gemma_qwen3.py

$(VENV5)/.installed: requirements-v5.txt pyproject.toml
	test -x $(PY5) || $(PYTHON) -m venv $(VENV5)
	$(PY5) -m pip install -q --upgrade pip
	$(PY5) -m pip install -q -r requirements-v5.txt
	$(PY5) -m pip install -q --no-deps -e .
	touch $@

test-v5: $(VENV5)/.installed
	$(PY5) -c "import transformers; print('transformers', transformers.__version__)"
	$(PY5) -m pytest -q $(NATIVE_TESTS)

lint: $(VENV)/.installed-test
	$(PY) -m ruff check aroma_jax tests experiments

clean:
	rm -rf $(VENV) $(VENV5) .pytest_cache
