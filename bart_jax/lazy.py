"""Lazily resolved package names, so importing a package stays cheap and each piece loads only when used."""

from __future__ import annotations

import importlib
from typing import Callable, Mapping


def lazy_getattr(package: str, names: Mapping[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` for `package` that imports `names[name]` (a module path) on first use."""

    def __getattr__(name: str):
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
