"""Imports on first use: package attributes (PEP 562), so that importing one module of a
package does not import all of its siblings; and :data:`numpy`, loaded when first used.

numpy is most of a command's import time (about 0.1 s of CPU) and the metadata of an image
(headers, block list, device state, bitmap counts: what opening and checking one needs)
is read without it. A module that uses numpy writes ``from fixedram._lazy import numpy as
np``: a native save or restore, which hands the pages to QEMU, and everything a command
does before it needs page data then never load it.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

__all__ = ["lazy_exports", "LazyModule", "load_now", "numpy"]


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


class LazyModule(types.ModuleType):
    """Stands for module ``name`` and imports it when one of its attributes is first read;
    each attribute is then kept here, so later reads cost what a module's do. Thread-safe:
    the import system serialises the import."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # copy, pickle, inspect probing: not the module's API
            raise AttributeError(attr)
        value = getattr(importlib.import_module(self.__name__), attr)
        self.__dict__[attr] = value
        return value


def load_now(module: types.ModuleType) -> None:
    """Import the module a :class:`LazyModule` stands for now (no-op for a module): where a
    path needs it anyway and has a better moment for it than its first use."""
    importlib.import_module(module.__name__)


if TYPE_CHECKING:
    import numpy as numpy
else:
    numpy = LazyModule("numpy")
