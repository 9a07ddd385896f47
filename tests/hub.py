"""The shipped nats/ configs, run for real on loopback ports: certificates from nats/make-certs.sh,
worker users from nats/worker-user.sh, and only the machine-specific values swapped (paths, ports)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client as NATS

from hive_bus._embedded import NatsServer

from .helpers import REPO

NATS_DIR = REPO / "nats"
WORKERS_MARKER = "# ---- worker users"
# what a Pi's config names, and what a test on loopback puts instead
_MACHINE_VALUES = {
    "/etc/nats/certs/": None,  # the test's certificates directory
    'store_dir: "/var/lib/nats"': "# store_dir: given with -sd",
    "0.0.0.0:4222": "127.0.0.1:-1",
    "127.0.0.1:8222": "127.0.0.1:-1",
}


@dataclass(frozen=True, slots=True)
class WorkerUser:
    name: str
    providers: tuple[str, ...]
    nkey: str | None = None  # public user nkey; else a password from WORKER_<NAME>_PASSWORD


@dataclass(frozen=True, slots=True)
class Hub:
    """A rendered nats/ directory: its configs, certificates and the passwords its users log in with."""

    dir: Path
    certs: Path

    def password(self, user: str) -> str:
        return (self.dir / "passwords" / user).read_text().strip()

    def tls(self, client: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
        if client is not None:
            context.load_cert_chain(
                self.certs / f"client-{client}.pem", self.certs / f"client-{client}-key.pem"
            )
        return context


def make_certs(out: Path, *, servers: Sequence[str], clients: Sequence[str]) -> Path:
    args = ["bash", str(NATS_DIR / "make-certs.sh"), "--out", str(out)]
    for name in servers:
        args += ["--server", name]
    for name in clients:
        args += ["--client", name]
    subprocess.run(args, check=True, capture_output=True, timeout=60)
    return out


def worker_block(user: WorkerUser) -> str:
    args = ["bash", str(NATS_DIR / "worker-user.sh")]
    if user.nkey:
        args += ["--nkey", user.nkey]
    done = subprocess.run(
        [*args, user.name, *user.providers], check=True, capture_output=True, text=True, timeout=30
    )
    return done.stdout


def render(dest: Path, certs: Path, workers: Sequence[WorkerUser] = ()) -> Hub:
    """Copy nats/ to ``dest`` with this machine's paths and free ports, plus ``workers``' user blocks."""
    shutil.copytree(NATS_DIR, dest, ignore=shutil.ignore_patterns("certs"))
    values = {**_MACHINE_VALUES, "/etc/nats/certs/": f"{certs}/"}
    for conf in dest.glob("*.conf"):
        text = conf.read_text()
        for was, now in values.items():
            assert now is not None
            text = text.replace(was, now)
        conf.write_text(text)
    accounts = dest / "accounts.conf"
    text = accounts.read_text()
    assert WORKERS_MARKER in text, "accounts.conf lost the line under which worker users go"
    head, sep, tail = text.partition(WORKERS_MARKER)
    line_end = tail.index("\n") + 1
    blocks = "".join(worker_block(w) for w in workers)
    accounts.write_text(head + sep + tail[:line_end] + blocks + tail[line_end:])
    with_password = [w.name for w in workers if not w.nkey]
    subprocess.run(
        ["bash", str(NATS_DIR / "make-secrets.sh"), "--dir", str(dest), *with_password],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return Hub(dir=dest, certs=certs)


@contextmanager
def hub_server(
    hub: Hub, store: Path, *, config: str = "hub.conf", extra_args: Sequence[str] = ()
) -> Iterator[NatsServer]:
    """A nats-server running ``hub``'s config, stopped on the way out."""
    server = NatsServer(
        store, config=hub.dir / config, extra_args=extra_args, log_path=store.parent / f"{store.name}.log"
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def connect(
    url: str, hub: Hub, user: str, *, cert: str | None, errors: list[str], inbox: str | None = None
) -> NATS:
    """A plain nats-py client logged in as ``user``; server errors (permission violations) go to ``errors``."""

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = NATS()
    await nc.connect(
        url,
        user=user,
        password=hub.password(user),
        tls=hub.tls(cert),
        inbox_prefix=inbox or "_INBOX",
        error_cb=on_error,
        connect_timeout=3,
        max_reconnect_attempts=0,
    )
    return nc
