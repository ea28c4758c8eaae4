"""Typed, validated configuration.

Every option of every command is a field of a ``@dataclass``. The command line and YAML files are
generated from those fields, so a field added to a dataclass is at once a documented flag
(``--learning_rate``, with the dashed alias ``--learning-rate``) and a YAML key. Precedence:
command line > ``--config`` YAML > field default.

Use :func:`opt` to declare a field with its help text::

    @dataclass
    class ExampleConfig:
        beta: float = opt(5.0, "DPO temperature.")

        def __post_init__(self):
            check(self.beta > 0, "beta must be > 0")

A command collects several dataclasses; a field name shared by two of them (``seed``,
``max_seq_length``) is one flag that sets both.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, **meta: Any):
    """A dataclass field with help text (and optional ``aliases``, ``choices``)."""
    metadata = {"help": help, **meta}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML/CLI value to the field type, with a message naming the field."""
    inner, optional = _unwrap_optional(tp)
    if optional and inner is bool and isinstance(value, str) and value.strip().lower() == "auto":
        return None  # a tri-state flag: auto / true / false
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required (got null)")
    origin = get_origin(inner)
    try:
        if inner is bool:
            return parse_bool(value)
        if inner in (int, float, str):
            if inner is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(f"expected an integer, got {value}")
            if inner is int and isinstance(value, bool):
                raise ValueError("expected an integer, got a boolean")
            return inner(value)
        if origin is Literal:
            choices = get_args(inner)
            if value not in choices:
                raise ValueError(f"expected one of {', '.join(map(str, choices))}; got {value!r}")
            return value
        if origin in (list, tuple):
            (item_tp,) = get_args(inner)[:1] or (str,)
            if isinstance(value, str):
                value = [value]
            return [_coerce(name, item_tp, v) for v in value]
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError(f"expected a mapping, got {type(value).__name__}")
            return dict(value)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def iter_fields(classes: Iterable[type]) -> list[tuple[dataclasses.Field, Any]]:
    seen: dict[str, tuple[dataclasses.Field, Any]] = {}
    for cls in classes:
        hints = _field_types(cls)
        for f in dataclasses.fields(cls):
            if f.name not in seen:
                seen[f.name] = (f, hints[f.name])
    return list(seen.values())


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def add_fields_to_parser(parser: argparse.ArgumentParser, classes: Iterable[type], title: str | None = None):
    """Add one flag per dataclass field (underscore name plus dashed alias)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f, tp in iter_fields(classes):
        owner = f.metadata.get("group") or title or "options"
        group = groups.get(owner) or parser.add_argument_group(owner)
        groups[owner] = group
        inner, optional = _unwrap_optional(tp)
        names = [f"--{f.name}"]
        if "_" in f.name:
            names.append(f"--{f.name.replace('_', '-')}")
        names += [f"--{a}" for a in f.metadata.get("aliases", ())]
        helptext = f"{f.metadata.get('help', '')} (default: {_default_text(f)})"
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=helptext)
        if inner is bool:
            kwargs.update(nargs="?", const="true", metavar="auto|true|false" if optional else "true|false")
        elif get_origin(inner) in (list, tuple):
            kwargs.update(nargs="+", metavar="VALUE")
        elif get_origin(inner) is Literal:
            kwargs.update(metavar="|".join(map(str, get_args(inner))))
        else:
            kwargs.update(metavar=getattr(inner, "__name__", "VALUE").upper())
        group.add_argument(*names, **kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: cannot be read as a text file ({type(exc).__name__}: {exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build(classes: Iterable[type], values: dict[str, Any], *, strict: bool = True, source: str = "options"):
    """Instantiate each dataclass from one flat ``values`` mapping.

    Unknown keys are an error when ``strict`` (a typo in a YAML file must not be silently ignored).
    """
    classes = list(classes)
    known = {f.name for f, _ in iter_fields(classes)}
    unknown = sorted(set(values) - known)
    if strict and unknown:
        raise ConfigError(f"{source}: unknown option(s): {', '.join(unknown)}")
    out = []
    for cls in classes:
        hints = _field_types(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                kwargs[f.name] = _coerce(f.name, hints[f.name], values[f.name])
        try:
            out.append(cls(**kwargs))
        except TypeError as exc:
            raise ConfigError(f"{cls.__name__}: {exc}") from None
    return out


def merged_values(namespace: argparse.Namespace, classes: Iterable[type]) -> dict[str, Any]:
    """YAML from ``--config`` (if any) overlaid with the flags given on the command line."""
    cli = {k: v for k, v in vars(namespace).items() if k not in ("command", "config", "func")}
    values: dict[str, Any] = {}
    if getattr(namespace, "config", None):
        values.update(load_yaml(namespace.config))
    known = {f.name for f, _ in iter_fields(classes)}
    values.update({k: v for k, v in cli.items() if k in known})
    return values


def to_dict(*configs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cfg in configs:
        out.update(dataclasses.asdict(cfg))
    return out
