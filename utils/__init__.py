"""Everything that does not run a network. At the top, what every layer uses: ``cli``
(command-line conventions and errors), ``args`` (the shared argument groups), ``io``
(atomic files, the run lock, the UTF-8 reader), ``hashing``. Below, one subpackage per
subsystem, each entered through its ``__init__``: ``formats``, ``fetch``,
``evaluation``, ``training``, ``selection``, ``reproduction``."""

from __future__ import annotations

import importlib


def front_door(package: str, exports: dict[str, str]):
    """``(__all__, __getattr__)`` of a subpackage whose public names live in its modules
    (``{module: "name name ..."}``): a name's module is imported when the name is first
    used, so that a script needing a CSV reader does not pay for torch."""
    where = {name: module for module, names in exports.items() for name in names.split()}

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    return sorted(where), __getattr__
