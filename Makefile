# Two-command quick start: `make demo` and `make test` (see README). `make check` is the quick gate while
# developing (ruff, mypy, the tests not marked slow); `make docs` builds the documentation site (docs/, every
# warning an error); CI (.ci/run) runs `make lint test docs`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DOCS_STAMP := $(VENV)/.installed-docs
DEMO_OUT ?= demo_out

.PHONY: demo test lint check docs install clean

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

$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install --quiet "torch==2.13.0" -e ".[docs]"
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

# --strict: a broken link or anchor, an API object without a docstring, a missing model card fails the build.
# NO_MKDOCS_2_WARNING silences Material's notice about its own future (not a warning about these pages).
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) $(DEMO_OUT) site
