"""Finding the generator families and downstream tasks: by where their modules live, not by
registration at import time.

* A generator family is a module of the package ``gans.families`` that defines ``FAMILY``
  (:func:`discover`, used by :mod:`gans.registry`).
* A downstream task of ``augment-compare`` is a top-level package of this project with a module
  ``downstream`` that defines ``DOWNSTREAM`` (:func:`downstream_tasks`): ``classifier/downstream.py``
  is the classification task.

Modules are imported when a registry is first asked and the objects read from their attribute;
importing a module changes no state anywhere, so what is registered does not depend on what
happened to be imported before.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from histosynth.config import PROJECT_ROOT, require_choice


def discover(package: str, attribute: str) -> dict[str, Any]:
    """``{obj.name: obj}`` for every module of ``package`` defining ``attribute`` (sorted by name)."""
    pkg = importlib.import_module(package)
    found: dict[str, Any] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        obj = getattr(module, attribute, None)
        if obj is None:
            continue
        if obj.name in found:
            raise ValueError(f"{package}.{info.name} defines {attribute} {obj.name!r}, which "
                             f"another module of {package} already defines")
        found[obj.name] = obj
    return found


SEARCH_ROOTS = [PROJECT_ROOT]
"""Folders whose packages may hold downstream tasks (the project's own checkout)."""


@functools.cache
def downstream_tasks() -> dict[str, Any]:
    """``{name: DOWNSTREAM}`` of every package under :data:`SEARCH_ROOTS` with a ``downstream`` module."""
    found: dict[str, Any] = {}
    for root in SEARCH_ROOTS:
        for info in sorted(pkgutil.iter_modules([str(root)]), key=lambda m: m.name):
            if info.ispkg and (root / info.name / "downstream.py").is_file():
                obj = getattr(importlib.import_module(f"{info.name}.downstream"), "DOWNSTREAM", None)
                if obj is not None:
                    found.setdefault(obj.name, obj)
    return found


def get_downstream(name: str, key: str = "task") -> Any:
    tasks = downstream_tasks()
    require_choice(name, tasks, key, "a downstream task")
    return tasks[name]
