from __future__ import annotations

from typing import Any

import pytest

from trioproxy.config.errors import ConfigError
from trioproxy.config.model import CorsSpec
from trioproxy.http.cors import CorsPolicy, compile_cors, is_preflight
from trioproxy.http.headers import get_all, get_first
from trioproxy.http.protocol import Headers

APP = b"https://app.example.org"
EVIL = b"https://evil.example"


def policy(**spec: Any) -> CorsPolicy:
    spec.setdefault("allow_origins", (APP.decode(),))
    return compile_cors(CorsSpec(**spec), "routes.r.cors")


def cors_error(**spec: Any) -> str:
    with pytest.raises(ConfigError) as info:
        policy(**spec)
    return str(info.value)


def preflight_headers(
    origin: bytes = APP, method: bytes = b"PUT", headers: bytes | None = None
) -> Headers:
    fields: Headers = [
        (b"host", b"api.example.org"),
        (b"origin", origin),
        (b"access-control-request-method", method),
    ]
    if headers is not None:
        fields.append((b"access-control-request-headers", headers))
    return fields


# --- preflight ---------------------------------------------------------------------


def test_preflight_needs_options_origin_and_requested_method() -> None:
    assert is_preflight(b"OPTIONS", preflight_headers())
    assert not is_preflight(b"GET", preflight_headers())
    assert not is_preflight(b"OPTIONS", [(b"origin", APP)])
    assert not is_preflight(b"OPTIONS", [(b"access-control-request-method", b"PUT")])


def test_allowed_preflight_is_answered_204_with_every_set_field() -> None:
    p = policy(
        allow_methods=("GET", "PUT"),
        allow_headers=("X-Token",),
        allow_credentials=True,
        max_age=600,
    )
    answer = p.preflight(preflight_headers(headers=b"x-token, content-type"))
    assert answer.status == 204
    assert answer.body == b""
    assert answer.headers == [
        (b"access-control-allow-origin", APP),
        (b"access-control-allow-methods", b"GET, PUT"),
        (
            b"access-control-allow-headers",
            b"X-Token, Accept, Accept-Language, Content-Language, Content-Type",
        ),
        (b"access-control-max-age", b"600"),
        (b"access-control-allow-credentials", b"true"),
        (b"vary", b"Origin"),
    ]


def test_preflight_leaves_out_what_is_not_set() -> None:
    answer = policy(allow_methods=("PUT",)).preflight(preflight_headers())
    assert get_first(answer.headers, b"access-control-max-age") is None
    assert get_first(answer.headers, b"access-control-allow-credentials") is None
    assert get_first(answer.headers, b"content-length") is None  # 204: RFC 9110 §8.6


def test_any_origin_without_credentials_answers_star() -> None:
    answer = policy(allow_origins=("*",), allow_methods=("PUT",)).preflight(
        preflight_headers(origin=EVIL)
    )
    assert answer.status == 204
    assert get_first(answer.headers, b"access-control-allow-origin") == b"*"


def test_any_origin_with_credentials_echoes_the_origin_never_star() -> None:
    answer = policy(allow_origins=("*",), allow_methods=("PUT",), allow_credentials=True).preflight(
        preflight_headers(origin=EVIL)
    )
    assert get_first(answer.headers, b"access-control-allow-origin") == EVIL
    assert get_first(answer.headers, b"access-control-allow-credentials") == b"true"


def test_foreign_origin_preflight_is_refused_without_cors_fields() -> None:
    answer = policy(allow_methods=("PUT",)).preflight(preflight_headers(origin=EVIL))
    assert answer.status == 400
    assert answer.body == b"Disallowed CORS origin"
    assert not [n for n, _ in answer.headers if n.startswith(b"access-control-")]
    assert get_first(answer.headers, b"content-length") == b"22"


def test_disallowed_method_and_headers_are_named() -> None:
    answer = policy(allow_methods=("GET",)).preflight(
        preflight_headers(origin=EVIL, method=b"DELETE", headers=b"x-secret")
    )
    assert answer.status == 400
    assert answer.body == b"Disallowed CORS origin, method, headers"


def test_methods_compare_case_sensitively() -> None:
    answer = policy(allow_methods=("PATCH",)).preflight(preflight_headers(method=b"patch"))
    assert answer.body == b"Disallowed CORS method"


def test_header_names_compare_case_insensitively_and_safelisted_are_free() -> None:
    p = policy(allow_methods=("POST",), allow_headers=("X-Token",))
    ok = p.preflight(preflight_headers(method=b"POST", headers=b"X-TOKEN,Content-Type"))
    assert ok.status == 204
    refused = p.preflight(preflight_headers(method=b"POST", headers=b"x-token, x-other"))
    assert refused.body == b"Disallowed CORS headers"


def test_star_methods_and_headers_echo_the_request() -> None:
    answer = policy(allow_methods=("*",), allow_headers=("*",)).preflight(
        preflight_headers(method=b"PURGE", headers=b"X-A, x-b")
    )
    assert answer.status == 204
    assert get_first(answer.headers, b"access-control-allow-methods") == b"PURGE"
    assert get_first(answer.headers, b"access-control-allow-headers") == b"X-A, x-b"


