# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Two stamps, one virtualenv: `run` installs what `hive up` runs (the [all] extra: gateway and every
# provider SDK), the rest installs [test], which holds [all] and the test tools, and so stamps both.
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

.PHONY: run test test-setup faults lint bench clean

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all]'
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP) $(RUN_STAMP)

# options for hive up: make run ARGS="--port 9090 --data /srv/hive"
run: $(RUN_STAMP)
	$(BIN)/hive up $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Tools the tests use, installed where missing: Prometheus and promtool, Chromium, strace (Debian's
# packages), the compose-spec schema.
test-setup: $(STAMP)
	bash tests/setup/ensure-prometheus.sh
	bash tests/setup/fetch-compose-schema.sh $(VENV)
	sh tests/setup/tools.sh
	bash tests/setup/ensure-chromium.sh

# Two test processes (pytest-xdist), each with its own nats-server, a file's tests in one of them: the
# suite mostly waits on timers and servers, and runs in about 9 minutes on two cores instead of 15.
test: lint test-setup
	$(BIN)/pytest -n 2 --dist loadfile

# The fault-injection suite alone (it is part of `make test` too); figures in docs/reliability.md.
faults: lint
	sh tests/setup/tools.sh
	$(BIN)/pytest -m faults

bench: $(STAMP)
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/rate_limits.py
	$(BIN)/python bench/quota.py
	$(BIN)/python bench/gateway.py
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/scale.py --out bench/scale

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
