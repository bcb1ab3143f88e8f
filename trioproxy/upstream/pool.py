"""Per-origin pools of keep-alive upstream connections.

Rules (the same as httpcore's, in trio terms):

* at most ``max_per_origin`` connections to one origin are open; a caller that
  finds them all busy waits up to ``pool_timeout`` and then gets
  :class:`~trioproxy.errors.PoolTimeout`;
* a connection goes back to the pool only if the engine marked it ``clean``
  (its exchange finished whole) and the protocol says both sides keep it
  alive; anything else — an error, a cancellation midway, ``Connection:
  close`` — closes it, shielded, in the scope that checked it out;
* an idle connection older than ``idle_timeout``, or whose socket became
  readable (the server closed it), is closed instead of reused.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import attrs
import trio

from trioproxy.errors import PoolTimeout
from trioproxy.http.h11_impl import H11Client
from trioproxy.http.protocol import ClientProtocol
from trioproxy.upstream.connection import Connector, UpstreamConnection, open_connection
from trioproxy.upstream.origin import Origin

_CHECK_IDLE_AFTER = 1.0


@attrs.define
class _OriginPool:
    limiter: trio.Semaphore
    idle: list[UpstreamConnection] = attrs.Factory(list)


class _Checkout:
    """The async context manager of ``UpstreamPool.connection`` (a class: the hot
    path pays for no generator)."""

    __slots__ = ("_conn", "_connect_timeout", "_fresh", "_origin", "_pool", "_pools")

    def __init__(
        self,
        pools: UpstreamPool,
        pool: _OriginPool,
        origin: Origin,
        fresh: bool,
        connect_timeout: float | None,
    ) -> None:
        self._pools = pools
        self._pool = pool
        self._origin = origin
        self._fresh = fresh
        self._connect_timeout = connect_timeout
        self._conn: UpstreamConnection | None = None

    async def __aenter__(self) -> UpstreamConnection:
        self._conn = await self._pools._acquire(
            self._pool, self._origin, self._fresh, self._connect_timeout
        )
        return self._conn

    async def __aexit__(self, *exc_info: object) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pools._release(self._pool, conn)


@attrs.define
class UpstreamPool:
    """Connection pools for every upstream origin the proxy talks to."""

    connect_timeout: float = 5.0
    pool_timeout: float = 30.0
    idle_timeout: float = 60.0
    max_per_origin: int = 256
    max_head_size: int = 65536
    ssl_context: ssl.SSLContext | None = None
    #: How streams are opened; tests swap in memory streams.
    connector: Connector | None = None
    #: The parser seam's client implementation (see trioproxy.http.parsers).
    protocol_factory: Callable[[int], ClientProtocol] = H11Client
    #: trio's clock (see ``Engine.current_time``).
    current_time: Callable[[], float] = trio.current_time
    _pools: dict[Origin, _OriginPool] = attrs.field(factory=dict, init=False)

    def _pool_for(self, origin: Origin) -> _OriginPool:
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _OriginPool(trio.Semaphore(self.max_per_origin))
        return pool

    def idle_count(self, origin: Origin) -> int:
        pool = self._pools.get(origin)
        return len(pool.idle) if pool else 0

    def in_use_count(self, origin: Origin) -> int:
        pool = self._pools.get(origin)
        return self.max_per_origin - pool.limiter.value if pool else 0

    def connection(
        self, origin: Origin, *, fresh: bool = False, connect_timeout: float | None = None
    ) -> _Checkout:
        """``async with pool.connection(origin) as conn``: one exchange's connection.

        Args:
            fresh: open a new connection even if an idle one exists (used to
                retry a request that failed on a reused, stale connection).
            connect_timeout: this exchange's, if not the pool's (a route's own).

        Raises:
            PoolTimeout: every connection to the origin stayed busy.
            UpstreamConnectError, UpstreamConnectTimeout: from connecting.
        """
        return _Checkout(self, self._pool_for(origin), origin, fresh, connect_timeout)

    async def _acquire(
        self, pool: _OriginPool, origin: Origin, fresh: bool, connect_timeout: float | None
    ) -> UpstreamConnection:
        try:
            pool.limiter.acquire_nowait()  # the common case needs no timeout scope
        except trio.WouldBlock:
            with trio.move_on_after(self.pool_timeout) as waited:
                await pool.limiter.acquire()
            if waited.cancelled_caught:
                raise PoolTimeout(f"{origin}: {self.max_per_origin} connections busy") from None
        try:
            conn = None
            if not fresh and (idle := pool.idle):
                # The common case inline (an awaited coroutine costs as much as
                # the check): the newest idle connection, idle under a second.
                newest = idle[-1]
                now = self.current_time()
                if now - newest.idle_since < _CHECK_IDLE_AFTER and (
                    newest.idle_since >= now - self.idle_timeout
                ):
                    conn = idle.pop()
                else:
                    conn = await self._take_idle(pool)
            if conn is None:
                conn = await open_connection(
                    origin,
                    connect_timeout=connect_timeout or self.connect_timeout,
                    ssl_context=self.ssl_context,
                    max_head_size=self.max_head_size,
                    connector=self.connector,
                    protocol_factory=self.protocol_factory,
                )
        except BaseException:
            pool.limiter.release()
            raise
        conn.start_exchange()
        return conn

    async def _release(self, pool: _OriginPool, conn: UpstreamConnection) -> None:
        try:
            if conn.clean and conn.protocol.reusable:
                conn.protocol.start_next_cycle()
                conn.exchanges += 1
                conn.idle_since = now = self.current_time()
                idle = pool.idle
                idle.append(conn)
                if idle[0].idle_since < now - self.idle_timeout:
                    await self._close_expired(pool, now)
            else:
                with trio.CancelScope(shield=True):
                    await conn.aclose()
        finally:
            pool.limiter.release()

    async def _take_idle(self, pool: _OriginPool) -> UpstreamConnection | None:
        """The most recently used live idle connection; stale ones are closed.

        The liveness check (a poll syscall) is skipped for a connection idle
        less than a second: a server closing a connection that soon after a
        complete response says ``Connection: close`` in it, which we honour.
        """
        now = self.current_time()
        deadline = now - self.idle_timeout
        while pool.idle:
            conn = pool.idle.pop()
            if conn.idle_since >= deadline and (
                now - conn.idle_since < _CHECK_IDLE_AFTER or conn.looks_alive()
            ):
                return conn
            with trio.CancelScope(shield=True):
                await conn.aclose()
        return None

    async def _close_expired(self, pool: _OriginPool, now: float) -> None:
        # The list is ordered by idle_since: expired connections sit at its front.
        deadline = now - self.idle_timeout
        while pool.idle and pool.idle[0].idle_since < deadline:
            with trio.CancelScope(shield=True):
                await pool.idle.pop(0).aclose()

    async def aclose(self) -> None:
        """Close every idle connection (busy ones are closed by their users)."""
        with trio.CancelScope(shield=True):
            for pool in self._pools.values():
                while pool.idle:
                    await pool.idle.pop().aclose()
