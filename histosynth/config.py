"""Typed YAML configs: dataclass sections that reject unknown keys and check types and ranges.

A config file is a YAML mapping whose top-level keys are sections (``data``, ``model``, ...).
Each section is a dataclass; :func:`build` walks the mapping and the dataclass fields together:

* an unknown key fails with its dotted name, the file it came from and the closest valid key;
* a value of the wrong type fails the same way (ints are accepted for floats, and a YAML string
  such as ``1e-4`` -- which YAML 1.1 does not read as a number -- is accepted for a float);
* ``Literal`` fields name the valid choices;
* range checks live in each dataclass's ``__post_init__`` and call :func:`require`, whose error
  is prefixed with the section's dotted path by :func:`build`.

Overrides from the command line (``--set train.steps=200``) are applied to the raw mapping before
it is built, so they are checked exactly like the file, and errors say they came from ``--set``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from histosynth.errors import UserError

T = TypeVar("T")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"


class ConfigError(UserError, ValueError):
    """A config value is unknown, of the wrong type or out of range.

    ``key`` is the dotted name (``train.steps``); ``source`` the file or ``--set``.
    """

    def __init__(self, key: str, msg: str, source: str | None = None):
        self.key, self.msg, self.source = key, msg, source
        super().__init__(self._format())

    def _format(self) -> str:
        where = f" (in {self.source})" if self.source else ""
        return f"{self.key}: {self.msg}{where}" if self.key else f"{self.msg}{where}"

    def located(self, prefix: str, source: str | None) -> "ConfigError":
        key = f"{prefix}.{self.key}" if prefix and self.key else (prefix or self.key)
        return ConfigError(key, self.msg, self.source or source)


def require(ok: bool, key: str, msg: str) -> None:
    """Range check for ``__post_init__``: raise a ConfigError naming ``key`` unless ``ok``."""
    if not ok:
        raise ConfigError(key, msg)


def require_choice(value: str, choices, key: str, what: str) -> None:
    """``value`` must be one of ``choices`` (known only at run time, e.g. a registry); the error
    names the closest choice and all of them."""
    choices = list(choices)
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(key, f"{value!r} is not {what}{hint}; choose one of {', '.join(choices)}")


# ----------------------------------------------------------------------------------------------
# locating and reading files


def resolve_config_path(name: str | Path) -> Path:
    """A path as given if it exists; otherwise a bare name looked up in ``configs/``."""
    p = Path(name)
    if p.is_file():
        return p
    if len(p.parts) == 1:
        for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
            if cand.is_file():
                return cand
    available = ", ".join(sorted(q.name for q in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError("", f"config file not found: {name} (bare names are looked up in "
                          f"{CONFIG_DIR}; available: {available or 'none'})")


MAX_DEPTH = 32
"""Deepest nesting of mappings and lists a config may have (histosynth's need about 5)."""


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` for configs: no aliases (``*name``: a billion-laughs file is refused at
    once instead of expanding for minutes and gigabytes; configs have no need for them), no
    duplicate keys (YAML would keep the last one without a word) and at most MAX_DEPTH levels."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError("", f"YAML aliases (*{event.anchor}) are not allowed in a config "
                                  f"(line {event.start_mark.line + 1}); write the value out")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise ConfigError("", f"nested more than {MAX_DEPTH} levels deep "
                                      f"(line {self.peek_event().start_mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(str(key), f"appears twice in one mapping (lines {seen[key]} and {line}); "
                                            "YAML would silently keep the last: keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """YAML text as Python values, with the checks of :class:`_ConfigLoader`."""
    return yaml.load(text, Loader=_ConfigLoader)        # a SafeLoader: plain values only


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = parse_yaml(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError("", f"not UTF-8 text (byte {e.start}): save the config as UTF-8", str(path)) from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"not valid YAML: {e}", str(path)) from None
    except ConfigError as e:
        raise ConfigError(e.key, e.msg, str(path)) from None
    except RecursionError:
        raise ConfigError("", f"nested too deeply (more than {MAX_DEPTH} levels)", str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"the top level must be a mapping of sections, got {type(data).__name__}",
                          str(path))
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> set[str]:
    """Apply ``a.b=value`` strings (value parsed as YAML) in place; return the dotted keys set."""
    touched = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError("", f"--set expects KEY=VALUE (e.g. train.steps=200), got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        except (ConfigError, RecursionError) as e:
            raise ConfigError(key.strip(), f"{getattr(e, 'msg', 'nested too deeply')}", "--set") from None
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section", "--set")
            node = child
        node[parts[-1]] = value
        touched.add(key)
    return touched


# ----------------------------------------------------------------------------------------------
# building dataclasses


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and ("on" if value else "off") in choices:
            value = "on" if value else "off"        # YAML 1.1 reads a bare on/off as a boolean
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(key, f"{value!r} is not a valid choice; choose one of "
                                   f"{', '.join(repr(c) for c in choices)}{hint}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(key, f"expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"is a section; expected a mapping of keys, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    raise TypeError(f"config field type {tp!r} of {key} is not supported")  # programming error


def _build(cls: type[T], data: dict[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}? " if close else ""
            raise ConfigError(dotted, f"unknown key; {hint}valid keys here: {', '.join(fields)}")
        kwargs[key] = _convert(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.located(prefix, None) from None


def build(cls: type[T], data: dict[str, Any], source: str | None = None,
          set_keys: set[str] | None = None) -> T:
    """Build dataclass ``cls`` from a raw mapping; errors name the dotted key and the source."""
    try:
        return _build(cls, data, "")
    except ConfigError as e:
        src = source
        if set_keys and any(e.key == k or e.key.startswith(k + ".") or k.startswith(e.key + ".")
                            for k in set_keys):
            src = "--set"
        raise ConfigError(e.key, e.msg, e.source or src) from None


def load(cls: type[T], path: str | Path | None, overrides: list[str] | None = None,
         base: dict[str, Any] | None = None) -> tuple[T, dict[str, Any], Path | None]:
    """Read ``path`` (or start from ``base``), apply ``overrides``, build ``cls``.

    Returns the config object, the raw mapping it was built from and the resolved file path.
    """
    resolved = resolve_config_path(path) if path is not None else None
    data = read_yaml(resolved) if resolved is not None else dict(base or {})
    touched = apply_overrides(data, list(overrides or []))
    cfg = build(cls, data, str(resolved) if resolved else None, touched)
    return cfg, data, resolved


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-Python dict of a config dataclass, or of a mapping (lists instead of tuples: YAML-
    and pickle-safe)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return plain(dataclasses.asdict(v))
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:      # write every value out: configs refuse aliases
        return True


def dump_yaml(cfg: Any) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False)
