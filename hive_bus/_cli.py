"""The ``hive`` command. Settings are read here, once, and passed down; errors become one line.

Why one module of about 1,200 lines: it is the ``hive`` click group, one function per sub-command, each
a thin layer (read the options, call the client, print) with its few helpers beside it; read it by the
command's name. The batch and schedule command groups have modules of their own (``_cli_batch``,
``_cli_schedule``).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import logging
import math
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar, get_args

import anyio
import click
import msgspec
from nats.js.api import ConsumerConfig, DeliverPolicy

from . import _redact
from ._budget import BudgetError, load_budgets
from ._bus import Bus, event_providers, open_bus
from ._client import Hive, PartialSubmit, connect, request_of
from ._embedded import EmbeddedServerError, run_nats_server
from ._errors import BusUnavailable, HiveError, TaskEnded, TaskNotFound
from ._events import merged_events
from ._loop import ENV_LOOP, LOOP_CHOICES, LoopChoice, LoopUnavailable, backend_options
from ._messages import (
    WEBHOOK_EVENTS,
    ChatMessage,
    TaskRequest,
    TaskStatus,
    TaskView,
    decode_event,
    encoder,
    explain_error,
    now_ms,
    request_decoder,
)
from ._names import check_provider
from ._prices import PriceFileError, PriceTable
from ._providers import HandlerError, Provider, load_handler
from ._routes import ENV_ROUTES, Routes, RoutesError
from ._settings import ENV_PREFIX, MAX_SECONDS, Settings, SettingsError, load_settings, with_overrides
from ._signals import until_stopped
from ._streamed import StreamEnded, StreamRestarted, StreamText
from ._version import __version__
from ._worker import ProviderKey, Worker, WorkerOptions

log = logging.getLogger("hive_bus.cli")
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_DATA = Path(".hive")


# Errors of the gateway and the adapters, by module: a module never imported raised none of them, and
# importing one just to name its errors would make every command need the gateway's extra.
_LAZY_ERRORS = (
    ("hive_bus.services.auth", "AuthConfigError"),
    ("hive_bus.services.gateway", "GatewayError"),
    ("hive_bus.services.webhooks.config", "WebhookConfigError"),
    ("hive_bus.workers", "ProviderUnavailable"),
)


def _expected_errors() -> tuple[type[BaseException], ...]:
    lazy = [getattr(sys.modules[m], name) for m, name in _LAZY_ERRORS if m in sys.modules]
    return (
        HiveError, SettingsError, EmbeddedServerError, HandlerError, PriceFileError, BudgetError,
        RoutesError, msgspec.ValidationError, *lazy,
    )  # fmt: skip


def _gateway_extra(command: str) -> None:
    """One clear line, not a traceback, when the gateway's libraries are not installed."""
    wanted = ("litestar", "uvicorn", "prometheus_client", "httpx", "standardwebhooks")
    missing = [m for m in wanted if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(
            f"{command} needs the 'gateway' extra ({', '.join(missing)} not installed): "
            "pip install 'hive-bus[gateway]'"
        )


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _run(fn: Callable[[], Awaitable[None]]) -> None:
    """Run ``fn`` on asyncio, on the loop ``hive --loop`` chose (see :mod:`hive_bus._loop`); a known
    error is one clear line on stderr and exit status 1."""
    ctx = click.get_current_context(silent=True)
    choice: LoopChoice = (ctx.find_object(dict) or {}).get("loop", "auto") if ctx else "auto"
    try:
        options = backend_options(choice)
    except LoopUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    log.debug("event loop: %s", "uvloop" if options.get("use_uvloop") else "asyncio")
    try:
        anyio.run(fn, backend="asyncio", backend_options=options)
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseException as exc:
        known = [e for e in _leaves(exc) if isinstance(e, _expected_errors())]
        if known:
            raise click.ClickException(_one_line(known[0])) from None
        raise


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, msgspec.ValidationError):
        return f"invalid task: {explain_error(exc)}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


_FILE = click.Path(dir_okay=False)


