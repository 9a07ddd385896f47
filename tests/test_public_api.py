"""Issue 13, point 6: the public API. ``__all__`` of each public module holds what users call and
nothing else (as anyio checks its own); the built-in adapters use only public names; and an adapter a
third party writes with those names alone serves tasks."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path
from types import ModuleType

import anyio
import pytest

import hive_bus
import hive_bus.bus
import hive_bus.workers
from hive_bus import (
    Completed,
    Hive,
    KeyRejected,
    Output,
    ProviderKey,
    RetryAfter,
    Retrying,
    Task,
    Usage,
    Worker,
    WorkerOptions,
    register_secret,
)

from .helpers import events_of

PUBLIC_MODULES = [
    importlib.import_module(name)
    for _, name, _ in pkgutil.iter_modules(hive_bus.__path__, "hive_bus.")
    if not name.rpartition(".")[2].startswith("_")
]
# The names an adapter for a new provider needs, as issue 13 lists them.
PROVIDER_API = {
    "Provider",
    "Output",
    "RetryAfter",
    "RetryLater",
    "FailNow",
    "KeyRejected",
    "NoQuota",
    "Quota",
    "Usage",
    "Task",
    "ProviderKey",
    "register_secret",
}


def _public(module: ModuleType) -> list[ModuleType]:
    return [module, *PUBLIC_MODULES]


@pytest.mark.parametrize("module", _public(hive_bus), ids=lambda m: m.__name__)
def test_every_name_in_all_exists_and_is_no_private_module(module: ModuleType) -> None:
    names = module.__all__
    assert len(names) == len(set(names)), f"{module.__name__}.__all__ repeats a name"
    for name in names:
        assert hasattr(module, name), f"{module.__name__}.__all__ names {name!r}, which it does not have"
        assert name == "__version__" or not name.startswith("_"), f"{module.__name__}.__all__ has {name!r}"
        value = getattr(module, name)
        assert not inspect.ismodule(value), f"{module.__name__}.{name} is a module, not an API"


@pytest.mark.parametrize("module", _public(hive_bus), ids=lambda m: m.__name__)
def test_every_public_class_or_function_of_ours_is_in_all(module: ModuleType) -> None:
    """A class or function of hive_bus reachable under a public name is exported on purpose (listed in
    ``__all__``), not left behind by an import: plumbing that moved away must not linger."""
    for name, value in vars(module).items():
        if name.startswith("_") or not (inspect.isclass(value) or inspect.isfunction(value)):
            continue
        if module is not hive_bus and name in hive_bus.__all__ and value is getattr(hive_bus, name):
            continue  # the top level's API, taken by a module that uses it
        if getattr(value, "__module__", "").startswith("hive_bus"):
            assert name in module.__all__, f"{module.__name__}.{name} is public but not in __all__"


def test_the_top_level_is_what_users_call_and_the_bus_has_a_module_of_its_own() -> None:
    for plumbing in ("Bus", "open_bus", "Names", "load_handler"):
        assert plumbing not in hive_bus.__all__ and not hasattr(hive_bus, plumbing), plumbing
    assert {"Bus", "open_bus", "Names"} <= set(hive_bus.bus.__all__)
    assert set(hive_bus.__all__) >= PROVIDER_API, PROVIDER_API - set(hive_bus.__all__)
    assert (Path(hive_bus.__file__).parent / "py.typed").is_file()


def _imports_of_hive_bus(path: Path) -> list[tuple[int, str, str | None]]:
    """Every (line, module, name) an adapter module takes from hive_bus, read from its source."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").startswith("hive_bus")
        ):
            found += [(node.lineno, node.module or "", alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.startswith("hive_bus")]
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "hive_bus"
        ):
            found.append((node.lineno, "hive_bus", node.attr))
    return found


def test_the_built_in_adapters_use_only_public_names() -> None:
    public = {m.__name__: m for m in _public(hive_bus)}
    sources = sorted(Path(hive_bus.workers.__file__).parent.glob("*.py"))
    assert len(sources) > 5
    private = [
        f"{path.name}:{line}: {module}{'.' + name if name else ''}"
        for path in sources
        for line, module, name in _imports_of_hive_bus(path)
        if module not in public or (name is not None and name not in public[module].__all__)
    ]
    assert not private, f"hive_bus/workers/ uses private names of hive_bus: {private}"


# A third party's adapter, written with the public names alone --------------------------------------

GOOD_KEY, REVOKED_KEY = "sk-shout-good-0123456789", "sk-shout-revoked-9876543210"


class ShoutProvider:
    """An adapter for a made-up provider "shout" that answers in capitals: it says once that its
    per-minute limit is reached, and refuses a revoked key (naming the key, as some APIs do)."""

    def __init__(self, api_key: str) -> None:
        register_secret(api_key)  # the worker keeps it out of every event and log line
        self._key = api_key
        self.limited_once = False

    async def complete(self, task: Task) -> Output:
        if self._key == REVOKED_KEY:
            raise KeyRejected(f"shout refused the API key {self._key}")
        if not self.limited_once:
            self.limited_once = True
            raise RetryAfter("shout per-minute limit reached", retry_after_s=0.2, quota="minute")
        words = len(task.prompt.split())
        return Output(
            value=task.prompt.upper(), model="shout-1", usage=Usage(input_tokens=words, output_tokens=words)
        )


@pytest.mark.anyio
async def test_an_adapter_written_with_public_names_serves_a_task(hive: Hive) -> None:
    keys = [ProviderKey("revoked", ShoutProvider(REVOKED_KEY)), ProviderKey("good", ShoutProvider(GOOD_KEY))]
    worker = Worker(hive.bus, keys, WorkerOptions(provider="shout", fetch_wait_s=0.5))
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        try:
            task_id = await hive.submit("shout", "hola desde fuera")
            view = await hive.wait(task_id, timeout_s=30)
        finally:
            worker.stop()
    assert view.status == "completed", view
    assert (view.output, view.model, view.usage) == (
        "HOLA DESDE FUERA",
        "shout-1",
        Usage(input_tokens=3, output_tokens=3),
    )
    events = await events_of(hive.bus, task_id)
    assert any(isinstance(e, Retrying) and e.quota == "minute" for e in events), events
    assert isinstance(events[-1], Completed)
    assert all(REVOKED_KEY not in repr(e) and GOOD_KEY not in repr(e) for e in events)
