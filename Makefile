# Both targets build their own virtual environment, so a fresh clone needs only Python 3.11+.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo venv clean

venv: $(STAMP)

# torch is pinned to the CPU build on this kind of machine before the project is installed;
# an unpinned torch would pull a several-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests

demo: $(STAMP)
	$(VENV)/bin/probe demo

clean:
	rm -rf $(VENV) build *.egg-info
