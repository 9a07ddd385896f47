"""The deployment files, checked without a Docker engine: compose.yaml against the Compose
specification's own schema and against the repository, the alert rules and the Prometheus config by
promtool (rules unit-tested too), the Grafana dashboard's JSON and every query in it."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
import yaml
from jsonschema import Draft201909Validator

from hive_bus import load_settings
from hive_bus._cli import cli
from hive_bus._embedded import nats_server_path
from hive_bus.bus import Bus
from hive_bus.services.metrics import BusMetrics
from hive_bus.services.room import Room

from .deploy import (
    COMPOSE,
    COMPOSE_SCHEMA,
    DASHBOARD,
    DEPLOY,
    PROMETHEUS_DIR,
    PROMTOOL,
    compose,
    dashboard,
    dashboard_queries,
    load_yaml,
    needs_promtool,
    prometheus_config,
)
from .helpers import REPO


def test_compose_follows_the_compose_specification() -> None:
    if not COMPOSE_SCHEMA.is_file():
        pytest.skip(
            f"no compose-spec schema at {COMPOSE_SCHEMA}: tests/setup/fetch-compose-schema.sh fetches it"
        )
    validator = Draft201909Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, "\n".join(errors)
    # and the schema does refuse what is not Compose
    wrong = copy.deepcopy(compose())
    wrong["services"]["gateway"]["restart_policy"] = "always"
    wrong["services"]["worker"]["depends_on"] = {"gateway": {"condition": "when_ready"}}
    assert len(list(validator.iter_errors(wrong))) == 2


def test_every_file_compose_uses_is_in_the_repository_or_made_by_the_set_up_scripts(tmp_path: Path) -> None:
    for part in ("nats", "deploy"):
        shutil.copytree(
            REPO / part,
            tmp_path / part,
            ignore=shutil.ignore_patterns(
                "certs", "secrets", "passwords", "secrets.conf", "site-secrets.conf"
            ),
        )
    shutil.copy(COMPOSE, tmp_path / "compose.yaml")
    # the README's set-up, in this copy
    for script in (["nats/make-certs.sh", "--server", "nats", "--client", "gateway", "--client", "local"],
                   ["nats/make-secrets.sh"], ["deploy/make-secrets.sh"]):  # fmt: skip
        subprocess.run(["bash", *script], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    doc = compose()
    missing = []
    for name, service in doc["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and not (tmp_path / source).exists():
                missing.append(f"{name}: {source}")
        if "build" in service:
            assert (REPO / service["build"] / "Dockerfile").is_file()
    for name, secret in doc["secrets"].items():
        if not (tmp_path / secret["file"]).is_file():
            missing.append(f"secret {name}: {secret['file']}")
        for service in doc["services"].values():
            for used in service.get("secrets", []):
                assert used in doc["secrets"], f"a service uses secret {used}, which compose does not define"
    assert not missing, missing


@pytest.mark.parametrize("service", ["gateway", "worker"])
def test_compose_runs_hive_with_settings_and_flags_it_knows(service: str) -> None:
    spec = compose()["services"][service]
    env = {k: str(v) for k, v in spec["environment"].items() if k.startswith("HIVE_")}
    load_settings(env)  # an unknown HIVE_* variable or a bad value raises, naming it
    secrets_used = {f"/run/secrets/{s}" for s in spec["secrets"]}
    for key, value in env.items():
        if key.endswith("_FILE"):
            assert value in secrets_used, f"{service}: {key}={value} is not a secret compose mounts"
    command = cli.commands[spec["command"][0]]
    with command.make_context(spec["command"][0], list(spec["command"][1:])):
        pass  # every flag exists and every value parses


def test_prometheus_and_grafana_find_what_compose_gives_them() -> None:
    doc = compose()
    services = doc["services"]
    prometheus = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    [job] = [j for j in prometheus["scrape_configs"] if j["job_name"] == "hive-gateway"]
    [[target]] = [c["targets"] for c in job["static_configs"]]
    host, port = target.split(":")
    assert host in services and services[host]["command"][-2:] == ["--port", port]
    token = job["authorization"]["credentials_file"]
    assert token == "/run/secrets/metrics-token" and "metrics-token" in services["prometheus"]["secrets"]
    assert services["gateway"]["environment"]["HIVE_METRICS_TOKEN_FILE"] == token
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]

    datasources = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    [source] = datasources
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    providers = load_yaml(DEPLOY / "grafana/provisioning/dashboards/hive-bus.yml")["providers"]
    [provider] = providers
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert mounted[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    assert mounted["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    for panel in dashboard()["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]


def gateway_metric_names() -> set[str]:
    """Every sample name the gateway's /metrics can hold (families and their suffixes)."""
    metrics = BusMetrics(cast(Bus, None))  # the registry alone: nothing reads the bus until run()
    Room(cast(Bus, None), metrics.registry)  # hive_bus_writable, which the gateway registers beside them
    names = {"up"}
    for family in metrics.registry.collect():
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def test_the_dashboard_is_grafana_json_that_queries_only_what_the_gateway_exports() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "hive-bus" and doc["title"] and doc["schemaVersion"] >= 30
    panels = doc["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids repeat"
    for panel in panels:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24 and box["h"] > 0, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], f"{panel['title']} has no query"
    [variable] = doc["templating"]["list"]
    assert variable["name"] == "provider"
    exported = gateway_metric_names()
    queries = dashboard_queries()
    assert len(queries) >= 15
    for where, expr in queries.items():
        used = set(re.findall(r"\b(hive_[a-z_]+|up)\b(?=\s*[{\[]|\s*\))", expr))
        assert used, f"{where}: no metric found in {expr}"
        assert used <= exported, f"{where} uses {used - exported}, which the gateway does not export"


