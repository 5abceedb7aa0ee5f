"""Configs: stdlib dataclasses are the schema, YAML files are serialized instances.

- unknown keys are errors that name the allowed keys;
- `--set a.b=c` overrides are converted to the field's type (int, float, bool, str, Optional,
  Literal, list/tuple, nested dataclass);
- `to_yaml(cfg, comments=True)` writes a commented YAML whose comments are the fields' help texts.

Torch-free on purpose: `dcustom config print` must be instant.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from dcustom.errors import DcustomError


def opt(default: Any = dataclasses.MISSING, help: str = "", **kwargs):
    """A dataclass field with a help text; mutable defaults are copied per instance."""
    metadata = {"help": help}
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


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass `cls` from a mapping, strictly: unknown keys name the allowed ones."""
    if not isinstance(data, dict):
        raise DcustomError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise DcustomError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(fields)}.")
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = coerce(value, hints[name], f"{where}.{name}" if where else name)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise DcustomError(f"{where}: required key {missing[0]!r} is missing.")
    try:
        obj = cls(**kwargs)
    except DcustomError:
        raise
    except (TypeError, ValueError) as exc:
        raise DcustomError(f"{where}: {exc}") from None
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
        target_cls, node = cls, data
        for i, part in enumerate(path):
            fields = {f.name for f in dataclasses.fields(target_cls) if f.init}
            dotted = ".".join(path[: i + 1])
            if part not in fields:
                raise DcustomError(f"override {text!r}: unknown key {dotted!r}; allowed keys here: {', '.join(sorted(fields))}.")
            tp = _hints(target_cls)[part]
            if i == len(path) - 1:
                node[part] = coerce(value, tp, f"override {dotted}")
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
    if not path.is_file():
        raise DcustomError(f"config file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise DcustomError(f"config file {str(path)!r} is not valid YAML{at}.") from None
    if not isinstance(data, dict):
        raise DcustomError(f"config file {str(path)!r} must hold a mapping of keys to values.")
    return data


def load_config(cls, path: str | Path | None = None, overrides=(), data: dict | None = None):
    """Instance of `cls` from a YAML file (or mapping) plus dotted overrides, strictly checked."""
    raw = dict(data or {})
    where = "config"
    if path is not None:
        raw.update(read_yaml(path))
        where = str(path)
    raw = apply_overrides(cls, raw, overrides)
    return from_dict(cls, raw, where)


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