class _Seconds(click.FloatRange):
    """A number of seconds: finite (click's FloatRange lets nan through), from 0 (or above 0) to ten
    years, as the settings' durations."""

    def __init__(self, *, zero: bool = True) -> None:
        super().__init__(min=0, max=MAX_SECONDS, min_open=not zero)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if math.isnan(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds


_ROUTES_HELP = (
    "TOML file of model aliases for /v1/chat/completions: candidates, route, retry policy, time budget, "
    "cache [env HIVE_GATEWAY_ROUTES]"
)
# (flag, Settings field, metavar, help): how to log in to a NATS server that wants it
_CREDENTIAL_OPTIONS = (
    ("--nats-user", "nats_user", "USER", "NATS user [env HIVE_NATS_USER]; password in env HIVE_NATS_PASSWORD"),
    ("--nats-password-file", "nats_password_file", "FILE", "the NATS password, on its first line [env HIVE_NATS_PASSWORD_FILE]"),
    ("--nats-nkey-seed", "nats_nkey_seed_file", "FILE", "NATS nkey seed file [env HIVE_NATS_NKEY_SEED_FILE]"),
    ("--nats-creds", "nats_creds_file", "FILE", "NATS creds file (JWT and seed) [env HIVE_NATS_CREDS_FILE]"),
    ("--nats-tls-ca", "nats_tls_ca_file", "FILE", "CA that signed the server's certificate [env HIVE_NATS_TLS_CA_FILE]"),
    ("--nats-tls-cert", "nats_tls_cert_file", "FILE", "client certificate [env HIVE_NATS_TLS_CERT_FILE]"),
    ("--nats-tls-key", "nats_tls_key_file", "FILE", "client certificate's key [env HIVE_NATS_TLS_KEY_FILE]"),
)  # fmt: skip


def bus_options(fn: F) -> F:
    """``--nats``, ``--prefix`` and the NATS credentials, on every command that talks to a bus."""

    @functools.wraps(fn)
    def wrapper(*args: Any, nats_url: str | None, prefix: str | None, **kwargs: Any) -> Any:
        credentials = {field: kwargs.pop(field) for _, field, _, _ in _CREDENTIAL_OPTIONS}
        try:
            settings = load_settings(nats_url=nats_url, prefix=prefix, **credentials)
        except (SettingsError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        return fn(*args, settings=settings, **kwargs)

    for flag, field, metavar, text in reversed(_CREDENTIAL_OPTIONS):
        wrapper = click.option(
            flag, field, metavar=metavar, type=_FILE if metavar == "FILE" else None, help=text
        )(wrapper)
    wrapper = click.option(
        "--prefix", help="bus prefix, to run several buses on one server [env HIVE_PREFIX; hive]"
    )(wrapper)
    wrapper = click.option(
        "--nats",
        "nats_url",
        metavar="URL",
        help="NATS server URL, or URLs separated by commas [env HIVE_NATS_URL; nats://127.0.0.1:4222]",
    )(wrapper)
    return wrapper  # type: ignore[return-value]


async def _until_stopped_or_lost(bus: Bus) -> BusUnavailable | None:
    """Wait for Ctrl-C (or SIGTERM), or for the bus's connection to be gone for good (nats-py does not
    reconnect after the server closed it). Returns that loss, which the caller raises once it has stopped
    what it runs, so that the process ends with status 1 and one line and its supervisor starts it
    again."""
    lost: list[BusUnavailable] = []
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            try:
                await bus.wait_lost()
            except BusUnavailable as exc:
                lost.append(exc)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        await until_stopped()
        tg.cancel_scope.cancel()
    return lost[0] if lost else None


def _provider_for(name: str, handler: str | None, model: str | None) -> Provider | list[ProviderKey]:
    if handler:
        return load_handler(handler)
    from hive_bus.workers import builtin

    return builtin(name, os.environ, model=model)


@click.group()
@click.version_option(__version__, prog_name="hive")
@click.option(
    "--log-level",
    help="DEBUG, INFO, WARNING, ERROR or CRITICAL [env HIVE_LOG_LEVEL; INFO for services, WARNING for one-shot commands]",
)
@click.option(
    "--loop",
    type=click.Choice(LOOP_CHOICES, case_sensitive=False),
    envvar=ENV_LOOP,
    default="auto",
    show_default=True,
    help=f"event loop: auto is uvloop where installed (not Windows), else asyncio's own [env {ENV_LOOP}]",
)
@click.pass_context
def cli(ctx: click.Context, log_level: str | None, loop: str) -> None:
    """hive-bus: farm LLM prompts and Python jobs out to workers anywhere, over NATS JetStream."""
    ctx.ensure_object(dict)["loop"] = loop.lower()
    level = (log_level or os.environ.get("HIVE_LOG_LEVEL") or "").strip().upper()
    if level and level not in logging.getLevelNamesMapping():
        valid = "DEBUG, INFO, WARNING, ERROR or CRITICAL"
        if log_level:
            raise click.BadParameter(f"{log_level!r} is not a level: give {valid}", param_hint="--log-level")
        raise click.ClickException(f"invalid setting HIVE_LOG_LEVEL: {level!r} is not a level: give {valid}")
    # the commands that run until stopped say what they do at INFO; the rest (submit, status, stats...)
    # print their answer, and only warnings besides
    serving = ctx.invoked_subcommand in ("up", "gateway", "worker", "nats", "watch")
    logging.basicConfig(
        level=level or ("INFO" if serving else "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _redact.keep_secrets_out_of_logs()  # even at DEBUG: the SDKs log headers verbatim
    logging.getLogger("asyncio").addFilter(_tls_eof_noise)


def _tls_eof_noise(record: logging.LogRecord) -> bool:
    """False for asyncio's 'returning true from eof_received() has no effect when using ssl': nats-py
    starts TLS on a connection opened in plain text, whose stream protocol then answers the server's close
    as a plain one would, and asyncio (and uvloop) say so each time a server closes a TLS connection (a
    refused login, a restart). It says nothing wrong, and came before the one line of a refused login."""
    return not str(record.msg).startswith("returning true from eof_received() has no effect")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="gateway address")
@click.option("--port", default=8080, show_default=True, help="gateway port (0: any free port)")
@click.option(
    "--nats-port", default=4222, show_default=True, help="embedded nats-server port (0: any free port)"
)
@click.option("--data", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True)
@click.option("--prefix", help="bus prefix [env HIVE_PREFIX; hive]")
@click.option("--routes", "routes_file", type=_FILE, help=_ROUTES_HELP)
def up(host: str, port: int, nats_port: int, data: Path, prefix: str | None, routes_file: str | None) -> None:
    """Run it all on this machine: nats-server, the gateway, and a worker per available provider."""
    _gateway_extra("hive up")
    from hive_bus.services.auth import Tokens, check_exposure
    from hive_bus.services.gateway import Gateway, GatewayOptions, bind
    from hive_bus.services.webhooks import load_webhook_settings
    from hive_bus.workers import available

    async def main() -> None:
        tokens = Tokens.from_env(os.environ)
        webhooks = load_webhook_settings(os.environ)
        check_exposure(host, tokens)
        routes = Routes.load(routes_file or os.environ.get(ENV_ROUTES))
        sock = bind(host, port)  # before anything starts, so a taken port fails fast
        async with run_nats_server(data / "nats", port=nats_port) as server:
            settings = load_settings(nats_url=server.url, prefix=prefix)
            async with open_bus(settings, name="hive-up") as bus:
                providers, skipped = available(os.environ)
                for why in skipped.values():
                    click.echo(f"not started: {why}")
                prices = PriceTable.load(settings.prices_file)
                budgets = load_budgets(settings.budgets_file, settings.budgets)
                workers = [
                    Worker(bus, keys, WorkerOptions(provider=name, prices=prices, budget=budgets.get(name)))
                    for name, keys in providers.items()
                ]
                hive = Hive(bus)
                options = GatewayOptions(
                    host=host, port=port, tokens=tokens, routes=routes, webhooks=webhooks
                )
                gateway = Gateway(hive, options, sock=sock)
                try:
                    async with anyio.create_task_group() as tg:
                        for worker in workers:
                            await tg.start(worker.run)
                        await tg.start(gateway.serve)
                        click.echo(
                            f"hive is up: gateway {gateway.url}, nats {server.url}, data {data}/, "
                            f"workers: {', '.join(providers)}. Ctrl-C stops it."
                        )
                        for line in _exports(settings):
                            click.echo(line)
                        lost = await _until_stopped_or_lost(bus)
                        gateway.stop()
                        for worker in workers:
                            worker.stop()
                finally:
                    await hive.close()
                if lost is not None:
                    raise lost

    _run(main)


def _exports(settings: Settings) -> list[str]:
    """The lines that point another terminal's ``hive`` commands at this bus, where the defaults do not."""
    defaults = load_settings({})
    differ = [
        (f"{ENV_PREFIX}{field.upper()}", value)
        for field in ("nats_url", "prefix")
        if (value := getattr(settings, field)) != getattr(defaults, field)
    ]
    if not differ:
        return []
    word = "set" if sys.platform == "win32" else "export"
    return ["for other terminals:", *(f"  {word} {name}={value}" for name, value in differ)]


@cli.command("nats")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=4222, show_default=True)
@click.option("--data", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True)
def nats_cmd(host: str, port: int, data: Path) -> None:
    """Run the embedded nats-server (JetStream on, store under DATA/nats) until Ctrl-C."""

    async def main() -> None:
        async with run_nats_server(data / "nats", port=port, host=host) as server:
            click.echo(f"nats-server on {server.url}, store {server.store_dir}. Ctrl-C stops it.")
            await until_stopped()

    _run(main)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True)
@click.option(
    "--max-body-bytes",
    default=20 * 1024 * 1024,
    show_default=True,
    help="largest body of POST /v1/tasks (a batch's is 40 MiB)",
)
@click.option(
    "--max-connections",
    default=1000,
    show_default=True,
    help="HTTP connections at once; more get 503 (allow this many open files, and some)",
)
@click.option("--routes", "routes_file", type=_FILE, help=_ROUTES_HELP)
@click.option(
    "--stream-keepalive",
    "stream_keepalive_s",
    type=_Seconds(zero=False),
    default=10.0,
    show_default=True,
    help="seconds between ': waiting' comments of a streamed chat completion while its task waits",
)
@click.option(
    "--http",
    "http",
    type=click.Choice(["auto", "httptools", "h11"], case_sensitive=False),
    default="auto",
    show_default=True,
    help="HTTP parser: auto is httptools where installed, else h11",
)
@bus_options
def gateway(
    host: str,
    port: int,
    max_body_bytes: int,
    max_connections: int,
    routes_file: str | None,
    stream_keepalive_s: float,
    http: str,
    settings: Settings,
) -> None:
    """Run the HTTP gateway. Off loopback it needs tokens: HIVE_GATEWAY_TOKENS (comma-separated) or
    HIVE_GATEWAY_TOKENS_FILE (one per line); HIVE_METRICS_TOKEN, if set, is the one /metrics takes."""
    _gateway_extra("hive gateway")
    from hive_bus.services.auth import Tokens, check_exposure
    from hive_bus.services.gateway import Gateway, GatewayOptions, bind
    from hive_bus.services.limits import ConnectionLimits, ParserUnavailable, http_parser
    from hive_bus.services.webhooks import load_webhook_settings

    try:
        http_parser(http.lower())  # type: ignore[arg-type]  # one of the choices; a missing one fails here
    except ParserUnavailable as exc:
        raise click.ClickException(str(exc)) from None

    async def main() -> None:
        tokens = Tokens.from_env(os.environ)
        webhooks = load_webhook_settings(os.environ)
        check_exposure(host, tokens)
        routes = Routes.load(routes_file or os.environ.get(ENV_ROUTES))
        sock = bind(host, port)
        async with connect(settings=settings) as hive:
            limits = ConnectionLimits(max_connections=max_connections)
            options = GatewayOptions(
                host=host,
                port=port,
                max_body_bytes=max_body_bytes,
                tokens=tokens,
                limits=limits,
                routes=routes,
                stream_keepalive_s=stream_keepalive_s,
                http=http.lower(),  # type: ignore[arg-type]  # one of the choices
                webhooks=webhooks,
            )
            gw = Gateway(hive, options, sock=sock)
            async with anyio.create_task_group() as tg:
                await tg.start(gw.serve)
                click.echo(f"gateway on {gw.url}, bus {settings.prefix}. Ctrl-C stops it.")
                lost = await _until_stopped_or_lost(hive.bus)
                gw.stop()
            if lost is not None:
                raise lost

    _run(main)


@cli.command()
@click.argument("provider", required=False)
@click.option("--provider", "provider_opt", help="provider name (the same as the PROVIDER argument)")
@click.option("--handler", metavar="MODULE:FUNCTION", help="run this async function as the provider")
@click.option("--model", help="default model for tasks that name none (built-in providers)")
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 1024))
@click.option(
    "--drain-timeout", "drain_timeout_s", type=_Seconds(), default=30.0, show_default=True, help="seconds"
)
@click.option(
    "--at-most-once",
    is_flag=True,
    help="never call twice for a task: one delivered again after a crash mid-call fails as interrupted",
)
@click.option(
    "--name",
    "worker_name",
    help="the name of this worker's NATS credential (nats/worker-user.sh NAME) [env HIVE_WORKER_NAME]",
)
@bus_options
def worker(
    provider: str | None,
    provider_opt: str | None,
    handler: str | None,
    model: str | None,
    concurrency: int,
    drain_timeout_s: float,
    at_most_once: bool,
    worker_name: str | None,
    settings: Settings,
) -> None:
    """Serve one provider's tasks: a built-in one (echo, gemini, groq, anthropic, openai), or your own
    with --handler."""
    from ._names import is_valid_token

    name = provider or provider_opt
    if not name:
        raise click.UsageError("name the provider: hive worker PROVIDER (or --provider NAME)")
    if provider and provider_opt and provider != provider_opt:
        raise click.UsageError(f"two provider names given: {provider!r} and {provider_opt!r}")
    if not is_valid_token(name):
        raise click.UsageError(f"provider {name!r} must be 1-64 letters, digits, '_' or '-'")
    try:
        settings = with_overrides(settings, worker_name=worker_name)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None

    async def main() -> None:
        impl = _provider_for(name, handler, model)
        prices = PriceTable.load(settings.prices_file)
        budget = load_budgets(settings.budgets_file, settings.budgets).get(name)
        options = WorkerOptions(
            provider=name,
            concurrency=concurrency,
            drain_timeout_s=drain_timeout_s,
            at_most_once=at_most_once,
            prices=prices,
            budget=budget,
        )
        async with open_bus(settings, name=f"hive-worker-{name}") as bus:
            w = Worker(bus, impl, options)
            async with anyio.create_task_group() as tg:
                await tg.start(w.run)
                # what start-up made lives as long as the process: out of the collector's way
                gc.freeze()
                click.echo(f"worker {w.id} serving {name}. Ctrl-C drains and stops it.")
                lost = await _until_stopped_or_lost(bus)
                w.stop()
            if lost is not None:
                raise lost

    _run(main)


