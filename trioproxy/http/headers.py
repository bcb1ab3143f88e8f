"""Header rules for a message passing through the proxy (sans-I/O).

Every proxied request and response goes through this module twice, so it works
on the parser seam's representation as is (``Headers``: lowercase names,
stripped values, repeated fields as separate entries in order) and never joins,
splits or rewrites a field it does not own.

Hop-by-hop fields (RFC 9110 §7.6.1). ``Connection`` and the fields it names
describe the connection to the immediate peer, not the message, so a proxy
removes them before forwarding. So are ``Keep-Alive``, ``Proxy-Connection``,
``TE``, ``Transfer-Encoding`` and ``Upgrade``, which §7.6.1 tells intermediaries
to remove even when ``Connection`` does not list them, and ``Trailer``: the
proxy re-frames every body (RFC 9112 §6.1, §7.1.2), so a trailer declaration
from one hop would be wrong on the next. Connection options are compared
case-insensitively (§7.6.1); a ``close`` token simply names no field.

A connection option never removes what frames or addresses the message:
``Content-Length`` and ``Transfer-Encoding`` (RFC 9112 §6.1-6.3) say where the
body ends, and ``Host`` (RFC 9112 §3.2) is the request's authority. §7.6.1
says a sender must not list them as options (they are not about this
connection), so one that does is simply wrong; dropping them would send a
POST upstream with its body bytes and nothing saying how many there are, i.e.
no body (RFC 9112 §6.3 item 7). Like nginx, the proxy ignores such options and
forwards the message framed.

Fields the proxy owns. Upstream, the proxy writes exactly one ``Host``
(RFC 9112 §3.2), first in the head; it extends the ``X-Forwarded-For`` and
``Via`` (RFC 9110 §7.6.3) chains into one line each rather than appending a
second line, and sets ``X-Forwarded-Proto``, ``X-Forwarded-Host`` and
``X-Request-ID``, replacing whatever the client sent. ``Expect`` is not
forwarded: the proxy answers ``100-continue`` itself (RFC 9110 §10.1.1).
The owned fields go after the passed-through ones, in the order listed above.

Everything else passes through byte for byte and in order: ``Set-Cookie``
lines stay separate (they cannot be comma-joined, RFC 6265 §3), and
``Cache-Control``, ``Content-Length`` and ``Content-Encoding`` are the
endpoints' business.

A route's header rules (``trioproxy.http.transforms``: remove, set, add) edit
the fields built here, the proxy's own included. Rather than a second pass over
the result, they come as a :class:`FieldEdit` and are applied in the same pass,
with the same outcome as ``HeaderTransform.apply`` on the fields built without
them: a removed or set name is filtered with the hop-by-hop ones; a set line
takes the place of the first forwarded line of its name, else of the proxy's
own line of that name, else goes at the end, followed by the added lines.

Cost. A rule that needs ``Connection`` makes one pass to read it and one to
filter; the common message without a ``Connection`` option outside the fixed
set filters against that set alone. No regexes, and the owned fields are
collected during the filtering pass.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Final, TypeAlias

import attrs

from trioproxy.http.protocol import Headers

__all__ = [
    "HOP_BY_HOP",
    "FieldEdit",
    "FieldRules",
    "client_response_headers",
    "comma_tokens",
    "get_all",
    "get_first",
    "has_token",
    "new_request_id",
    "request_id_from",
    "strip_hop_by_hop",
    "upstream_request_headers",
]

HOP_BY_HOP: Final[frozenset[bytes]] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# RFC 9110 §5.6.1: list elements are separated by commas with optional
# whitespace (SP / HTAB) around them.
_OWS: Final = b" \t"
_LIST_SEP: Final = b", "

# X-Request-ID is echoed into logs and upstream heads: accept only a bounded
# run of visible ASCII (VCHAR, RFC 5234 B.1), nothing that could split a line.
_REQUEST_ID_MAX: Final = 200
_VCHAR: Final = bytes(range(0x21, 0x7F))

# Connection options that are ignored rather than obeyed (see the module docstring,
# RFC 9110 §7.6.1): the message's framing and its Host. Transfer-Encoding is in
# HOP_BY_HOP already (the proxy re-frames every body), so it is listed for clarity.
_NEVER_CONNECTION_OPTIONS: Final[frozenset[bytes]] = frozenset(
    {b"content-length", b"transfer-encoding", b"host"}
)

# Dropped from the upstream request on top of the hop-by-hop fields.
_REQUEST_EXTRA: Final[frozenset[bytes]] = frozenset({b"expect"})
_REQUEST_DROP: Final[frozenset[bytes]] = HOP_BY_HOP | _REQUEST_EXTRA

# The fields the proxy writes itself, per direction. The peer's lines of these
# names never reach the result as they came, so a header rule's set line for one
# of them takes the place of the proxy's line, never of the peer's.
_REQUEST_OWNED: Final[frozenset[bytes]] = frozenset(
    {
        b"host",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"via",
        b"x-request-id",
    }
)
_RESPONSE_OWNED: Final[frozenset[bytes]] = frozenset({b"via", b"x-request-id"})


@attrs.frozen(slots=True)
class FieldRules:
    """Which names one direction's header rules remove or set, in the form the pass
    that builds that direction's fields reads; made once per route.

    Args:
        drop: every name removed or set (lowercase).
        set_names: the names set (a subset of ``drop``).
        request: rules for the upstream request (else for the client's response).
    """

    drop: frozenset[bytes]
    set_names: frozenset[bytes]
    request: bool
    #: The names the pass filters out when ``Connection`` names none: its own
    #: and ``drop``.
    pass_drop: frozenset[bytes] = attrs.field(init=False)
    #: Set names whose line may take the place of a forwarded line: neither
    #: dropped on its own (hop-by-hop, ``Expect``) nor written by the proxy.
    in_place: frozenset[bytes] = attrs.field(init=False)
    #: The names of the proxy's own fields that the rules remove or set.
    owned: frozenset[bytes] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        base, owned = (
            (_REQUEST_DROP, _REQUEST_OWNED) if self.request else (HOP_BY_HOP, _RESPONSE_OWNED)
        )
        object.__setattr__(self, "pass_drop", base | self.drop)
        object.__setattr__(self, "in_place", self.set_names - base - owned)
        object.__setattr__(self, "owned", self.drop & owned)


#: One message's header rules with their values: the :class:`FieldRules`; name ->
#: the one line that replaces every line of that name (where the first was, else
#: at the end), in the order they are appended; the lines appended after
#: everything else. A plain tuple: it may be made per message, and an attrs
#: instance costs several times as much to build.
FieldEdit: TypeAlias = tuple[FieldRules, Mapping[bytes, bytes], Sequence[tuple[bytes, bytes]]]


def get_first(headers: Headers, name: bytes) -> bytes | None:
    """Return the value of the first ``name`` field, or ``None``.

    Args:
        headers: the message's fields.
        name: a lowercase field name.
    """
    for field_name, value in headers:
        if field_name == name:
            return value
    return None


def get_all(headers: Headers, name: bytes) -> list[bytes]:
    """Return the values of every ``name`` field, in order."""
    return [value for field_name, value in headers if field_name == name]


def comma_tokens(headers: Headers, name: bytes) -> list[bytes]:
    """Return every element of every ``name`` field read as a comma list.

    Elements are lowercased and stripped of surrounding whitespace; empty ones
    (``a,,b``, a trailing comma) are dropped (RFC 9110 §5.6.1). Suited to
    token lists such as ``Connection``, not to quoted strings.
    """
    tokens: list[bytes] = []
    for field_name, value in headers:
        if field_name == name:
            for part in value.lower().split(b","):
                token = part.strip(_OWS)
                if token:
                    tokens.append(token)
    return tokens


def has_token(headers: Headers, name: bytes, token: bytes) -> bool:
    """Tell whether any ``name`` field lists ``token`` (given lowercase)."""
    for field_name, value in headers:
        if field_name == name:
            for part in value.lower().split(b","):
                if part.strip(_OWS) == token:
                    return True
    return False


def _drop_set(headers: Headers, base: frozenset[bytes]) -> frozenset[bytes]:
    """``base`` plus the field names listed in ``Connection`` (RFC 9110 §7.6.1),
    except the framing fields and ``Host``, which no connection option removes."""
    # comma_tokens' reading, in the same pass and with no list built: this runs
    # twice per proxied request.
    named: set[bytes] | None = None
    for field_name, value in headers:
        if field_name == b"connection":
            for part in value.lower().split(b","):
                token = part.strip(_OWS)
                if token and token not in base and token not in _NEVER_CONNECTION_OPTIONS:
                    if named is None:
                        named = set()
                    named.add(token)
    # Usually None: "Connection: keep-alive" / "close" name nothing new.
    return base.union(named) if named else base


def strip_hop_by_hop(headers: Headers, extra: frozenset[bytes] = frozenset()) -> Headers:
    """Return ``headers`` without the fields that must not be forwarded.

    Removes :data:`HOP_BY_HOP`, every field named by a ``Connection`` option
    (RFC 9110 §7.6.1) but ``Content-Length`` and ``Host``, and the names in
    ``extra``; the rest keep their order and repeats.

    Args:
        headers: the received fields; not modified.
        extra: more lowercase names to remove.

    Returns:
        A new list.
    """
    drop = _drop_set(headers, HOP_BY_HOP | extra if extra else HOP_BY_HOP)
    return [field for field in headers if field[0] not in drop]


# Request ids need to be unique, not unguessable: a PRNG seeded once from the
# OS beats uuid4's getrandom() syscall per request on the hot path.
_ids = random.Random(os.urandom(32))


def new_request_id() -> bytes:
    """Return a fresh request id: 32 lowercase hex digits (128 random bits)."""
    return b"%032x" % _ids.getrandbits(128)


def request_id_from(headers: Headers) -> bytes | None:
    """Return the client's first ``X-Request-ID`` if it is safe to reuse, else ``None``.

    Safe means 1 to 200 bytes, all visible ASCII (0x21-0x7E): no spaces, no
    control characters, nothing outside ASCII.
    """
    value = get_first(headers, b"x-request-id")
    if value is None or not 0 < len(value) <= _REQUEST_ID_MAX:
        return None
    # Deleting every allowed byte leaves the forbidden ones: one C-level pass.
    if value.translate(None, _VCHAR):
        return None
    return value


def _extend_chain(prior: list[bytes], hop: bytes) -> bytes:
    """Join ``prior`` list values and ``hop`` into one comma list."""
    if not prior:
        return hop
    prior.append(hop)
    return _LIST_SEP.join(prior)


def upstream_request_headers(
    headers: Headers,
    *,
    client_addr: str,
    scheme: str,
    upstream_host: bytes,
    preserve_host: bool,
    request_id: bytes,
    via: bytes = b"1.1 trioproxy",
    x_forwarded: bool = True,
    edit: FieldEdit | None = None,
    forwarded_host: bytes | None = None,
) -> Headers:
    """Build the fields the proxy sends upstream from the client's request fields.

    Args:
        headers: the client's request fields; not modified.
        client_addr: the client's IP address, without port; an IPv6 address
            may come bracketed and is written bare.
        scheme: ``"http"`` or ``"https"``, as the client reached the proxy.
        upstream_host: the ``Host`` value for the upstream (its authority).
        preserve_host: forward the client's ``Host`` instead, when it sent one.
        request_id: the value for ``X-Request-ID``.
        via: this hop's ``Via`` element (RFC 9110 §7.6.3), e.g. ``b"1.0 trioproxy"``
            for an HTTP/1.0 client.
        x_forwarded: write ``X-Forwarded-For``/``-Proto``/``-Host``; False drops
            them, the client's included (``[server] forwarded = "rfc7239"``: the
            ``Forwarded`` field, see ``trioproxy.edge.identity``, says it instead).
        edit: the route's request header rules, applied in the same pass (see
            the module docstring).
        forwarded_host: the ``X-Forwarded-Host`` value instead of the client's
            ``Host`` (what a trusted proxy in front said, ``trioproxy.edge.identity``).

    Returns:
        A new list: ``Host`` first, then the client's other forwardable fields
        in order, then ``X-Forwarded-For``, ``X-Forwarded-Proto``,
        ``X-Forwarded-Host`` (only if the client sent ``Host``), ``Via`` and
        ``X-Request-ID``; then, with ``edit``, its set lines not placed yet and
        its added lines.
    """
    drop = _drop_set(headers, _REQUEST_DROP)
    if edit is not None:
        rules, sets, add = edit
        # A line a Connection option names is gone before the rules see it: a
        # set line of its name does not take its place.
        if drop is _REQUEST_DROP:
            drop, in_place = rules.pass_drop, rules.in_place
        else:
            drop, in_place = drop | rules.drop, rules.in_place - drop
        placed: set[bytes] | None = None  # made when a set line takes a line's place
    out: Headers = [(b"host", upstream_host)]
    client_host: bytes | None = None
    forwarded_for: list[bytes] = []
    via_chain: list[bytes] = []
    for field in headers:
        name = field[0]
        if name == b"host":
            # Read before the drop test: Host is the request's authority
            # (RFC 9112 §3.2), never a connection option, and always rewritten.
            if client_host is None:
                client_host = field[1]
        elif name in drop:
            if edit is not None and name in in_place:
                if placed is None:
                    placed = set()
                elif name in placed:
                    continue
                placed.add(name)
                out.append((name, sets[name]))
            continue
        elif name == b"x-forwarded-for":
            if field[1]:
                forwarded_for.append(field[1])
        elif name == b"via":
            if field[1]:
                via_chain.append(field[1])
        elif name in (b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"):
            continue
        else:
            out.append(field)

    if preserve_host and client_host is not None:
        out[0] = (b"host", client_host)
    if client_addr.startswith("[") and client_addr.endswith("]"):
        client_addr = client_addr[1:-1]
    if forwarded_host is None:
        forwarded_host = client_host
    if x_forwarded:
        hop = client_addr.encode("ascii")
        out.append((b"x-forwarded-for", _extend_chain(forwarded_for, hop)))
        out.append((b"x-forwarded-proto", scheme.encode("ascii")))
        if forwarded_host is not None:
            out.append((b"x-forwarded-host", forwarded_host))
    out.append((b"via", _extend_chain(via_chain, via)))
    out.append((b"x-request-id", request_id))
    if edit is not None:
        if placed is not None or rules.owned:
            # The proxy's own fields, appended just above: Via and X-Request-ID, and
            # X-Forwarded-For, -Proto (and -Host) unless they are off.
            owned = 2 + ((3 if forwarded_host is not None else 2) if x_forwarded else 0)
            _finish_edit(out, len(out) - owned, edit, placed or set())
        else:  # the usual case, without a call
            out += sets.items()
            out += add
    return out


def client_response_headers(
    headers: Headers,
    *,
    request_id: bytes,
    via: bytes = b"1.1 trioproxy",
    edit: FieldEdit | None = None,
) -> Headers:
    """Build the fields the proxy sends the client from the upstream's response fields.

    Args:
        headers: the upstream's response fields; not modified.
        request_id: the value for ``X-Request-ID``.
        via: this hop's ``Via`` element (RFC 9110 §7.6.3).
        edit: the route's response header rules, applied in the same pass (see
            the module docstring).

    Returns:
        A new list: the forwardable fields in order (``Set-Cookie`` lines kept
        separate), then ``Via`` and ``X-Request-ID``; then, with ``edit``, its
        set lines not placed yet and its added lines.
    """
    drop = _drop_set(headers, HOP_BY_HOP)
    if edit is not None:
        rules, sets, add = edit
        if drop is HOP_BY_HOP:
            drop, in_place = rules.pass_drop, rules.in_place
        else:
            drop, in_place = drop | rules.drop, rules.in_place - drop
        placed: set[bytes] | None = None  # made when a set line takes a line's place
    out: Headers = []
    via_chain: list[bytes] = []
    for field in headers:
        name = field[0]
        if name in drop or name == b"x-request-id":
            if edit is not None and name in in_place:
                if placed is None:
                    placed = set()
                elif name in placed:
                    continue
                placed.add(name)
                out.append((name, sets[name]))
            continue
        if name == b"via":
            if field[1]:
                via_chain.append(field[1])
        else:
            out.append(field)
    out.append((b"via", _extend_chain(via_chain, via)))
    out.append((b"x-request-id", request_id))
    if edit is not None:
        if placed is not None or rules.owned:
            _finish_edit(out, len(out) - 2, edit, placed or set())
        else:  # the usual case, without a call
            out += sets.items()
            out += add
    return out


def _finish_edit(out: Headers, owned_from: int, edit: FieldEdit, placed: set[bytes]) -> None:
    """Apply ``edit`` to the proxy's own fields (``out[0]`` for a request's Host,
    ``out[owned_from:]``), then append the set lines not placed yet and the added
    lines."""
    rules, sets, add = edit
    if rules.owned:
        if rules.request and b"host" in rules.owned:
            # A request's Host is first (and its rules may only set it, RFC 9112 §3.2).
            host = sets.get(b"host")
            if host is not None:
                out[0] = (b"host", host)
                placed.add(b"host")
            else:
                del out[0]
                owned_from -= 1
        drop = rules.drop
        tail = out[owned_from:]
        del out[owned_from:]
        for field in tail:
            name = field[0]
            if name not in drop:
                out.append(field)
            elif name in sets and name not in placed:
                placed.add(name)
                out.append((name, sets[name]))
    for name, value in sets.items():
        if name not in placed:
            out.append((name, value))
    out.extend(add)


_PHRASES: Final = {status.value: status.phrase.encode() for status in HTTPStatus}
_VIA: Final = {b"1.1": b"1.1 trioproxy", b"1.0": b"1.0 trioproxy"}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase for ``status`` (RFC 9110 §15), or ``b""``."""
    return _PHRASES.get(status, b"")


def via_entry(http_version: bytes) -> bytes:
    """Our ``Via`` entry: the protocol version received, then our name (RFC 9110 §7.6.3)."""
    return _VIA.get(http_version) or b"%b trioproxy" % http_version
