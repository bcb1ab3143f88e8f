from __future__ import annotations

from typing import Any

import pytest

from trioproxy.config.errors import ConfigError
from trioproxy.config.model import MatchSpec, RouteSettings
from trioproxy.routing import Router, route_key_path


def route(name: str, *, priority: int = 0, **match: Any) -> RouteSettings:
    return RouteSettings(name=name, upstream="up", priority=priority, match=MatchSpec(**match))


def router(*routes: RouteSettings) -> Router[str]:
    return Router([(r, r.name) for r in routes])


def pick(
    r: Router[str],
    target: bytes = b"/",
    *,
    host: bytes | None = b"example.org",
    method: bytes = b"GET",
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> str | None:
    fields = [(b"host", host)] if host is not None else []
    fields += [(b"accept", b"*/*"), *headers]
    return r.match(method, target, fields)


def config_error(*routes: RouteSettings) -> str:
    with pytest.raises(ConfigError) as info:
        router(*routes)
    return str(info.value)


# --- what one route matches ------------------------------------------------------


def test_no_routes_match_nothing() -> None:
    assert pick(router()) is None


def test_route_without_conditions_matches_every_request() -> None:
    r = router(route("all"))
    assert pick(r, b"/any/path?q=1", method=b"DELETE") == "all"
    assert pick(r, b"*", method=b"OPTIONS", host=None) == "all"


def test_payload_is_returned_as_attached() -> None:
    payload = object()
    r = Router([(route("a", path="/a"), payload)])
    assert r.match(b"GET", b"/a", []) is payload


def test_exact_host_ignores_case_port_and_trailing_dot() -> None:
    r = router(route("site", host=("example.org",)))
    for host in (b"example.org", b"EXAMPLE.org", b"example.org:8443", b"example.org."):
        assert pick(r, host=host) == "site", host
    assert pick(r, host=b"www.example.org") is None
    assert pick(r, host=b"example.org.evil") is None


def test_host_condition_never_matches_a_request_without_host() -> None:
    r = router(route("site", host=("example.org",)))
    assert pick(r, host=None) is None


def test_configured_host_is_case_insensitive_too() -> None:
    r = router(route("site", host=("Example.ORG",)))
    assert pick(r, host=b"example.org") == "site"


def test_ip_literal_hosts_match_with_port_stripped() -> None:
    r = router(route("v6", host=("[::1]",)), route("v4", host=("127.0.0.1",)))
    assert pick(r, host=b"[::1]:8080") == "v6"
    assert pick(r, host=b"127.0.0.1:8080") == "v4"


def test_wildcard_matches_any_depth_of_subdomain_but_not_the_bare_domain() -> None:
    r = router(route("subs", host=("*.example.org",)))
    assert pick(r, host=b"a.example.org") == "subs"
    assert pick(r, host=b"a.b.example.org:80") == "subs"
    assert pick(r, host=b"example.org") is None
    assert pick(r, host=b"badexample.org") is None


def test_any_listed_host_may_match() -> None:
    r = router(route("two", host=("a.org", "*.b.org")))
    assert pick(r, host=b"a.org") == "two"
    assert pick(r, host=b"x.b.org") == "two"
    assert pick(r, host=b"c.org") is None


def test_exact_path_ignores_the_query_only() -> None:
    r = router(route("login", path="/login"))
    assert pick(r, b"/login") == "login"
    assert pick(r, b"/login?next=/") == "login"
    assert pick(r, b"/login?") == "login"
    assert pick(r, b"/login/") is None
    assert pick(r, b"/login2") is None


def test_paths_are_raw_bytes_never_decoded() -> None:
    r = router(route("admin", path_prefix="/admin"), route("encoded", path="/a%2Fb"))
    assert pick(r, b"/%61dmin") is None
    assert pick(r, b"/admin/../x") == "admin"
    assert pick(r, b"/a%2Fb") == "encoded"
    assert pick(r, b"/a/b") is None


def test_prefix_matches_on_a_segment_boundary() -> None:
    r = router(route("users", path_prefix="/users"))
    for target in (b"/users", b"/users/", b"/users/7", b"/users?x=1"):
        assert pick(r, target) == "users", target
    assert pick(r, b"/usersettings") is None
    assert pick(r, b"/user") is None


def test_prefix_ending_in_slash_needs_the_slash() -> None:
    r = router(route("api", path_prefix="/api/"))
    assert pick(r, b"/api/v1") == "api"
    assert pick(r, b"/api/") == "api"
    assert pick(r, b"/api") is None


def test_root_prefix_matches_every_origin_form_path() -> None:
    r = router(route("root", path_prefix="/"))
    assert pick(r, b"/") == "root"
    assert pick(r, b"/deep/path") == "root"
    assert pick(r, b"*", method=b"OPTIONS") is None


def test_regex_is_searched_anywhere_like_nginx() -> None:
    r = router(route("v2", path_regex=r"/v2/"))
    assert pick(r, b"/api/v2/items") == "v2"
    anchored = router(route("v2", path_regex=r"^/v2/"))
    assert pick(anchored, b"/api/v2/items") is None
    assert pick(anchored, b"/v2/items") == "v2"


def test_regex_sees_the_path_without_the_query() -> None:
    r = router(route("json", path_regex=r"\.json$"))
    assert pick(r, b"/data.json?x=1") == "json"
    assert pick(r, b"/data?f=.json") is None


def test_methods_match_any_listed_case_sensitively() -> None:
    r = router(route("writes", methods=("POST", "PUT")))
    assert pick(r, method=b"POST") == "writes"
    assert pick(r, method=b"PUT") == "writes"
    assert pick(r, method=b"GET") is None
    assert pick(r, method=b"post") is None


def test_header_conditions_must_all_hold() -> None:
    r = router(route("beta", headers=(("X-Beta", "1"), ("x-team", "core"))))
    assert pick(r, headers=((b"x-beta", b"1"), (b"x-team", b"core"))) == "beta"
    assert pick(r, headers=((b"x-beta", b"1"),)) is None
    assert pick(r, headers=((b"x-beta", b"yes"), (b"x-team", b"core"))) is None


def test_header_condition_holds_if_any_line_of_that_name_equals() -> None:
    r = router(route("beta", headers=(("x-beta", "1"),)))
    assert pick(r, headers=((b"x-beta", b"0"), (b"x-beta", b"1"))) == "beta"


def test_all_conditions_of_a_route_must_hold() -> None:
    r = router(
        route("it", host=("api.org",), path_prefix="/v1", methods=("GET",), headers=(("a", "b"),))
    )
    cond = ((b"a", b"b"),)
    assert pick(r, b"/v1/x", host=b"api.org", method=b"GET", headers=cond) == "it"
    assert pick(r, b"/v2", host=b"api.org", method=b"GET", headers=cond) is None
    assert pick(r, b"/v1/x", host=b"web.org", method=b"GET", headers=cond) is None
    assert pick(r, b"/v1/x", host=b"api.org", method=b"POST", headers=cond) is None
    assert pick(r, b"/v1/x", host=b"api.org", method=b"GET") is None


# --- which route wins ------------------------------------------------------------


def test_higher_priority_wins_over_specificity() -> None:
    r = router(
        route("exact", path="/a", host=("example.org",)),
        route("fallback", priority=1),
    )
    assert pick(r, b"/a") == "fallback"


def test_exact_host_beats_wildcard_beats_no_host() -> None:
    r = router(
        route("none"),
        route("wild", host=("*.example.org",)),
        route("exact", host=("www.example.org",)),
    )
    assert pick(r, host=b"www.example.org") == "exact"
    assert pick(r, host=b"api.example.org") == "wild"
    assert pick(r, host=b"other.org") == "none"


def test_longer_wildcard_beats_shorter() -> None:
    r = router(route("org", host=("*.example.org",)), route("api", host=("*.api.example.org",)))
    assert pick(r, host=b"v1.api.example.org") == "api"
    assert pick(r, host=b"www.example.org") == "org"
    # "api.example.org" itself is a subdomain of example.org only.
    assert pick(r, host=b"api.example.org") == "org"


def test_host_is_compared_before_path() -> None:
    r = router(
        route("exact-path", path="/login"),
        route("host-regex", host=("example.org",), path_regex="login"),
    )
    assert pick(r, b"/login") == "host-regex"
    assert pick(r, b"/login", host=b"other.org") == "exact-path"


def test_exact_path_beats_longer_prefix_beats_shorter_beats_regex_beats_none() -> None:
    r = router(
        route("none"),
        route("regex", path_regex="^/a"),
        route("short", path_prefix="/a"),
        route("long", path_prefix="/a/b"),
        route("exact", path="/a/b/c"),
    )
    assert pick(r, b"/a/b/c") == "exact"
    assert pick(r, b"/a/b/c/d") == "long"
    assert pick(r, b"/a/x") == "short"
    assert pick(r, b"/ab") == "regex"
    assert pick(r, b"/b") == "none"


def test_more_conditions_win_among_equal_paths() -> None:
    r = router(
        route("plain", path_prefix="/p"),
        route("method", path_prefix="/p", methods=("POST",)),
        route("method-and-header", path_prefix="/p", methods=("POST",), headers=(("x", "1"),)),
    )
    assert pick(r, b"/p", method=b"POST", headers=((b"x", b"1"),)) == "method-and-header"
    assert pick(r, b"/p", method=b"POST") == "method"
    assert pick(r, b"/p") == "plain"


def test_file_order_breaks_remaining_ties() -> None:
    r = router(route("first", path_regex="^/a"), route("second", path_regex="a$"))
    assert pick(r, b"/a") == "first"
    assert pick(r, b"/xa") == "second"
    swapped = router(route("second", path_regex="a$"), route("first", path_regex="^/a"))
    assert pick(swapped, b"/a") == "second"


def test_lower_priority_routes_still_answer_what_higher_ones_leave() -> None:
    r = router(
        route("catch-all"),
        route("admin", priority=10, path_prefix="/admin"),
        route("site", priority=5, host=("example.org",)),
    )
    assert pick(r, b"/admin/x") == "admin"
    assert pick(r, b"/home") == "site"
    assert pick(r, b"/home", host=b"other.org") == "catch-all"


def test_a_catch_all_above_everything_takes_every_request() -> None:
    r = router(route("site", host=("example.org",), path="/a"), route("maintenance", priority=1))
    assert pick(r, b"/a") == "maintenance"
    assert pick(r, b"*", host=None, method=b"OPTIONS") == "maintenance"


def test_fallback_after_host_specific_routes() -> None:
    r = router(route("site", host=("example.org",), path="/a"), route("default"))
    assert pick(r, b"/a") == "site"
    assert pick(r, b"/b") == "default"


# --- config errors -----------------------------------------------------------------


# --- the split by first path segment, and the Host cache (cost, same answers) ------


def test_split_by_segment_keeps_the_order_of_the_whole_list() -> None:
    r = router(
        route("users-regex", path_regex="^/users/[0-9]+$", priority=1),
        route("users", path_prefix="/users"),
        route("users-me", path="/users/me"),
        route("user-settings", path_prefix="/usersettings"),
        route("api", path_prefix="/api/"),
        route("root-exact", path="/"),
        route("root", path_prefix="/", methods=("POST",)),
        route("v-regex", path_regex="^/v[0-9]/"),
        route("all"),
    )
    assert pick(r, b"/users/7") == "users-regex"  # a regex with a priority: in every split
    assert pick(r, b"/users/me") == "users-me"
    assert pick(r, b"/users/x?y") == "users"
    assert pick(r, b"/users") == "users"
    assert pick(r, b"/usersettings/a") == "user-settings"
    assert pick(r, b"/users;x") == "all"  # the segment "users;x" has no route of its own
    assert pick(r, b"/api/x") == "api"
    assert pick(r, b"/api") == "all"  # "/api/" needs the slash
    assert pick(r, b"/") == "root-exact"
    assert pick(r, b"/?q") == "root-exact"
    assert pick(r, b"/nothing", method=b"POST") == "root"  # the prefix "/" is in every split
    assert pick(r, b"/users/x", method=b"POST") == "users"
    assert pick(r, b"/v2/x") == "v-regex"
    assert pick(r, b"//users") == "all"  # first segment "", not "users"
    assert pick(r, b"*", method=b"OPTIONS") == "all"


def test_target_not_in_origin_form_walks_every_candidate() -> None:
    r = router(route("star", path_regex="^[*]$"), route("a", path_prefix="/a"))
    assert pick(r, b"*", method=b"OPTIONS") == "star"
    assert pick(r, b"/a/b") == "a"


def test_host_answers_stay_right_past_the_cache_size() -> None:
    r = router(
        route("exact", host=("svc.example.org",)),
        route("wild", host=("*.example.org",)),
        route("other", path_prefix="/x"),
    )
    for i in range(2500):  # more Host values than the router remembers
        assert pick(r, b"/x", host=b"h%d.example.org" % i) == "wild"
        assert pick(r, b"/x", host=b"h%d.example.net:80" % i) == "other"
        assert pick(r, b"/x", host=b"SVC.example.org:%d" % i) == "exact"
    assert pick(r, b"/y", host=b"example.net") is None


def test_same_match_and_priority_names_both_routes() -> None:
    message = config_error(
        route("users", path_prefix="/users"), route("people", path_prefix="/users")
    )
    assert message == (
        "routes.people.match: same match and priority as routes.users, "
        "so it could never be chosen there"
    )


def test_same_match_ignores_order_of_methods_and_case() -> None:
    message = config_error(
        route("a", methods=("GET", "POST"), headers=(("X-A", "1"),)),
        route("b", methods=("POST", "GET"), headers=(("x-a", "1"),)),
    )
    assert "routes.b.match: same match and priority as routes.a" in message


def test_same_match_under_one_shared_host_is_named() -> None:
    message = config_error(
        route("a", host=("a.org", "b.org"), path="/x"), route("b", host=("b.org",), path="/x")
    )
    assert message == (
        'routes.b.match: same match and priority as routes.a for host "b.org", '
        "so it could never be chosen there"
    )


def test_same_match_at_different_priorities_is_fine() -> None:
    r = router(route("a", path="/x"), route("b", path="/x", priority=1))
    assert pick(r, b"/x") == "b"


def test_two_catch_alls_clash() -> None:
    assert "routes.b.match: same match and priority as routes.a" in config_error(
        route("a"), route("b")
    )


def test_invalid_regex_names_key_path_and_value() -> None:
    message = config_error(route("users", path_regex="^(("))
    assert message.startswith("routes.users.match.path_regex: not a valid regular expression: ")
    assert message.endswith(', got "^(("')


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ({"path_prefix": "users"}, 'routes.r.match.path_prefix: must start with "/", got "users"'),
        ({"path": "users"}, 'routes.r.match.path: must start with "/", got "users"'),
        ({"path": "/a?b=1"}, "routes.r.match.path: '?' ends a path"),
        ({"path": "/a b"}, "routes.r.match.path: ' ' must be percent-encoded"),
        ({"path_prefix": "/café"}, "routes.r.match.path_prefix: 'é' must be percent-encoded"),
        (
            {"path": "/a", "path_prefix": "/a"},
            "routes.r.match: give one of path, path_prefix and path_regex, got path, path_prefix",
        ),
        ({"host": ("example.org:8080",)}, "routes.r.match.host: hosts are matched without"),
        ({"host": ("www.*.org",)}, 'routes.r.match.host: the only wildcard is a leading "*."'),
        ({"host": ("*",)}, 'routes.r.match.host: the only wildcard is a leading "*."'),
        ({"host": ("bücher.de",)}, "routes.r.match.host: write an internationalised name"),
        ({"host": ("a/b",)}, 'routes.r.match.host: not a host name, got "a/b"'),
        ({"methods": ("GET POST",)}, 'routes.r.match.methods: not a method name, got "GET POST"'),
        ({"headers": (("x y", "1"),)}, 'routes.r.match.headers: not a header name, got "x y"'),
        (
            {"headers": (("x-a", "1\r\nx-b: 2"),)},
            "routes.r.match.headers.x-a: control character '\\r' not allowed",
        ),
    ],
)
def test_invalid_match_names_its_key_path(match: dict[str, Any], expected: str) -> None:
    assert config_error(route("r", **match)).startswith(expected)


