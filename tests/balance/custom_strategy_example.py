"""Strategies for the custom-loading tests (``balance.custom_strategy_example:Name``)."""

from __future__ import annotations

from collections.abc import Sequence

from trioproxy.balance.target import Target
from trioproxy.http.protocol import RequestHead


class LastOne:
    """Always the last candidate: easy to tell apart from every built-in strategy."""

    def __init__(self) -> None:
        self.seen: list[RequestHead | None] = []

    def pick(self, candidates: Sequence[Target], request: RequestHead | None = None) -> Target:
        self.seen.append(request)
        return candidates[-1]


class NeedsArguments:
    def __init__(self, weight: int) -> None:
        self.weight = weight

    def pick(self, candidates: Sequence[Target], request: RequestHead | None = None) -> Target:
        return candidates[0]


class NoPick:
    pass


class PickNotCallable:
    pick = "first"


class PickWithoutRequest:
    def pick(self, candidates: Sequence[Target]) -> Target:
        return candidates[0]


#: An object that already is a strategy is used as it is.
READY_MADE = LastOne()
