"""The private parts of nats-py that hive-bus relies on are all still there, and only ``hive_bus._nats``
reaches them.

A nats-py upgrade that renames or drops one fails here, naming it, instead of failing a publish, a
heartbeat read or the gateway's metrics at run time."""

from __future__ import annotations

import random
import re
from importlib.metadata import distribution
from pathlib import Path

import anyio
import pytest
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, PubAck
from packaging.requirements import Requirement
from packaging.version import Version

from hive_bus._bus import Bus, ensure_events, kv_entries
from hive_bus._nats import (
    NATS_HEADER_PARSER,
    PRIVATE_ATTRIBUTES,
    PullInbox,
    delivery_count,
    follow,
    kv_direct,
    kv_parts,
    num_pending,
    parse_header_lines,
    pull_subject,
    raw_writer,
    stream_seq,
    unsubscribe,
)

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.anyio

_CHECKED = [(owner, name) for owner, names in PRIVATE_ATTRIBUTES.items() for name in names]


def _real_object(bus: Bus, owner: str) -> object:
    """The object a name is read from in use: a connected client, a bucket of the bus, the class."""
    return {
        "nats.aio.client.Client": bus.nc,
        "nats.js.kv.KeyValue": bus.workers_kv,
        "nats.js.client.JetStreamContext": kv_parts(bus.workers_kv)[0],
        "nats.aio.msg.Msg.Metadata": Msg.Metadata,
    }[owner]


async def _stored_and_followed(
    bus: Bus, task_id: str, data: bytes, headers: dict[str, str] | None = None
) -> tuple[PubAck, Msg]:
    """An echo event stored, and read back through an ordered consumer of echo's events stream."""
    await ensure_events(bus, "echo")
    ack = await bus.js.publish(bus.names.event_subject("echo", task_id, "queued"), data, headers=headers)
    stream = bus.names.events_stream_of("echo")
    sub = await follow(bus.js, bus.names.events_under("echo"), stream=stream, config=ConsumerConfig())
    try:
        with anyio.fail_after(5):
            msg = await sub.next_msg(timeout=5)
    finally:
        await unsubscribe(sub)
    return ack, msg


@pytest.mark.parametrize(("owner", "name"), _CHECKED, ids=[f"{o}.{n}" for o, n in _CHECKED])
async def test_each_private_attribute_of_nats_py_is_there(bus: Bus, owner: str, name: str) -> None:
    if owner.endswith(("PushSubscription", ".Subscription", "._JSI")):
        # a subscription's: read off one that follows a stream
        await ensure_events(bus, "echo")
        sub = await follow(
            bus.js, bus.names.events_under("echo"), stream=bus.names.events_stream_of("echo"),
            config=ConsumerConfig(),
        )  # fmt: skip
        await unsubscribe(sub)
        found: object = {
            "nats.js.client.JetStreamContext.PushSubscription": sub,
            "nats.aio.subscription.Subscription": sub._sub,
            "nats.js.client.JetStreamContext._JSI": sub._sub._jsi,
        }[owner]
    else:
        found = _real_object(bus, owner)
    assert hasattr(found, name), (
        f"nats-py {distribution('nats-py').version} has no {owner}.{name}, which hive_bus/_nats.py uses: "
        "adapt the seam to this version before widening the pin in pyproject.toml"
    )


async def test_the_seam_reads_what_nats_py_keeps_private(bus: Bus) -> None:
    """Not only there: each still means what the seam takes it to mean."""
    js, stream, prefix = kv_parts(bus.workers_kv)
    await bus.workers_kv.put("w1", b"beat")
    got = await js.get_last_msg(stream, prefix + "w1")
    assert got.data == b"beat", "KeyValue._js/_stream/_pre no longer name the bucket's stream and subjects"
    direct = kv_direct(bus.workers_kv)
    assert direct is not None and direct[0] is bus.nc, "KeyValue._direct or JetStreamContext._nc is wrong"
    assert direct[1] == f"$JS.API.DIRECT.GET.{stream}", "JetStreamContext._prefix is not the API prefix"
    assert await kv_entries(bus.workers_kv) == {"w1": b"beat"}, "a batched get does not read the bucket"

    assert raw_writer(bus.nc) is not None, "Client._send_command/_flush_pending are gone"
    assert isinstance(bus.nc.stats["out_msgs"], int), "Client.stats['out_msgs'] is gone"

    ack, msg = await _stored_and_followed(bus, "t1", b"{}")
    assert stream_seq(msg.reply) == ack.seq, "Msg.Metadata._get_metadata_fields no longer gives the sequence"
    assert delivery_count(msg) == msg.metadata.num_delivered == 1, "the delivery count is read wrong"
    assert num_pending(msg) == msg.metadata.num_pending, "the pending count is read wrong"