def test_the_dashboard_shows_what_the_room_alerts_fire_on() -> None:
    """JetStream not storing writes, a stream or a bucket near full: each alert's gauge has a panel, so
    that an operator sent there by the alert sees it, and sees it coming before it fires."""
    rules = {
        r["alert"]: r["expr"] for g in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"] for r in g["rules"]
    }
    shown = " ".join(dashboard_queries().values())
    for alert in ("HiveBusNotWritable", "HiveStreamNearlyFull", "HiveBucketFull"):
        [gauge] = re.findall(r"\bhive_[a-z_]+", rules[alert])
        assert re.search(rf"\b{gauge}\b", shown), f"{alert} fires on {gauge}, which no dashboard panel shows"


@needs_promtool
def test_every_dashboard_query_is_promql_that_promtool_accepts(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{n}", "expr": expr} for n, expr in enumerate(dashboard_queries().values())
    ]}]}  # fmt: skip
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    done = _promtool("check", "rules", str(tmp_path / "dashboard.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(dashboard_queries())} rules found" in done.stdout


@needs_promtool
def test_alert_rules_and_the_prometheus_config_pass_promtool(tmp_path: Path) -> None:
    token = tmp_path / "metrics-token"
    token.write_text("a-metrics-token-of-some-length\n")
    config = prometheus_config(tmp_path / "prometheus", token_file=token, gateway="127.0.0.1:8080")
    rules = _promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    count = sum(len(g["rules"]) for g in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"])
    assert f"SUCCESS: {count} rules found" in rules.stdout
    checked = _promtool("check", "config", str(config))  # loads alerts.yml beside it too
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_promtool
def test_alerts_fire_on_what_they_are_for_and_not_otherwise() -> None:
    done = _promtool("test", "rules", str(PROMETHEUS_DIR / "alerts.test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {
        t["alertname"]
        for case in load_yaml(PROMETHEUS_DIR / "alerts.test.yml")["tests"]
        for t in case["alert_rule_test"]
    }
    alerts = {r["alert"] for g in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"] for r in g["rules"]}
    assert tested == alerts, f"alerts without a unit test: {alerts - tested}"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


SYSTEMD = DEPLOY / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["nats.service", "hive-gateway.service", "hive-worker@.service"])
def test_systemd_units_pass_systemd_analyze(unit: str, tmp_path: Path) -> None:
    # the unit as installed: its programs where this machine has them
    here = {
        "/usr/local/bin/nats-server": nats_server_path(),
        "/opt/hive-bus/.venv/bin/hive": str(Path(sys.executable).with_name("hive")),
    }
    text = (SYSTEMD / unit).read_text()
    for was, now in here.items():
        text = text.replace(was, now)
    (tmp_path / unit).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


@pytest.mark.parametrize("env_file", ["gateway.env", "worker.env"])
def test_systemd_environment_files_hold_settings_hive_knows(env_file: str) -> None:
    env = {}
    for line in (SYSTEMD / env_file).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    load_settings({k: v for k, v in env.items() if k.startswith("HIVE_")})


def test_the_shipped_local_worker_user_is_what_worker_user_sh_makes() -> None:
    made = subprocess.run(
        ["bash", str(REPO / "nats/worker-user.sh"), "local", "echo"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert made in (REPO / "nats/accounts.conf").read_text()


def _script(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def _make_certs(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _script([str(REPO / "nats/make-certs.sh"), "--out", str(out), *args], out.parent)


def test_adding_a_client_keeps_the_hubs_server_certificate(tmp_path: Path) -> None:
    # the README's "Adding a worker": --client alone, on the hub's certificates directory
    certs = tmp_path / "certs"
    assert _make_certs(certs, "--server", "pi.example.org", "--client", "gateway").returncode == 0
    before = {f.name: f.read_bytes() for f in certs.glob("*.pem")}
    added = _make_certs(certs, "--client", "laptop")
    assert added.returncode == 0, added.stderr
    assert "kept the server certificate" in added.stdout
    assert {name: (certs / name).read_bytes() for name in before} == before  # CA, server, gateway
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", certs / "ca.pem", certs / "client-laptop.pem"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    # --server given: the server certificate is made anew, and the output says it replaced one
    renamed = _make_certs(certs, "--server", "pi.example.org", "--server", "203.0.113.7")
    assert renamed.returncode == 0 and "replaced the server certificate" in renamed.stdout
    assert "DNS:pi.example.org,IP:203.0.113.7" in renamed.stdout
    assert (certs / "server.pem").read_bytes() != before["server.pem"]
    assert (certs / "client-gateway.pem").read_bytes() == before["client-gateway.pem"]


@pytest.mark.parametrize("name", ["a,DNS:evil.example", "x y", "300.1.1.1", "-x.example", "a..b"])
def test_a_server_name_that_is_no_dns_name_or_ip_is_refused_and_nothing_written(
    name: str, tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    assert _make_certs(certs, "--server", "pi.example.org").returncode == 0
    before = {f.name: f.read_bytes() for f in certs.iterdir()}
    for out in (certs, tmp_path / "new"):
        done = _make_certs(out, "--server", "pi.example.org", "--server", name, "--client", "laptop")
        assert done.returncode == 2
        assert done.stderr.splitlines() == [
            f"make-certs: server name '{name}' is neither a DNS name (letters, digits, '-' and dots) "
            "nor an IP address (see --help)"
        ]
    assert {f.name: f.read_bytes() for f in certs.iterdir()} == before
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("args", "option"),
    [(["--out"], "--out"), (["--server"], "--server"), (["--client", "a", "--client"], "--client"),
     (["--days", "--client", "a"], "--days")],
)  # fmt: skip
def test_an_option_without_its_value_is_a_usage_line(args: list[str], option: str, tmp_path: Path) -> None:
    done = _script([str(REPO / "nats/make-certs.sh"), *args], tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"make-certs: {option} needs a value (see --help)"]
    assert list(tmp_path.iterdir()) == []


def _make_secrets(into: Path, *names: str) -> subprocess.CompletedProcess[str]:
    return _script([str(REPO / "nats/make-secrets.sh"), "--dir", str(into), *names], into.parent)


def _files(under: Path) -> dict[str, bytes]:
    return {str(f.relative_to(under)): f.read_bytes() for f in sorted(under.rglob("*")) if f.is_file()}


@pytest.mark.parametrize(("first", "second"), [("a-b", "a_b"), ("laptop", "Laptop"), ("Pi-1", "pi_1")])
def test_a_worker_name_that_maps_to_anothers_password_variable_is_refused(
    first: str, second: str, tmp_path: Path
) -> None:
    hub = tmp_path / "nats"
    assert _make_secrets(hub, first).returncode == 0
    assert _make_secrets(hub, first).returncode == 0  # the same name again: kept, as before
    before = _files(hub)
    variable = "WORKER_" + first.upper().replace("-", "_") + "_PASSWORD"
    clash = f"make-secrets: worker '{second}' would share {variable} with worker '{first}'"
    done = _make_secrets(hub, second)
    assert done.returncode == 2 and done.stderr.startswith(clash) and len(done.stderr.splitlines()) == 1
    assert _files(hub) == before  # no passwords/<second>, nothing added to secrets.conf
    # its password file handed out and gone from the hub (its secret a bcrypt hash): still known
    (hub / "passwords" / first).unlink()
    assert _make_secrets(hub, second).stderr.startswith(clash)
    # both in one run: refused before anything is written
    fresh = _make_secrets(tmp_path / "fresh", first, second)
    assert fresh.returncode == 2 and fresh.stderr.startswith(clash)
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("name", ["gateway", "admin", "site", "Gateway"])
def test_make_secrets_refuses_the_hubs_own_users_as_worker_names(name: str, tmp_path: Path) -> None:
    hub = tmp_path / "nats"
    assert _make_secrets(hub).returncode == 0
    before = _files(hub)  # a worker "gateway" would have overwritten passwords/gateway
    done = _make_secrets(hub, name)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"make-secrets: '{name}' is one of the hub's own users (gateway, admin, site), not a worker name"
    ]
    assert _files(hub) == before


def _shipped_users() -> set[str]:
    """The users the shipped nats/ configs define that are not worker blocks (worker-user.sh's)."""
    users = set()
    for conf in ("accounts.conf", "leafnodes.conf"):
        text = (REPO / "nats" / conf).read_text()
        workers = set(re.findall(r'# worker "([^"]+)"', text))
        users |= set(re.findall(r'\buser: "?([A-Za-z0-9_-]+)"?', text)) - workers
    return users


@pytest.mark.parametrize("name", [*sorted(_shipped_users()), "Gateway"])
def test_worker_user_refuses_the_hubs_own_users(name: str) -> None:
    # its block pasted into accounts.conf made `nats-server -t` fail: Duplicate user "gateway"
    done = _script([str(REPO / "nats/worker-user.sh"), name, "echo"], REPO)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"worker-user: '{name}' is one of the hub's own users (gateway, admin, site), not a worker name"
    ]


def test_the_shipped_configs_define_the_users_the_scripts_refuse() -> None:
    assert _shipped_users() == {"gateway", "admin", "site"}


@pytest.mark.parametrize(
    ("script", "args", "says"),
    [("worker-user.sh", ["--prefix"], "worker-user: --prefix needs a value (see --help)"),
     ("worker-user.sh", ["--nkey", "--prefix", "hive", "pi", "echo"], "worker-user: --nkey needs a value (see --help)"),
     ("make-secrets.sh", ["--dir"], "make-secrets: --dir needs a directory (see --help)")],
)  # fmt: skip
def test_the_other_scripts_say_an_option_lacks_its_value(
    script: str, args: list[str], says: str, tmp_path: Path
) -> None:
    done = _script([str(REPO / "nats" / script), *args], tmp_path)
    assert (done.returncode, done.stdout, done.stderr.splitlines()) == (2, "", [says])


@pytest.mark.parametrize("script", ["make-certs.sh", "make-secrets.sh", "worker-user.sh"])
def test_help_is_the_scripts_header_comment(script: str) -> None:
    text = (REPO / "nats" / script).read_text().splitlines()
    header = [line.removeprefix("#").removeprefix(" ") for line in text[1 : text.index("set -euo pipefail")]]
    done = _script([str(REPO / "nats" / script), "--help"], REPO)
    assert done.returncode == 0 and done.stdout.splitlines() == header


def test_compose_runs_a_nats_server_with_the_stream_features_the_bus_uses() -> None:
    """The counters stream (allow_msg_counter), deadlines (message schedules, @at) need nats-server 2.12,
    recurring schedules 2.14; nats:2.11-alpine made the counters stream without counters, and the next
    gateway start refused it. The image is at least the minor version the tests run."""
    image = compose()["services"]["nats"]["image"]
    found = re.fullmatch(r"nats:(\d+)\.(\d+)(?:\.\d+)?-alpine", image)
    assert found, image
    tested = subprocess.run(
        [str(nats_server_path()), "--version"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    version = re.search(r"v(\d+)\.(\d+)\.", tested)
    assert version, tested
    assert (int(found[1]), int(found[2])) >= (int(version[1]), int(version[2])), (image, tested)


@pytest.mark.parametrize("config", ["hub.conf", "cluster.conf"])
def test_the_readmes_steps_put_every_file_a_server_config_includes_in_etc_nats(config: str) -> None:
    """The config the README runs (/etc/nats/hub.conf, /etc/nats/cluster.conf) and every file it
    includes, or tells to include (leafnodes.conf, commented out), are copied to /etc/nats by the
    README's steps or made there by make-secrets.sh: uncommenting the leaf nodes' include failed with
    'open /etc/nats/leafnodes.conf: no such file or directory', and no step put cluster.conf there."""
    readme = (REPO / "README.md").read_text()
    copies = re.findall(r"^\s*cp (nats/\S+(?: nats/\S+)*) /etc/nats/$", readme, re.MULTILINE)
    assert copies, "the README's steps that copy nats/ files to /etc/nats"
    there = {Path(f).name for line in copies for f in line.split()} | {"secrets.conf", "site-secrets.conf"}
    assert config in there, f"no step of the README copies nats/{config} to /etc/nats"
    wanted, seen = [config], set()
    while wanted:
        conf = wanted.pop()
        seen.add(conf)
        for name in re.findall(r"^\s*(?:#\s*)?include\s+(\S+)", (REPO / "nats" / conf).read_text(), re.M):
            assert name in there, f"{conf} includes {name}, which the README's steps do not put in /etc/nats"
            if name not in seen and (REPO / "nats" / name).is_file():
                wanted.append(name)


def test_a_server_certificate_made_anew_keeps_the_owner_of_the_one_it_replaces(tmp_path: Path) -> None:
    """The README has the Pi's /etc/nats given to the nats user, then (adding a name, a cluster) the server
    certificate made anew by root: its key came out root's, mode 0600, and nats-server, run as nats, could
    no longer read it (reload failed, the next start too)."""
    if os.geteuid() != 0:
        pytest.skip("giving a file another owner needs root")
    certs = tmp_path / "certs"
    assert _make_certs(certs, "--server", "pi.example.org", "--client", "gateway").returncode == 0
    nats_user = 65534  # nobody, standing for nats
    for file in certs.iterdir():
        os.chown(file, nats_user, nats_user)
    renamed = _make_certs(certs, "--server", "pi.example.org", "--server", "nats-1")
    assert renamed.returncode == 0, renamed.stderr
    for name in ("server.pem", "server-key.pem"):
        status = (certs / name).stat()
        assert (status.st_uid, status.st_gid) == (nats_user, nats_user), name
    assert (certs / "server-key.pem").stat().st_mode & 0o777 == 0o600
    client = _make_certs(certs, "--client", "laptop")  # a new file: its maker's, for the worker machine
    assert client.returncode == 0 and (certs / "client-laptop-key.pem").stat().st_uid == os.geteuid()
