"""Rate limits, sans-I/O: the GCRA decision, the bounded memory store, the keys
a request is counted under, and the ``RateLimit`` header fields.

The algorithm is GCRA (the generic cell rate algorithm, ITU-T I.371), which
admits exactly what a token bucket of ``burst`` tokens refilled at
``average / period`` admits, but keeps one number per key instead of two: the
*theoretical arrival time* (TAT), the time at which the bucket would be full
again. With ``interval = period / average``::

    debt    = max(TAT, now) - now          # how far the key is "in the future"
    allowed = debt + interval <= burst * interval
    if allowed: TAT = now + debt + interval

One number per key is what makes the Redis store simple and atomic: a Lua
script reads, decides and writes one string per key with an expiry equal to
the debt, so an idle key costs nothing once it has expired (see
``trioproxy.edge.redis_store``, whose script is this function, line for line).
Times are whole microseconds, so the Python and the Lua arithmetic (doubles,
exact below 2**53 µs, ~285 years) agree to the unit; the unit tests check it.

A route may have several limits (per second and per hour, per IP and per
key): a request passes only if every one of them admits it, and only then is
it counted in every one (all or nothing, so a refused request costs no
quota in the limits that would have admitted it).

The header fields follow draft-ietf-httpapi-ratelimit-headers-11 (May 2026;
the same syntax as -08 to -10): one quota policy item per limit::

    RateLimit-Policy: "ip/1s";q=10;w=1;trioproxy-burst=5
    RateLimit: "ip/1s";r=0;t=1
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence

import attrs

from trioproxy.config.model import RateLimitSpec
from trioproxy.edge.access import presented_key
from trioproxy.http.protocol import Headers

US = 1_000_000

#: Memory store bound when the config says nothing (``[server] rate_limit_max_keys``).
DEFAULT_MAX_KEYS = 100_000


def gcra(tat: int | None, now: int, interval: int, burst: int) -> tuple[bool, int]:
    """``(allowed, debt)`` for one request at ``now`` on a key whose TAT is ``tat``
    (None: never seen, or expired). ``debt`` is the key's state *before* this
    request (``max(tat, now) - now``, µs); if allowed, the new TAT is
    ``now + debt + interval``."""
    debt = 0 if tat is None or tat < now else tat - now
    return debt + interval <= burst * interval, debt


@attrs.frozen
class Limit:
    """One ``rate_limit`` entry of a route, made ready to count."""

    spec: RateLimitSpec
    #: Microseconds between two requests at the average rate.
    interval: int
    burst: int
    #: The name of its quota policy in the header fields (unique on its route).
    name: str
    #: The prefix of its store keys: route, rate and key kind.
    prefix: str
    #: Where ``api_key`` reads the key: the route's ``auth.header`` (lower-case), or
    #: None for ``Authorization: Bearer`` (as ``trioproxy.edge.access`` reads it).
    key_header: bytes | None = None

    @classmethod
    def compile(
        cls, spec: RateLimitSpec, route: str, name: str, key_header: bytes | None = None
    ) -> Limit:
        interval = max(1, round(spec.period * US / spec.average))
        burst = spec.burst if spec.burst is not None else spec.average
        prefix = f"{route}|{spec.average}/{round(spec.period * US)}us/{burst}|{spec.key}|"
        return cls(spec, interval, burst, name, prefix, key_header)

    def policy_item(self) -> str:
        """This limit as a ``RateLimit-Policy`` item: ``"name";q=N;w=S;trioproxy-burst=B``.

        ``w`` is whole seconds (the draft has no sub-second windows): a period that
        is not whole is stated over the next whole second, its quota scaled down.
        """
        period = self.spec.period
        window = max(1, math.ceil(period - 1e-9))
        quota = self.spec.average if window == period else int(self.spec.average * window / period)
        return f"{_sf_string(self.name)};q={quota};w={window};trioproxy-burst={self.burst}"


def compile_limits(
    specs: Sequence[RateLimitSpec], route: str, key_header: bytes | None = None
) -> tuple[Limit, ...]:
    """A route's limits, each named ``KEY/PERIOD`` (``"ip/1s"``; ``#2`` appended to a
    name already taken). ``key_header``: the route's ``auth.header``, if any."""
    limits: list[Limit] = []
    taken: set[str] = set()
    for index, spec in enumerate(specs):
        name = f"{spec.key}/{_period_label(spec.period)}"
        if name in taken:
            name = f"{name}#{index}"
        taken.add(name)
        limits.append(Limit.compile(spec, route, name, key_header))
    return tuple(limits)


def _period_label(period: float) -> str:
    if period == int(period):
        return f"{int(period)}s"
    return f"{round(period * 1000)}ms"


def _sf_string(text: str) -> str:
    """An RFC 8941 sf-string (printable ASCII; quote and backslash escaped)."""
    clean = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- what a request is counted under ------------------------------------------------


