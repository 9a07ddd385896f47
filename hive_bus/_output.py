"""Structured output: a task's ``response_format`` checked, at submission (the schema) and on the worker
(the output), with the ``jsonschema`` library.

Why ``jsonschema``: it is the reference implementation of JSON Schema for Python (every draft, 3 to
2020-12), kept by the JSON Schema organisation, pure Python over ``referencing`` (with a Rust ``rpds``
wheel for arm64 too), and it names each error's path, which the failed event passes on. It is a base
dependency because the worker runtime validates the output and the client checks the schema before it
queues a task; both are in the base install. A ``$ref`` is resolved within the schema only: nothing is
fetched from the network.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, cast

import msgspec
from jsonschema import exceptions, validators
from jsonschema.protocols import Validator
from referencing.exceptions import Unresolvable

from ._errors import FailNow, InvalidOutput
from ._messages import JsonObjectFormat, JsonSchemaFormat, ResponseFormat
from ._nesting import NestedTooDeep, check_json

# Schemas up to this size (encoded) are remembered with what was worked out from them; a larger one is
# worked out each time, so that the caches hold at most a few MB.
CACHED_SCHEMA_BYTES = 16 * 1024
# a validation error quotes the offending value: kept short, the whole output is in no event anyway
MAX_QUOTED_CHARS = 300


def schema_error(schema: dict[str, Any]) -> str | None:
    """What makes ``schema`` not a valid JSON Schema (its dialect's metaschema says), or None.

    Remembered per schema (by its encoding): checking one against the 2020-12 metaschema takes about
    4 ms, and a batch's tasks, or a client's, share their schema."""
    encoded = msgspec.json.encode(schema)
    return (
        _schema_error(encoded) if len(encoded) <= CACHED_SCHEMA_BYTES else _schema_error.__wrapped__(encoded)
    )


@lru_cache(maxsize=256)
def _schema_error(schema_json: bytes) -> str | None:
    schema = msgspec.json.decode(schema_json)
    dialect = schema.get("$schema")
    if dialect is not None and not isinstance(dialect, str):
        return "not a valid JSON Schema: $schema must be a string (the URI of a dialect)"
    cls = validators.validator_for(schema, default=cast(Any, None))  # None: a dialect it does not know
    if cls is None and dialect is not None:
        return (
            f"not a JSON Schema dialect this hive knows: $schema {_short(dialect)!r} (drafts 3, 4, 6, 7, "
            "2019-09 and 2020-12 are; without $schema, 2020-12)"
        )
    cls = cls or validators.Draft202012Validator
    try:
        cls.check_schema(schema)
    except exceptions.SchemaError as exc:
        return f"not a valid JSON Schema: {_short(exc.message)} (at {exc.json_path} of the schema)"
    except Exception as exc:  # the checker tripped on it (a $ref it cannot follow...): a 400 all the same
        return f"not a usable JSON Schema: {_short(f'{type(exc).__name__}: {exc}')}"
    return None


def wants_json(response_format: ResponseFormat | None) -> bool:
    return isinstance(response_format, JsonObjectFormat | JsonSchemaFormat)


def structured(response_format: ResponseFormat | None, value: Any) -> Any:
    """The output as the task asked for it: for a JSON format, the parsed JSON value (a text output is
    parsed; a value a provider parsed already, such as Anthropic's tool input, is taken as it is),
    checked against the format. Raises :class:`InvalidOutput` naming the first error, or
    :class:`FailNow` for a schema whose ``$ref`` points nowhere (no output can match it)."""
    if not wants_json(response_format):
        return value
    if isinstance(value, str):
        try:
            check_json(value.encode(), enclosing=0)
            value = msgspec.json.decode(value)
        except NestedTooDeep as exc:
            raise InvalidOutput(f"the output is JSON nested too deep: {exc}") from None
        except msgspec.DecodeError as exc:
            raise InvalidOutput(f"the output is not valid JSON ({exc}): {_short(repr(value))}") from None
    if isinstance(response_format, JsonObjectFormat):
        if not isinstance(value, dict):
            raise InvalidOutput(f"the output is JSON but not an object: {_short(repr(value))}")
        return value
    assert isinstance(response_format, JsonSchemaFormat)
    spec = response_format.json_schema
    encoded = msgspec.json.encode(spec.schema)
    validator = (
        _validator(encoded) if len(encoded) <= CACHED_SCHEMA_BYTES else _validator.__wrapped__(encoded)
    )
    if isinstance(validator, str):  # a task built by hand, past the submission's check
        raise FailNow(f"the schema {spec.name!r} is {validator}")
    try:
        error = exceptions.best_match(validator.iter_errors(value))
    except Unresolvable as exc:
        raise FailNow(f"the schema {spec.name!r} has a $ref that cannot be resolved: {exc}") from None
    except RecursionError:  # a $ref cycle that consumes nothing ({"$ref": "#"}): no output can pass
        raise FailNow(f"the schema {spec.name!r} refers to itself without end ($ref)") from None
    if error is not None:
        raise InvalidOutput(
            f"the output does not match the schema {spec.name!r}: at {error.json_path}: {_short(error.message)}"
        )
    return value


@lru_cache(maxsize=64)
def _validator(schema_json: bytes) -> Validator | str:
    """One validator per schema (keyed by its encoding): a batch of tasks shares its schema. What is
    wrong with the schema instead, for one that is not valid."""
    schema = msgspec.json.decode(schema_json)
    if (problem := schema_error(schema)) is not None:
        return problem
    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    return cls(schema)


def _short(text: str) -> str:
    return text if len(text) <= MAX_QUOTED_CHARS else f"{text[:MAX_QUOTED_CHARS]}..."