def test_every_problem_is_listed_one_per_line() -> None:
    message = config_error(
        route("a", path_prefix="a", methods=("G T",)),
        route("b", path_regex="(("),
        route("c", path="/c"),
        route("d", path="/c"),
    )
    lines = message.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "routes.a.match.path_prefix",
        "routes.a.match.methods",
        "routes.b.match.path_regex",
        "routes.d.match",
    ]


def test_route_names_that_are_not_bare_keys_are_quoted() -> None:
    assert route_key_path("users") == "routes.users"
    assert route_key_path("api.v1") == 'routes."api.v1"'
    assert config_error(route("api.v1", path="x")).startswith('routes."api.v1".match.path:')


def _reference_pick(
    routes: list[RouteSettings], method: bytes, target: bytes, fields: list[tuple[bytes, bytes]]
) -> str | None:
    """The winner by the rules of the module docstring, for routes without hosts,
    every route checked in full."""
    import re

    path = target.split(b"?")[0]

    def path_rank(m: MatchSpec) -> tuple[int, int]:
        if m.path is not None:
            return (0, 0)
        if m.path_prefix is not None:
            return (1, -len(m.path_prefix))
        return (2, 0) if m.path_regex is not None else (3, 0)

    def holds(m: MatchSpec) -> bool:
        if m.path is not None and path != m.path.encode():
            return False
        if m.path_prefix is not None:
            prefix = m.path_prefix.encode()
            slashed = prefix if prefix.endswith(b"/") else prefix + b"/"
            if not (path == prefix or path.startswith(slashed)):
                return False
        if m.path_regex is not None and re.search(m.path_regex.encode(), path) is None:
            return False
        if m.methods and method not in {x.upper().encode() for x in m.methods}:
            return False
        return all((n.lower().encode(), v.encode()) in fields for n, v in m.headers)

    ranked = sorted(
        (
            (-r.priority, *path_rank(r.match), -(bool(r.match.methods) + len(r.match.headers)), i)
            for i, r in enumerate(routes)
        ),
    )
    for *_, i in ranked:
        if holds(routes[i].match):
            return routes[i].name
    return None


