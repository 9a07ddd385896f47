"""Logging in to the shipped hub config: TLS only, a client certificate, a password or an nkey; every
refusal is one clear line that names the setting to fix, and no secret is ever printed."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import nkeys  # type: ignore[import-untyped]
import openai
import pytest

from hive_bus import (
    BusRefused,
    BusUnavailable,
    FailNow,
    FunctionProvider,
    Hive,
    Settings,
    SettingsError,
    Task,
    Worker,
    WorkerOptions,
    load_settings,
)
from hive_bus._budget import load_budgets
from hive_bus._bus import connect_nats
from hive_bus._credentials import closed_hint
from hive_bus._dlq import DeadLetter
from hive_bus._embedded import NatsServer
from hive_bus._router import Router
from hive_bus.bus import open_bus
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.workers.echo import EchoProvider

from .helpers import eventually, free_port, hive_cli, running_worker
from .hub import Hub, WorkerUser, hub_server, make_certs, render

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def nkey_seed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    path = tmp_path_factory.mktemp("nkey") / "laptop.nk"
    path.write_bytes(seed + b"\n")
    path.chmod(0o600)
    return path, public


@pytest.fixture(scope="module")
def hub(
    tmp_path_factory: pytest.TempPathFactory, nkey_seed: tuple[Path, str]
) -> Iterator[tuple[Hub, NatsServer]]:
    base = tmp_path_factory.mktemp("hub")
    certs = make_certs(base / "certs", servers=["127.0.0.1"], clients=["gateway", "laptop"])
    rendered = render(base / "nats", certs, [WorkerUser("laptop", ("echo",), nkey=nkey_seed[1])])
    with hub_server(rendered, base / "store") as server:
        yield rendered, server


def settings_for(hub: Hub, url: str, cert: str | None, **values: Any) -> Settings:
    files: dict[str, Any] = {"nats_tls_ca_file": str(hub.certs / "ca.pem")}
    if cert:
        files |= {
            "nats_tls_cert_file": str(hub.certs / f"client-{cert}.pem"),
            "nats_tls_key_file": str(hub.certs / f"client-{cert}-key.pem"),
        }
    return load_settings(environ={}, nats_url=url, prefix="hive", connect_timeout_s=5, **{**files, **values})


def test_a_plaintext_client_is_refused(hub: tuple[Hub, NatsServer]) -> None:
    rendered, server = hub
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        info = sock.recv(4096)
        assert info.startswith(b"INFO ") and b'"tls_required":true' in info
        password = rendered.password("gateway")
        sock.sendall(
            b'CONNECT {"user":"gateway","pass":"%s","verbose":false}\r\nPING\r\n' % password.encode()
        )
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert b"PONG" not in answer  # never served in plain text, with the right password too


@contextmanager
def fake_server(info: dict[str, Any]) -> Iterator[tuple[int, list[bytes]]]:
    """A loopback listener that greets each client with ``info`` as a NATS server would, answers
    nothing more, and keeps all that each client sent (until it closed, or went quiet for a second)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    received: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1)
                conn.sendall(b"INFO %s\r\n" % json.dumps(info).encode())
                sent = b""
                try:
                    while chunk := conn.recv(4096):
                        sent += chunk
                except OSError:  # a timeout or a reset: what came is all there is
                    pass
                received.append(sent)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], received
    finally:
        stop.set()
        thread.join(5)
        listener.close()


_PLAIN_INFO = {"server_id": "FAKE", "version": "2.10.0", "proto": 1, "max_payload": 1048576,
               "auth_required": True, "tls_required": False}  # fmt: skip


def _password_login(tmp_path: Path) -> tuple[str, dict[str, str]]:
    secret = "pw-" + os.urandom(8).hex()
    (tmp_path / "pw").write_text(secret + "\n")
    env = {"HIVE_NATS_PASSWORD_FILE": str(tmp_path / "pw"), "HIVE_CONNECT_TIMEOUT_S": "3"}
    return secret, {"HIVE_NATS_USER": "bob", **env}


