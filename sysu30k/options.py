"""Options declared once: a dataclass field carries its default, help, range and choices, and the
command line options and the ``--config`` TOML files are generated from it.

``opt(default, help, ...)`` declares a field; ``cli_options(cls)`` turns the fields of ``cls`` (nested
dataclass fields flattened) into Click options; ``build(cls, values)`` makes the dataclass from the
parsed values; ``apply_config(ctx, values)`` fills the options not given on the command line from a TOML
file, through the same Click types (so its values meet the same ranges) and refusing unknown keys.
Imports nothing from the other subpackages but ``sysu30k.errors``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import typing
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from .errors import UserError

_NONE = type(None)


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
        flag: str | None = None, choices: tuple | None = None, min: float | None = None, max: float | None = None,
        min_open: bool = False, max_open: bool = False, metavar: str | None = None, type: click.ParamType | None = None,
        multiple: bool = False, cli: bool = True, default_note: str | None = None,
        flag_value: str | None = None) -> Any:
    """A dataclass field that is also a command line option.

    ``flag`` names the option when it is not ``--field-name``; ``min``/``max`` (``*_open``: exclusive) and
    ``choices`` are checked at the command line and in config files; ``type`` is a Click type for values
    that are not plain scalars; ``cli=False`` keeps the field off the command line; ``default_note`` is
    shown instead of the default (for a default that is derived, e.g. from another option); ``flag_value``
    makes the value optional: the bare flag means that value.
    """
    meta = {"help": help, "flag": flag, "choices": choices, "range": (min, max, min_open, max_open), "metavar": metavar,
            "type": type, "multiple": multiple, "cli": cli, "default_note": default_note, "flag_value": flag_value}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


class ByteSize(click.ParamType):
    """A byte count with an optional unit: 256MB, 1.5GiB, 500k, 4096."""

    name = "SIZE"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m[2].lower() not in _UNITS:
            self.fail(f"{value!r} is not a size such as 256MB, 1GiB or 500000", param, ctx)
        return int(float(m[1]) * _UNITS[m[2].lower()])


class Listed(click.ParamType):
    """Comma-separated values (``40,70``; a TOML list in a config file) as a tuple of ``item``."""

    def __init__(self, item: type, name: str):
        self.item, self.name = item, name

    def convert(self, value, param, ctx) -> tuple:
        if isinstance(value, tuple):
            return value
        parts = value if isinstance(value, list) else [s for s in str(value).split(",") if s.strip()]
        try:
            return tuple(self.item(str(p).strip()) for p in parts)
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.item.__name__} values", param, ctx)


class KeyValue(click.ParamType):
    """``key=value`` with a JSON value when it parses (numbers, booleans, objects), else the string."""

    name = "KEY=VALUE"

    def convert(self, value, param, ctx) -> tuple[str, Any]:
        if isinstance(value, tuple):
            return value
        key, sep, text = str(value).partition("=")
        if not sep or not key:
            self.fail(f"takes key=value, not {value!r}", param, ctx)
        try:
            return key, json.loads(text)
        except json.JSONDecodeError:
            return key, text


def storage_option_field(help: str = "Passed to the filesystem of a remote DST (repeatable; JSON values allowed). "
                    "S3 endpoint, region and keys come from the standard AWS variables and config.") -> Any:
    """The ``--storage-option KEY=VALUE`` field of every command that reads or writes a dataset."""
    return opt(factory=dict, help=help, flag="--storage-option", multiple=True, type=KeyValue(), metavar="KEY=VALUE")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base(annotation: Any) -> Any:
    """The type of ``int``, ``int | None``, ``tuple[int, ...]`` and the like, without its ``None``."""
    args = typing.get_args(annotation)
    return next(a for a in args if a is not _NONE) if _NONE in args else annotation


def _is_dataclass_type(t: Any) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def fields(cls: type) -> list[tuple[str, dataclasses.Field, Any]]:
    """The command line fields of ``cls`` as (option name, field, type), nested dataclasses flattened."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if _is_dataclass_type(t):
            out += fields(t)
        elif f.metadata.get("cli", False):
            out.append((f.name, f, t))
    return out


def _click_type(f: dataclasses.Field, t: Any) -> click.ParamType | Any:
    meta = f.metadata
    if meta["type"] is not None:
        return meta["type"]
    base = _base(t)
    if meta["choices"] is not None:
        return click.Choice([str(c) for c in meta["choices"]])
    lo, hi, lo_open, hi_open = meta["range"]
    if base is int:
        return click.IntRange(lo, hi, min_open=lo_open, max_open=hi_open) if (lo, hi) != (None, None) else click.INT
    if base is float:
        return click.FloatRange(lo, hi, min_open=lo_open, max_open=hi_open) if (lo, hi) != (None, None) else click.FLOAT
    return click.STRING


def _default_text(f: dataclasses.Field) -> str:
    meta = f.metadata
    if meta["default_note"] is not None:
        return meta["default_note"]
    d = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if d is None or d == () or d == {}:
        return ""
    if isinstance(d, bool):
        return "on" if d else "off"
    if isinstance(d, (tuple, list)):
        return ",".join(str(x) for x in d)
    return str(d)


