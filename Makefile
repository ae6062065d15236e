# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
export MONAI_DATA_DIRECTORY ?= $(abspath ../shared/data)
# 2 CPU cores on CI: one torch thread per test worker, two workers.
PYTEST_WORKERS ?= 2

.PHONY: install demo test test-fast benchmarks clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m monai_metalearn.demo

test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -q --durations=10 tests
	$(PY) -m pytest -q --nbmake --nbmake-timeout=900 --durations=4 tutorials

test-fast: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) -q -m "not slow" tests

benchmarks: $(VENV)/.installed
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