@pytest.mark.parametrize("scheme", ["tls", "nats"])
def test_a_tls_url_never_sends_the_login_to_a_server_that_offers_no_tls(scheme: str, tmp_path: Path) -> None:
    # a server, or anyone in the way, that says tls_required false: nats-py would carry on in plain text
    secret, env = _password_login(tmp_path)
    with fake_server(_PLAIN_INFO) as (port, received):
        done = hive_cli(["stats", "--nats", f"{scheme}://127.0.0.1:{port}"], env=env)
    sent = b"".join(received)
    assert done.returncode == 1
    if scheme == "nats":  # the fake would see a plain-text login: what it keeps is what went out
        assert secret.encode() in sent
        return
    assert received and secret.encode() not in sent and b"CONNECT" not in sent
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1 and "offers no TLS" in errors[0] and "Traceback" not in done.stderr, done.stderr


def test_a_tls_url_to_a_server_that_allows_both_starts_tls_before_the_login(tmp_path: Path) -> None:
    # allow_non_tls: the server says tls_required false, tls_available true, and takes TLS if the
    # client starts it; nats-py would log in in plain text
    secret, env = _password_login(tmp_path)
    with fake_server({**_PLAIN_INFO, "tls_available": True}) as (port, received):
        done = hive_cli(["stats", "--nats", f"tls://127.0.0.1:{port}"], env=env)
    assert done.returncode == 1
    assert received and all(sent.startswith(b"\x16\x03") for sent in received)  # a TLS ClientHello
    assert secret.encode() not in b"".join(received)


