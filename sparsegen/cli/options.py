"""Command-line flags derived from a method's config fields: one vocabulary everywhere.

Every option of a config class becomes ``--field-name`` (underscores as dashes), parsed
by the field's type:

=============================  =======================================================
field type                     on the command line
=============================  =======================================================
``int``, ``float``             ``--block-size 64``, ``--decay-factor 0.2``
``bool``                       ``--sink`` / ``--no-sink``
an enum (``Backend``, ...)     one of its values: ``--backend torch``
tuples, int-or-tuple           comma-separated: ``--kernel-size 18,24,24``, ``--top-k 2``
``Optional[...]``              ``none`` for None: ``--tile none``
=============================  =======================================================

Flags default to "not given", so :func:`config_options` returns only what the user typed:
a preset's values stay unless a flag overrides that one field. The config validates the
values (once), and its message names the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from typing import Any, Callable

from ..methods import MethodConfig

__all__ = ["add_config_arguments", "config_options", "flag_name"]

_TRUE = ("1", "true", "t", "yes", "on")
_FALSE = ("0", "false", "f", "no", "off")


def flag_name(field_name: str) -> str:
    """``decay_factor`` -> ``--decay-factor``."""
    return "--" + field_name.replace("_", "-")


def _union_args(typ) -> tuple:
    origin = typing.get_origin(typ)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(typ)
    return (typ,)


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false (or 1/0), got {text!r}")


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _value_parser(typ) -> tuple[Callable[[str], Any], str]:
    """(parser of one command-line string for a field of type ``typ``, metavar)."""
    options = [a for a in _union_args(typ) if a is not type(None)]
    optional = len(options) < len(_union_args(typ))
    scalars = [a for a in options if typing.get_origin(a) is not tuple]
    tuples = [a for a in options if typing.get_origin(a) is tuple]
    item = None
    if tuples:
        item_types = {t for t in typing.get_args(tuples[0]) if t is not Ellipsis}
        item = item_types.pop() if len(item_types) == 1 else None
    scalar = scalars[0] if scalars else item
    convert = {bool: _parse_bool, int: _parse_int, float: _parse_float}.get(scalar or item, str)

    def parse(text: str):
        if optional and text.strip().lower() == "none":
            return None
        if tuples and ("," in text or not scalars):
            return tuple(convert(x) for x in text.split(",") if x.strip())
        return convert(text)

    metavar = ({int: "N", float: "X", bool: "BOOL"}.get(scalar or item, "VALUE")
               + (",..." if tuples else "") + ("|none" if optional else ""))
    return parse, metavar


def _show(value) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, *, shared: bool = True,
                         title: str = "") -> None:
    """Add a flag for every option of ``config_cls`` (with ``shared=False``, only the
    method's own, not the schedule/backend fields every method has)."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
        raise TypeError(f"config_cls must be a MethodConfig subclass, got {config_cls!r}")
    group = parser.add_argument_group(title or f"options of method '{config_cls.method}' ({config_cls.__name__})")
    hints = config_cls.field_types()
    for f in config_cls.option_fields(shared=shared):
        typ = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "required" if f.name == "kernel_size" and default is None else f"default {_show(default)}"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{config_cls.__name__}.{f.name} ({shown})")
        if typ is bool:
            group.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(typ, type) and issubclass(typ, enum.Enum):
            group.add_argument(flag_name(f.name), choices=[e.value for e in typ], **kw)
        else:
            parse, metavar = _value_parser(typ)
            group.add_argument(flag_name(f.name), type=parse, metavar=metavar, **kw)


def config_options(args: argparse.Namespace, config_cls: type, *, shared: bool = True) -> dict:
    """The options of ``config_cls`` the user gave on the command line, as keyword arguments."""
    return {f.name: getattr(args, f.name) for f in config_cls.option_fields(shared=shared) if hasattr(args, f.name)}
