"""Command-line flags generated from a settings dataclass: one ``--flag-name`` per field, typed from its
annotation, so a field added to ``TrainConfig`` / ``SSLConfig`` / ``DenseConfig`` is a flag everywhere at once.

Layer: imports only the standard library (every command module may use it)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, Iterable, Mapping

__all__ = ["add_dataclass_flags", "dataclass_values"]


def _kind(hint: Any) -> Any:
    """``Optional[X]`` -> X; anything else unchanged."""
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: Iterable[str] = (),
                        defaults: Mapping[str, Any] = {}, none_help: str = "unset",
                        helps: Mapping[str, str] = {}) -> None:
    """One flag per field of ``cls`` except ``skip``: bools are switches (``--no-x`` where the default is True),
    dicts take JSON, tuples take their items, everything else its annotated type. ``defaults`` overrides a
    field's default for this parser; ``none_help`` says what a None default means."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag, kind = "--" + field.name.replace("_", "-"), _kind(hints[field.name])
        default = defaults.get(field.name, _default(field))
        text = helps.get(field.name, "")
        shown = f"default: {default if default is not None else none_help}" + (f"; {text}" if text else "")
        if kind is bool:
            if default:
                parser.add_argument("--no-" + flag[2:], dest=field.name, action="store_false", default=True,
                                    help=text or None)
            else:
                parser.add_argument(flag, action="store_true", default=False, help=text or None)
        elif typing.get_origin(kind) is dict or kind is dict:
            parser.add_argument(flag, type=json.loads, default=dict(default or {}), help=f"JSON; {shown}")
        elif typing.get_origin(kind) is tuple:  # tuple[float, float] takes 2 values, tuple[int, ...] any number
            items = typing.get_args(kind)
            parser.add_argument(flag, type=items[0], nargs="+" if Ellipsis in items else len(items), default=default,
                                help=shown)
        else:
            parser.add_argument(flag, type=kind, default=default, help=shown)


def dataclass_values(cls: type, args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """The fields of ``cls`` that ``args`` holds (tuples restored from argparse's lists), with ``overrides``."""
    values = {}
    for field in dataclasses.fields(cls):
        if hasattr(args, field.name):
            value = getattr(args, field.name)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    values.update(overrides)
    return values