def _not_before(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--not-before TIME`` checked here, so that a time without its offset names the flag and shows
    the fix (the task's own check says only ``Expected `datetime` with a timezone component``)."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 time: write it as 2026-12-24T09:00:00+01:00"
        ) from None
    if when.tzinfo is None:
        raise click.BadParameter(
            f"{value!r} has no offset: add the one it is in, as {value}+01:00, or Z for UTC"
        )
    return when.isoformat()


def _json_object(value: str | None, what: str) -> Any:
    if value is None:
        return None
    try:
        return msgspec.json.decode(value)
    except msgspec.DecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=what) from None


@cli.command()
@click.argument("provider", required=False)
@click.argument("prompt", required=False)
@click.option("--file", "file", type=click.File("r"), help="a JSON Lines file of tasks ('-' for stdin)")
@click.option(
    "--messages",
    "messages_file",
    metavar="FILE",
    help="ask with a conversation instead of PROMPT: a JSON array of messages "
    '([{"role": "system"|"user"|"assistant", "content": "..."}]); \'-\' for stdin',
)
@click.option(
    "--response-format",
    metavar="JSON",
    help='the output\'s shape: {"type": "json_object"}, or {"type": "json_schema", "json_schema": '
    '{"name": ..., "schema": {...}}} (or the words json_object, text)',
)
@click.option("--model")
@click.option("--system", help="system prompt")
@click.option("--payload", help="JSON value handed to the provider (custom handlers)")
@click.option("--metadata", help="JSON object kept with the task")
@click.option("--key", "idempotency_key", help="idempotency key: a resubmission returns the first task")
@click.option("--max-attempts", type=click.IntRange(1, 100))
@click.option("--priority", type=click.Choice(["high", "normal", "low"]))
@click.option(
    "--fallback", multiple=True, metavar="PROVIDER[:MODEL]", help="where to go on no quota (repeat, in order)"
)
@click.option("--route", type=click.Choice(["in_order", "cheapest"]))
@click.option(
    "--deadline", "deadline_s", type=float, metavar="S", help="fail the task S seconds after submission"
)
@click.option(
    "--webhook",
    metavar="URL[,EVENT...]",
    help="announce the task's end to URL (signed; the gateway's webhook settings apply), for the events "
    "named after it (task.completed, task.failed, task.cancelled; all when none)",
)
@click.option(
    "--not-before",
    "not_before",
    metavar="TIME",
    callback=_not_before,
    help="queue the task no earlier than TIME, ISO 8601 with its offset (2026-12-24T09:00:00+01:00)",
)
@click.option(
    "--wait",
    "wait_s",
    type=_Seconds(),
    default=None,
    help="wait up to this many seconds for the result (exit 1: failed or cancelled, 2: not ended in time)",
)
@click.option("--ordered", is_flag=True, help="with --file --wait: print the results in input order")
@bus_options
def submit(
    provider: str | None,
    prompt: str | None,
    file: TextIO | None,
    messages_file: str | None,
    response_format: str | None,
    model: str | None,
    system: str | None,
    payload: str | None,
    metadata: str | None,
    idempotency_key: str | None,
    max_attempts: int | None,
    priority: str | None,
    fallback: tuple[str, ...],
    route: str | None,
    deadline_s: float | None,
    webhook: str | None,
    not_before: str | None,
    wait_s: float | None,
    ordered: bool,
    settings: Settings,
) -> None:
    """Queue a task (PROVIDER PROMPT, or PROVIDER --messages FILE) and print its id, or with --wait its
    final state as JSON.

    With --file, queue every task of a JSON Lines file (one task object per line, as POST /v1/tasks
    takes it): each line's id is printed as {"line": N, "id": ...}, with a progress bar and a summary
    on stderr. PROVIDER and every option but --key and --messages are defaults for the lines (a line's
    own field wins; --metadata is merged under the line's). With --wait, each result is printed as it
    ends, {"line", "id", "status", "output" or "error"} (in input order with --ordered); exit 0 when
    every task completed, 1 when one failed, was cancelled or was evicted, 2 when one had not ended in time.
    """
    if file is not None:
        if prompt or messages_file or idempotency_key:
            flag = "PROMPT" if prompt else "--messages" if messages_file else "--key"
            raise click.UsageError(f"{flag} cannot apply to every line of --file (each line says its own)")
        defaults: dict[str, Any] = {
            "provider": provider, "model": model, "system": system, "max_attempts": max_attempts,
            "priority": priority, "route": route, "deadline_s": deadline_s, "not_before": not_before,
            "fallback": list(fallback) or None,
            "response_format": _response_format(response_format) if response_format is not None else None,
            "payload": _json_object(payload, "--payload"),
            "metadata": _json_object(metadata, "--metadata"),
            "webhook": _webhook(webhook),
        }  # fmt: skip
        if defaults["metadata"] is not None and not isinstance(defaults["metadata"], dict):
            raise click.BadParameter("must be a JSON object", param_hint="--metadata")
        tasks = _read_tasks(file, {k: v for k, v in defaults.items() if v is not None})
        _submit_file(tasks, settings, wait_s=wait_s, ordered=ordered)
        return
    if ordered:
        raise click.UsageError("--ordered goes with --file and --wait")
    if prompt and messages_file:
        raise click.UsageError("give either PROMPT or --messages FILE, not both")
    if not provider or not (prompt or messages_file):
        raise click.UsageError("name the PROVIDER and the PROMPT (or give --messages FILE, or --file)")
    messages = _read_messages(messages_file) if messages_file else None
    policy = {
        "max_attempts": max_attempts, "priority": priority, "route": route, "deadline_s": deadline_s,
        "not_before": not_before,
    }  # fmt: skip
    extra: dict[str, Any] = {k: v for k, v in policy.items() if v is not None}
    if fallback:
        extra["fallback"] = list(fallback)
    if response_format is not None:
        extra["response_format"] = _response_format(response_format)
    if webhook is not None:
        extra["webhook"] = _webhook(webhook)
    meta = _json_object(metadata, "--metadata")
    if meta is not None and not isinstance(meta, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--metadata")

    body = _json_object(payload, "--payload")

    async def main() -> None:
        # checked in here: a field that is not valid is one line, as _run says
        request = request_of(
            provider, prompt, messages=messages, model=model, system=system, payload=body, metadata=meta,
            idempotency_key=idempotency_key, **extra,
        )  # fmt: skip
        async with connect(settings=settings) as hive:
            accepted = await hive.submit_request(request)
            _warn(accepted.warnings)
            task_id = accepted.id
            if wait_s is None:
                click.echo(task_id)
                return
            with _said_if_interrupted(task_id):
                view = await hive.wait(task_id, wait_s)
        _print_view(view)
        _exit_for([view])

    _run(main)


@contextlib.contextmanager
def _said_if_interrupted(task_id: str) -> Iterator[None]:
    """Ctrl-C while waiting for a task that was accepted: the task goes on, and its id, printed only with
    its end, would be lost with the wait."""
    try:
        yield
    except anyio.get_cancelled_exc_class():
        click.echo(
            f"interrupted: task {task_id} goes on (hive status {task_id} --wait S reads its end)", err=True
        )
        raise


def _warn(warnings: Iterable[str]) -> None:
    """A submission's warnings (a provider no worker serves), on stderr as part of the command's answer:
    not a log line, which ``--log-level ERROR`` would hide."""
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)