async def test_a_tls_url_takes_a_server_that_allows_both_to_tls(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", servers=["127.0.0.1"], clients=[])
    http_port = free_port()
    conf = tmp_path / "both.conf"
    conf.write_text(
        f'http: "127.0.0.1:{http_port}"\nallow_non_tls: true\n'
        f'tls {{ cert_file: "{certs}/server.pem", key_file: "{certs}/server-key.pem" }}\n'
    )
    server = NatsServer(tmp_path / "store", config=conf)
    server.start()
    try:
        settings = load_settings(
            environ={}, nats_url=f"tls://127.0.0.1:{server.port}", nats_tls_ca_file=str(certs / "ca.pem")
        )
        nc = await connect_nats(settings, name="both")
        try:
            async with httpx.AsyncClient(timeout=5) as http:
                connz = (await http.get(f"http://127.0.0.1:{http_port}/connz")).json()
        finally:
            await nc.close()
    finally:
        server.stop()
    versions = [c.get("tls_version") for c in connz["connections"] if c.get("name") == "both"]
    assert len(versions) == 1 and versions[0], connz  # a TLS connection, not a plain-text one


async def test_a_nats_url_logs_in_to_a_plain_server_with_a_password(tmp_path: Path) -> None:
    secret = "pw-" + os.urandom(8).hex()
    conf = tmp_path / "plain.conf"
    conf.write_text(f'authorization {{ user: bob, password: "{secret}" }}\n')
    server = NatsServer(tmp_path / "store", config=conf)
    server.start()
    try:
        settings = load_settings(environ={}, nats_url=server.url, nats_user="bob", nats_password=secret)
        nc = await connect_nats(settings, name="test")
        assert nc.is_connected
        await nc.close()
    finally:
        server.stop()


async def test_a_client_without_the_ca_is_told_to_set_it(hub: tuple[Hub, NatsServer]) -> None:
    rendered, server = hub
    settings = load_settings(
        environ={}, nats_url=server.url, nats_user="gateway", nats_password=rendered.password("gateway")
    )
    with pytest.raises(BusRefused, match=r"certificate was not trusted .*HIVE_NATS_TLS_CA_FILE"):
        await connect_nats(settings, name="test")


async def test_a_client_without_a_certificate_is_told_to_give_one(hub: tuple[Hub, NatsServer]) -> None:
    rendered, server = hub
    settings = settings_for(
        rendered, server.url, None, nats_user="gateway", nats_password=rendered.password("gateway")
    )
    # the server's alert says so; when the server closes first and the alert is lost, the hint does
    with pytest.raises(BusUnavailable, match=r"client certificate.*set HIVE_NATS_TLS_CERT_FILE"):
        await connect_nats(settings, name="test")


@pytest.mark.parametrize(
    "met", ["nats: connection lost", "[Errno 32] Broken pipe", "[Errno 104] Connection reset by peer"]
)
def test_however_the_client_meets_the_servers_close_the_hint_names_the_certificate(met: str) -> None:
    # the server closes a connection without a client certificate; the client meets that as whichever
    # of these its next read or write gets (CI saw the broken pipe, and the hint was missing)
    settings = load_settings(environ={}, nats_url="tls://127.0.0.1:4222")
    assert "set HIVE_NATS_TLS_CERT_FILE" in closed_hint(settings, met)
    assert closed_hint(load_settings(environ={}, nats_url="nats://127.0.0.1:4222"), met) == ""


async def test_a_certificate_from_another_ca_is_refused(hub: tuple[Hub, NatsServer], tmp_path: Path) -> None:
    rendered, server = hub
    other = make_certs(tmp_path / "other", servers=["127.0.0.1"], clients=["gateway"])
    settings = settings_for(
        rendered, server.url, None, nats_user="gateway", nats_password=rendered.password("gateway"),
        nats_tls_cert_file=str(other / "client-gateway.pem"), nats_tls_key_file=str(other / "client-gateway-key.pem"),
    )  # fmt: skip
    with pytest.raises(BusUnavailable, match="TLS"):
        await connect_nats(settings, name="test")


def test_a_wrong_password_is_one_line_without_the_password(hub: tuple[Hub, NatsServer]) -> None:
    rendered, server = hub
    wrong = "not-the-password-" + os.urandom(6).hex()
    c = rendered.certs
    done = hive_cli(
        ["workers", "--nats", server.url, "--nats-user", "gateway", "--nats-tls-ca", str(c / "ca.pem"),
         "--nats-tls-cert", str(c / "client-gateway.pem"), "--nats-tls-key", str(c / "client-gateway-key.pem")],
        env={"HIVE_NATS_PASSWORD": wrong, "HIVE_LOG_LEVEL": "DEBUG"},
    )  # fmt: skip
    assert done.returncode == 1
    assert "authorization violation" in done.stderr and "HIVE_NATS_PASSWORD" in done.stderr
    assert "Traceback" not in done.stderr
    assert wrong not in done.stderr + done.stdout  # nor in any log line, at DEBUG


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_refused_login_over_tls_is_the_one_error_line(hub: tuple[Hub, NatsServer], loop: str) -> None:
    """The server closing the TLS connection made asyncio (and uvloop) log 'WARNING asyncio: returning
    true from eof_received() has no effect when using ssl' before the command's one line."""
    rendered, server = hub
    c = rendered.certs
    done = hive_cli(
        ["--loop", loop, "workers", "--nats", server.url, "--nats-user", "gateway",
         "--nats-tls-ca", str(c / "ca.pem"), "--nats-tls-cert", str(c / "client-gateway.pem"),
         "--nats-tls-key", str(c / "client-gateway-key.pem")],
        env={"HIVE_NATS_PASSWORD": "not-the-password-" + os.urandom(6).hex()},
    )  # fmt: skip
    assert done.returncode == 1
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("Error: "), done.stderr
    assert "the server refused the login" in errors[0]


async def test_the_gateway_login_opens_the_bus_and_queues_tasks(
    hub: tuple[Hub, NatsServer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rendered, server = hub
    caplog.set_level(logging.DEBUG)
    secret_file = rendered.dir / "passwords" / "gateway"
    settings = settings_for(rendered, f"tls://127.0.0.1:{server.port}", "gateway", nats_user="gateway",
                            nats_password_file=str(secret_file))  # fmt: skip
    async with open_bus(settings, name="gateway") as bus:
        task_id = await Hive(bus).submit("echo", "hola")
        assert (await Hive(bus).get(task_id)).status == "queued"
    assert rendered.password("gateway") not in caplog.text + repr(settings)


async def test_the_gateway_login_runs_a_batch_from_the_moment_it_is_created(
    hub: tuple[Hub, NatsServer], nkey_seed: tuple[Path, str]
) -> None:
    """The gateway keeps each batch in the bucket hive_batches, and starts running a bus's first batch when
    JetStream's advisory says that bucket was made: both under the shipped gateway rights (without them
    the batch was a 503, and the advisory's refusal left it to a look every 30 s)."""
    rendered, server = hub
    gateway = settings_for(
        rendered, server.url, "gateway", nats_user="gateway", nats_password=rendered.password("gateway")
    )
    worker = settings_for(
        rendered, server.url, "laptop", nats_nkey_seed_file=str(nkey_seed[0]), worker_name="laptop"
    )
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "echo", "messages": [{"role": "user", "content": f"hola {i}"}]}}
        for i in range(3)
    ]  # fmt: skip
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    async with open_bus(gateway, name="gateway") as gbus, anyio.create_task_group() as tg:
        first = await Hive(gbus).submit("echo", "the provider has work: its consumers are made")
        gw = Gateway(Hive(gbus), GatewayOptions(port=0))
        await tg.start(gw.serve)
        async with (
            open_bus(worker, name="worker") as wbus,
            running_worker(wbus, "echo", EchoProvider()),
            openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0) as client,
        ):
            assert (await Hive(gbus).wait(first, 30)).status == "completed"  # the worker serves
            uploaded = await client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
            batch = await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )

            async def completed() -> str | None:
                done = await client.batches.retrieve(batch.id)
                return done.output_file_id if done.status == "completed" else None

            output = await eventually(completed, 15, "the batch to complete (well before a look every 30 s)")
            out = (await client.files.content(output)).read().splitlines()
        gw.stop()
    assert [json.loads(x)["custom_id"] for x in out] == ["c0", "c1", "c2"]


