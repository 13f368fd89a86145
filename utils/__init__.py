"""Everything that does not run a network: at the top what every layer uses (``cli``,
``args``, ``io``, ``hashing``), below one subpackage per subsystem, entered through its
``__init__``."""

from __future__ import annotations

import importlib


def front_door(package: str, exports: dict[str, str]):
    """``(__all__, __getattr__)`` of a subpackage (``{module: "name name ..."}``): a module is
    imported when one of its names is first used, so a CSV reader does not pay for torch."""
    where = {name: module for module, names in exports.items() for name in names.split()}

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    return sorted(where), __getattr__