# Exit statuses of the commands that report on tasks: every task completed, some failed, some not ended.
EXIT_FAILED, EXIT_NOT_ENDED = 1, 2


def _exit_for(views: Sequence[TaskView]) -> None:
    """Exit 0 when every task completed, 1 when one failed or was cancelled, or was evicted (ended, how is
    no longer known), 2 when one has not ended (a wait ran out)."""
    if any(v.status in ("failed", "cancelled", "evicted") for v in views):
        raise click.exceptions.Exit(EXIT_FAILED)
    if any(not v.done for v in views):
        raise click.exceptions.Exit(EXIT_NOT_ENDED)


def _read_messages(path: str) -> list[ChatMessage]:
    """The conversation in ``path`` ('-' for stdin), checked; anything wrong is one line naming it."""
    where = "stdin" if path == "-" else path
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise click.ClickException(f"--messages {where}: cannot read it: {exc.strerror or exc}") from None
    try:
        messages = _messages_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise click.ClickException(f"--messages {where}: {_message_error(exc)}") from None
    except msgspec.DecodeError as exc:
        raise click.ClickException(f"--messages {where}: not valid JSON ({exc})") from None
    if not messages:
        raise click.ClickException(f"--messages {where}: the array holds no message")
    return messages


_messages_decoder = msgspec.json.Decoder(list[ChatMessage])
_AT_MESSAGE = re.compile(r"^(.*) - at `\$\[(\d+)\]\.?(.*)`$", re.DOTALL)


