"""`Registry[T]`: the one way fleetserve chooses a pluggable part by name.

Attention backends, routing policies, fleet backends and model architectures each keep one
registry, written as ``"name": "module:Attr"`` lines. An entry is imported the first time it
is asked for, so a registry costs nothing to import, lists its names without importing a
thing (for ``argparse`` ``choices=``), and cannot create an import cycle. Adding a part is one
new file and one line in its registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names of one kind of part (``kind``, e.g. "attention backend") mapped to
    ``"module:Attr"`` strings. ``get`` imports ``module`` and returns its ``Attr``, once."""

    def __init__(self, kind: str, entries: Mapping[str, str]) -> None:
        for name, target in entries.items():
            module, _, attr = target.partition(":")
            if not module or not attr:
                raise ValueError(f"{kind} {name!r}: {target!r} is not a 'module:Attr' string")
        self.kind = kind
        self._entries = dict(entries)
        self._loaded: dict[str, T] = {}  # a cache of imports, never of choices

    def names(self) -> list[str]:
        """The valid names, sorted; imports nothing."""
        return sorted(self._entries)

    def check(self, name: str) -> str:
        """`name` if it is registered; else a `ValueError` naming the valid choices. Imports
        nothing."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.names()}")
        return name

    def get(self, name: str) -> T:
        """The part registered as `name`, imported on first use."""
        if name not in self._loaded:
            module, _, attr = self._entries[self.check(name)].partition(":")
            self._loaded[name] = getattr(importlib.import_module(module), attr)
        return self._loaded[name]

    def items(self) -> Iterator[tuple[str, T]]:
        """Every (name, part), importing them all: for lookups by another key."""
        return ((name, self.get(name)) for name in self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
