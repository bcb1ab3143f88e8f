"""What an active health probe sends and which answers pass it (sans-I/O).

The default probe is a *liveness* check: ``HEAD /``, passed by any HTTP answer
with a status below 500. Many upstreams have nothing at ``/``: an API whose
``/`` is 404 (FastAPI, vLLM), nginx with no ``/`` location, a WebSocket-only
server answering ``HEAD /`` with 405. Each of those is alive and serving, and
a probe expecting 2xx/3xx there would take every upstream out and answer 503
to every request. What a liveness probe must catch is a target that is not
serving at all: a refused or reset connection, a timeout, bytes that are not
HTTP (the prober's own checks), or a 5xx, the server saying it cannot serve.

Once the operator names a health path (for all upstreams, or for one), the
probe is a *readiness* check of that endpoint: 200-399 by default, or the
statuses the operator expects (``--health-expect 200``, ``200,204``,
``200-299``). Expected statuses are data (:class:`StatusRanges`), so the same
value can come from a flag, a TOML list or the library API.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

__all__ = [
    "LIVENESS",
    "PATH_DEFAULT",
    "HealthSettings",
    "StatusRanges",
]

_LOWEST, _HIGHEST = 100, 599


@attrs.frozen
class StatusRanges:
    """A set of HTTP statuses as inclusive ``(low, high)`` ranges, in order given."""

    ranges: tuple[tuple[int, int], ...]

    def __contains__(self, status: object) -> bool:
        return any(low <= status <= high for low, high in self.ranges)  # type: ignore[operator]

    def __str__(self) -> str:
        return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in self.ranges)

    @classmethod
    def of(cls, items: Iterable[int | str]) -> StatusRanges:
        """From codes and ``"low-high"`` ranges: ``[200]``, ``[200, "300-399"]``.

        Raises:
            ValueError: an item is not a status (100-599) or a range of them, or
                ``items`` is empty; the message quotes the item.
        """
        ranges = tuple(_range(item) for item in items)
        if not ranges:
            raise ValueError("no status given")
        return cls(ranges)

    @classmethod
    def parse(cls, text: str) -> StatusRanges:
        """From a comma list of codes and ranges: ``200``, ``200,204``, ``200-299,404``.

        Raises:
            ValueError: as :meth:`of`.
        """
        return cls.of(part.strip() for part in text.split(","))


def _range(item: int | str) -> tuple[int, int]:
    if isinstance(item, int) and not isinstance(item, bool):
        low = high = item
    elif isinstance(item, str):
        low_text, sep, high_text = item.partition("-")
        if not low_text.strip().isdigit() or (sep and not high_text.strip().isdigit()):
            raise ValueError(f"not a status or a range of statuses: {item!r}")
        low = int(low_text)
        high = int(high_text) if sep else low
    else:
        raise ValueError(f"not a status or a range of statuses: {item!r}")
    if not _LOWEST <= low <= high <= _HIGHEST:
        raise ValueError(f"statuses run from {_LOWEST} to {_HIGHEST}, low first: {item!r}")
    return low, high


#: No health path configured: the target answers HTTP and does not say it is failing.
LIVENESS = StatusRanges(((_LOWEST, 499),))
#: A health path configured and no expected statuses given: success or redirect.
PATH_DEFAULT = StatusRanges(((200, 399),))


@attrs.frozen(kw_only=True)
class HealthSettings:
    """How the active probers probe.

    ``path`` None means no health path was configured: targets without their own
    are probed at ``/`` as a liveness check. ``expect`` None means the default
    statuses of :meth:`expected_for`.
    """

    enabled: bool = True
    method: bytes = b"HEAD"
    path: str | None = None
    expect: StatusRanges | None = None
    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3

    def path_for(self, target_path: str | None) -> str:
        """The path to probe for a target whose own ``health_path`` is ``target_path``."""
        return target_path or self.path or "/"

    def expected_for(self, target_path: str | None) -> StatusRanges:
        """The statuses that pass a probe of a target with that own ``health_path``."""
        if self.expect is not None:
            return self.expect
        if self.path is None and target_path is None:
            return LIVENESS
        return PATH_DEFAULT