async def test_an_nkey_worker_opens_the_bus_under_its_name(
    hub: tuple[Hub, NatsServer], nkey_seed: tuple[Path, str]
) -> None:
    rendered, server = hub
    gateway = settings_for(
        rendered, server.url, "gateway", nats_user="gateway", nats_password=rendered.password("gateway")
    )
    async with open_bus(gateway):  # the gateway declares the bus objects
        pass
    worker = settings_for(
        rendered, server.url, "laptop", nats_nkey_seed_file=str(nkey_seed[0]), worker_name="laptop"
    )
    async with open_bus(worker, name="worker") as bus:  # checks every stream and bucket, from its own inbox
        assert bus.nc.is_connected
    nameless = settings_for(
        rendered, server.url, "laptop", nats_nkey_seed_file=str(nkey_seed[0]), request_timeout_s=0.5
    )
    with pytest.raises(BusRefused, match="HIVE_WORKER_NAME"):  # the key is right, the inbox is not its own
        async with open_bus(nameless):
            pass


@pytest.mark.parametrize(
    ("values", "named"),
    [
        (
            {"nats_tls_ca_file": "/nonexistent/ca.pem"},
            "HIVE_NATS_TLS_CA_FILE /nonexistent/ca.pem: cannot read",
        ),
        ({"nats_user": "w", "nats_password_file": "/nonexistent/pw"}, "HIVE_NATS_PASSWORD_FILE"),
        ({"nats_nkey_seed_file": "/nonexistent/seed"}, "HIVE_NATS_NKEY_SEED_FILE"),
    ],
)
async def test_a_missing_file_is_named_before_any_connection(values: dict[str, str], named: str) -> None:
    settings = load_settings(environ={}, nats_url="tls://127.0.0.1:1", **values)
    with pytest.raises(SettingsError, match=named):
        await connect_nats(settings, name="test")


def test_a_ca_file_that_is_not_a_certificate_is_named(tmp_path: Path) -> None:
    from hive_bus._credentials import tls_context

    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(SettingsError, match=r"HIVE_NATS_TLS_CA_FILE .*not a PEM certificate"):
        tls_context(load_settings(environ={}, nats_tls_ca_file=str(bad)))


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"HIVE_NATS_PASSWORD": "pw"}, "HIVE_NATS_USER is not"),
        (
            {"HIVE_NATS_USER": "u", "HIVE_NATS_CREDS_FILE": "x.creds"},
            "HIVE_NATS_USER and HIVE_NATS_CREDS_FILE",
        ),
        ({"HIVE_NATS_TLS_CERT_FILE": "c.pem"}, "HIVE_NATS_TLS_KEY_FILE go together"),
        ({"HIVE_WORKER_NAME": "pi.kitchen"}, "HIVE_WORKER_NAME"),
        ({"HIVE_REPLICAS": "2.5"}, "HIVE_REPLICAS"),
    ],
)
def test_settings_that_cannot_work_are_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named) as refused:
        load_settings(env)
    assert "pw" not in str(refused.value).replace("password", "")


