"""Runtime checks for a channel's message type ``T``.

Plain classes are checked with ``isinstance``; ``typing`` forms are checked as far as is
cheap and unambiguous: unions and ``Optional`` by their members, ``Literal`` by value,
``Annotated`` by its first argument, and parameterised generics (``list[int]``,
``dict[str, float]``, ``Sequence[int]``) by their origin class only, so a send never
walks a whole container.
"""

from __future__ import annotations

import collections.abc
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = ["type_checker", "type_name"]

Checker = Callable[[Any], bool]


def type_checker(tp: Any) -> Checker | None:
    """A predicate for values of ``tp``, or None when anything goes."""
    if tp is None or tp is type(None):
        return _is_none
    if tp is Any or tp is object or isinstance(tp, typing.TypeVar):
        return None
    if tp is float:
        return _is_float
    if tp is complex:
        return _is_complex
    origin = typing.get_origin(tp)
    if origin is None:
        if isinstance(tp, type):
            return _instance_of(tp)
        if hasattr(tp, "__supertype__"):  # typing.NewType
            return type_checker(tp.__supertype__)
        return None
    args = typing.get_args(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        members = [type_checker(arg) for arg in args]
        checks = [member for member in members if member is not None]
        if len(checks) < len(members):
            return None
        return lambda value: any(check(value) for check in checks)
    if origin is typing.Literal:
        return lambda value: any(value == arg and type(value) is type(arg) for arg in args)
    if origin is typing.Annotated:
        return type_checker(args[0])
    if origin is collections.abc.Callable:
        return callable
    if origin is type:
        return lambda value: isinstance(value, type)
    if isinstance(origin, type):
        return _instance_of(origin)
    return None


def type_name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__qualname__ if tp.__module__ != "builtins" else tp.__name__
    return repr(tp).replace("typing.", "")


def _instance_of(cls: type) -> Checker:
    return lambda value: isinstance(value, cls)


def _is_none(value: Any) -> bool:
    return value is None


def _is_float(value: Any) -> bool:
    # PEP 484's numeric tower: an int is acceptable where a float is expected.
    return isinstance(value, (float, int))


def _is_complex(value: Any) -> bool:
    return isinstance(value, (complex, float, int))
