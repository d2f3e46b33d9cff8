# `make demo` and `make test` work on a fresh clone: each sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# This machine has a local CPU build of this torch; elsewhere pick the build for your hardware, e.g.
# `make setup TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"`.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo-model

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/grok1 demo --dir $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check grok1 tests bench

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
