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

Other trainers' spellings of an option are :class:`Alias` entries (a table the command line owns):
each becomes a flag and a YAML key that sets its target field; an alias given together with its
target (or two aliases of one field) in the same source is an error. One YAML file serves several
commands: :func:`command_values` keeps the keys the command uses, returns the keys only other
commands use (for a note), and refuses keys no command knows, with a "did you mean" suggestion.
Float options must be finite (``inf``/``nan`` in any spelling are refused, naming the option).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Union, get_args, get_origin

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
            out = inner(value)
            if inner is float and not math.isfinite(out):
                raise ValueError(f"expected a finite number, got {value!r}")
            return out
        if origin is Literal:
            choices = get_args(inner)
            if value not in choices:
                close = suggest(str(value), map(str, choices))
                raise ValueError(f"expected one of {', '.join(map(str, choices))}; got {value!r}"
                                 + (f" (did you mean {close}?)" if close else ""))
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


ALIAS_DEST = "alias:"  # argparse dest prefix of alias flags (resolved by :func:`resolve_aliases`)


@dataclass(frozen=True)
class Alias:
    """Another trainer's name for a field: ``target`` is the field, ``origin`` the trainer (for help and
    docs); ``convert`` maps the other trainer's value conventions (``-1`` for "no limit") to ours."""

    target: str
    origin: str
    convert: Callable[[Any], Any] | None = None


def _arg_kwargs(tp: Any) -> dict[str, Any]:
    inner, optional = _unwrap_optional(tp)
    if inner is bool:  # bool | None: a tri-state flag (auto, true, false)
        return dict(nargs="?", const="true", metavar="auto|true|false" if optional else "true|false")
    if get_origin(inner) in (list, tuple):
        return dict(nargs="+", metavar="VALUE")
    if get_origin(inner) is Literal:
        return dict(metavar="|".join(map(str, get_args(inner))))
    return dict(metavar=getattr(inner, "__name__", "VALUE").upper())


def flag_names(name: str) -> list[str]:
    """``--name`` plus its dashed spelling ``--na-me``."""
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def add_fields_to_parser(parser: argparse.ArgumentParser, classes: Iterable[type], title: str | None = None,
                         aliases: Mapping[str, Alias] | None = None):
    """Add one flag per dataclass field (underscore name plus dashed alias), and hidden flags for the
    ``aliases`` whose target is one of the fields (named in the target's help)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    aliases = aliases or {}
    for f, tp in iter_fields(classes):
        owner = f.metadata.get("group") or title or "options"
        group = groups.get(owner) or parser.add_argument_group(owner)
        groups[owner] = group
        names = flag_names(f.name) + [f"--{a}" for a in f.metadata.get("aliases", ())]
        others = [a for a, alias in aliases.items() if alias.target == f.name]
        also = "; also " + ", ".join(f"--{a} ({aliases[a].origin})" for a in others) if others else ""
        helptext = f"{f.metadata.get('help', '')} (default: {_default_text(f)}{also})"
        group.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, help=helptext, **_arg_kwargs(tp))
        for a in others:
            group.add_argument(*flag_names(a), dest=ALIAS_DEST + a, default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS, **_arg_kwargs(tp))


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


def suggest(name: str, candidates: Iterable[str]) -> str | None:
    """The closest of ``candidates`` to a misspelt ``name`` (difflib), or None."""
    match = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return match[0] if match else None


def resolve_aliases(values: Mapping[str, Any], aliases: Mapping[str, Alias], source: str,
                    prefix: str = "", given: dict[str, str] | None = None) -> dict[str, Any]:
    """``values`` with alias keys (YAML keys or ``ALIAS_DEST`` argparse dests) replaced by their targets.

    Two names of one option in the same source (an alias and its target, or two aliases) are an error;
    ``prefix`` (``--`` on the command line) is how the message spells the names; ``given`` (when passed)
    receives each target's name as written.
    """
    out: dict[str, Any] = {}
    given = {} if given is None else given
    for key, value in values.items():
        name = key[len(ALIAS_DEST):] if key.startswith(ALIAS_DEST) else key
        alias = aliases.get(name)
        target = alias.target if alias else name
        if target in given:
            raise ConfigError(f"{source}: {prefix}{given[target]} and {prefix}{name} are the same option "
                              f"({prefix}{target}); give it once")
        given[target] = name
        out[target] = alias.convert(value) if alias and alias.convert else value
    return out


def command_values(namespace: argparse.Namespace, classes: Iterable[type], *, aliases: Mapping[str, Alias],
                   owners: Mapping[str, list[str]], unsupported: Mapping[str, str]
                   ) -> tuple[dict[str, Any], list[str]]:
    """The values of one command: ``--config`` YAML (if any) overlaid with the command-line flags.

    ``owners`` maps every option of every command to the commands that use it. YAML keys of other
    commands only are returned as the second element, as written (the caller notes them); keys that no command
    knows are an error naming each one (with a suggestion, or why an ``unsupported`` option has no
    meaning here), and so is a YAML value of the wrong type (a non-finite float, ...) that the command line does
    not replace: every such error names the file.
    """
    types = {f.name: tp for f, tp in iter_fields(classes)}
    here = set(types)
    cli = {k: v for k, v in vars(namespace).items() if k in here or k.startswith(ALIAS_DEST)}
    from_cli = resolve_aliases(cli, aliases, "command line", prefix="--")
    values: dict[str, Any] = {}
    ignored: list[str] = []
    path = getattr(namespace, "config", None)
    if path:
        written: dict[str, str] = {}
        yaml_values = resolve_aliases(load_yaml(path), aliases, str(path), given=written)
        errors = []
        for key, value in yaml_values.items():
            if key in here:
                values[key] = value
                if key not in from_cli:  # a bad value the command line does not replace: name the file
                    try:
                        _coerce(written.get(key, key), types[key], value)
                    except ConfigError as exc:
                        errors.append(str(exc))
            elif key in owners:
                ignored.append(written[key])
            elif key in unsupported:
                errors.append(f"{key}: {unsupported[key]}")
            else:
                close = suggest(key, [*owners, *aliases])
                errors.append(f"unknown option {key}" + (f" (did you mean {close}?)" if close else ""))
        if errors:
            raise ConfigError(f"{path}: " + "; ".join(errors))
    values.update(from_cli)
    return values, ignored


def to_dict(*configs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cfg in configs:
        out.update(dataclasses.asdict(cfg))
    return out
