"""Package attributes imported on first use (PEP 562), so that importing one module of a
package does not import all of its siblings."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: attribute ``name`` comes from submodule
    ``where[name]``, imported when the attribute is first read.

    An exported name may also be a submodule's (``fixedram.endpoint.receive``, the module,
    and ``receive``, its function). Importing the submodule binds the module on the package;
    the package keeps the exported object instead, as an eager ``from .receive import
    receive`` in its ``__init__`` did.
    """
    module = sys.modules[package]
    namespace = module.__dict__

    class _Package(types.ModuleType):
        def __setattr__(self, name: str, value: Any) -> None:
            if name in where and isinstance(value, types.ModuleType):
                return  # the submodule being imported: the export keeps the name
            super().__setattr__(name, value)

    module.__class__ = _Package

    def __getattr__(name: str) -> Any:
        source = where.get(name)
        if source is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{source}"), name)
        namespace[name] = value
        return value

    return __getattr__
