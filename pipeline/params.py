"""Typed, validated configs from plain dicts (a section of params.yaml, as the stage read it).

Each pipeline module declares a frozen dataclass config beside the code that uses it; this
module turns a dict into one, refusing unknown keys and wrong types with a message that
names the key, the value and what is allowed. Value checks (ranges, combinations) live in
each config's ``__post_init__`` and raise ``ParamError`` through ``require``.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args, get_origin

from pipeline.errors import PipelineError

T = TypeVar("T")


class ParamError(PipelineError, ValueError):
    """A parameter that cannot be used; the message says which and what is allowed."""


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ParamError(f"{key}={value!r} is not allowed: {allowed}")


def parse(cls: type[T], section: Any, where: str) -> T:
    """Build ``cls`` (a dataclass) from ``section``; ``where`` names it in errors ('train')."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ParamError(f"{where} must be a mapping of keys to values, got {section!r}")
    fields = {f.name: f for f in dataclasses.fields(cast(Any, cls)) if f.init}
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise ParamError(
            f"unknown key {where}.{unknown[0]} (allowed keys: {', '.join(sorted(fields))})"
        )
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], section[name], f"{where}.{name}") for name in section}
    missing = [n for n, f in fields.items() if n not in values and _has_no_default(f)]
    if missing:
        raise ParamError(f"missing key {where}.{missing[0]}")
    return cls(**values)


def _has_no_default(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(option, value, key)
            except ParamError:
                pass
        raise ParamError(f"{key}={value!r} has the wrong type: expected {_name(tp)}")
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise ParamError(f"{key}={value!r} is not allowed: one of {', '.join(map(repr, args))}")
    if origin is tuple:  # tuple[X, ...]
        if not isinstance(value, (list, tuple)):
            raise ParamError(f"{key}={value!r} has the wrong type: expected a list of {_name(args[0])}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is type(None):
        if value is None:
            return None
        raise ParamError(f"{key}={value!r} has the wrong type: expected null")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # YAML writes 1e-3 as a string but 3 as an int: accept ints
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # PyYAML reads '1e-3' (no dot) as a string
        except ValueError:
            pass
    if isinstance(value, bool) and tp is not bool:
        raise ParamError(f"{key}={value!r} has the wrong type: expected {_name(tp)}")
    if isinstance(value, tp):
        return value
    raise ParamError(f"{key}={value!r} has the wrong type: expected {_name(tp)}")


def _name(tp: Any) -> str:
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_name(a) for a in get_args(tp))
    if get_origin(tp) is Literal:
        return " or ".join(map(repr, get_args(tp)))
    if get_origin(tp) is tuple:
        return f"a list of {_name(get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}: the form MLflow params and DVC -S use."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def read_file(path: Path) -> dict:
    """A params file (YAML): a mapping of sections, or a ParamError that says what is wrong."""
    import yaml
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamError(f"{path.resolve()} not found: run from the repository root") from None
    except yaml.YAMLError as e:
        raise ParamError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ParamError(f"{path} must be a mapping of sections (download, model, train, ...)")
    return data


def flags(parser: argparse.ArgumentParser, cls: type, section: str) -> None:
    """One command-line flag per field of the dataclass ``cls`` (``max_batch`` -> ``--max-batch``),
    typed as the field, its help from the field's ``metadata["help"]``. A flag not given is None,
    so ``overrides`` tells it from one that was."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, name = hints[f.name], "--" + f.name.replace("_", "-")
        help_ = f"{f.metadata.get('help', '')} [{section}.{f.name}]"
        if tp is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif get_origin(tp) is Literal:
            parser.add_argument(name, choices=get_args(tp), default=None, help=help_)
        else:
            parser.add_argument(name, type=tp, default=None, metavar=f.name.upper(), help=help_)


def overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` that ``args`` (parsed with ``flags``) set."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
