"""Settings from their three sources: the command line (flags generated from
the declarations), the environment (SCALE0_*) and a TOML file; `resolve()`
merges them and builds the command's dataclass, `to_argv()` goes back to
flags (for `scale0 up`), and `build()` makes an internal settings object
from the resolved one, matching names through each setting's `to`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from scale0.config.declared import CommonConfig
from scale0.config.kinds import BOOL, ENV_PREFIX, Invalid, Spec, env_name, flag, help_note, specs
from scale0.errors import ConfigError

C = TypeVar("C", bound=CommonConfig)
T = TypeVar("T")


def add_arguments(parser: argparse.ArgumentParser, cls: type[CommonConfig], *,
                  settings_file: bool = True) -> None:
    """Flags for every setting of `cls` (and --config FILE when `settings_file`)."""
    if settings_file:
        parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                            help="a TOML file of these settings (top-level keys named "
                                 "like the settings below)")
    for f, spec in specs(cls):
        help_text = f"{spec.help} ({help_note(f, spec)})".replace("%", "%%")
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if spec.kind is BOOL:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
            continue
        kw.update(type=_arg_type(spec, f.name), metavar=spec.metavar)
        if spec.choices:
            kw.update(choices=spec.choices, metavar=None)
        if spec.positional:
            parser.add_argument(f.name, nargs="?", **kw)
        else:
            parser.add_argument(flag(f.name), action="append" if spec.repeat else "store",
                                **kw)
    example = next(f.name for f, _ in specs(cls))
    if settings_file:
        parser.epilog = (
            f"Each setting may also come from the --config file (key: the setting's name, "
            f"e.g. {example}) or from the environment ({env_name(example)}; lists "
            "whitespace-separated). Precedence: default < file < environment < command line.")
    else:
        parser.epilog = (f"Each setting may also come from the environment "
                         f"({env_name(example)}); the command line wins.")


def _arg_type(spec: Spec, name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return _read(spec, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(_reason(spec, exc, text)) from exc
    parse.__name__ = name  # argparse names the type in some errors
    return parse


def from_args(cls: type[CommonConfig], args: argparse.Namespace) -> dict[str, Any]:
    """What the command line set (flags default to SUPPRESS: absent means not given)."""
    out: dict[str, Any] = {}
    for f, spec in specs(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            out[f.name] = tuple(value) if spec.repeat else value
    return out


def from_env(cls: type[CommonConfig], environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f, spec in specs(cls):
        name = env_name(f.name)
        if name in environ:
            text = environ[name]
            out[f.name] = _convert(spec, text.split() if spec.repeat else text,
                                   f"environment {name}")
    return out


def read_file(path: str | Path) -> dict[str, Any]:
    """The TOML document at `path`, or ConfigError naming the file."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the settings file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def from_mapping(cls: type[CommonConfig], data: Mapping[str, Any],
                 source: str) -> dict[str, Any]:
    """Checked and converted values of a TOML table whose keys are settings of `cls`."""
    known = {f.name: spec for f, spec in specs(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(unknown(source, key, known))
        out[key] = _convert(known[key], value, f"{source}: {key}")
    return out


def unknown(source: str, key: str, known: Iterable[str]) -> str:
    """The 'unknown setting' message, with the nearest known name if one is close."""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{source}: unknown setting {key!r}{hint}"


def resolve(cls: type[C], args: argparse.Namespace, environ: Mapping[str, str]) -> C:
    """defaults < file (args.config) < environment < command line; then `check()`."""
    values: dict[str, Any] = {}
    path = getattr(args, "config", None)
    if path is not None:
        values.update(from_mapping(cls, read_file(path), str(path)))
    values.update(from_env(cls, environ))
    values.update(from_args(cls, args))
    for f, spec in specs(cls):
        if spec.required and not values.get(f.name):
            where = (spec.metavar or f.name) if spec.positional else flag(f.name)
            raise ConfigError(f"missing setting {f.name!r}: give {where}, "
                              f"{env_name(f.name)} or {f.name} in the --config file")
    config = cls(**values)
    config.check()
    return config


def env_warnings(environ: Mapping[str, str], *classes: type[CommonConfig]) -> list[str]:
    """SCALE0_* variables close to, but not, a setting name: likely typos. Other
    SCALE0_* names are left alone (tools and tests use some of their own)."""
    names = {env_name(f.name) for cls in classes for f, _ in specs(cls)}
    out = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.85)
            if close:
                out.append(f"environment {name} is not a setting (did you mean {close[0]}?)")
    return out


def to_argv(cls: type[CommonConfig], data: Mapping[str, Any]) -> list[str]:
    """Command-line arguments for a TOML table already checked by `from_mapping`:
    how `scale0 up` passes a [[broker]] or [[pool]] table to its process."""
    known = {f.name: spec for f, spec in specs(cls)}
    head: list[str] = []
    argv: list[str] = []
    for key, value in data.items():
        spec = known[key]
        if spec.positional:
            head.append(_arg_text(value))
        elif spec.kind is BOOL:
            argv.append(flag(key) if value else "--no-" + flag(key)[2:])
        else:
            for item in (value if spec.repeat else [value]):
                argv.append(f"{flag(key)}={_arg_text(item)}")
    return head + argv


def _arg_text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


# -- reading one value ------------------------------------------------------

def _convert(spec: Spec, value: Any, where: str) -> Any:
    if spec.repeat:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {spec.kind.expected}, "
                              f"got {value!r}")
        items = []
        for item in value:
            try:
                items.append(_read(spec, item))
            except ValueError as exc:
                raise ConfigError(f"{where}: {_reason(spec, exc, item)}") from exc
        return tuple(items)
    try:
        return _read(spec, value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {_reason(spec, exc, value)}") from exc


def _read(spec: Spec, value: Any) -> Any:
    kind = spec.kind
    if not kind.toml:  # parsed from text only: a TOML value must be a string
        if not isinstance(value, str):
            raise ValueError(value)
        return kind.from_text(value)
    result = kind.read(value)
    if spec.choices and result not in spec.choices:
        raise Invalid(f"expected one of {', '.join(spec.choices)}, got {value!r}")
    return result


def _reason(spec: Spec, exc: ValueError, value: Any) -> str:
    if isinstance(exc, Invalid):
        return str(exc)
    expected = f"one of {', '.join(spec.choices)}" if spec.choices else spec.kind.expected
    return f"expected {expected}, got {value!r}"



# -- inside: the programs' own settings objects ------------------------------

def targets(target: Callable[..., Any]) -> set[str]:
    """The names `target` takes: a dataclass's fields, else its keyword parameters."""
    if dataclasses.is_dataclass(target):
        return {f.name for f in dataclasses.fields(target) if f.init}
    return {name for name, param in inspect.signature(target).parameters.items()
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)}


def build(target: Callable[..., T], cfg: CommonConfig, /, **given: Any) -> T:
    """`target(...)` (an internal settings dataclass, or a class such as `Pool`)
    from the resolved settings `cfg`: every name `target` takes that is some
    setting's `to` (or, without one, its name) gets that setting's value;
    `given` adds what no setting holds (objects built from settings, derived
    values) and wins over a setting of the same name."""
    names = targets(target)
    values: dict[str, Any] = {}
    for f, spec in specs(type(cfg)):
        inner = spec.to or f.name
        if inner in names:
            values[inner] = getattr(cfg, f.name)
    values.update(given)
    return target(**values)
