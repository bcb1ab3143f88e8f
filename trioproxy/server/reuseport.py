"""Listening sockets that several worker processes share.

Linux (3.9+) and the BSDs have ``SO_REUSEPORT``: every worker binds its own
listening socket to the same address, and the kernel spreads new connections over
them (on Linux by a hash of the connection's addresses). A worker that dies takes
only its own accept queue with it; the others keep accepting.

``trio.open_tcp_listeners`` does not set the option, so the sockets are made here,
as it makes them (every address ``getaddrinfo`` gives for the host, IPv6 ones
v6-only, ``SO_REUSEADDR`` where it is not Windows), and wrapped in
``trio.SocketListener`` by the caller.

Where ``SO_REUSEPORT`` does not exist, the supervisor binds and listens once and
the workers inherit the descriptors (they then share one accept queue).
"""

from __future__ import annotations

import socket
import sys

import trio

#: The accept queue asked for (the kernel caps it at ``net.core.somaxconn``), as trio asks.
BACKLOG = 0xFFFF


def reuse_port_supported() -> bool:
    """Whether this platform has ``SO_REUSEPORT`` with the load-spreading meaning.

    macOS has the option too, but there the last socket bound takes every
    connection; only Linux spreads them, so only Linux uses it here.
    """
    return hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith("linux")


def bind_sockets(
    host: str, port: int, *, reuse_port: bool, listen: bool = True
) -> list[socket.socket]:
    """Bound (and, with ``listen``, listening) TCP sockets on every address of ``host``.

    With ``port`` 0 the first socket takes a free port and the others take the same
    one. A socket bound with ``reuse_port`` but not listening reserves the port and
    takes no connections (the supervisor holds the port so for its workers).

    Raises:
        OSError: the address is in use, not available, or not permitted. The sockets
            already made are closed.
    """
    infos = socket.getaddrinfo(
        host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    made: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            made.append(sock)
            if sys.platform != "win32":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(made) > 1:
                address = (address[0], made[0].getsockname()[1], *address[2:])
            sock.bind(address)
            if listen:
                sock.listen(BACKLOG)
    except OSError:
        for sock in made:
            sock.close()
        raise
    return made


def as_listeners(sockets: list[socket.socket]) -> list[trio.SocketListener]:
    """Each (listening) socket as a trio listener, non-blocking; they own the sockets."""
    listeners = []
    for sock in sockets:
        sock.setblocking(False)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    return listeners