# --- actual requests ---------------------------------------------------------------

UPSTREAM: Headers = [
    (b"content-type", b"application/json"),
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-credentials", b"true"),
    (b"set-cookie", b"a=1"),
]


def test_allowed_origin_gets_our_fields_instead_of_upstreams() -> None:
    p = policy(allow_credentials=True, expose_headers=("X-Total", "X-Page"))
    assert p.response_headers(APP, UPSTREAM) == [
        (b"content-type", b"application/json"),
        (b"set-cookie", b"a=1"),
        (b"access-control-allow-origin", APP),
        (b"access-control-allow-credentials", b"true"),
        (b"access-control-expose-headers", b"X-Total, X-Page"),
        (b"vary", b"Origin"),
    ]


def test_foreign_origin_gets_no_cors_fields_not_even_upstreams() -> None:
    out = policy(allow_credentials=True).response_headers(EVIL, UPSTREAM)
    assert out == [
        (b"content-type", b"application/json"),
        (b"set-cookie", b"a=1"),
        (b"vary", b"Origin"),
    ]


def test_request_without_origin_still_varies_on_origin() -> None:
    assert policy().response_headers(None, []) == [(b"vary", b"Origin")]


def test_any_origin_without_credentials_is_star_and_needs_no_vary() -> None:
    out = policy(allow_origins=("*",)).response_headers(EVIL, [])
    assert out == [(b"access-control-allow-origin", b"*")]


def test_any_origin_with_credentials_echoes_and_varies() -> None:
    out = policy(allow_origins=("*",), allow_credentials=True).response_headers(EVIL, [])
    assert out == [
        (b"access-control-allow-origin", EVIL),
        (b"access-control-allow-credentials", b"true"),
        (b"vary", b"Origin"),
    ]


def test_existing_vary_origin_is_not_repeated() -> None:
    out = policy().response_headers(APP, [(b"vary", b"Accept-Encoding, origin")])
    assert get_all(out, b"vary") == [b"Accept-Encoding, origin"]
    out = policy().response_headers(APP, [(b"vary", b"Accept-Encoding")])
    assert get_all(out, b"vary") == [b"Accept-Encoding", b"Origin"]


def test_origin_must_match_exactly() -> None:
    p = policy()
    for near in (b"http://app.example.org", b"https://app.example.org:8443", b"null"):
        assert get_first(p.response_headers(near, []), b"access-control-allow-origin") is None


# --- config errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"allow_origins": ()}, "routes.r.cors.allow_origins: empty, so no origin is allowed"),
        (
            {"allow_origins": ("*", "https://a.org")},
            'routes.r.cors.allow_origins: "*" allows every origin',
        ),
        (
            {"allow_origins": ("https://a.org/",)},
            "routes.r.cors.allow_origins: an origin is scheme://host[:port], with no path, "
            'got "https://a.org/"',
        ),
        ({"allow_origins": ("a.org",)}, "routes.r.cors.allow_origins: an origin is scheme://"),
        (
            {"allow_origins": ("https://A.org",)},
            "routes.r.cors.allow_origins: browsers send origins in lower case",
        ),
        (
            {"allow_origins": ("https://a.org:443",)},
            "routes.r.cors.allow_origins: browsers leave the default port out",
        ),
        ({"allow_methods": ()}, "routes.r.cors.allow_methods: empty"),
        ({"allow_methods": ("GET POST",)}, 'routes.r.cors.allow_methods: not a method, got "GET'),
        ({"allow_headers": ("x y",)}, 'routes.r.cors.allow_headers: not a header name, got "x y"'),
        ({"expose_headers": ("*", "x")}, 'routes.r.cors.expose_headers: "*" allows every'),
        ({"max_age": -1}, "routes.r.cors.max_age: must be >= 0 seconds, got -1"),
    ],
)
def test_invalid_cors_names_its_key_path(spec: dict[str, Any], expected: str) -> None:
    assert cors_error(**spec).startswith(expected)


def test_credentials_with_any_origin_is_allowed_as_in_starlette() -> None:
    assert policy(allow_origins=("*",), allow_credentials=True).echoes_origin


def test_null_and_ports_and_ipv6_origins_are_accepted() -> None:
    p = policy(allow_origins=("null", "http://localhost:3000", "http://[::1]:8080"))
    assert p.allows_origin(b"null")
    assert p.allows_origin(b"http://localhost:3000")
    assert p.allows_origin(b"http://[::1]:8080")


def test_every_cors_problem_is_listed() -> None:
    message = cors_error(allow_origins=("x",), allow_headers=("a b",), max_age=-5)
    assert [line.split(":")[0] for line in message.splitlines()] == [
        "routes.r.cors.allow_origins",
        "routes.r.cors.allow_headers",
        "routes.r.cors.max_age",
    ]
