"""JSON read back into a dataclass, checked field by field against the field's annotation.

Settings files come from model folders that may be old, hand-edited or a stranger's; a value of
the wrong JSON type (``"patch": 5``, ``"steps": "x"``) used to surface deep inside as a TypeError or
AttributeError. :func:`check_fields` refuses it first, in one line naming the file and the field.
The annotations are the schema, so a field added to a dataclass is checked without more code.

JSON has fewer types than Python: an integer is a valid float, a list stands for a tuple, and an
object's keys are always strings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flexpatch.errors import FlexPatchError

__all__ = ["check_fields", "describe", "matches"]

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object"}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # resolved once per class: the annotations are strings under ``from __future__ import annotations``
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def matches(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a type annotation (bools are not numbers; ints are floats)."""
    if tp is Any or tp is object:
        return True
    if tp is None or tp is type(None):
        return value is None
    if _is_union(tp):
        return any(matches(value, arg) for arg in typing.get_args(tp))
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is str:
        return isinstance(value, str)
    if origin in (dict, Mapping):
        return isinstance(value, dict) and (
            not args or all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
        )
    if origin in (tuple, list):
        return isinstance(value, list | tuple) and _items_match(value, args, variadic=origin is list)
    return True  # a type JSON cannot hold (a nested dataclass, a path): its own reader checks it


def _items_match(value: list | tuple, args: tuple[Any, ...], variadic: bool) -> bool:
    if not args:
        return True
    if variadic or (len(args) == 2 and args[1] is Ellipsis):
        return all(matches(v, args[0]) for v in value)
    return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args, strict=True))


def describe(tp: Any) -> str:
    """The annotation in words, as a message shows it: ``a list of integers``, ``null or a number``."""
    if tp is None or tp is type(None):
        return "null"
    if _is_union(tp):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if origin in (tuple, list):
        if not args:
            return "a list"
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {_plural(args[0])}"
        if len(set(args)) == 1:
            return f"a list of {len(args)} {_plural(args[0])}"
        return f"a list of [{', '.join(describe(a) for a in args)}]"
    if origin in (dict, Mapping) and args and args[1] is not Any:
        return f"an object of {_plural(args[1])}"
    return _NAMES.get(origin, getattr(origin, "__name__", str(origin)))


def _plural(tp: Any) -> str:
    words = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
    return words.get(tp, f"({describe(tp)})")


def _shown(value: Any) -> str:
    """The offending value as JSON, cut short: a message stays one readable line."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(
    cls: type, data: Any, where: str | Path, *, older: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Check a JSON object against the fields of dataclass ``cls``; return it unchanged.

    Only the fields present are checked (a missing one takes its default or is the reader's to
    refuse); keys that are no field are left alone (older or newer files still load).

    Args:
        cls: the dataclass whose annotations say what each field must be.
        data: the parsed JSON.
        where: the file (or what the data is) named in the message.
        older: field -> the type an older file's layout gives it, accepted as well (its reader
            converts it).

    Raises:
        FlexPatchError: ``data`` is not an object, or a field has the wrong type.
    """
    if not isinstance(data, dict):
        raise FlexPatchError(f"{where}: must be a JSON object, got {_shown(data)}")
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name] if not older or f.name not in older else hints[f.name] | older[f.name]
        value = data[f.name]
        if not matches(value, tp):
            raise FlexPatchError(f"{where}: field '{f.name}' must be {describe(tp)}, got {_shown(value)}")
    return data
