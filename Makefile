# Both targets build their own virtual environment, so a fresh clone needs only Python 3.11+.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUN    := $(VENV)/.installed-run
DEV    := $(VENV)/.installed-dev

.PHONY: test lint demo venv clean

venv: $(DEV)

# torch is pinned to the CPU build on this kind of machine before the project is installed;
# an unpinned torch would pull a several-GB CUDA build. The demo needs only the project's own
# dependencies (its budget, 8 minutes cold on 2 cores, includes this install); tests and lint add
# the [test,lint] extras on top.
$(RUN): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $(RUN)

$(DEV): $(RUN)
	$(PY) -m pip install -q -e '.[test,lint]'
	touch $(DEV)

test: $(DEV)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests

# Style and types: the same checks as .pre-commit-config.yaml and CI.
lint: $(DEV)
	$(VENV)/bin/ruff check probe train analysis tests benchmarks
	$(VENV)/bin/mypy

demo: $(RUN)
	$(VENV)/bin/probe demo

clean:
	rm -rf $(VENV) build *.egg-info
