"""The one ``class_path`` importer (YAML ``class_path``, checkpoints' run facts, ``estimate --adapter``, CLI error
hints), and the lookup of an adapter method by name or class path."""

from __future__ import annotations

import importlib

from lightning_lora.core.layer import METHODS, AdapterConfig


def import_class(path: str, base: type | None = None, what: str = "class") -> type:
    """The class at ``module.Class`` ``path`` (a subclass of ``base`` if given).

    Raises:
        ValueError: ``path`` is not a dotted path, its module or class cannot be imported, or it is no ``base``.
    """
    module_name, _, name = str(path).rpartition(".")
    if not module_name:
        raise ValueError(f"{what} {path!r} is not a module.Class path.")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {what} {path!r}: {err}.") from None
    if not isinstance(cls, type) or (base is not None and not issubclass(cls, base)):
        raise ValueError(f"{what} {path!r} is not a subclass of {base.__name__ if base else 'object'}.")
    return cls


def method_class(spec: str | type[AdapterConfig]) -> type[AdapterConfig]:
    """An adapter method by registered name (any case: ``"lora"``), by ``module.Class`` path, or by the name of a
    module that registers it when imported (``"loha"`` for ``loha.py``'s ``LoHa``).

    Raises:
        ValueError: listing the registered methods.
    """
    if isinstance(spec, type) and issubclass(spec, AdapterConfig):
        return spec
    found = _registered(spec)
    if found is None and "." in str(spec):
        return import_class(str(spec), AdapterConfig, "adapter class")
    if found is None and _importable(str(spec)):
        found = _registered(spec)
    if found is None:
        raise ValueError(f"unknown adapter {spec!r}; registered methods: {', '.join(n.lower() for n in METHODS)} "
                         "(or give a module.Class path, or a module that defines one).")
    return found


def _registered(name: object) -> type[AdapterConfig] | None:
    return {n.lower(): cls for n, cls in METHODS.items()}.get(str(name).lower())


def _importable(module: str) -> bool:
    """Import ``module`` (defining a method registers it); False if there is no such module."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
