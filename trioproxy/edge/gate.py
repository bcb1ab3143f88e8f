"""The edge rules a front end applies to a request head once its route is known.

One call per request, before anything else looks at it (``respond`` answers,
CORS, the engine, WebSocket upgrades): the real client IP is resolved
(``trioproxy.edge.identity``) and kept in the exchange's record for the access
log and ``{client_ip}``; the route's access rules (``trioproxy.edge.access``)
refuse with 403/401, so a refused request never reaches an upstream; the head
goes on with its forwarding fields as the policy says and without the API key.
Sans-I/O: it raises or returns a head, and a front end answers the error as any
``ProxyError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trioproxy.edge.identity import IdentityPolicy, identify, rewrite_forwarding
from trioproxy.http.cors import is_preflight
from trioproxy.http.protocol import RequestHead

if TYPE_CHECKING:
    from trioproxy.engine import ExchangeLog
    from trioproxy.snapshot import Route


def admit(
    head: RequestHead,
    route: Route,
    policy: IdentityPolicy,
    *,
    peer: str,
    scheme: str,
    record: ExchangeLog,
) -> RequestHead:
    """``head`` as it goes on, or the error it gets.

    Sets ``record.client_ip`` when the client is not simply the peer's address
    as given, and ``record.client_proto`` / ``record.client_host`` to what a
    trusted peer says of the client's scheme and host (``X-Forwarded-Proto``,
    ``-Host``: kept upstream instead of the proxy's own).

    Raises:
        AccessDenied: 403. KeyMissing, KeyRejected: 401 with ``WWW-Authenticate``.
    """
    access = route.access
    if access is None and not policy.rewrites:
        return head  # the common case: nothing to do
    headers = head.headers
    client = peer
    if policy.rewrites:
        identity = identify(peer, headers, policy)
        client = record.client_ip = identity.client_ip
        if identity.trusted_peer:
            record.client_proto = identity.proto
            record.client_host = identity.host
        headers = rewrite_forwarding(headers, identity, policy, scheme)
    if access is not None:
        preflight = route.cors is not None and is_preflight(head.method, head.headers)
        access.check(client, headers, preflight=preflight)
        if access.auth is not None:
            headers = access.auth.without_key(headers)
    if headers is head.headers:
        return head
    return RequestHead(head.method, head.target, headers, head.http_version)
