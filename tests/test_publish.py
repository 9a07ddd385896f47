"""The submission publisher (hive_bus._publish): a call's messages go out in one write, and each gets
its own answer, in order, within one deadline, whatever happens to the others."""

from __future__ import annotations

import time

import anyio
import pytest
from nats.aio.msg import Msg

from hive_bus import BusUnavailable, Hive, TaskRequest
from hive_bus._messages import Task
from hive_bus._publish import JetStreamPublisher, NoStream, PubAck, PublishRefused, stored
from hive_bus.bus import Bus

pytestmark = pytest.mark.anyio


async def test_each_message_gets_its_own_answer_in_order(bus: Bus) -> None:
    names = bus.names
    silent = f"{names.prefix}.silent"  # no stream takes it, but something listens: no answer ever comes
    await bus.nc.subscribe(silent, cb=ignore)
    publisher = JetStreamPublisher(bus.nc, timeout_s=0.5)
    await publisher.start()
    task = names.task_subject("echo", "normal", "poison")
    started = time.monotonic()
    outcomes = await publisher.publish(
        [
            (task, b"one", None, names.tasks_stream),
            (silent, b"two", None, names.tasks_stream),
            (f"{names.prefix}.nowhere", b"three", None, names.tasks_stream),  # nobody listens
            (task, b"four", None, names.events_stream_of("echo")),  # a stream that does not take the subject
            (task, b"five", "m5", names.tasks_stream),
            (task, b"five again", "m5", names.tasks_stream),
        ]
    )
    waited_s = time.monotonic() - started
    await publisher.stop()
    first, no_answer, nowhere, refused, fifth, again = outcomes
    assert isinstance(first, PubAck) and first.stream == names.tasks_stream and not first.duplicate
    assert no_answer is None and 0.4 < waited_s < 2.0  # one deadline for the call
    assert isinstance(nowhere, NoStream)
    assert isinstance(refused, PublishRefused) and refused.code == 400
    assert isinstance(fifth, PubAck) and isinstance(again, PubAck)
    assert (fifth.duplicate, again.duplicate, again.seq) == (False, True, fifth.seq)
    assert first.seq < fifth.seq  # stored in the order written
    with pytest.raises(
        BusUnavailable, match=r"no acknowledgement from \w+ within 0\.5s: it may be stored all the same"
    ):
        stored(no_answer, names.tasks_stream, 0.5)
    with pytest.raises(BusUnavailable, match="no stream answered"):
        stored(nowhere, names.tasks_stream, 0.5)


async def test_a_task_message_sent_again_is_stored_once(bus: Bus, hive: Hive) -> None:
    """A task without a key carries no de-duplication id (the server would keep it in memory for the
    duplicate window, and again for its ``queued`` marker): it goes as the first message on its subject,
    so the same message sent again, as after a lost ack, is answered as stored, where the first is."""
    names = bus.names
    task = Task.from_request(TaskRequest(provider="echo", prompt="once", priority="high"))
    message = hive._check_messages(task, None)
    await hive._ensure_streams(task.provider)  # as a submission does first: its marker's stream
    [first] = await hive._publish_tasks([task], [None], [message])
    [again] = await hive._publish_tasks([task], [None], [message])
    assert isinstance(first, PubAck) and not first.duplicate
    assert again == PubAck(stream=names.tasks_stream, seq=first.seq, duplicate=True)
    subject = names.task_subject("echo", "high", task.id)
    stored_task = await bus.js.get_last_msg(names.tasks_stream, subject)
    assert stored_task.seq == first.seq and "Nats-Msg-Id" not in (stored_task.headers or {})
    queued = names.event_subject("echo", task.id, "queued")
    marker = await bus.js.get_last_msg(names.events_stream_of("echo"), queued)
    assert "Nats-Msg-Id" not in (marker.headers or {})
    with pytest.raises(BusUnavailable, match="wrong last sequence: x"):  # any other refusal is one
        stored(PublishRefused(400, 10071, "wrong last sequence: x"), names.tasks_stream, 5)


async def test_a_call_given_up_leaves_nothing_waiting(bus: Bus) -> None:
    silent = f"{bus.names.prefix}.silent"
    await bus.nc.subscribe(silent, cb=ignore)
    publisher = JetStreamPublisher(bus.nc, timeout_s=30)
    await publisher.start()
    with anyio.move_on_after(0.2) as scope:
        await publisher.publish([(silent, b"x", None, bus.names.tasks_stream)] * 3)
    assert scope.cancelled_caught
    assert publisher._waiting == {}  # no reply token kept for an answer nobody waits for
    await publisher.stop()


async def test_messages_asked_for_one_by_one_at_once_each_get_their_own_answer(bus: Bus) -> None:
    """``publish_together`` (a worker's lanes recording their tasks' events): the calls made in one pass of
    the event loop go out together, and each caller gets its own message's answer; one too large for the
    server fails alone, and one given up on is no one's loss."""
    names = bus.names
    publisher = JetStreamPublisher(bus.nc, timeout_s=5)
    await publisher.start()
    subject = names.task_subject("echo", "normal", "together")
    outcomes: dict[int, object] = {}

    async def one(i: int, data: bytes) -> None:
        try:
            (outcomes[i],) = await publisher.publish_together([(subject, data, f"t{i}", names.tasks_stream)])
        except Exception as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(one, i, b"x" * (bus.nc.max_payload + 1 if i == 7 else 10))
        with anyio.CancelScope() as given_up:
            given_up.cancel()
            await publisher.publish_together([(subject, b"given up", "t-up", names.tasks_stream)])
    await publisher.stop()
    assert type(outcomes.pop(7)).__name__ == "MaxPayloadError"
    assert all(isinstance(o, PubAck) and not o.duplicate for o in outcomes.values()), outcomes
    seqs = {o.seq for o in outcomes.values() if isinstance(o, PubAck)}
    assert len(seqs) == 19  # each its own message
    for i, ack in outcomes.items():
        assert isinstance(ack, PubAck)
        stored_msg = await bus.js.get_msg(names.tasks_stream, seq=ack.seq)
        assert stored_msg.headers is not None and stored_msg.headers["Nats-Msg-Id"] == f"t{i}"


async def test_a_task_with_no_stream_to_take_it_is_not_accepted(bus: Bus, hive: Hive) -> None:
    await bus.js.delete_stream(bus.names.tasks_stream)  # an operator removed it
    with pytest.raises(BusUnavailable, match=f"{bus.names.tasks_stream}: no stream answered"):
        await hive.submit("echo", "nowhere to go")


async def ignore(msg: Msg) -> None:
    pass
