"""Property-based fuzzing of the gateway from its own OpenAPI document (Schemathesis): whatever a
client sends, no answer is a 5xx and every answer matches the schema it is documented with."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import anyio.from_thread
import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from hive_bus import Hive, Settings
from hive_bus._embedded import NatsServer
from hive_bus.bus import open_bus
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.workers.echo import EchoProvider

from .conftest import make_settings
from .helpers import running_worker


@asynccontextmanager
async def gateway_running(settings: Settings) -> AsyncIterator[str]:
    async with open_bus(settings) as bus, running_worker(bus, "echo", EchoProvider()):
        # feeds of every event end after a moment, as they would after an hour, so each example ends
        options = GatewayOptions(port=0, max_body_bytes=16 * 1024, feed_max_s=0.2)
        gateway = Gateway(Hive(bus), options)
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            yield gateway.url
            gateway.stop()


@pytest.fixture(scope="module")
def gateway_schema(nats_server: NatsServer) -> Iterator[schemathesis.BaseSchema]:
    # Schemathesis calls synchronously: the gateway runs on an event loop of its own, in a thread.
    settings = make_settings(nats_server.url)
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(gateway_running(settings)) as url,
    ):
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


def test_no_request_gets_a_5xx_or_an_undocumented_answer(gateway_schema: schemathesis.BaseSchema) -> None:
    operations = [result.ok() for result in gateway_schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 8  # every documented route is fuzzed
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=30, deadline=None, database=None, suppress_health_check=list(hypothesis.HealthCheck)
        )
        def fuzz(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
            case.call_and_validate(checks=CHECKS)

        fuzz()
