# Two-command quick start: `make demo` and `make test` (see README). `make check` is the quick gate while
# developing (ruff, mypy, the tests not marked slow); CI (.ci/run) runs `make lint test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DEMO_OUT ?= demo_out

.PHONY: demo test lint check install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch==2.13.0 is named on the same command line as everything that depends on it, so pip never
# resolves a newer (CUDA) build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "torch==2.13.0" -e .
	touch $@

$(TEST_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install --quiet "torch==2.13.0" -e ".[test]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stembed demo --out $(DEMO_OUT)

test: $(TEST_STAMP)
	$(PY) -m pytest -q

# ruff and mypy read their settings from pyproject.toml (mypy: files = src/stembed)
lint: $(TEST_STAMP)
	$(PY) -m ruff check src tests
	$(PY) -m mypy

check: lint
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(DEMO_OUT)
