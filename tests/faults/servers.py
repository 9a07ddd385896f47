"""nats-servers for the fault cases: one per test (they are killed, restarted and damaged), optionally
with the Raspberry Pi hub's config."""

from __future__ import annotations

import re
from pathlib import Path

import anyio

from hive_bus._embedded import NatsServer
from hive_bus.bus import Bus

from ..helpers import REPO, eventually


def pi_config(tmp_path: Path) -> Path:
    """``nats/hub.conf`` (the Raspberry Pi hub's config) fit for a test: its JetStream settings, sync
    included, as they are; where to listen and store is left to the command line (a free loopback port
    and a temporary store), no monitoring port, and neither TLS nor accounts (the included files; their
    own tests are tests/test_hub_*.py): these cases are about what the store keeps."""
    text = (REPO / "nats" / "hub.conf").read_text()
    kept = [
        ln for ln in text.splitlines() if not re.match(r"\s*(listen|http|store_dir)\s*:|\s*include\s", ln)
    ]
    path = tmp_path / "hub-test.conf"
    path.write_text("\n".join(kept) + "\n")
    return path


def hub_syncs_always() -> bool:
    return (
        re.search(r"^\s*sync_interval\s*:\s*always\s*$", (REPO / "nats" / "hub.conf").read_text(), re.M)
        is not None
    )


async def start(server: NatsServer) -> None:
    """Start (or start again, same port and store) without blocking the event loop."""
    await anyio.to_thread.run_sync(server.start)


async def reconnected(bus: Bus, timeout_s: float = 30.0) -> None:
    async def probe() -> bool:
        return bus.nc.is_connected

    await eventually(probe, timeout_s, "the test's client to reconnect")
