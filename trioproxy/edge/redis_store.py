"""The Redis store of rate limits: one limit shared by every proxy instance.

Each check is one ``EVALSHA`` of :data:`GCRA_SCRIPT`, the algorithm of
``trioproxy.edge.ratelimit.gcra`` in Lua, over all of a request's Redis-stored
limits at once: Redis runs a script atomically, so N proxies that check the
same key at the same time are serialised there and enforce one limit. Time
is Redis's own clock (``TIME``), so the instances' clocks need not agree.

The client is coredis: it is maintained, typed, and built on anyio, so it runs
under trio as it is (redis-py's asyncio client does not: it needs an asyncio
event loop). coredis 6 clients must be used as async context managers, so the
store is a service (``await nursery.start(store.run)``) that holds the client
open for its life. It is imported only when a store starts (~0.2 s of import
time that a proxy without ``[server] redis`` does not pay).

When Redis fails (refused, reset, or no answer within ``timeout``) the request
is decided by ``on_store_error``: ``allow`` lets it through uncounted, ``deny``
answers 503. Every such request is counted in :attr:`RedisStore.errors`
(``trioproxy_ratelimit_store_errors_total``). The log says so once when an
outage begins and once when Redis answers again. During an outage one request
at most every :data:`RETRY_INTERVAL` seconds tries Redis; the others are
decided at once instead of each waiting ``timeout``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from trioproxy.config.model import RedisSettings
from trioproxy.edge.ratelimit import Limit, Verdict

if TYPE_CHECKING:
    import coredis
    import coredis.commands

log = logging.getLogger("trioproxy.edge")

#: Seconds between two tries of a Redis that failed.
RETRY_INTERVAL = 0.5
#: Keys are the limit's store key under this prefix.
KEY_PREFIX = "trioproxy:rl:"

#: KEYS: one per limit. ARGV[1]: now in µs, or "" for Redis's clock; then
#: ``interval, burst`` per limit. Returns ``{ok_1, debt_1, ok_2, debt_2, ...}``;
#: each key's TAT is written (with an expiry when its debt is paid) only if
#: every limit admits the request.
GCRA_SCRIPT = """
local now
if ARGV[1] == "" then
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end
local out = {}
local all = true
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local stored = redis.call("GET", KEYS[i])
  local debt = 0
  if stored then
    local tat = tonumber(stored)
    if tat > now then debt = tat - now end
  end
  local ok = debt + interval <= burst * interval
  if not ok then all = false end
  out[2 * i - 1] = ok and 1 or 0
  out[2 * i] = debt
end
if all then
  for i = 1, #KEYS do
    local interval = tonumber(ARGV[2 * i])
    local due = out[2 * i] + interval
    redis.call("SET", KEYS[i], string.format("%.0f", now + due), "PX", math.ceil(due / 1000))
  end
end
return out
"""


class RedisStore:
    """Rate limit checks in Redis; ``check`` returns None when Redis failed."""

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        #: Requests whose limits Redis could not check (decided by ``on_store_error``).
        self.errors = 0
        self._client: coredis.Redis[bytes] | None = None
        self._script: coredis.commands.Script[bytes] | None = None
        self._failing = False
        self._errors_before_outage = 0
        self._retry_at = 0.0
        self._scope = trio.CancelScope()
        #: What a failed command raises (coredis's errors, once it is imported).
        self._store_errors: tuple[type[Exception], ...] = (OSError,)

    @property
    def deny_on_error(self) -> bool:
        return self.settings.on_store_error == "deny"

    @property
    def connected(self) -> bool:
        """Whether its client is open (between ``run``'s start and its end)."""
        return self._client is not None

    @property
    def healthy(self) -> bool:
        return self._client is not None and not self._failing

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the client open until :meth:`stop` or cancellation. Connections are
        made on demand: a Redis that is down at start is an outage like any other."""
        import coredis
        from coredis.retry import NoRetryPolicy

        self._store_errors = (coredis.exceptions.RedisError, OSError)
        # Its INFO lines (a script loaded again, a connection lost) would be noise in
        # the access log; an outage is logged here, once.
        logging.getLogger("coredis").setLevel(logging.WARNING)
        client: coredis.Redis[bytes] = coredis.Redis.from_url(
            self.settings.url, retry_policy=NoRetryPolicy()
        )
        with self._scope:
            async with client:
                self._script = client.register_script(GCRA_SCRIPT)
                self._client = client
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    self._client = None
                    self._script = None

    def stop(self) -> None:
        self._scope.cancel()

    async def check(
        self, limits: Sequence[Limit], keys: Sequence[str], *, now: float | None = None
    ) -> Verdict | None:
        """Decide a request on ``limits`` (store keys ``keys``) and count it in all of
        them if all admit it; None if Redis could not answer (counted and logged).

        ``now`` (seconds) replaces Redis's clock: for tests that compare the script
        with the Python algorithm on the same instants.
        """
        clock = trio.current_time()
        script = self._script
        if script is None or (self._failing and clock < self._retry_at):
            self._failed("not connected" if script is None else "", tried=False)
            return None
        args: list[str | int] = ["" if now is None else str(round(now * 1_000_000))]
        for limit in limits:
            args += [limit.interval, limit.burst]
        reply: list[int] | None = None
        why = f"no answer within {self.settings.timeout:g} s"
        with trio.move_on_after(self.settings.timeout):
            try:
                reply = list(await script(keys=[KEY_PREFIX + key for key in keys], args=args))
            except self._store_errors as exc:
                why = f"{type(exc).__name__}: {exc}"
        if reply is None:
            self._failed(why)
            return None
        if self._failing:
            self._failing = False
            log.warning(
                "rate limit store %s recovered (%d requests were decided without it)",
                self.settings.url,
                self.errors - self._errors_before_outage,
            )
        allowed = tuple(bool(reply[2 * i]) for i in range(len(limits)))
        debts = tuple(int(reply[2 * i + 1]) for i in range(len(limits)))
        return Verdict(tuple(limits), allowed, debts)

    def _failed(self, why: str, *, tried: bool = True) -> None:
        """Count a request decided without Redis; log the start of an outage. After
        a failed try, the next one is :data:`RETRY_INTERVAL` away."""
        self.errors += 1
        if tried:
            self._retry_at = trio.current_time() + RETRY_INTERVAL
        if not self._failing:
            self._failing = True
            self._errors_before_outage = self.errors - 1
            way = "denying (503)" if self.deny_on_error else "allowing"
            log.error(
                "rate limit store %s failed (%s): %s the requests it cannot check "
                "until it recovers",
                self.settings.url,
                why or "unavailable",
                way,
            )
