# Two-command quick start: `make demo` and `make test` (see README). `make check` is the quick gate while
# developing (ruff, mypy, the tests not marked slow); `make docs` builds the documentation site (docs/, every
# warning an error); CI (.ci/run) runs `make lint test docs`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
DEMO_OUT ?= demo_out
UV_VERSION := 0.13.10
# Installs come from the lock files in requirements/ (exact versions, resolved once by `make lock`) through uv, which
# installs them in seconds where pip resolves for minutes. torch is named on the same command line, not locked: the
# pin gives the CPU build here and the normal (CUDA) build on a GPU machine. --compile-bytecode writes the .pyc files
# once, at install: where PYTHONDONTWRITEBYTECODE is set (as on our CI machines) every new Python process (a CLI call,
# a dask or DDP worker, a test worker) would otherwise compile torch, xarray, dask... from source again, ~10 s each.
UV_INSTALL := $(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY)
# uv does not read pip's configuration: pass on where pip finds local wheels (the CPU torch on this machine kind),
# or uv would fetch the registry's CUDA build.
PIP_FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
ifneq ($(strip $(PIP_FIND_LINKS)),)
export UV_FIND_LINKS ?= $(PIP_FIND_LINKS)
endif

.PHONY: demo test lint check docs install lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "uv==$(UV_VERSION)"

$(STAMP): pyproject.toml requirements/run.lock | $(PY)
	$(UV_INSTALL) -r requirements/run.lock "torch==2.13.0" -e .
	touch $@

# the test and docs extras (one lock: `make test`, `make lint` and `make docs` share the environment)
$(DEV_STAMP): pyproject.toml requirements/dev.lock $(STAMP)
	$(UV_INSTALL) -r requirements/dev.lock "torch==2.13.0" -e ".[test,docs]"
	touch $@

# Re-resolve the locks after changing pyproject.toml's dependencies (tests/test_lock.py checks they cover it).
lock: | $(PY)
	$(VENV)/bin/uv pip compile --quiet --python $(PY) --no-emit-package torch pyproject.toml -o requirements/run.lock
	$(VENV)/bin/uv pip compile --quiet --python $(PY) --no-emit-package torch --extra test --extra docs \
		pyproject.toml -o requirements/dev.lock

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stembed demo --out $(DEMO_OUT)

test: $(DEV_STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile

# ruff and mypy read their settings from pyproject.toml (mypy: src/stembed, experiments, benchmarks, tests): the
# scripts are held to the package's bar; the tests' bodies are checked, their annotations optional
lint: $(DEV_STAMP)
	$(PY) -m ruff check src tests experiments benchmarks
	$(PY) -m mypy

check: lint
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow"

# --strict: a broken link or anchor, an API object without a docstring, a missing model card fails the build.
# NO_MKDOCS_2_WARNING silences Material's notice about its own future (not a warning about these pages).
docs: $(DEV_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) $(DEMO_OUT) site
