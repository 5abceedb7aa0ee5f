"""Lazy re-exports for packages whose public names live in torch-heavy modules."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, table: dict[str, str], namespace: dict):
    """(__getattr__, __dir__) for `package`, resolving each "module:attr" of `table` on first use."""

    def __getattr__(name):
        target = table.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, attr = target.split(":")
        value = getattr(importlib.import_module(module_name), attr)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(list(namespace) + list(table))

    return __getattr__, __dir__
