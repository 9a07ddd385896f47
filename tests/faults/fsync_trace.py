"""What nats-server does on disk before it acks a publish, seen with ``strace`` attached to its pid.

The trace keeps fsync/fdatasync calls (with ``-y``: the path of the file synced) and the writes to
client sockets, where the publish acks appear as ``{"stream":"NAME","seq":N}`` (with a JetStream domain,
``"domain":"hive"`` between the two). A publish ack of a stream
counts as synced when an fsync of one of that stream's message blocks completed after the previous ack
of the same stream and before this one.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ATTACH_TIMEOUT_S = 20.0
_LINE = re.compile(r"^(?P<pid>\d+)\s+\S+\s+(?P<rest>.*)$")
_PATH = re.compile(r"^\w+\(\d+<(?P<path>[^>]*)>")
# {"stream":"NAME","seq":N}, or with the hub's JetStream domain {"stream":"NAME","domain":"hive","seq":N}
_ACK = re.compile(
    r'\\"stream\\":\\"(?P<stream>[^\\"]+)\\",(?:\\"domain\\":\\"[^\\"]*\\",)?\\"seq\\":(?P<seq>\d+)'
)


class TraceUnavailable(RuntimeError):
    """strace is missing or may not attach here; the message says which."""


def strace_path() -> str | None:
    return shutil.which("strace")


@contextmanager
def traced(pid: int, out: Path) -> Iterator[Path]:
    """strace every thread of ``pid`` while the block runs; the trace is in ``out`` afterwards."""
    exe = strace_path()
    if exe is None:
        raise TraceUnavailable("strace is not installed (tests/setup/tools.sh installs it as root)")
    errors = out.with_suffix(".err")
    calls = "trace=fsync,fdatasync,write,writev,sendmsg,sendto"
    cmd = [exe, "-f", "-y", "-tt", "-s", "512", "-e", calls, "-o", str(out), "-p", str(pid)]
    with open(errors, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        while "attached" not in errors.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise TraceUnavailable(f"strace could not attach to pid {pid}: {errors.read_text().strip()}")
            time.sleep(0.05)
        yield out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # detaches, leaving the server running
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass(frozen=True, slots=True)
class Ack:
    stream: str
    seq: int
    synced: bool  # an fsync of the stream's blocks came between the previous ack and this one


def acks(trace: str) -> list[Ack]:
    """Every publish ack in the trace, in order, with whether an fsync of its stream preceded it."""
    synced: dict[str, bool] = {}
    unfinished: dict[str, str] = {}  # pid -> path of an fsync not yet returned
    found: list[Ack] = []

    def sync_done(path: str) -> None:
        for part in path.split("/streams/")[1:]:
            synced[part.split("/", 1)[0]] = True

    for line in trace.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        pid, rest = m["pid"], m["rest"]
        if rest.startswith("<... f") and " resumed>" in rest:  # an fsync returning
            path = unfinished.pop(pid, None)
            if path is not None and rest.rstrip().endswith("= 0"):
                sync_done(path)
            continue
        call = rest.split("(", 1)[0]
        if call in ("fsync", "fdatasync"):
            pm = _PATH.match(rest)
            path = pm["path"] if pm else ""
            if rest.endswith("<unfinished ...>"):
                unfinished[pid] = path
            elif rest.rstrip().endswith("= 0"):
                sync_done(path)
        elif call in ("write", "writev", "sendmsg", "sendto"):
            for am in _ACK.finditer(rest):
                stream = am["stream"]
                found.append(Ack(stream, int(am["seq"]), synced.get(stream, False)))
                synced[stream] = False
    return found
