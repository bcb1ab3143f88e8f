"""TLS termination on the standalone server: contexts, SNI, handshakes, reload.

Config (``[server] tls``)::

    [server.tls]
    cert = "site.pem"            # certificate chain (PEM), leaf first
    key = "site.key"             # its private key (PEM)
    redirect_http = 8080         # optional: a plain listener answering 308 to https
    [[server.tls.sni]]           # more certificates, chosen by the name the client asks for
    hosts = ["api.example.com", "*.example.org"]
    cert = "api.pem"
    key = "api.key"

``--certfile``/``--keyfile`` give ``cert``/``key`` on the command line.

Protocol. TLS 1.2 or newer (``minimum_version``), the ``ssl`` module's default
server ciphers, ALPN ``http/1.1`` (RFC 7301: a client offering only ``h2`` gets no
ALPN answer and may go on with HTTP/1.1, as with nginx without http2). A
certificate is picked by SNI (RFC 6066 §3): an exact host first, then the
longest ``*.`` wildcard that covers the name (any depth, as routes match hosts),
else the default ``cert``. No name, or an unknown one, gets the default.

Reload. The listening context never changes: its ``sni_callback`` (called by
OpenSSL for every ClientHello, with or without a name) hands the connection the
context of the current :class:`CertificateSet`, which a reload replaces with one
read from the files again. A connection keeps the context it shook hands with,
so reload drops nothing; the next handshake gets the new certificates.

Stream. A plain TCP connection becomes a :class:`~trioproxy.edge.tls_stream.FastTLSStream`
(OpenSSL reading and writing the socket itself; ``trio.SSLStream`` over a memory BIO
cost ~50 µs per request more, see ``bench/README.rst``); any other stream gets
``trio.SSLStream``.

Handshake. :func:`handshake` runs it under a deadline the caller gives — the
header timeout, whose clock keeps running into the first request head (see
``ClientConnection(head_deadline=...)``) — so a client that stalls in the
handshake, or speaks plain HTTP to the TLS port, costs one connection slot for
at most that long and one debug line, and no other connection waits for it.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from collections.abc import Mapping

import attrs
import trio

from trioproxy.config.model import ServerTLS
from trioproxy.edge.tls_stream import FastTLSStream
from trioproxy.sockets import FastSocketStream

log = logging.getLogger("trioproxy.tls")

__all__ = [
    "CertificateError",
    "CertificateSet",
    "TLSTerminator",
    "handshake",
    "load_pair",
    "server_context",
]


class CertificateError(ValueError):
    """A certificate/key pair that cannot be used; the message says why, without paths."""


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for one certificate chain and key: TLS >= 1.2, ALPN http/1.1.

    Raises:
        CertificateError: the files cannot be read, are not PEM, or do not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    # TLS 1.2 renegotiation would make a read write and a write read (FastTLSStream
    # keeps the two directions apart); TLS 1.3 has none.
    context.options |= ssl.OP_NO_RENEGOTIATION
    load_pair(context, cert, key)
    return context


def load_pair(context: ssl.SSLContext, cert: str, key: str) -> None:
    """``context.load_cert_chain(cert, key)`` with its failures said plainly.

    Raises:
        CertificateError: the files cannot be read, are not PEM, or do not match.
    """
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        reason = exc.reason or exc.strerror or str(exc)
        if "KEY_VALUES_MISMATCH" in str(reason).upper():
            raise CertificateError("the key does not match the certificate") from None
        raise CertificateError(f"not a PEM certificate chain and key ({reason})") from None
    except OSError as exc:
        raise CertificateError(f"cannot read it: {exc.strerror or exc}") from None


@attrs.frozen
class CertificateSet:
    """The contexts of one ``[server] tls`` as read at one time: default and by host."""

    default: ssl.SSLContext
    #: Exact host names (lower-case) → context.
    exact: Mapping[str, ssl.SSLContext]
    #: ``(".example.org", context)``, longest suffix first.
    wildcards: tuple[tuple[str, ssl.SSLContext], ...]

    @classmethod
    def load(cls, tls: ServerTLS) -> CertificateSet:
        """Read every certificate of ``tls``.

        Raises:
            CertificateError: for the first pair that cannot be used.
        """
        default = server_context(tls.cert, tls.key)
        exact: dict[str, ssl.SSLContext] = {}
        wildcards: list[tuple[str, ssl.SSLContext]] = []
        for entry in tls.sni:
            context = server_context(entry.cert, entry.key)
            for host in entry.hosts:
                if host.startswith("*."):
                    wildcards.append((host[1:], context))
                else:
                    exact.setdefault(host.rstrip("."), context)
        wildcards.sort(key=lambda item: -len(item[0]))
        return cls(default, exact, tuple(wildcards))

    def for_name(self, server_name: str | None) -> ssl.SSLContext:
        """The context for the SNI ``server_name`` (None: the client sent none)."""
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(".")
        context = self.exact.get(name)
        if context is not None:
            return context
        for suffix, candidate in self.wildcards:
            if name.endswith(suffix) and len(name) > len(suffix):
                return candidate
        return self.default


class TLSTerminator:
    """The listening side's TLS: one fixed context whose SNI callback serves the
    current certificates (see the module docstring)."""

    def __init__(self, tls: ServerTLS) -> None:
        self.settings = tls
        self.certificates = CertificateSet.load(tls)
        # The listening context carries the default certificate too, so that it is a
        # usable server context on its own; the callback switches every connection
        # to the current set's context.
        self.context = server_context(tls.cert, tls.key)
        self.context.sni_callback = self._pick

    def _pick(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        connection.context = self.certificates.for_name(server_name)

    def reload(self, tls: ServerTLS) -> None:
        """Serve the certificates ``tls`` names from the next handshake on.

        Raises:
            CertificateError: nothing changed.
        """
        self.certificates = CertificateSet.load(tls)
        self.settings = tls


async def handshake(
    stream: trio.abc.Stream, context: ssl.SSLContext, *, deadline: float, peer: str
) -> trio.abc.Stream | None:
    """``stream`` wrapped in TLS once the handshake is done, or None (logged at debug,
    one line) when it failed or did not finish by ``deadline``.

    A plain TCP stream (``FastSocketStream``) becomes a :class:`FastTLSStream` (its
    socket taken over); any other stream is wrapped in ``trio.SSLStream``.

    Resource handling: the caller keeps owning ``stream`` and closes it; on None the
    TLS wrapper is closed here, otherwise the caller closes the stream returned.
    """
    tls_stream: FastTLSStream | trio.SSLStream[trio.abc.Stream]
    if type(stream) is FastSocketStream:
        tls_stream = FastTLSStream.wrap(stream.socket, context)
    else:
        tls_stream = trio.SSLStream(stream, context, server_side=True)
    why: object = None
    plain_http = False
    with trio.move_on_at(deadline):
        try:
            await tls_stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            cause = exc.__cause__
            why = cause.reason if isinstance(cause, ssl.SSLError) and cause.reason else cause
            if why == "HTTP_REQUEST":
                why = "plain HTTP sent to the TLS port"
                plain_http = True
            why = why or "connection closed"
        else:
            return tls_stream
    if why is None:
        log.debug("TLS handshake with %s not finished within the header timeout", peer)
    else:
        log.debug("TLS handshake with %s failed: %s", peer, why)
    if plain_http:
        await _answer_plain_http(stream, tls_stream, deadline)
    await trio.aclose_forcefully(tls_stream)
    return None


#: What a client that spoke plain HTTP to the TLS port reads (nginx answers 400 too).
_PLAIN_HTTP_BODY = b"400 Bad Request: plain HTTP was sent to the HTTPS port\n"
PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%b" % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY)
)


async def _answer_plain_http(
    stream: trio.abc.Stream,
    tls_stream: FastTLSStream | trio.SSLStream[trio.abc.Stream],
    deadline: float,
) -> None:
    """Answer 400 in plain text, then close as nginx's lingering close does: our
    side shut, the rest of the request read and dropped until the client closes
    (up to ``deadline``, one second at most), so that the kernel sends a FIN after
    the answer, not a reset that could destroy it before the client reads it."""
    plain: trio.abc.Stream
    if isinstance(tls_stream, FastTLSStream):
        # The TLS socket took the descriptor; the answer goes on a copy of it.
        plain = FastSocketStream(socket.socket(fileno=os.dup(tls_stream.socket.fileno())))
    else:
        plain = stream
    try:
        with trio.move_on_at(min(deadline, trio.current_time() + 1.0)):
            await plain.send_all(PLAIN_HTTP_ANSWER)
            if isinstance(plain, trio.abc.HalfCloseableStream):
                await plain.send_eof()
            while await plain.receive_some(65536):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        if plain is not stream:
            await trio.aclose_forcefully(plain)
