"""The gateway's app served by granian (embedded in this process's uvloop loop), for bench/gateway.py.

Run: ``python bench/granian_gateway.py NATS_URL PREFIX PORT``; SIGTERM ends it. It serves exactly the app
that ``hive gateway`` serves (tokens, edge, fast path, metrics, store audit, router), so that the
benchmark compares HTTP servers and nothing else. granian is not a dependency of hive-bus: this runs only
where it is installed (``pip install granian``). It has no counterpart of the gateway's body timeout and
connection cap (see bench/README.md), which is why it is measured and not served.
"""

from __future__ import annotations

import logging
import sys

import anyio
from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings
from granian.log import LogLevels
from granian.server.embed import Server

import hive_bus
from hive_bus._audit import StoreAudit
from hive_bus._router import Router
from hive_bus.services.gateway import GatewayOptions, create_app
from hive_bus.services.metrics import BusMetrics


async def main(nats_url: str, prefix: str, port: int) -> None:
    async with hive_bus.connect(nats_url, prefix=prefix) as hive:
        settings = hive.bus.settings
        metrics, router = BusMetrics(hive.bus), Router(hive.bus)
        audit = StoreAudit(hive.bus, grace_s=settings.audit_grace_s, every_s=settings.audit_every_s)
        app = create_app(hive, GatewayOptions(port=port), metrics, None, audit)
        server = Server(
            app,
            address="127.0.0.1",
            port=port,
            interface=Interfaces.ASGINL,  # the app has no lifespan work
            http=HTTPModes.http1,
            http1_settings=HTTP1Settings(header_read_timeout=10_000),  # the gateway's head timeout
            log_level=LogLevels.warning,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(metrics.run)
            await tg.start(router.run)
            await tg.start(audit.run)
            await server.serve()
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), backend_options={"use_uvloop": True})
