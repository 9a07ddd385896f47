"""How deep JSON may nest, checked before anything decodes it.

msgspec (like every recursive decoder and encoder) raises :class:`RecursionError` on a value nested
about a thousand levels deep, and where exactly depends on how deep the caller's own stack already is:
a value that one reader decodes may make the next one fail. So every decoder of a wire type checks the
depth first, on the bytes, against one documented limit: no field of a task (``payload``, ``metadata``)
and no output may nest more than :data:`MAX_NESTING` arrays or objects. A message over it is refused as
a :class:`NestedTooDeep` (a :class:`msgspec.ValidationError`, so each reader's handling of a message that
does not validate applies), and nothing accepted can make a later reader recurse too deep.

The check costs two ``bytes.count`` calls for the usual message; only one that holds more brackets than
the limit has its strings taken out and its brackets summed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import accumulate
from typing import Any, Generic, TypeVar

import msgspec

# Arrays and objects, one in another, that a task's payload or metadata, or an output, may hold.
MAX_NESTING = 32

T = TypeVar("T")

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


class NestedTooDeep(msgspec.ValidationError):
    """A JSON value nested deeper than the limit. ``field`` names where (``payload``,
    ``tasks[3].payload``); the message ends as msgspec's do, so :func:`explain_error` reads it."""

    def __init__(self, field: str, limit: int) -> None:
        self.field = field
        self.limit = limit
        where = f" - at `$.{field}`" if field else ""
        super().__init__(f"nested deeper than {limit} levels (arrays or objects){where}")


def depth_of(data: bytes) -> int:
    """How many arrays and objects of the JSON text ``data`` are open at once, at most."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(accumulate(_STEP[b] for b in brackets), default=0)


def deep_path(data: bytes, limit: int) -> list[str | int]:
    """The path (keys and indexes) to the first array or object of ``data`` that opens past ``limit``
    levels; empty when none does. Reads the text token by token: only for an answer that names it."""
    path: list[str | int] = []
    kinds: list[int] = []  # the open containers: ord("{") or ord("[")
    expect_key = False
    for token in _TOKEN.finditer(data):
        text = token.group()
        head = text[0]
        if head == ord('"'):
            if expect_key:
                path[-1] = text[1:-1].decode("utf-8", "replace")
                expect_key = False
        elif head in b"[{":
            if len(kinds) >= limit:
                return path
            kinds.append(head)
            path.append(0)
            expect_key = head == ord("{")
        elif head in b"]}":
            if kinds:
                kinds.pop()
                path.pop()
            expect_key = False
        elif head == ord(",") and kinds:
            if kinds[-1] == ord("["):
                index = path[-1]
                path[-1] = index + 1 if isinstance(index, int) else 0
            else:
                expect_key = True
    return []


def field_name(path: list[str | int], parts: int) -> str:
    """The first ``parts`` elements of ``path`` as msgspec writes a location: ``tasks[3].payload``."""
    out = ""
    for part in path[:parts]:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def check_json(
    data: bytes | bytearray | memoryview | str, *, enclosing: int, named: int | None = None
) -> None:
    """Raise :class:`NestedTooDeep` if a value inside ``data`` nests more than :data:`MAX_NESTING`
    levels below the ``enclosing`` levels of its message (1 for a task, 2 for an event holding a task,
    3 for a batch). The error names the first ``named`` elements of the path (``enclosing`` by default)."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    limit = MAX_NESTING + enclosing
    if raw.count(b"[") + raw.count(b"{") <= limit or depth_of(raw) <= limit:
        return
    path = deep_path(raw, limit)
    raise NestedTooDeep(field_name(path, enclosing if named is None else named), MAX_NESTING)


class Guarded(Generic[T]):
    """A msgspec JSON decoder that checks the nesting first (see the module's docstring)."""

    def __init__(self, decoder: msgspec.json.Decoder[T], *, enclosing: int) -> None:
        self._decoder = decoder
        self._enclosing = enclosing

    def decode(self, data: bytes | bytearray | memoryview | str) -> T:
        check_json(data, enclosing=self._enclosing)
        try:
            return self._decoder.decode(data)
        except RecursionError:  # not reached within the limit; a decoder must never raise it
            raise NestedTooDeep("", MAX_NESTING) from None


def check_value(value: Any, field: str) -> None:
    """Raise :class:`NestedTooDeep` if the Python value (a task's ``payload``, an output) nests more
    than :data:`MAX_NESTING` lists, tuples or dicts; walked without recursion."""
    for depth, path in _containers(value, field):
        if depth > MAX_NESTING:
            raise NestedTooDeep(path, MAX_NESTING)


def _containers(value: Any, field: str) -> Iterator[tuple[int, str]]:
    stack: list[tuple[Any, int, str]] = [(value, 0, field)]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, dict):
            yield depth + 1, path
            if depth + 1 <= MAX_NESTING:
                stack.extend((v, depth + 1, path) for v in item.values())
        elif isinstance(item, list | tuple):
            yield depth + 1, path
            if depth + 1 <= MAX_NESTING:
                stack.extend((v, depth + 1, path) for v in item)
