# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-setup lint bench clean

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

# Tools the deployment tests use: Prometheus and promtool (Debian's package), the compose-spec schema.
test-setup: $(STAMP)
	bash tests/setup/ensure-prometheus.sh
	bash tests/setup/fetch-compose-schema.sh $(VENV)

test: lint test-setup
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/rate_limits.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