@pytest.mark.parametrize("seed", range(30))
def test_the_split_walk_answers_as_a_walk_of_every_route(seed: int) -> None:
    import random

    rng = random.Random(seed)
    segments = ("a", "b", "ab", "")
    # A method no route names, and one in another case, walk the routes without methods.
    methods = (b"GET", b"POST", b"PUT", b"DELETE", b"get")

    def some_path() -> str:
        return "/" + "/".join(rng.choice(segments) for _ in range(rng.randint(0, 3)))

    routes: list[RouteSettings] = []
    keys: set[tuple[object, ...]] = set()
    for i in range(rng.randint(1, 12)):
        kind = rng.choice(("path", "path_prefix", "path_prefix", "path_regex", None))
        match: dict[str, Any] = {}
        if kind == "path_regex":
            match[kind] = rng.choice(("^/a", "b$", "^/(a|b)/", "/ab/"))
        elif kind is not None:
            match[kind] = some_path() + rng.choice(("", "", "/"))
        if rng.random() < 0.3:
            match["methods"] = tuple(rng.sample(("GET", "POST", "PUT", "get"), rng.randint(1, 2)))
        if rng.random() < 0.2:
            match["headers"] = (("x-beta", "1"),)
        candidate = route(f"r{i}", priority=rng.choice((0, 0, 1)), **match)
        same = {**match, "methods": sorted({m.upper() for m in match.get("methods", ())})}
        key = (candidate.priority, repr(sorted(same.items())))
        if key not in keys:  # the same match twice is a config error
            keys.add(key)
            routes.append(candidate)
    r = router(*routes)
    for _ in range(60):
        target = (some_path() + rng.choice(("", "?q=/a", "?"))).encode()
        method = rng.choice(methods)
        fields = [(b"host", b"example.org")]
        if rng.random() < 0.5:
            fields.append((b"x-beta", b"1"))
        expected = _reference_pick(routes, method, target, fields)
        assert r.match(method, target, fields) == expected, (routes, method, target, fields)
    for odd in (b"*", b"?q"):  # not origin-form; a path that is empty
        assert r.match(b"OPTIONS", odd, []) == _reference_pick(routes, b"OPTIONS", odd, [])
