# The README's two commands: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 6006
HOST ?= localhost
PYTEST_ARGS ?=

.PHONY: demo test install install-test system-test-deps lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.py pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

# Test installs pin torch (CPU build) and tensorflow-cpu through the constraints file; the package stays unpinned.
$(VENV)/.installed-test: $(BIN)/python setup.py pyproject.toml constraints-test.txt
	$(BIN)/pip install --quiet -c constraints-test.txt -e '.[test,torch,lightning,transformers,jax]' tensorflow-cpu keras
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test system-test-deps

# The browser tests drive the distribution's Chromium (Playwright cannot download browsers offline).
system-test-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	  else echo "chromium is missing: run 'sudo apt-get install -y chromium' (needed by the browser tests)"; exit 1; fi; }
	@if [ -f frontend/package-lock.json ] && [ ! -d frontend/node_modules ]; then cd frontend && npm ci --silent; fi

demo: install
	@echo "tb_gradient_plugin demo: open http://$(HOST):$(PORT)/#gradients"
	$(BIN)/tensorboard --logdir demo_logs --host $(HOST) --port $(PORT)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

test: install-test lint
	$(BIN)/pytest $(PYTEST_ARGS)

bench: install-test
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
