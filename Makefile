# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/hive up

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	bash tests/setup/ensure-chromium.sh
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/rate_limits.py
	$(BIN)/python bench/gateway.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
