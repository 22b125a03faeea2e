"""Named algorithms: partition methods, routers, budgets and folder formats are registry entries.

An entry owns its name, a one-line summary (what ``--help``, recipe errors and the model card say
about it) and any settings the pipeline must know about it. Registration is explicit, one call per
entry, next to the function it registers::

    PARTITIONS = Registry("partition method")

    @PARTITIONS.register("random", "neurons assigned to experts at random (baseline)")
    def at_random(ffn, stats, experts, generator): ...

Adding a method is therefore one function and one registration: the recipe's validation, the CLI's
help and choices, and the model card all read the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class Entry(Generic[F]):
    name: str
    summary: str  # one line, lower case, no final full stop: "a small MLP per layer, trained ..."
    fn: F
    settings: dict[str, Any] = field(default_factory=dict)  # what the pipeline must know about this entry


class Registry(Generic[F]):
    """Entries by name, in registration order. ``registry[name]`` is the registered function."""

    def __init__(self, kind: str):
        self.kind = kind  # "partition method", "router", ... as messages name it
        self._entries: dict[str, Entry[F]] = {}

    def register(self, name: str, summary: str, **settings) -> Callable[[F], F]:
        """Decorator: register the function under ``name``; ``settings`` are kept on its entry."""

        def add(fn: F) -> F:
            self._entries[name] = Entry(name, summary, fn, settings)
            return fn

        return add

    def entry(self, name: str) -> Entry[F]:
        return self._entries[self.check(name)]

    def check(self, name: str) -> str:
        """``name`` if registered, else a :class:`ValueError` that lists the choices."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._entries)}")
        return name

    def names(self) -> list[str]:
        return list(self._entries)

    def help(self) -> str:
        """Every entry as ``name: summary``, for ``--help``."""
        return ". ".join(f"{e.name}: {e.summary}" for e in self._entries.values()) + "."

    def __getitem__(self, name: str) -> F:
        return self.entry(name).fn

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