async def test_the_worker_runtime_serves_under_its_least_privilege_credential(
    hub: tuple[Hub, NatsServer], nkey_seed: tuple[Path, str]
) -> None:
    """A real worker under the shipped worker rights: it waits for its consumers (the gateway's router
    makes them once its heartbeat shows), then pulls each priority, spends its budget, completes tasks
    and dead-letters a failure, and the server refuses it nothing but the consumer it may not create."""
    rendered, server = hub
    gateway = settings_for(
        rendered, server.url, "gateway", nats_user="gateway", nats_password=rendered.password("gateway")
    )
    worker = settings_for(
        rendered, server.url, "laptop", nats_nkey_seed_file=str(nkey_seed[0]), worker_name="laptop",
        heartbeat_interval_s=0.5, heartbeat_ttl_s=2.0,
    )  # fmt: skip

    async def picky(task: Task) -> str:
        if task.prompt == "no":
            raise FailNow("refused on purpose")
        return task.prompt.upper()

    before = server.log_path.read_text() if server.log_path.exists() else ""
    async with open_bus(gateway, name="gateway") as gbus, anyio.create_task_group() as tg:
        await tg.start(Router(gbus).run)
        hive = Hive(gbus)
        ids = [
            await hive.submit("echo", p, priority=q)
            for p, q in (("a", "high"), ("b", "normal"), ("c", "low"))
        ]
        failing = await hive.submit("echo", "no")
        async with open_bus(worker, name="worker") as wbus:
            budget = load_budgets(None, "echo = { rpm = 100 }")["echo"]
            async with running_worker(wbus, "echo", FunctionProvider(picky), budget=budget):
                views = [await hive.wait(t, 30) for t in ids]
                failed = await hive.wait(failing, 30)
        tg.cancel_scope.cancel()
    assert [(v.status, v.output) for v in views] == [
        ("completed", "A"),
        ("completed", "B"),
        ("completed", "C"),
    ]
    assert failed.status == "failed"
    assert (await _dead_letter_of(gateway, failing)).failed.error == "refused on purpose"
    log = server.log_path.read_text()[len(before) :]
    refused = [line for line in log.splitlines() if "Permissions Violation" in line]
    assert all("CONSUMER.CREATE" in line for line in refused), refused


async def test_a_worker_started_before_its_providers_first_task_serves_it(tmp_path: Path) -> None:
    """A worker that may not create its consumers keeps its heartbeat up while it waits for them: the
    gateway's router makes them once the provider has work and a heartbeat shows, however long after
    the worker's start that work comes (its one heartbeat had expired, and it waited for ever)."""
    certs = make_certs(tmp_path / "certs", servers=["127.0.0.1"], clients=["gateway", "early"])
    rendered = render(tmp_path / "nats", certs, [WorkerUser("early", ("echo",))])
    with hub_server(rendered, tmp_path / "store") as server:
        gateway = settings_for(
            rendered, server.url, "gateway", nats_user="gateway", nats_password=rendered.password("gateway"),
            heartbeat_interval_s=0.5, heartbeat_ttl_s=1.0,  # the bucket's TTL
        )  # fmt: skip
        worker_settings = settings_for(
            rendered, server.url, "early", nats_user="early", nats_password=rendered.password("early"),
            worker_name="early", heartbeat_interval_s=0.5, heartbeat_ttl_s=1.0, request_timeout_s=0.5,
        )  # fmt: skip
        async with open_bus(gateway, name="gateway") as gbus, anyio.create_task_group() as tg:
            await tg.start(Router(gbus).run)
            async with open_bus(worker_settings, name="worker") as wbus:
                worker = Worker(wbus, EchoProvider(), WorkerOptions(provider="echo", fetch_wait_s=0.5))
                tg.start_soon(worker.run)
                await anyio.sleep(3)  # three heartbeat lifetimes with no work for echo
                task_id = await Hive(gbus).submit("echo", "hola")
                view = await Hive(gbus).wait(task_id, 20)
                worker.stop()
            tg.cancel_scope.cancel()
    assert (view.status, view.output) == ("completed", "hola")


async def _dead_letter_of(settings: Settings, task_id: str) -> DeadLetter:
    async with open_bus(settings, name="gateway") as bus:
        return await Hive(bus).dead_letter(task_id)