def _message_error(exc: msgspec.ValidationError) -> str:
    """msgspec's ``Invalid enum value 'bot' - at `$[1].role``` as ``message 2: role: Invalid ...``."""
    found = _AT_MESSAGE.match(str(exc))
    if found is None:
        return "expected a JSON array of messages" if "Expected `array`" in str(exc) else str(exc)
    what, index, field = found.groups()
    return f"message {int(index) + 1}: {field + ': ' if field else ''}{what}"


def _webhook(value: str | None) -> dict[str, Any] | None:
    """``--webhook URL[,EVENT...]`` as a task's ``webhook`` field, its events checked here so that a typo
    names the flag (the URL is checked as the task is: http(s), no spaces)."""
    if value is None:
        return None
    url, *events = [part.strip() for part in value.split(",")]
    unknown = [e for e in events if e not in WEBHOOK_EVENTS]
    if unknown or not url:
        what = f"unknown event {unknown[0]!r}" if unknown else "no URL"
        raise click.BadParameter(
            f"{what}: give URL[,EVENT...] with events among {', '.join(WEBHOOK_EVENTS)}",
            param_hint="--webhook",
        )
    return {"url": url, "events": events} if events else {"url": url}


def _response_format(value: str) -> Any:
    if value in ("json_object", "text"):
        return {"type": value}
    decoded = _json_object(value, "--response-format")
    if not isinstance(decoded, dict):
        raise click.BadParameter(
            "must be a JSON object (or json_object, text)", param_hint="--response-format"
        )
    return decoded


@cli.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--system", help="system prompt")
@click.option("--key", "idempotency_key", help="idempotency key: a repeat reads the first task's answer")
@click.option(
    "--timeout",
    "timeout_s",
    type=_Seconds(),
    default=600.0,
    show_default=True,
    help="seconds to wait for the end",
)
@bus_options
def chat(
    model: str,
    prompt: str,
    system: str | None,
    idempotency_key: str | None,
    timeout_s: float,
    settings: Settings,
) -> None:
    """Ask MODEL (a provider, or provider/model) and print the answer as it streams in.

    The task goes through the bus like any other (queued, rate limits waited out, retried); its worker
    forwards the text as the provider produces it. Exit status 1 when the task fails or has not ended
    within --timeout (it goes on; its id is printed).
    """
    provider, _, model_name = model.partition("/")

    async def main() -> None:
        # checked in here: a field that is not valid is one line, as _run says
        request = request_of(
            provider, prompt, model=model_name or None, system=system, idempotency_key=idempotency_key
        )
        async with connect(settings=settings) as hive, hive.stream(request, timeout_s=timeout_s) as stream:
            _warn(stream.warnings)
            with _said_if_interrupted(stream.task_id):
                async for item in stream:
                    match item:
                        case StreamText(text=text):
                            click.echo(text, nl=False)
                            sys.stdout.flush()
                        case StreamRestarted(attempt=attempt, why=why):
                            click.echo("")  # end the abandoned line
                            click.echo(f"[attempt {attempt} ended ({why}); the answer starts over]", err=True)
                        case StreamEnded(view=view):
                            click.echo("")
                            if view.status in ("failed", "cancelled"):
                                raise HiveError(f"task {view.id} {view.status} ({view.reason}): {view.error}")
                            if view.status == "evicted":
                                raise HiveError(f"task {view.id} evicted: {view.error}")
                            if view.status != "completed":
                                raise HiveError(
                                    f"task {view.id} has not ended within {timeout_s:g}s; it goes on"
                                )

    _run(main)


