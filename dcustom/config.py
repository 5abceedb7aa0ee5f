"""Configs: stdlib dataclasses are the schema, YAML files are serialized instances.

- unknown keys are errors that name the allowed keys;
- `--set a.b=c` overrides are converted to the field's type (int, float, bool, str, Optional,
  Literal, list/tuple, nested dataclass);
- values are checked against the ranges and choices declared on the fields (`opt(..., ge=1)`), so
  `dcustom config check` and `dcustom train` accept and refuse the same files;
- an error names where the bad value came from: the YAML file, or the override (`--set`, a flag);
- a key that moved (a config class lists it in its `moved_keys` ClassVar, old dotted key -> new) is
  refused in one sentence naming the new key, never silently ignored;
- `to_yaml(cfg, comments=True)` writes a commented YAML whose comments are the fields' help texts.

Torch-free on purpose: `dcustom config print` must be instant.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from dcustom.errors import DcustomError


def opt(default: Any = dataclasses.MISSING, help: str = "", *, ge=None, gt=None, le=None, lt=None, choices=None,
        **kwargs):
    """A dataclass field with a help text and optional bounds (ge/gt/le/lt) or `choices`; mutable defaults
    are copied per instance. Bounds are checked wherever a config is read (YAML, overrides, `check_values`)."""
    metadata = {"help": help}
    bounds = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    if bounds:
        metadata["bounds"] = bounds
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        value = default
        return dataclasses.field(default_factory=lambda: dataclasses.replace(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp, where: str) -> Any:
    """Convert a YAML/override value to type `tp` or raise one clear sentence naming `where`."""
    origin = typing.get_origin(tp)
    bad = DcustomError(f"{where}: {value!r} is not valid; expected {_type_name(tp)}.")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except DcustomError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if value else []
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    return value


_BOUND_WORDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def check_field(value: Any, f: dataclasses.Field, where: str) -> None:
    """Raise one sentence naming `where` when `value` breaks the bounds or choices declared on field `f`."""
    choices = f.metadata.get("choices")
    if choices is not None and value is not None and value not in choices:
        raise DcustomError(f"{where}: {value!r} is not known; accepted: {', '.join(map(str, choices))}.")
    bounds = f.metadata.get("bounds")
    if not bounds or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    ok = all({"ge": value >= b, "gt": value > b, "le": value <= b, "lt": value < b}[k] for k, b in bounds.items())
    if not ok:
        kind = "an integer" if isinstance(value, int) else "a number"
        limits = " and ".join(f"{_BOUND_WORDS[k]} {b if isinstance(b, int) else f'{b:g}'}" for k, b in bounds.items())
        raise DcustomError(f"{where}: {value!r} is not valid; accepted: {kind} {limits}.")


def check_values(obj, where: str = "config") -> None:
    """Check every field of a config instance (and its sections) against its declared bounds and choices:
    what the Python API builds directly gets the same checks as a YAML file."""
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        dotted = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            check_values(value, dotted)
        else:
            check_field(value, f, dotted)


class ConfigValueError(DcustomError):
    """A check across several keys failed (a dataclass __post_init__); `detail` is the sentence without a source."""

    def __init__(self, where: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.where, self.detail = where, detail


def _join(where: str, name: str) -> str:
    """'configs/x.yaml:' + 'rank' -> 'configs/x.yaml: rank'; 'configs/x.yaml: train' + 'lr' -> '... train.lr'."""
    if not where:
        return name
    return f"{where} {name}" if where.endswith(":") else f"{where}.{name}"


def moved_key_error(cls, path: list[str], where: str) -> DcustomError | None:
    """The error for dotted key `path` when `cls` declares it moved (`moved_keys`), else None."""
    new = getattr(cls, "moved_keys", {}).get(".".join(path))
    if new is None:
        return None
    return DcustomError(f"{where}: key {'.'.join(path)!r} has moved to {new!r}; write it there instead.")


def _moved_in(cls, data: dict, where: str) -> None:
    for old in getattr(cls, "moved_keys", {}):
        node, parts = data, old.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and parts[-1] in node:
            raise moved_key_error(cls, parts, where)


def from_dict(cls, data: dict, where: str = "config", base=None):
    """Build dataclass `cls` from a mapping, strictly: unknown keys name the allowed ones, moved keys their
    new place.

    `where` names the source; a trailing ':' marks a file, whose keys are then written 'file: a.b'. Keys the
    mapping leaves out take their values from `base` (an instance of `cls`), else the class defaults; a section
    given in part starts from the section's default in its parent (`lora: {rank: 4}` keeps the method's alpha)."""
    label = where.rstrip(":")
    if not isinstance(data, dict):
        raise DcustomError(f"{label}: expected a mapping of keys to values, got {type(data).__name__}.")
    _moved_in(cls, data, label)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise DcustomError(f"{label}: unknown key {unknown[0]!r}; allowed keys: {', '.join(fields)}.")
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = _join(where, name)
        section = _dataclass_in(hints[name])
        if section is not None and isinstance(value, dict):
            default = getattr(base, name) if base is not None else _default_of(fields[name])
            kwargs[name] = from_dict(section, value, key, base=default if isinstance(default, section) else None)
        else:
            kwargs[name] = coerce(value, hints[name], key)
        check_field(kwargs[name], fields[name], key)
    if base is not None:
        kwargs.update({n: copy.deepcopy(getattr(base, n)) for n in fields if n not in kwargs})
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise DcustomError(f"{label}: required key {missing[0]!r} is missing.")
    try:
        obj = cls(**kwargs)
    except DcustomError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigValueError(label, str(exc).rstrip(".") + ".") from None
    return obj


def to_dict(obj) -> dict:
    """Plain dict of a dataclass instance (tuples become lists, so YAML stays plain)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    import yaml

    if "=" not in text:
        raise DcustomError(f"override {text!r} must look like key=value or a.b=value.")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise DcustomError(f"override {text!r} has an empty key; expected key=value.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(cls, data: dict, overrides) -> dict:
    """Apply dotted `a.b=c` overrides to a raw mapping, checking each key against the schema."""
    data = dict(data)
    for text in overrides or ():
        path, value = parse_override(text)
        moved = moved_key_error(cls, path, f"override {text!r}")
        if moved is not None:
            raise moved
        target_cls, node = cls, data
        for i, part in enumerate(path):
            fields = {f.name for f in dataclasses.fields(target_cls) if f.init}
            dotted = ".".join(path[: i + 1])
            if part not in fields:
                raise DcustomError(f"override {text!r}: unknown key {dotted!r}; allowed keys here: {', '.join(sorted(fields))}.")
            tp = _hints(target_cls)[part]
            if i == len(path) - 1:
                node[part] = coerce(value, tp, f"override {dotted}")
                check_field(node[part], _field(target_cls, part), f"override {dotted}")
                if dataclasses.is_dataclass(node[part]):
                    node[part] = to_dict(node[part])
            else:
                sub_cls = _dataclass_in(tp)
                if sub_cls is None:
                    raise DcustomError(f"override {text!r}: {dotted!r} is not a section, it takes {_type_name(tp)}.")
                child = node.get(part)
                node[part] = dict(child) if isinstance(child, dict) else {}
                node, target_cls = node[part], sub_cls
    return data


def _default_of(f: dataclasses.Field):
    """The default value of field `f` (a fresh one from its factory), or None when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _field(cls, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _dataclass_in(tp):
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def read_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if path.is_dir():
        raise DcustomError(f"config file {str(path)!r} is a folder; accepted: a YAML file.")
    if not path.is_file():
        raise DcustomError(f"config file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DcustomError(f"config file {str(path)!r} is not UTF-8 text; accepted: a YAML file.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise DcustomError(f"config file {str(path)!r} is not valid YAML{at}.") from None
    if data is None:  # an empty file would otherwise train silently on every default
        raise DcustomError(f"config file {str(path)!r} is empty; accepted: a YAML mapping of keys to values "
                           "(`dcustom config print <method>` writes one).")
    if not isinstance(data, dict):
        raise DcustomError(f"config file {str(path)!r} must hold a mapping of keys to values.")
    return data


def load_config(cls, path: str | Path | None = None, overrides=(), data: dict | None = None):
    """Instance of `cls` from a YAML file (or mapping) plus dotted overrides, strictly checked."""
    raw = dict(data or {})
    where = "config"
    if path is not None:
        raw.update(read_yaml(path))
        where = f"{path}:"
    raw = apply_overrides(cls, raw, overrides)
    try:
        return from_dict(cls, raw, where)
    except ConfigValueError as exc:
        # A check across keys: blame the override that set a key the sentence names, not the file.
        named = [o for o in overrides or () if _names_key(exc.detail, parse_override(o)[0])]
        if not named:
            raise
        raise DcustomError(f"override {named[0]}: {exc.detail}") from None


def _names_key(text: str, path: list[str]) -> bool:
    import re

    return any(re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", text) for key in (".".join(path), path[-1]))


def save_yaml(obj, path: str | Path, comments: bool = False) -> Path:
    """Write a config atomically (temp file then rename), never leaving a partial file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_yaml(obj, comments=comments))
    tmp.replace(path)
    return path


def to_yaml(obj, comments: bool = False) -> str:
    """YAML text of a config; with comments, each key is preceded by its help text."""
    import yaml

    if not comments:
        return yaml.safe_dump(to_dict(obj), sort_keys=False)
    lines: list[str] = []

    def emit(o, indent: int):
        pad = "  " * indent
        for f in dataclasses.fields(o):
            if not f.init:
                continue
            value = getattr(o, f.name)
            help_text = f.metadata.get("help", "")
            if help_text:
                lines.append(f"{pad}# {help_text}")
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:")
                emit(value, indent + 1)
            else:
                # Dump inside a one-item flow list, then strip the brackets: a scalar, list or
                # mapping all come out on one line.
                dumped = yaml.safe_dump([to_dict(value)], default_flow_style=True, width=10**6).strip()[1:-1]
                lines.append(f"{pad}{f.name}: {dumped}")

    emit(obj, 0)
    return "\n".join(lines) + "\n"