def _digest(value: bytes) -> str:
    """Header values and keys are stored hashed: bounded in size, and a secret
    (an API key) is never written to memory tables or Redis as it is."""
    return hashlib.blake2b(value, digest_size=12).hexdigest()


def request_key(limit: Limit, headers: Headers, client_addr: str) -> str:
    """The store key ``limit`` counts this request under.

    ``client_addr`` is the real client IP (``trioproxy.edge.identity``), and
    ``api_key`` the key as the route's access rules read it. Requests that lack the
    header (``header:NAME``) or present no key (``api_key``) share one bucket per
    limit, so leaving it out is no way around the limit.
    """
    kind = limit.spec.key
    if kind == "ip":
        return limit.prefix + client_addr
    if kind == "route":
        return limit.prefix
    if kind == "api_key":
        key = presented_key(headers, limit.key_header)
        return limit.prefix + ("-" if key is None else _digest(key))
    name = kind.partition(":")[2].encode("ascii")
    for field, value in headers:
        if field == name:
            return limit.prefix + _digest(value)
    return limit.prefix + "-"


# --- the memory store ---------------------------------------------------------------


class MemoryStore:
    """TATs by key, at most ``max_keys`` of them: the least recently used key goes
    first. Evicting a key whose debt is paid loses nothing; one still in debt is
    forgiven (so the bound is the memory cost of an attack with that many keys,
    210 to 240 bytes a key, measured with tracemalloc)."""

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.max_keys = max_keys
        self._tats: OrderedDict[str, int] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._tats)

    def get(self, key: str) -> int | None:
        tat = self._tats.get(key)
        if tat is not None:
            self._tats.move_to_end(key)
        return tat

    def set(self, key: str, tat: int) -> None:
        tats = self._tats
        tats[key] = tat
        tats.move_to_end(key)
        while len(tats) > self.max_keys:
            tats.popitem(last=False)
            self.evicted += 1


@attrs.frozen
class Verdict:
    """What a request's limits decided: whether it passes, and for each limit its
    state before this request (``debts``, µs)."""

    limits: tuple[Limit, ...]
    allowed: tuple[bool, ...]
    debts: tuple[int, ...]

    @property
    def passed(self) -> bool:
        return all(self.allowed)

    def retry_after(self) -> int:
        """Whole seconds (>= 1) until every refusing limit admits a request."""
        wait = 0
        for limit, ok, debt in zip(self.limits, self.allowed, self.debts, strict=True):
            if not ok:
                wait = max(wait, debt + limit.interval - limit.burst * limit.interval)
        return max(1, math.ceil(wait / US))

    def headers(self) -> Headers:
        """``Retry-After``, ``RateLimit-Policy`` and ``RateLimit`` for a 429."""
        retry = self.retry_after()
        items = []
        for limit, ok, debt in zip(self.limits, self.allowed, self.debts, strict=True):
            if ok:
                remaining = (limit.burst * limit.interval - debt) // limit.interval
                reset = math.ceil(debt / US)
            else:
                remaining, reset = 0, retry
            items.append(f"{_sf_string(limit.name)};r={remaining};t={reset}")
        policy = ", ".join(limit.policy_item() for limit in self.limits)
        return [
            (b"retry-after", str(retry).encode()),
            (b"ratelimit-policy", policy.encode()),
            (b"ratelimit", ", ".join(items).encode()),
        ]


def check_memory(
    store: MemoryStore,
    limits: Sequence[Limit],
    keys: Sequence[str],
    now: float,
    *,
    commit: bool = True,
) -> Verdict:
    """Decide a request on ``limits`` (its store keys ``keys``) at ``now`` (seconds),
    and, with ``commit``, count it in every limit if all admit it."""
    now_us = round(now * US)
    allowed: list[bool] = []
    debts: list[int] = []
    for limit, key in zip(limits, keys, strict=True):
        ok, debt = gcra(store.get(key), now_us, limit.interval, limit.burst)
        allowed.append(ok)
        debts.append(debt)
    if commit and all(allowed):
        for limit, key, debt in zip(limits, keys, debts, strict=True):
            store.set(key, now_us + debt + limit.interval)
    return Verdict(tuple(limits), tuple(allowed), tuple(debts))


def admit_memory(
    store: MemoryStore, limits: Sequence[Limit], headers: Headers, client_addr: str, now: float
) -> bool:
    """:func:`check_memory` for the common case, on the hot path: count the request
    and say True if every limit admits it; else count nothing and say False (the
    caller asks :func:`check_memory` for the verdict to answer with)."""
    now_us = round(now * US)
    get = store.get
    pending: list[tuple[str, int]] = []
    for limit in limits:
        key = request_key(limit, headers, client_addr)
        interval = limit.interval
        tat = get(key)
        debt = 0 if tat is None or tat < now_us else tat - now_us
        if debt + interval > limit.burst * interval:
            return False
        pending.append((key, now_us + debt + interval))
    for key, tat in pending:
        store.set(key, tat)
    return True