def _read_tasks(file: TextIO, defaults: dict[str, Any] | None = None) -> list[tuple[int, TaskRequest]]:
    """Every task of a JSON Lines file, checked before any is queued; a bad line names its number.
    ``defaults`` fill the fields a line leaves out (``metadata`` is merged, the line's keys winning;
    ``system`` goes only to a line that asks with a prompt)."""
    tasks = []
    for number, line in enumerate(file, start=1):
        if not line.strip():
            continue
        try:
            if not defaults:
                tasks.append((number, request_decoder.decode(line)))
                continue
            fields = msgspec.json.decode(line)
            if not isinstance(fields, dict):
                raise click.ClickException(f"line {number}: a task is a JSON object")
            merged = {**defaults, **fields}
            if "metadata" in defaults and isinstance(fields.get("metadata"), dict):
                merged["metadata"] = {**defaults["metadata"], **fields["metadata"]}
            if "system" in defaults and "system" not in fields and fields.get("messages") is not None:
                del merged["system"]
            tasks.append((number, msgspec.convert(merged, TaskRequest)))
        except msgspec.ValidationError as exc:
            raise click.ClickException(f"line {number}: {explain_error(exc)}") from None
        except msgspec.DecodeError as exc:
            raise click.ClickException(f"line {number}: not valid JSON ({exc})") from None
    if not tasks:
        raise click.ClickException("the file holds no task")
    return tasks


def _submit_file(
    tasks: list[tuple[int, TaskRequest]],
    settings: Settings,
    chunk: int = 500,
    *,
    wait_s: float | None = None,
    ordered: bool = False,
) -> None:
    warned: set[str] = set()

    def warn_once(warning: str) -> None:  # once a command, not once a chunk
        if warning not in warned:
            warned.add(warning)
            _warn([warning])

    async def main() -> None:
        accepted = rejected = 0
        lines: dict[str, int] = {}  # task id -> input line
        async with connect(settings=settings) as hive:
            with click.progressbar(length=len(tasks), label="submitting", file=sys.stderr) as bar:
                for start in range(0, len(tasks), chunk):
                    part = tasks[start : start + chunk]
                    try:
                        ids: list[str | None] = list(
                            await hive.submit_many([r for _, r in part], on_warning=warn_once)
                        )
                        errors: dict[int, HiveError] = {}
                    except PartialSubmit as partial:
                        ids, errors = partial.ids, partial.errors
                    for i, (number, _) in enumerate(part):
                        task_id = ids[i]
                        if task_id is not None:
                            accepted += 1
                            lines[task_id] = number
                            if wait_s is None:
                                click.echo(msgspec.json.encode({"line": number, "id": task_id}).decode())
                        else:
                            rejected += 1
                            click.echo(f"line {number}: not accepted: {errors.get(i)}", err=True)
                    bar.update(len(part))
            click.echo(f"{accepted} accepted, {rejected} not accepted, of {len(tasks)} tasks", err=True)
            views = await _follow_results(hive, lines, wait_s, ordered) if wait_s is not None else []
        if rejected:
            raise click.exceptions.Exit(1)
        _exit_for(views)

    _run(main)


def _result_line(number: int, view: TaskView) -> str:
    item: dict[str, Any] = {"line": number, "id": view.id, "status": view.status}
    if view.status == "completed":
        item["output"] = view.output
    elif view.done:
        item["error"] = view.error or view.reason
    return msgspec.json.encode(item).decode()


async def _follow_results(hive: Hive, lines: dict[str, int], wait_s: float, ordered: bool) -> list[TaskView]:
    """Print each task's result as it ends (or in input order), for up to ``wait_s``; then the state of
    the ones that have not ended. The views, for the exit status."""
    ended: dict[str, TaskView] = {}
    order = sorted(lines, key=lines.__getitem__)
    printed = 0
    with anyio.move_on_after(wait_s):
        async for view in hive.results(list(lines)):
            ended[view.id] = view
            if not ordered:
                click.echo(_result_line(lines[view.id], view))
                continue
            while printed < len(order) and order[printed] in ended:
                click.echo(_result_line(lines[order[printed]], ended[order[printed]]))
                printed += 1
    views = list(ended.values())
    for position, task_id in enumerate(order):  # the wait ran out: the rest as they are now
        found = ended.get(task_id)
        if found is None:
            found = await hive.get(task_id)
            views.append(found)
            click.echo(_result_line(lines[task_id], found))
        elif ordered and position >= printed:
            click.echo(_result_line(lines[task_id], found))
    return views


@cli.command("list")
@click.option(
    "--meta", multiple=True, metavar="KEY:VALUE", help="a metadata key and its value (repeat: each must hold)"
)
@click.option("--batch", "batch_id", help="a batch's lines (metadata batch_id)")
@click.option("--schedule", "schedule_id", help="a schedule's runs (metadata schedule_id)")
@click.option("--status", type=click.Choice(list(get_args(TaskStatus))), help="only tasks in this status")
@click.option("--provider", help="only this provider's tasks")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@bus_options
def list_command(
    meta: tuple[str, ...],
    batch_id: str | None,
    schedule_id: str | None,
    status: str | None,
    provider: str | None,
    limit: int,
    settings: Settings,
) -> None:
    """Print tasks as GET /v1/tasks lists them, one JSON document a line, newest first (their texts cut;
    hive status ID has them whole): with --meta, --batch or --schedule, the newest tasks of that
    metadata however old (read from the metadata index); without, the most recent tasks (read from the
    tail of the events), e.g. hive list --provider groq --status queued."""
    wanted: dict[str, str] = {}
    if batch_id is not None:
        wanted["batch_id"] = batch_id
    if schedule_id is not None:
        wanted["schedule_id"] = schedule_id
    for item in meta:
        key, sep, value = item.partition(":")
        if not sep or not key or key in wanted:
            why = "names its key twice" if key in wanted else "is not KEY:VALUE"
            raise click.BadParameter(f"{item!r} {why}", param_hint="--meta")
        wanted[key] = value
    if status == "evicted" and not wanted:  # as GET /v1/tasks: the tail of the events holds none
        raise click.BadParameter(
            "evicted lists only with --meta, --batch or --schedule: a task whose events were evicted is "
            "in no events tail",
            param_hint="--status",
        )

    async def main() -> None:
        async with connect(settings=settings) as hive:
            if wanted:
                found = await hive.find(wanted, status=status, provider=provider, limit=limit)
            else:
                found = await hive.recent(status=status, provider=provider, limit=limit)
        for view in found:
            click.echo(encoder.encode(view.trimmed()).decode())

    _run(main)


