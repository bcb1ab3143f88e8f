"""Balancing strategies: plain objects that choose one target from candidates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

T = TypeVar("T")


class Strategy(Protocol):
    def pick(self, candidates: Sequence[T]) -> T:
        """One of ``candidates`` (never empty)."""


class RoundRobin:
    """Each candidate in turn."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[T]) -> T:
        index = self._next % len(candidates)
        self._next = index + 1
        return candidates[index]
