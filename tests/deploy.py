"""The deployment files (compose.yaml, deploy/), and the Prometheus tools that check them."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helpers import REPO

COMPOSE = REPO / "compose.yaml"
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "hive-bus.json"
PROMETHEUS_DIR = DEPLOY / "prometheus"
# fetched by tests/setup/fetch-compose-schema.sh (make test runs it) into the virtualenv
COMPOSE_SCHEMA = Path(sys.prefix) / "share" / "compose-spec" / "compose_spec.json"

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed: tests/setup/ensure-prometheus.sh (make test) installs Debian's prometheus package",
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus is not installed: tests/setup/ensure-prometheus.sh (make test) installs Debian's prometheus package",
)

# What Grafana puts in place of the dashboard's variables before it sends a query.
GRAFANA_VARIABLES = {"$provider": ".*", "$__rate_interval": "1m", "$__range": "1h"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = load_yaml(COMPOSE)
    return doc


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def dashboard_queries() -> dict[str, str]:
    """Every query of the dashboard (panel title and ref id -> PromQL), as Grafana sends it."""
    queries: dict[str, str] = {}
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries[f"{panel['title']} [{target['refId']}]"] = expr
    return queries


def prometheus_config(dest: Path, *, token_file: Path, gateway: str, interval: str | None = None) -> Path:
    """deploy/prometheus copied to ``dest`` with this machine's values: the gateway's address and the
    token file (and, for a test that cannot wait, a shorter scrape interval)."""
    shutil.copytree(PROMETHEUS_DIR, dest)
    config = load_yaml(dest / "prometheus.yml")
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "hive-gateway"]
    job["authorization"]["credentials_file"] = str(token_file)
    job["static_configs"] = [{"targets": [gateway]}]
    config["scrape_configs"] = [job]
    if interval is not None:
        config["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
    (dest / "prometheus.yml").write_text(yaml.safe_dump(config))
    return dest / "prometheus.yml"