def field_default(f: dataclasses.Field) -> Any:
    """The default value of field ``f``."""
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def cli_options(cls: type, defaults: bool = True, notes: dict[str, str] | None = None,
                only: tuple[str, ...] | None = None) -> Callable:
    """A decorator adding one Click option per command line field of ``cls`` (or of its fields ``only``).

    ``defaults=False`` gives every option the default None (the caller fills unset ones, e.g. per stage),
    showing ``notes[name]`` or the field's default in the help.
    """
    chosen = [(n, f, t) for n, f, t in fields(cls) if only is None or n in only]
    if only is not None and len(chosen) != len(only):
        raise ValueError(f"{cls.__name__} has no option {set(only) - {n for n, _, _ in chosen}}")

    def decorate(fn: Callable) -> Callable:
        for name, f, t in reversed(chosen):
            meta = f.metadata
            flag = flag_of(f)
            base = _base(t)
            note = (notes or {}).get(name, _default_text(f))
            help_text = meta["help"] + (f"  [default: {note}]" if note else "")
            if base is bool and meta["type"] is None:
                decl = flag if "/" in flag else f"{flag}/--no-{flag[2:]}"
                option = click.option(decl, name, default=field_default(f) if defaults else None, help=help_text)
            else:
                optional = {"is_flag": False, "flag_value": meta["flag_value"]} if meta.get("flag_value") else {}
                option = click.option(flag, name, type=_click_type(f, t), multiple=meta["multiple"],
                                      default=(field_default(f) if defaults and not meta["multiple"] else None),
                                      metavar=meta["metavar"], help=help_text, **optional)
            fn = option(fn)
        return fn
    return decorate


def flag_of(f: dataclasses.Field) -> str:
    """The command line flag of field ``f``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check(obj: Any) -> None:
    """Raise UserError when a field of the dataclass ``obj`` (or of a dataclass inside it) breaks its declared
    range or choices, so library callers meet the same limits as the command line."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check(value)
            continue
        meta = f.metadata
        if not meta.get("cli") or value is None or meta.get("type") is not None:
            continue
        if meta["choices"] is not None and value not in meta["choices"]:
            raise UserError(f"{flag_of(f)} must be one of {', '.join(map(str, meta['choices']))}, not {value!r}")
        lo, hi, lo_open, hi_open = meta["range"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value != value:
            raise UserError(f"{flag_of(f)} must be a number, not NaN")
        if (lo is not None and (value < lo or (lo_open and value == lo))) or \
                (hi is not None and (value > hi or (hi_open and value == hi))):
            raise UserError(f"{flag_of(f)} must lie in {'(' if lo_open else '['}{'-inf' if lo is None else lo}, "
                            f"{'inf' if hi is None else hi}{')' if hi_open else ']'}, not {value}")


def _convert(f: dataclasses.Field, t: Any, value: Any) -> Any:
    """A parsed option value as the field's type (choices are strings at the command line)."""
    base = _base(t)
    if value is None:
        return None
    if f.metadata["choices"] is not None and base in (int, float):
        return base(value)
    if f.metadata["multiple"]:
        return dict(value) if base is dict else tuple(value)
    return value


def build(cls: type, values: dict[str, Any], **fixed: Any) -> Any:
    """An instance of ``cls`` from command line ``values`` (missing or None: the field's default).

    ``fixed`` sets fields of ``cls`` itself that are not options (or overrides them)."""
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if f.name in fixed:
            kwargs[f.name] = fixed[f.name]
        elif _is_dataclass_type(t):
            kwargs[f.name] = build(t, values)
        elif f.metadata.get("cli", False) and values.get(f.name) is not None:
            kwargs[f.name] = _convert(f, t, values[f.name])
    return cls(**kwargs)


def apply_config(ctx: click.Context, values: dict[str, Any], path: str | None) -> dict[str, Any]:
    """``values`` with every option not given on the command line taken from the TOML file ``path``.

    Keys are option names as on the command line (``per_bag`` or ``per-bag``, ``pairwise_weight``); each value
    goes through the option's own type, so ranges and choices hold as there. Unknown keys are refused."""
    if not path:
        return values
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise UserError(f"--config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"--config {path} is not valid TOML: {exc}") from None
    params = {}
    for p in ctx.command.params:
        if isinstance(p, click.Option) and p.name != "config_file":
            for key in (p.name, *(o.lstrip("-").replace("-", "_") for o in p.opts)):
                params[key] = p
    out = dict(values)
    for key, raw in table.items():
        param = params.get(key.replace("-", "_"))
        name = param.name if param is not None else key
        if param is None:
            raise UserError(f"--config {path}: unknown option {key!r} for `{ctx.command.name}` "
                            f"(see sysu30k {ctx.command.name} --help)")
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            continue                                    # flags override the file
        if isinstance(raw, dict):
            raw = list(raw.items())                     # storage_options = {key = value, ...}
        elif param.multiple and not isinstance(raw, list):
            raw = [raw]
        try:
            out[name] = param.type_cast_value(ctx, raw)
        except click.BadParameter as exc:
            raise UserError(f"--config {path}: {key} = {raw!r}: {exc.message}") from None
    return out
