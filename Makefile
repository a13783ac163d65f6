# `make demo`: install everything and run the main job. `make test`: install everything and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export PYTHONHASHSEED := 0

.PHONY: demo test lint bench-smoke clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) -m aroma_jax.cli demo

test: $(VENV)/.installed-test
	$(PY) -m ruff check aroma_jax tests experiments
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed-test
	$(PY) -m ruff check aroma_jax tests experiments

clean:
	rm -rf $(VENV) .pytest_cache
