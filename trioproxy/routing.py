"""The router: which configured route a request belongs to (sans-I/O).

What a route matches (``[routes.NAME] match = {...}``; every condition given
must hold, a route with none matches every request):

- ``host``: the request's ``Host`` field, port and a trailing dot removed,
  compared case-insensitively (RFC 9110 §4.2.3: the host is case-insensitive).
  An entry is an exact name or a ``*.example.org`` wildcard, which matches
  ``a.example.org`` and ``a.b.example.org`` but not ``example.org``. Any one
  entry may match. A request without ``Host`` matches no host condition.
- the path: the request-target up to the first ``?``, as the raw bytes the
  client sent. Nothing is percent-decoded, ``..`` is not resolved, ``//`` is
  not merged: a route for ``/admin`` does not see ``/%61dmin``. Configure
  paths in the form clients send them.

  ``path`` is an exact path. ``path_prefix`` matches on a segment boundary:
  ``/users`` matches ``/users``, ``/users/`` and ``/users/7`` but not
  ``/usersettings``; a prefix ending in ``/`` matches what starts with it.
  ``path_regex`` is searched anywhere in the path (``re.search``), as nginx
  does for ``location ~``: anchor it with ``^`` to match from the start. A
  route takes at most one of the three.
- ``methods``: any one of them, compared case-sensitively (RFC 9110 §9.1).
- ``headers``: every (name, value) pair must equal one of the request's fields
  (names case-insensitive, values exact).

Which route wins when several match, in this order:

1. A higher ``priority`` (default 0).
2. The host, as nginx picks a server before a location: an exact host beats a
   wildcard (a longer wildcard beats a shorter one), which beats no host.
3. The path: an exact path beats a longer prefix, which beats a shorter one,
   which beats a regex, which beats no path condition.
4. More conditions: a ``methods`` list counts one, each ``headers`` pair one.
5. File order.

A route whose every host (or whose lack of host) ties with an earlier route on
all of these and has the same conditions could never be chosen: that is a
config error naming both.

Cost. The order is settled when the router is built: one candidate list per
configured exact host, per wildcard and for "no host", each already sorted,
each split by method (a route with ``methods`` is in the lists of its methods
only, and its methods need no check there; a method no route names gets the
routes without ``methods``), and each of those by the first path segment
(``users`` in ``/users/7``): an exact
path or a prefix can only match a path with its own first segment, so a
request walks only the candidates of its segment, plus the regexes and the
routes without a path condition, in the same order. A match reads ``Host``
once (only when some route has a host condition) and finds its list with one
dict lookup (plus one per dot of the host for wildcards; the answer is kept
per ``Host`` value, up to ``_HOST_CACHE_SIZE`` of them), then one lookup for
the method and one for the segment, and walks that list until the first entry whose path and
conditions hold; in the list of its own segment, a prefix of that one whole
segment (``/users``) needs no comparison. A single route with no condition, or
any router whose first candidate is always such a route, answers without
looking at the request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Final, Generic, TypeAlias, TypeVar

from trioproxy.config.errors import ConfigError
from trioproxy.config.model import MatchSpec, RouteSettings
from trioproxy.http.protocol import Headers
from trioproxy.http.syntax import field_value_problem, is_token, key, path_problem, quoted

__all__ = ["Router", "route_key_path"]

P = TypeVar("P")

# Path kinds, most specific first (their order is their rank).
_EXACT: Final = 0
_PREFIX: Final = 1
_REGEX: Final = 2
_ANY: Final = 3

# Host kinds, most specific first.
_HOST_EXACT: Final = 0
_HOST_WILDCARD: Final = 1
_HOST_ANY: Final = 2

_HOST_NAME: Final = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_IP_LITERAL: Final = re.compile(r"\[[0-9a-f:.]+\]")

#: How many ``Host`` values the router remembers the candidates of; past that it
#: forgets them all (clients choose the values, so the memory must stay bounded).
_HOST_CACHE_SIZE: Final = 1024

_Search: TypeAlias = Callable[[bytes], object]
_Conditions: TypeAlias = tuple[tuple[bytes, bytes], ...]
# What the hot loop reads, as a plain tuple (attribute access costs more):
# path kind, path, path + "/" (prefixes), regex search, methods, header
# conditions, payload.
_Candidate: TypeAlias = tuple[
    int, bytes, bytes, _Search, frozenset[bytes] | None, _Conditions | None, P
]


def _never(path: bytes) -> None:
    return None


def _first_segment(path: bytes) -> bytes:
    """``b"users"`` for ``/users/7`` and ``/users``, ``b""`` for ``/`` (an origin-form path)."""
    end = path.find(b"/", 1)
    return path[1:end] if end > 0 else path[1:]


class _Candidates(Generic[P]):
    """One sorted candidate list, split by the first path segment.

    An exact path or a prefix matches only paths whose first segment is its own:
    a prefix matches on a segment boundary, so a matching path starts with the
    prefix's first segment and its ``/`` (or is the prefix). A regex, the prefix
    ``/`` and a route with no path condition may match any path: they are in
    every split, and alone in ``others`` (for a segment no route names).

    In a split, a prefix of one whole segment (``/users``) and the prefix ``/``
    match every path there is asked for: they are kept as routes without a path
    condition, so the walk does not compare the path again.
    """

    __slots__ = ("all", "by_segment", "others")

    def __init__(self, candidates: list[_Candidate[P]]) -> None:
        self.all = candidates
        segments: dict[bytes, None] = {}
        anywhere: set[int] = set()
        for i, (kind, path, *_) in enumerate(candidates):
            if kind == _EXACT or (kind == _PREFIX and path != b"/"):
                segments[_first_segment(path)] = None
            else:
                anywhere.add(i)
        self.others = [_matched(c, b"") for i, c in enumerate(candidates) if i in anywhere]
        self.by_segment = {
            segment: [
                _matched(c, segment)
                for i, c in enumerate(candidates)
                if i in anywhere or _first_segment(c[1]) == segment
            ]
            for segment in segments
        }


class _ByMethod(Generic[P]):
    """One sorted candidate list, split by method, then by first path segment.

    A route with ``methods`` is a candidate only in the splits of its methods,
    where its methods need no check (they are None there); a method no route
    names walks the routes without ``methods``. Each split keeps the list's order.
    """

    __slots__ = ("all", "by_method", "other_methods")

    def __init__(self, candidates: list[_Candidate[P]]) -> None:
        self.all = candidates
        named = sorted({m for c in candidates if c[4] is not None for m in c[4]})
        self.by_method = {
            method: _Candidates(
                [_no_methods(c) for c in candidates if c[4] is None or method in c[4]]
            )
            for method in named
        }
        self.other_methods = _Candidates([c for c in candidates if c[4] is None])


def _no_methods(candidate: _Candidate[P]) -> _Candidate[P]:
    kind, path, slashed, search, _, conditions, payload = candidate
    return (kind, path, slashed, search, None, conditions, payload)


def _matched(candidate: _Candidate[P], segment: bytes) -> _Candidate[P]:
    """``candidate`` in the split of ``segment`` (b"" for ``others``): a prefix that
    every path of the split matches becomes a route without a path condition."""
    kind, path, slashed, search, methods, conditions, payload = candidate
    if kind == _PREFIX and (path == b"/" or path == b"/" + segment):
        return (_ANY, path, slashed, search, methods, conditions, payload)
    return candidate


def route_key_path(name: str) -> str:
    """The TOML key path of route ``name``: ``routes.users``, ``routes."a.b"``."""
    return f"routes.{key(name)}"


class _Entry(Generic[P]):
    """One route under one of its host patterns (or under none)."""

    __slots__ = ("candidate", "duplicate_key", "host", "host_kind", "route", "sort_key")

    def __init__(
        self,
        route: RouteSettings,
        index: int,
        host: str | None,
        path_key: tuple[int, str],
        candidate: _Candidate[P],
        conditions: int,
    ) -> None:
        self.route = route
        self.host = host
        self.candidate = candidate
        if host is None:
            self.host_kind, host_len = _HOST_ANY, 0
        elif host.startswith("*."):
            self.host_kind, host_len = _HOST_WILDCARD, len(host)
        else:
            self.host_kind, host_len = _HOST_EXACT, 0
        path_kind, path = path_key
        path_len = len(path) if path_kind == _PREFIX else 0
        self.sort_key = (
            -route.priority,
            self.host_kind,
            -host_len,
            path_kind,
            -path_len,
            -conditions,
            index,
        )
        match = route.match
        self.duplicate_key = (
            route.priority,
            host,
            path_key,
            frozenset(m.upper() for m in match.methods),
            frozenset((n.lower(), v) for n, v in match.headers),
        )


def _host_patterns(match: MatchSpec, where: str, problems: list[str]) -> list[str]:
    patterns: list[str] = []
    for raw in match.host:
        host = raw.lower()
        if host.endswith(".") and len(host) > 1:
            host = host[:-1]  # "example.org." names the same host, as nginx reads it
        wildcard = host.startswith("*.")
        name = host[2:] if wildcard else host
        if _HOST_NAME.fullmatch(name) or (not wildcard and _IP_LITERAL.fullmatch(host)):
            if host not in patterns:
                patterns.append(host)
            continue
        if not host.isascii():
            hint = "write an internationalised name in its xn-- (punycode) form"
        elif "*" in host:
            hint = 'the only wildcard is a leading "*.", as in "*.example.org"'
        elif ":" in host:
            hint = "hosts are matched without their port"
        else:
            hint = "not a host name"
        problems.append(f"{where}.host: {hint}, got {quoted(raw)}")
    return patterns


def _path_key(match: MatchSpec, where: str, problems: list[str]) -> tuple[int, str]:
    given = [
        (kind, key, value)
        for kind, key, value in (
            (_EXACT, "path", match.path),
            (_PREFIX, "path_prefix", match.path_prefix),
            (_REGEX, "path_regex", match.path_regex),
        )
        if value is not None
    ]
    if not given:
        return (_ANY, "")
    if len(given) > 1:
        keys = ", ".join(key for _, key, _ in given)
        problems.append(f"{where}: give one of path, path_prefix and path_regex, got {keys}")
    kind, key, value = given[0]
    if kind == _REGEX:
        try:
            re.compile(value.encode())
        except re.error as exc:
            problems.append(
                f"{where}.{key}: not a valid regular expression: {exc}, got {quoted(value)}"
            )
    else:
        problem = path_problem(value)
        if problem is not None:
            problems.append(f"{where}.{key}: {problem}")
    return (kind, value)


def _conditions(
    match: MatchSpec, where: str, problems: list[str]
) -> tuple[frozenset[bytes] | None, _Conditions | None]:
    methods: set[bytes] = set()
    for method in match.methods:
        if is_token(method):
            methods.add(method.upper().encode())
        else:
            problems.append(f"{where}.methods: not a method name, got {quoted(method)}")
    headers: list[tuple[bytes, bytes]] = []
    for name, value in match.headers:
        if not is_token(name):
            problems.append(f"{where}.headers: not a header name, got {quoted(name)}")
            continue
        problem = field_value_problem(value)
        if problem is not None:
            problems.append(f"{where}.headers.{name}: {problem}")
            continue
        pair = (name.lower().encode(), value.encode())
        if pair not in headers:
            headers.append(pair)
    return (frozenset(methods) or None, tuple(headers) or None)


def _compile_route(
    route: RouteSettings, payload: P, index: int, problems: list[str]
) -> list[_Entry[P]]:
    where = f"{route_key_path(route.name)}.match"
    match = route.match
    hosts = _host_patterns(match, where, problems)
    path_kind, path = path_key = _path_key(match, where, problems)
    methods, headers = _conditions(match, where, problems)

    path_bytes = path.encode()
    search: _Search = _never
    if path_kind == _REGEX:
        try:
            search = re.compile(path_bytes).search
        except re.error:
            pass  # reported by _path_key
    slashed = path_bytes if path_bytes.endswith(b"/") else path_bytes + b"/"
    candidate: _Candidate[P] = (path_kind, path_bytes, slashed, search, methods, headers, payload)
    conditions = (1 if methods else 0) + len(headers or ())
    patterns: list[str | None] = [*hosts] if hosts else [None]
    return [_Entry(route, index, host, path_key, candidate, conditions) for host in patterns]


def _duplicates(entries: list[_Entry[P]]) -> list[str]:
    first: dict[object, _Entry[P]] = {}
    clashes: dict[tuple[str, str], list[str | None]] = {}
    for entry in entries:
        earlier = first.setdefault(entry.duplicate_key, entry)
        if earlier is not entry:
            pair = (earlier.route.name, entry.route.name)
            clashes.setdefault(pair, []).append(entry.host)
    problems = []
    for (earlier_name, later_name), hosts in clashes.items():
        named = [h for h in hosts if h is not None]
        scope = f" for host {', '.join(quoted(h) for h in named)}" if named else ""
        problems.append(
            f"{route_key_path(later_name)}.match: same match and priority as "
            f"{route_key_path(earlier_name)}{scope}, so it could never be chosen there"
        )
    return problems


def _sorted(entries: list[_Entry[P]]) -> list[_Candidate[P]]:
    return [entry.candidate for entry in sorted(entries, key=lambda e: e.sort_key)]


class Router(Generic[P]):
    """Picks the route of a request; built once per config snapshot.

    Generic over the payload attached to each route (the engine's runtime
    route object), which :meth:`match` returns.
    """

    __slots__ = (
        "_always",
        "_by_host",
        "_by_wildcard",
        "_default",
        "_for_host_value",
        "_uses_host",
    )

    def __init__(self, routes: Sequence[tuple[RouteSettings, P]]) -> None:
        """Compile ``routes`` (in file order) and settle their order.

        Raises:
            ConfigError: one per router, listing every problem found, one per
                line, each starting with its key path (``routes.NAME.match...``):
                invalid hosts, paths, regexes, methods, header conditions, and
                routes that could never be chosen.
        """
        problems: list[str] = []
        entries: list[_Entry[P]] = []
        for index, (route, payload) in enumerate(routes):
            entries.extend(_compile_route(route, payload, index, problems))
        problems.extend(_duplicates(entries))
        if problems:
            raise ConfigError("\n".join(problems))

        anywhere = [e for e in entries if e.host_kind == _HOST_ANY]
        exact: dict[str, list[_Entry[P]]] = {}
        wildcard: dict[str, list[_Entry[P]]] = {}
        for entry in entries:
            if entry.host is None:
                continue
            table = wildcard if entry.host_kind == _HOST_WILDCARD else exact
            # Wildcards are keyed by their suffix with its dot: "*.a.org" -> ".a.org".
            key = entry.host[1:] if entry.host_kind == _HOST_WILDCARD else entry.host
            table.setdefault(key, []).append(entry)

        def wildcards_of(host: str) -> list[_Entry[P]]:
            return [e for suffix, es in wildcard.items() if host.endswith(suffix) for e in es]

        self._default = _ByMethod(_sorted(anywhere))
        self._by_host: dict[bytes, _ByMethod[P]] = {
            host.encode(): _ByMethod(_sorted(es + wildcards_of(host) + anywhere))
            for host, es in exact.items()
        }
        # A host's matching wildcards are all suffixes of its longest one, so
        # the longest one found names the whole list.
        self._by_wildcard: dict[bytes, _ByMethod[P]] = {
            suffix.encode(): _ByMethod(_sorted(wildcards_of(suffix) + anywhere))
            for suffix in wildcard
        }
        self._uses_host = bool(exact or wildcard)
        #: Raw ``Host`` value -> its candidates (see _HOST_CACHE_SIZE).
        self._for_host_value: dict[bytes, _ByMethod[P]] = {}
        self._always: tuple[P] | None = self._first_whatever_asked()

    def _first_whatever_asked(self) -> tuple[P] | None:
        """The payload every request gets, if the top candidate is the same catch-all everywhere."""
        lists = [self._default, *self._by_host.values(), *self._by_wildcard.values()]
        tops = {id(candidates.all[0]) if candidates.all else None for candidates in lists}
        if len(tops) != 1 or not self._default.all:
            return None
        kind, _, _, _, methods, headers, payload = self._default.all[0]
        if kind == _ANY and methods is None and headers is None:
            return (payload,)
        return None

    def match(self, method: bytes, target: bytes, headers: Headers) -> P | None:
        """Return the payload of the route this request belongs to, or ``None``.

        Args:
            method: the request method as received.
            target: the request-target as received (origin-form, or ``*``).
            headers: the request's fields (lowercase names).
        """
        if self._always is not None:
            return self._always[0]
        candidates = self._default
        if self._uses_host:
            for name, host in headers:  # get_first, without a call
                if name == b"host":
                    found = self._for_host_value.get(host)
                    if found is None:
                        found = self._candidates_for_host(host)
                    candidates = found
                    break
        split = candidates.by_method.get(method, candidates.other_methods)
        path = target.partition(b"?")[0]
        # The path's split: [b"", segment, ...] when it starts with "/" (one C call).
        parts = path.split(b"/", 2)
        if parts[0] or len(parts) == 1:
            walk = split.all  # "*": only a regex or a route without path may match
        else:
            walk = split.by_segment.get(parts[1], split.others)
        # Methods were checked by the split (every entry's ``methods`` is None).
        for kind, exact, slashed, search, _, conditions, payload in walk:
            if kind == _ANY:
                pass  # no path condition, or one every path of this walk meets
            elif kind == _EXACT:
                if path != exact:
                    continue
            elif kind == _PREFIX:
                if not path.startswith(slashed) and path != exact:
                    continue
            elif search(path) is None:  # _REGEX
                continue
            if conditions is not None:
                for condition in conditions:
                    if condition not in headers:
                        break
                else:
                    return payload
                continue
            return payload
        return None

    def _candidates_for_host(self, value: bytes) -> _ByMethod[P]:
        """The candidates of a ``Host`` value, remembered for the next request."""
        cache = self._for_host_value
        if len(cache) >= _HOST_CACHE_SIZE:
            cache.clear()
        found = self._lookup_host(value)
        if found is None:
            found = self._default  # no route names this host
        cache[value] = found
        return found

    def _lookup_host(self, value: bytes) -> _ByMethod[P] | None:
        host = value.lower()
        if host.startswith(b"["):
            end = host.find(b"]")
            if end > 0:
                host = host[: end + 1]
        else:
            colon = host.rfind(b":")
            if colon >= 0:
                host = host[:colon]
        if host.endswith(b"."):
            host = host[:-1]
        found = self._by_host.get(host)
        if found is not None or not self._by_wildcard:
            return found
        dot = host.find(b".", 1)
        while dot > 0:
            found = self._by_wildcard.get(host[dot:])
            if found is not None:
                return found
            dot = host.find(b".", dot + 1)
        return None