@cli.command()
@click.argument("task_ids", metavar="ID...", nargs=-1, required=True)
@click.option(
    "--wait", "wait_s", type=_Seconds(), default=0.0, help="wait up to this many seconds for the end"
)
@bus_options
def status(task_ids: tuple[str, ...], wait_s: float, settings: Settings) -> None:
    """Print the state of each task as JSON (one document per task, in the order given).

    Exit 0 when every task completed, 1 when one failed, was cancelled or was evicted, 2 when one has
    not ended."""

    async def main() -> None:
        async with connect(settings=settings) as hive:
            views: list[TaskView | None] = [None] * len(task_ids)
            unknown: list[str] = []

            async def one(i: int, task_id: str) -> None:
                try:
                    views[i] = await (
                        hive.wait(task_id, wait_s, content=True) if wait_s > 0 else hive.get(task_id)
                    )
                except TaskNotFound as exc:  # the others are still shown
                    unknown.append(str(exc))

            async with anyio.create_task_group() as tg:  # the waits run together
                for i, task_id in enumerate(task_ids):
                    tg.start_soon(one, i, task_id)
        ended = [v for v in views if v is not None]
        for view in ended:
            _print_view(view)
        if unknown:
            raise click.ClickException("; ".join(unknown))
        _exit_for(ended)

    _run(main)


@cli.command()
@click.argument("task_ids", metavar="[ID]...", nargs=-1)
@click.option("--provider", help="cancel every queued task of this provider")
@click.option(
    "--where", "where", multiple=True, metavar="KEY=VALUE",
    help="cancel every queued task whose metadata has KEY (a string VALUE, or JSON); repeat to narrow",
)  # fmt: skip
@click.option("--reason", default="", help="kept in the task's cancelled event")
@bus_options
def cancel(
    task_ids: tuple[str, ...], provider: str | None, where: tuple[str, ...], reason: str, settings: Settings
) -> None:
    """Cancel tasks: by id, or every queued one of a provider or metadata. A queued or waiting task never
    runs; a running one is abandoned by its worker. Exit 1 when one had already ended."""
    if task_ids and (provider or where):
        raise click.UsageError("give task ids, or --provider/--where, not both")
    if not (task_ids or provider or where):
        raise click.UsageError("name the tasks: IDs, --provider or --where")
    metadata = dict(_key_value(item) for item in where)

    async def main() -> None:
        ended = False
        async with connect(settings=settings) as hive:
            if not task_ids:
                views = await hive.cancel_where(provider=provider, metadata=metadata, reason=reason)
                for view in views:
                    click.echo(f"{view.id} cancelled ({view.reason})")
                click.echo(f"{len(views)} cancelled", err=True)
                return
            for task_id in task_ids:
                try:
                    view = await hive.cancel(task_id, reason=reason)
                except TaskEnded as exc:
                    click.echo(f"{task_id}: {exc}", err=True)
                    ended = True
                    continue
                click.echo(f"{view.id} cancelled ({view.reason})")
        if ended:
            raise click.exceptions.Exit(EXIT_FAILED)

    _run(main)


