"""Case 9: a stateful property test. Hypothesis draws short sequences of submissions over HTTP, worker
processes started and killed, nats-server stopped (gracefully or by SIGKILL) and started again, and
bursts of 429s and 500s from the provider (the groq fake, through the real groq SDK). Whatever the
sequence, at the end every accepted task is completed, failed with a reason, dead-lettered or still
pending; none is lost, none recorded twice; and no submission is accepted while the server is down.

Bounded: a few examples of a few steps, no shrinking (each step costs real processes), a drain of at
most ``DRAIN_S`` per example, a deadline per example, and pytest's timeout over it all.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from hive_bus import Hive
from hive_bus._embedded import NatsServer
from hive_bus.bus import open_bus

from ..conftest import make_settings
from ..fakes import ProviderFakes
from .ledger import Figures, Ledger
from .stack import START_TIMEOUT_S, Child, Processes

pytestmark = pytest.mark.faults

EXAMPLES = 6
STEPS = 10
MAX_WORKERS = 3
DRAIN_S = 45.0
MAX_ATTEMPTS = 3  # keeps a task's backoff after 500s short
PROVIDER_ENV = {"GROQ_API_KEY": "gsk_property_test_key_01"}


def wait_ready(http: httpx.Client, url: str, gateway: Child) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not gateway.alive:
            raise AssertionError(f"the gateway exited:\n{gateway.log_tail()}")
        try:
            if http.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the gateway was not ready within {START_TIMEOUT_S}s")


def machine(
    server: NatsServer, fakes: ProviderFakes, tmp: Path, record: Callable[[Figures], None]
) -> type[RuleBasedStateMachine]:
    examples = itertools.count(1)

    class Bus(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            fakes.groq.reset()
            self.n = next(examples)
            self.settings = make_settings(server.url, ack_wait_s=2.0)
            where = tmp / f"example-{self.n}"
            where.mkdir()
            env = {**PROVIDER_ENV, "GROQ_BASE_URL": fakes.groq_base_url}
            self.procs = Processes(self.settings, where, env=env)
            self.http = httpx.Client(timeout=30)
            self.ledger = Ledger(f"9 property example {self.n}", on_figures=record)
            self.workers: list[Child] = []
            self.server_up = server.running
            self.steps: list[str] = []
            self.gateway = self.procs.gateway()
            try:
                wait_ready(self.http, self.gateway.url, self.gateway)
            except BaseException:
                self._close()
                raise

        def alive(self) -> list[Child]:
            return [w for w in self.workers if w.alive]

        @initialize()
        def begin(self) -> None:
            """Every example starts with a worker and work for it; the rules then add more, and faults."""
            self.steps.append("start worker, submit 4")
            self.workers.append(self.procs.worker("groq", concurrency=2))
            self._submit(4)

        @rule(n=st.integers(1, 4))
        def submit(self, n: int) -> None:
            self.steps.append(f"submit {n}")
            self._submit(n)

        def _submit(self, n: int) -> None:
            for _ in range(n):
                prompt = f"example {self.n} task {sum(self.ledger.answers.values())}"
                body = {"provider": "groq", "prompt": prompt, "max_attempts": MAX_ATTEMPTS}
                try:
                    r = self.http.post(f"{self.gateway.url}/v1/tasks", json=body)
                except httpx.TransportError:
                    self.ledger.transport_errors += 1
                    continue
                self.ledger.answer(r.status_code, r.json(), prompt)
                if not self.server_up:
                    assert r.status_code == 503, f"answered {r.status_code} while nats-server was down"

        @precondition(lambda self: self.server_up and len(self.alive()) < MAX_WORKERS)
        @rule()
        def start_worker(self) -> None:
            self.steps.append("start worker")
            self.workers.append(self.procs.worker("groq", concurrency=2))

        @precondition(lambda self: bool(self.alive()))
        @rule(which=st.integers(0, MAX_WORKERS - 1))
        def kill_worker(self, which: int) -> None:
            self.steps.append("kill worker")
            victim = self.alive()[which % len(self.alive())]
            victim.signal(signal.SIGKILL)
            victim.proc.wait(10)

        @precondition(lambda self: self.server_up)
        @rule(hard=st.booleans())
        def stop_server(self, hard: bool) -> None:
            self.steps.append("kill nats" if hard else "stop nats")
            server.kill() if hard else server.stop()
            self.server_up = False

        @precondition(lambda self: not self.server_up)
        @rule()
        def start_server(self) -> None:
            self.steps.append("start nats")
            server.start()  # same port, same store
            self.server_up = True

        @rule(status=st.sampled_from([429, 500]), count=st.integers(1, 4))
        def provider_burst(self, status: int, count: int) -> None:
            self.steps.append(f"{count}x{status}")
            fakes.groq.fail_next(status, count, retry_after_s=0.5)

        def teardown(self) -> None:
            try:
                if not self.server_up:
                    server.start()
                    self.server_up = True
                if not self.alive():
                    self.workers.append(self.procs.worker("groq", concurrency=2))
                anyio.run(self._settle, backend="asyncio")
            finally:
                self._close()

        async def _settle(self) -> None:
            async with open_bus(self.settings) as bus:
                left = await self.ledger.wait_final(Hive(bus), DRAIN_S)
                notes = (
                    f"steps: {', '.join(self.steps)}; {fakes.groq.requests} provider calls; {left} not final"
                )
                figures, fates = await self.ledger.check(bus, notes=notes, allow_pending=True)
            assert (
                figures.completed + figures.failed + figures.dead_lettered + figures.pending
                == figures.accepted
            )
            reasons = {r for f in fates.values() if f.kind == "failed" for r in f.reasons}
            assert reasons <= {"out_of_attempts", "permanent"}, reasons  # failed, with a reason

        def _close(self) -> None:
            self.http.close()
            self.procs.close()

    return Bus


@pytest.mark.timeout(420)
def test_random_faults_never_lose_or_duplicate_an_accepted_task(
    tmp_path: Path, fakes: ProviderFakes, request: pytest.FixtureRequest
) -> None:
    server = NatsServer(tmp_path / "store")
    server.start()

    def record(figures: Figures) -> None:
        request.node.user_properties.append(("ledger", figures.line()))

    try:
        run_state_machine_as_test(
            machine(server, fakes, tmp_path, record),
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=timedelta(seconds=150),
                database=None,
                phases=(Phase.explicit, Phase.reuse, Phase.generate),  # no shrinking: steps are costly
                suppress_health_check=list(HealthCheck),
                print_blob=True,
            ),
        )
    finally:
        server.stop()