def test_the_delivery_count_and_stream_sequence_are_read_from_either_form_of_ack_subject() -> None:
    """The worker's attempt count, a follower's place and what is left to read: from the reply subject
    as ``Msg.metadata`` reads them, with or without the domain and account hash that newer servers put
    in it."""
    for reply in (
        "$JS.ACK.TASKS.echo.3.100.50.1733520000000000000.7",
        "$JS.ACK.hub.ACCHASH.TASKS.echo.4.100.50.1733520000000000000.7.token",
        "$JS.ACK._.ACCHASH.TASKS.echo.5.100.50.1733520000000000000.7",
    ):
        msg = Msg(None, subject="x", reply=reply)  # type: ignore[arg-type]
        assert delivery_count(msg) == msg.metadata.num_delivered, reply
        assert stream_seq(reply) == msg.metadata.sequence.stream == 100, reply
        assert num_pending(msg) == msg.metadata.num_pending == 7, reply
    assert stream_seq("_INBOX.abc") is None  # not a JetStream message


def test_nats_py_is_pinned_to_the_minor_version_the_seam_was_checked_with() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    line = re.search(r'"(nats-py[^"]*)"', pyproject)
    assert line is not None, "pyproject.toml does not name nats-py"
    spec = Requirement(line.group(1)).specifier
    installed = Version(distribution("nats-py").version)
    assert spec.contains(installed), f"nats-py {installed} is installed but pyproject.toml asks for {spec}"
    next_minor = Version(f"{installed.major}.{installed.minor + 1}")
    assert not spec.contains(next_minor), f"nats-py {next_minor} would be accepted unchecked by {spec}"


def test_no_module_but_the_seam_reaches_into_nats_py() -> None:
    names = sorted({n for ns in PRIVATE_ATTRIBUTES.values() for n in ns if n.startswith("_")})
    alternatives = "|".join(re.escape(n) for n in names)
    # read off an object other than ``self`` (a module's own ``self._stream`` is its own), or by name
    pattern = re.compile(rf"(?<!self)\.(?:{alternatives})\b|[\"'](?:{alternatives})[\"']|\.stats\[")
    found = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for path in sorted((ROOT / "hive_bus").rglob("*.py"))
        if path.name != "_nats.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("#")
    ]
    assert not found, "nats-py's insides used outside hive_bus/_nats.py:\n" + "\n".join(found)


_CRAFTED = [
    b"",
    b"\r\n",
    b"Nats-Msg-Id: 01M96SMRMKQMBC7Z85KW055QS9\r\nNats-Stream: T\r\nNats-Sequence: 1\r\n\r\n",
    b"a:b\r\nA: c \r\na:  d\t\r\n",  # a repeated name: the last one kept; no space after the colon
    b": empty name\r\nno colon here\r\n \t Padded-Name \t: v\r\n",
    b"Bad Name: inner space\r\nBad\tName: inner tab\r\nBad\x1cName: a separator\r\nOk_Name: under\r\n",
    b"\x1cEdge: kept off by its own check\r\nEdge\x0b: v\r\nNon-\xc3\xa9: accent\r\n",
    b"Value: \xc3\xa9t\xc3\xa9 \xff broken\r\nColons: a:b:c\r\nx\ry: bare cr\r\nz\ny: bare lf\r\n",
]


def test_the_header_parser_is_nats_pys_own_replaced_by_one_that_reads_alike() -> None:
    assert NATS_HEADER_PARSER is not None, (
        f"nats-py {distribution('nats-py').version} has no nats.aio.client.Client._parse_header_lines "
        "called by its _process_headers, which hive_bus/_nats.py replaces: adapt the seam to this version"
    )
    own = NATS_HEADER_PARSER
    rng = random.Random(18)
    alphabet = b"ab-Z09: \t\r\n\x0b\x0c\x1c\x1f\xc3\xa9\xff_."
    blocks = [*_CRAFTED]
    for _ in range(5000):
        blocks.append(bytes(rng.choice(alphabet) for _ in range(rng.randrange(40))))
    for block in blocks:
        assert parse_header_lines(block) == own(block), block


async def test_the_headers_of_messages_and_of_statuses_read_as_before(bus: Bus) -> None:
    """Through the real client and server: a message's headers, and a status line with a description."""
    headers = {"Nats-Msg-Id": "h1", "Hive-Note": "d\u00e9j\u00e0 vu", "X": ""}
    ack, msg = await _stored_and_followed(bus, "h1", b"", headers)
    assert stream_seq(msg.reply) == ack.seq and msg.headers is not None
    assert {k: msg.headers[k] for k in headers} == headers

    answers: list[tuple[dict[str, str] | None, str | None]] = []
    got = anyio.Event()

    def on_answer(answer: Msg, status: str | None) -> None:
        answers.append((answer.headers, status))
        got.set()

    info = await bus.js.add_consumer(bus.names.tasks_stream, ConsumerConfig(inactive_threshold=5.0))
    inbox = PullInbox(bus.nc, on_answer)
    await inbox.start()
    try:
        await inbox.send(
            pull_subject(bus.names.tasks_stream, info.name), inbox.next_reply(), batch=1, no_wait=True
        )
        with anyio.fail_after(5):
            await got.wait()
    finally:
        await inbox.stop()
    [(status_headers, status)] = answers
    assert status == "404" and status_headers == {"Status": "404", "Description": "No Messages"}
