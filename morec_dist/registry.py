"""The one generic registry: a named table of swappable parts (models, losses, objective kinds,
methods, optimizers, sharding planners), each registry the only list of its names.

Validation, CLI choices and dispatch all read ``names()`` / ``get()`` of the same instance, so a
part registered by a plugin (``run.plugins``) is valid, listed and dispatched everywhere at once.
Depends on nothing else in the package, so every layer may hold a registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown name, or a name registered twice: names the config field and the choices."""


class Registry(Generic[T]):
    """Entries of one kind of part, by name, in registration order."""

    def __init__(self, kind: str, field: str) -> None:
        self.kind = kind  # what the entries are, for messages ("model", "objective kind")
        self.field = field  # the config field or flag that picks one ("model.name")
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        if not name or not isinstance(name, str):
            raise RegistryError(f"{self.kind}: a registered name must be a non-empty string, got {name!r}")
        if name in self._entries and not replace:
            raise RegistryError(f"{self.kind} {name!r} is already registered (pass replace=True to override it)")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@REGISTRY.decorator("name")`` on a function or class registers it under ``name``."""

        def register(entry: T) -> T:
            return self.register(name, entry)

        return register

    def get(self, name: str, where: str | None = None) -> T:
        if name not in self._entries:
            raise RegistryError(f"{where or self.field}: unknown {self.kind} {name!r}; expected one of {self.names()}")
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