def _key_value(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--where")
    try:
        return key, msgspec.json.decode(value)
    except msgspec.DecodeError:
        return key, value  # a plain string


@cli.command()
@bus_options
def upgrade(settings: Settings) -> None:
    """Upgrade the bus's objects to this version (and check them): a work-queue tasks stream of an older
    hive-bus becomes the limits one, its queued tasks kept; one events stream of every provider is split
    into one per provider, every event kept. The gateway and `hive up` do it at start too; a worker's
    credential may not."""

    async def main() -> None:
        async with open_bus(settings, name="hive-upgrade") as bus:
            names = bus.names
            info = await bus.js.stream_info(names.tasks_stream)
            events = {
                p: await bus.js.stream_info(names.events_stream_of(p)) for p in await event_providers(bus)
            }
        click.echo(
            f"{names.tasks_stream}: {getattr(info.config.retention, 'value', info.config.retention)} "
            f"retention, {info.state.messages} tasks held"
        )
        for provider, stream in events.items():
            click.echo(f"{names.events_stream_of(provider)}: {stream.state.messages} events of {provider}")
        click.echo("the bus is up to date")

    _run(main)


@cli.command()
@bus_options
def workers(settings: Settings) -> None:
    """List the workers whose heartbeat has not expired."""

    async def main() -> None:
        async with connect(settings=settings) as hive:
            beats = await hive.workers()
        if not beats:
            click.echo("no workers online")
            return
        click.echo(f"{'WORKER':<44} {'PROVIDER':<12} {'HOST':<20} {'IN FLIGHT':>9} {'DONE':>7} {'FAILED':>7}")
        for b in beats:
            click.echo(
                f"{b.worker_id:<44} {b.provider:<12} {b.host[:20]:<20} {b.in_flight:>9} {b.completed:>7} {b.failed:>7}"
            )

    _run(main)


@cli.command()
@bus_options
def stats(settings: Settings) -> None:
    """Per provider: queued, in flight, retrying, completed and failed tasks, workers, cooldown."""

    async def main() -> None:
        async with connect(settings=settings) as hive:
            rows = await hive.stats()
        if not rows:
            click.echo("no provider has seen a task yet")
            return
        click.echo(
            f"{'PROVIDER':<14}{'QUEUED':>8}{'IN FLIGHT':>11}{'RETRYING':>10}{'DONE':>8}{'FAILED':>8}{'WORKERS':>9}  COOLDOWN"
        )
        for r in rows:
            left = (
                f"{(r.cooldown_until_ms - now_ms()) / 1000:.0f}s: {r.cooldown_reason}"
                if r.cooldown_until_ms
                else ""
            )
            click.echo(
                f"{r.provider:<14}{r.pending:>8}{r.in_flight:>11}{r.retrying:>10}{r.completed:>8}{r.failed:>8}"
                f"{r.workers:>9}  {_printable(left[:60])}"
            )

    _run(main)


@cli.command()
@click.option("--provider", help="only this provider's tasks")
@bus_options
def watch(provider: str | None, settings: Settings) -> None:
    """Print every task event as it happens, one line each, until Ctrl-C."""

    async def main() -> None:
        check_provider(provider)  # as hive list: a name no provider can have would show nothing, ever
        async with connect(settings=settings) as hive, anyio.create_task_group() as tg:
            tg.start_soon(_follow_events, hive, provider)
            await until_stopped()
            tg.cancel_scope.cancel()

    _run(main)


async def _follow_events(hive: Hive, provider: str | None) -> None:
    """Each provider's events from now on (of a provider whose stream is made meanwhile, from its start),
    as they come: in order within a provider's, in no order between two providers'."""
    names = hive.bus.names
    listed = False  # the streams there are at the start are followed

    def config(_: str) -> ConsumerConfig:
        return ConsumerConfig(deliver_policy=DeliverPolicy.ALL if listed else DeliverPolicy.NEW)

    async with merged_events(hive.bus, names.events, config, only=provider) as received:
        listed = True
        async for msg in received:
            try:
                view = TaskView.of(decode_event(msg.subject, msg.data, msg.headers))
            except msgspec.DecodeError:
                continue
            at = datetime.fromtimestamp(view.updated_at_ms / 1000).strftime("%H:%M:%S.%f")[:-3]
            detail = view.error or (str(view.output)[:80] if view.output is not None else "")
            click.echo(f"{at} {view.id} {view.provider:<10} {view.status:<9} {_printable(detail)}")


def _printable(text: str) -> str:
    """``text`` as one line of plain characters: what a terminal would act on (a newline, a carriage
    return, an escape sequence that recolours, retitles or clears) written as its backslash escape
    (``\\n``, ``\\x1b``). Outputs and errors come from providers and models, not from the operator."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _print_view(view: TaskView) -> None:
    click.echo(msgspec.json.format(encoder.encode(view), indent=2).decode())


def main() -> None:
    cli()


@cli.group()
def dlq() -> None:
    """Dead letters: tasks that failed for good, kept with their last error."""


@dlq.command("list")
@click.option("--provider", help="only this provider's")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000))
@bus_options
def dlq_list(provider: str | None, limit: int, settings: Settings) -> None:
    """List dead letters, oldest first: task id, provider, reason, when, last error."""

    async def main() -> None:
        async with connect(settings=settings) as hive:
            letters = await hive.dead_letters(provider=provider, limit=limit)
        if not letters:
            click.echo("no dead letters")
            return
        click.echo(f"{'TASK':<28} {'PROVIDER':<12} {'REASON':<16} {'FAILED AT':<20} ERROR")
        for letter in letters:
            f = letter.failed
            at = datetime.fromtimestamp(f.at_ms / 1000).strftime("%Y-%m-%d %H:%M:%S")
            click.echo(f"{f.task_id:<28} {f.provider:<12} {f.reason:<16} {at:<20} {f.error[:100]}")

    _run(main)


@dlq.command("show")
@click.argument("task_id")
@bus_options
def dlq_show(task_id: str, settings: Settings) -> None:
    """Print one dead letter (the failure, and the task as it last ran) as JSON."""

    async def main() -> None:
        async with connect(settings=settings) as hive:
            letter = await hive.dead_letter(task_id)
        click.echo(msgspec.json.format(encoder.encode(letter), indent=2))

    _run(main)


@dlq.command("replay")
@click.argument("task_ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="replay every dead letter (of --provider)")
@click.option("--provider", help="with --all: only this provider's")
@bus_options
def dlq_replay(task_ids: tuple[str, ...], replay_all: bool, provider: str | None, settings: Settings) -> None:
    """Queue dead-lettered tasks again (same ids, their history kept)."""
    if bool(task_ids) == replay_all:
        raise click.UsageError("name the tasks to replay, or give --all")

    async def main() -> None:
        async with connect(settings=settings) as hive:
            ids = list(task_ids) or [
                letter.failed.task_id for letter in await hive.dead_letters(provider=provider, limit=100_000)
            ]
            if not ids:
                click.echo("no dead letters" + (f" of {provider}" if provider else "") + ": nothing replayed")
            for task_id in ids:
                done = await hive.replay(task_id)
                click.echo(f"{done.id} queued again on {done.provider} (run {done.run})")

    _run(main)


@dlq.command("purge")
@click.argument("task_ids", nargs=-1)
@click.option("--all", "purge_all", is_flag=True, help="drop every dead letter (of --provider)")
@click.option("--provider", help="with --all: only this provider's")
@bus_options
def dlq_purge(task_ids: tuple[str, ...], purge_all: bool, provider: str | None, settings: Settings) -> None:
    """Drop dead letters for good (their events stay in the record)."""
    if bool(task_ids) == purge_all:
        raise click.UsageError("name the dead letters to drop, or give --all")

    async def main() -> None:
        async with connect(settings=settings) as hive:
            if purge_all:
                count = await hive.purge_dead_letters(provider=provider)
            else:
                count = 0
                for task_id in task_ids:
                    count += await hive.purge_dead_letters(task_id=task_id)
        click.echo(f"{count} dead letter(s) dropped")

    _run(main)


@cli.command()
@click.option(
    "--clear", nargs=2, metavar="PROVIDER KEY", help="clear a key's cooldown, or put a refused key back"
)
@bus_options
def keys(clear: tuple[str, str] | None, settings: Settings) -> None:
    """List provider keys that are cooling down or were refused (by name, never the key itself)."""
    from ._bus import kv_entries
    from ._cooldown import KeyCooldowns, decode_records

    async def main() -> None:
        async with open_bus(settings, name="hive-keys") as bus:
            if clear:
                provider, key = clear
                cooldowns = KeyCooldowns(
                    bus.nc, bus.providers_kv, bus.names.providers_bucket, provider, [key]
                )
                await cooldowns.clear(key)
                click.echo(f"{provider} key {key} cleared")
                return
            records = decode_records(await kv_entries(bus.providers_kv))
        now = now_ms()
        shown = [r for r in records if r.refused or r.until_ms > now]
        if not shown:
            click.echo("every key is usable")
            return
        click.echo(f"{'PROVIDER':<12} {'KEY':<20} {'STATE':<22} REASON")
        for r in sorted(shown, key=lambda r: (r.provider, r.key)):
            state = "refused" if r.refused else f"cooling {(r.until_ms - now) / 1000:.0f}s ({r.quota})"
            click.echo(f"{r.provider:<12} {r.key:<20} {state:<22} {_printable(r.reason[:100])}")

    _run(main)


# ``hive batch`` lives in a module of its own (it imports from this one)
from ._cli_batch import batch as _batch_commands  # noqa: E402

cli.add_command(_batch_commands)

# ``hive schedule`` likewise
from ._cli_schedule import schedule as _schedule_commands  # noqa: E402

cli.add_command(_schedule_commands)
