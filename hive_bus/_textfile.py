"""A settings file's text, read one way for every file a setting names (routes, prices, budgets, tokens,
secrets, webhooks): UTF-8, and one reason in words when it cannot be read, never its content."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

_BARE = re.compile(r"[A-Za-z0-9_-]+")


class UnreadableFile(ValueError):
    """Why a file cannot be read: the system's reason (no such file, permission denied), or that it is
    not UTF-8 text. The caller puts it after the setting's name and the path."""


def read_text(path: str | Path) -> str:
    """The file's text. Raises :class:`UnreadableFile`."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UnreadableFile(exc.strerror or type(exc).__name__) from None
    except UnicodeDecodeError:
        raise UnreadableFile("it is not UTF-8 text") from None


def parse_toml(text: str, where: str) -> dict[str, Any]:
    """``text`` as TOML. Raises ValueError ``<where>: not valid TOML: <why>``: the caller raises it again
    as its own error."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{where}: not valid TOML: {exc}") from None


def read_toml(path: str | Path, where: str, *, unreadable: str | None = None) -> tuple[dict[str, Any], str]:
    """The TOML file at ``path``, and its text. Raises ValueError naming ``where``: ``<unreadable>: <why>``
    (``cannot read <where>`` by default) when it cannot be read, as :func:`parse_toml` when it is not
    TOML; the caller raises it again as its own error."""
    try:
        text = read_text(path)
    except UnreadableFile as exc:
        raise ValueError(f"{unreadable or f'cannot read {where}'}: {exc}") from None
    return parse_toml(text, where), text


def toml_key(parts: Sequence[str]) -> str:
    """A dotted TOML key as a user writes it: ``models."gpt-4.1".input_per_mtok``."""
    return ".".join(p if _BARE.fullmatch(p) else json.dumps(p) for p in parts)


def line_of(text: str, table: Sequence[str], key: str | None = None) -> int | None:
    """The line (1-based) of ``key`` under the table header ``[table]`` (or of the header itself), as
    far as a plain reading of the file finds it; None when it is written some other way (an inline
    table, a dotted key)."""
    if not table:
        return None
    header = re.compile(
        r"\s*\[\s*"
        + r"\s*\.\s*".join(f'(?:"{re.escape(p)}"|{re.escape(p)})' for p in table)
        + r"\s*\]\s*(#.*)?$"
    )
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if header.match(line):
            if key is None:
                return i + 1
            setting = re.compile(rf'\s*(?:"{re.escape(key)}"|{re.escape(key)})\s*=')
            for j in range(i + 1, len(lines)):
                if lines[j].lstrip().startswith("["):
                    break
                if setting.match(lines[j]):
                    return j + 1
            return i + 1
    return None


def convert_at(value: Any, kind: type[Any], table: Sequence[str], where: str, text: str) -> Any:
    """``value``, the TOML table ``table`` of a file read from ``text``, as ``kind``. Raises ValueError
    ``<where>: line N, key K: <why>`` (the line where it is found; a path into a nested table is named
    by the table alone, whose line is its header): the caller raises it again as its own error."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        message, sep, path = str(exc).rpartition(" - at `$.")
        if not sep:
            message, path = str(exc), ""
        field = path.rstrip("`") or None
        simple = field if field and field.isidentifier() else None
        line = line_of(text, table, simple)
        at = f"line {line}, " if line else ""
        raise ValueError(
            f"{where}: {at}key {toml_key([*table, *([simple] if simple else [])])}: {message}"
        ) from None
