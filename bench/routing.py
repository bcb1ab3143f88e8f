"""Cost of one ``Router.match``: one catch-all route, and a 50-route gateway config.

    python -m bench.routing

The budget: a proxied small GET costs ~230 µs of CPU, and a 50-route config must
keep >= 90 % of a single route's request rate, so routing must stay in the few-µs
range. The 50 routes mix exact hosts, wildcards, prefixes, regexes, methods and
header conditions; the requests hit an early route, a late one, and the catch-all
at the end of the longest candidate list (the worst case).
"""

from __future__ import annotations

import timeit

from trioproxy.config.model import MatchSpec, RouteSettings
from trioproxy.routing import Router


def _gateway_routes() -> list[tuple[RouteSettings, str]]:
    specs: list[tuple[str, MatchSpec, int]] = []
    for i in range(10):
        specs.append((f"host{i}", MatchSpec(host=(f"svc{i}.example.org",)), 0))
        specs.append(
            (f"host{i}-api", MatchSpec(host=(f"svc{i}.example.org",), path_prefix="/api"), 0)
        )
    for i in range(5):
        specs.append((f"wild{i}", MatchSpec(host=(f"*.team{i}.example.org",)), 0))
    for i in range(13):
        specs.append((f"prefix{i}", MatchSpec(path_prefix=f"/service{i}"), 0))
    for i in range(4):
        specs.append((f"regex{i}", MatchSpec(path_regex=rf"^/v{i}/items/[0-9]+$"), 0))
    for i in range(3):
        specs.append((f"exact{i}", MatchSpec(path=f"/exact{i}"), 0))
    specs.append(("posts", MatchSpec(path_prefix="/posts", methods=("POST", "PUT")), 0))
    specs.append(("beta", MatchSpec(path_prefix="/posts", headers=(("x-beta", "1"),)), 0))
    specs.append(("admin", MatchSpec(path_prefix="/admin"), 10))
    specs.append(("health", MatchSpec(path="/healthz"), 5))
    specs.append(("default", MatchSpec(), 0))
    assert len(specs) == 50, len(specs)
    return [
        (RouteSettings(name=name, upstream="up", match=match, priority=priority), name)
        for name, match, priority in specs
    ]


def _per_match(router: Router[str], method: bytes, target: bytes, host: bytes) -> float:
    headers = [
        (b"host", host),
        (b"user-agent", b"wrk"),
        (b"accept", b"*/*"),
        (b"accept-encoding", b"gzip"),
    ]
    match = router.match
    number = 200_000
    best = min(timeit.repeat(lambda: match(method, target, headers), number=number, repeat=5))
    return best / number * 1e6


def main() -> None:
    single: Router[str] = Router([(RouteSettings(name="default", upstream="up"), "default")])
    gateway = Router(_gateway_routes())
    cases = [
        ("1 route, catch-all", single, b"GET", b"/users/7?x=1", b"localhost:8080"),
        ("50 routes, exact host", gateway, b"GET", b"/index.html", b"svc3.example.org"),
        ("50 routes, exact host + prefix", gateway, b"GET", b"/api/x", b"svc3.example.org"),
        ("50 routes, wildcard", gateway, b"GET", b"/", b"a.b.team2.example.org:443"),
        ("50 routes, prefix", gateway, b"GET", b"/service9/x?y=1", b"localhost:8080"),
        ("50 routes, regex", gateway, b"GET", b"/v3/items/42", b"localhost:8080"),
        ("50 routes, method cond.", gateway, b"POST", b"/posts/1", b"localhost:8080"),
        ("50 routes, catch-all (worst)", gateway, b"GET", b"/nothing/else", b"localhost"),
    ]
    for label, router, method, target, host in cases:
        result = router.match(method, target, [(b"host", host)])
        print(f"{label:32} {_per_match(router, method, target, host):6.2f} µs  -> {result}")


if __name__ == "__main__":
    main()
