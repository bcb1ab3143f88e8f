from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest

from trioproxy.config.errors import ConfigError
from trioproxy.config.model import HeaderRules, RewriteSpec
from trioproxy.http.headers import client_response_headers, upstream_request_headers
from trioproxy.http.protocol import Headers
from trioproxy.http.transforms import (
    REQUEST_PLACEHOLDERS,
    BodyTransformError,
    FieldEditor,
    HeaderRuleSet,
    PathRewrite,
    TemplateValues,
    compile_header_rules,
    compile_rewrite,
    format_process_time,
    load_body_transform,
    run_body_transform,
)


def rewrite(**spec: object) -> PathRewrite:
    compiled = compile_rewrite(RewriteSpec(**spec), "routes.r.rewrite")  # type: ignore[arg-type]
    assert compiled is not None
    return compiled


def rewrite_error(**spec: object) -> str:
    with pytest.raises(ConfigError) as info:
        compile_rewrite(RewriteSpec(**spec), "routes.r.rewrite")  # type: ignore[arg-type]
    return str(info.value)


def rules(**tables: object) -> HeaderRuleSet:
    return compile_header_rules(HeaderRules(**tables), "routes.r.headers")  # type: ignore[arg-type]


def rules_error(**tables: object) -> str:
    with pytest.raises(ConfigError) as info:
        rules(**tables)
    return str(info.value)


# --- path rewrite ------------------------------------------------------------------


def _reference_prefix_rewrite(
    strip: bytes, add: bytes, target: bytes
) -> tuple[bytes, bytes | None]:
    """The prefix rules of the module docstring, on the path split from the query."""
    path, mark, query = target.partition(b"?")
    if not path.startswith(b"/"):
        return target, None
    stripped = None
    if strip and (path == strip or path.startswith(strip + b"/")):
        path, stripped = path[len(strip) :], strip
    return (add + path or b"/") + mark + query, stripped


@pytest.mark.parametrize("strip", [None, "/a", "/a/b", "/ab/"])
@pytest.mark.parametrize("add", [None, "/v1", "/x/y/"])
def test_prefix_rewrites_answer_as_the_rules_say(strip: str | None, add: str | None) -> None:
    if strip is None and add is None:
        return
    compiled = rewrite(strip_prefix=strip, add_prefix=add)
    strip_b = (strip or "").rstrip("/").encode()
    add_b = (add or "").rstrip("/").encode()
    for target in (
        b"/", b"/a", b"/a/", b"/a/b", b"/a/b/c", b"/ab", b"/ab/c", b"/a?", b"/a?x=/a",
        b"/a/b?y", b"/ab?", b"/?a", b"*", b"/a%2Fb", b"//a", b"/a//b", b"/b/a",
    ):  # fmt: skip
        expected = _reference_prefix_rewrite(strip_b, add_b, target)
        assert compiled.apply(target) == expected, target


def test_empty_rewrite_compiles_to_nothing() -> None:
    assert compile_rewrite(RewriteSpec(), "routes.r.rewrite") is None


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/users", b"/"),
        (b"/users/", b"/"),
        (b"/users/7", b"/7"),
        (b"/users/a%2Fb?x=%2F&y=;z", b"/a%2Fb?x=%2F&y=;z"),
        (b"/users?", b"/?"),
        (b"/users?q=a?b", b"/?q=a?b"),
    ],
)
def test_strip_prefix_keeps_query_byte_exact_and_never_leaves_empty_path(
    target: bytes, expected: bytes
) -> None:
    assert rewrite(strip_prefix="/users").apply(target) == (expected, b"/users")


def test_strip_prefix_only_on_a_segment_boundary() -> None:
    strip = rewrite(strip_prefix="/users")
    assert strip.apply(b"/usersettings?a=1") == (b"/usersettings?a=1", None)
    assert strip.apply(b"/other/users") == (b"/other/users", None)


def test_strip_prefix_trailing_slash_is_ignored() -> None:
    assert rewrite(strip_prefix="/users/").apply(b"/users/7") == (b"/7", b"/users")


def test_strip_prefix_does_not_decode() -> None:
    assert rewrite(strip_prefix="/users").apply(b"/%75sers/7") == (b"/%75sers/7", None)


def test_add_prefix_prefixes_the_path_only() -> None:
    add = rewrite(add_prefix="/api")
    assert add.apply(b"/v1/x?q=%20;") == (b"/api/v1/x?q=%20;", None)
    assert add.apply(b"/") == (b"/api/", None)
    assert add.apply(b"/?") == (b"/api/?", None)


def test_add_prefix_trailing_slash_does_not_double() -> None:
    assert rewrite(add_prefix="/api/").apply(b"/x") == (b"/api/x", None)


def test_strip_then_add_replaces_the_prefix_keeping_the_trailing_slash() -> None:
    both = rewrite(strip_prefix="/users", add_prefix="/api/people")
    assert both.apply(b"/users") == (b"/api/people", b"/users")
    assert both.apply(b"/users/") == (b"/api/people/", b"/users")
    assert both.apply(b"/users/7?x") == (b"/api/people/7?x", b"/users")


def test_regex_rewrites_with_backreferences_and_keeps_query() -> None:
    regex = rewrite(regex=r"^/v1/users/([0-9]+)$", replacement=r"/users/\1")
    assert regex.apply(b"/v1/users/42?expand=1&x=%2F") == (b"/users/42?expand=1&x=%2F", None)
    assert regex.apply(b"/v1/users/abc") == (b"/v1/users/abc", None)


def test_regex_sees_the_path_not_the_query() -> None:
    regex = rewrite(regex="x", replacement="y")
    assert regex.apply(b"/x/x?x=x") == (b"/y/y?x=x", None)


def test_regex_result_always_starts_with_slash() -> None:
    regex = rewrite(regex=r"^/strip", replacement="")
    assert regex.apply(b"/strip?a") == (b"/?a", None)
    assert regex.apply(b"/stripped") == (b"/ped", None)


def test_exact_paths_win_and_stop_the_other_rules() -> None:
    both = rewrite(paths=(("/old", "/new/place"),), strip_prefix="/old")
    assert both.apply(b"/old?k=v") == (b"/new/place?k=v", None)
    assert both.apply(b"/old/x") == (b"/x", b"/old")


def test_exact_paths_before_regex() -> None:
    both = rewrite(paths=(("/a", "/mapped"),), regex="^/a", replacement="/regexed")
    assert both.apply(b"/a") == (b"/mapped", None)
    assert both.apply(b"/ab") == (b"/regexedb", None)


def test_asterisk_target_is_left_alone() -> None:
    assert rewrite(add_prefix="/api").apply(b"*") == (b"*", None)


def test_bad_regex_error_names_key_path_and_value() -> None:
    message = rewrite_error(regex="^((", replacement="/x")
    assert message.startswith("routes.r.rewrite.regex: not a valid regular expression: ")
    assert message.endswith(', got "^(("')


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"strip_prefix": "users"}, 'routes.r.rewrite.strip_prefix: must start with "/"'),
        ({"add_prefix": "api"}, 'routes.r.rewrite.add_prefix: must start with "/"'),
        ({"strip_prefix": "/"}, 'routes.r.rewrite.strip_prefix: "/" changes no path'),
        ({"strip_prefix": "/a?b"}, "routes.r.rewrite.strip_prefix: '?' ends a path"),
        ({"regex": "^/a"}, "routes.r.rewrite: regex needs a replacement"),
        ({"replacement": "/a"}, "routes.r.rewrite: replacement needs a regex"),
        (
            {"regex": "^/a", "replacement": "/b", "strip_prefix": "/a"},
            "routes.r.rewrite: regex cannot be combined with strip_prefix or add_prefix",
        ),
        (
            {"regex": "^/a(.*)", "replacement": r"/b\2"},
            "routes.r.rewrite.replacement: invalid group reference 2",
        ),
        (
            {"regex": "^/a", "replacement": "/b?x=1"},
            "routes.r.rewrite.replacement: only the path is rewritten",
        ),
        ({"paths": (("old", "/new"),)}, 'routes.r.rewrite.paths.old: must start with "/"'),
        ({"paths": (("/old", "new"),)}, 'routes.r.rewrite.paths."/old": must start with "/"'),
    ],
)
def test_invalid_rewrite_names_its_key_path(spec: dict[str, object], expected: str) -> None:
    assert rewrite_error(**spec).startswith(expected)


def test_every_rewrite_problem_is_listed() -> None:
    message = rewrite_error(regex="((", strip_prefix="x", add_prefix="y")
    assert [line.split(":")[0] for line in message.splitlines()] == [
        "routes.r.rewrite.regex",
        "routes.r.rewrite",
        "routes.r.rewrite",
        "routes.r.rewrite.strip_prefix",
        "routes.r.rewrite.add_prefix",
    ]


# --- header rules ------------------------------------------------------------------

REQUEST: Headers = [
    (b"host", b"backend:8080"),
    (b"accept", b"*/*"),
    (b"x-tag", b"one"),
    (b"x-tag", b"two"),
    (b"cookie", b"a=1"),
]
VALUES = TemplateValues(
    request_id=b"rid-1",
    client_ip=b"10.0.0.9",
    host=b"example.org",
    method=b"GET",
    path=b"/users/7",
    route=b"users",
    upstream=b"api",
    server=b"http://10.0.0.2:8000",
    process_time=format_process_time(0.0123),
)


def test_set_replaces_every_line_with_one_where_the_first_was() -> None:
    edited = rules(request_set=(("x-tag", "three"),)).request.apply(REQUEST)
    assert edited == [
        (b"host", b"backend:8080"),
        (b"accept", b"*/*"),
        (b"x-tag", b"three"),
        (b"cookie", b"a=1"),
    ]


def test_set_of_an_absent_field_appends_it() -> None:
    edited = rules(request_set=(("X-Env", "prod"),)).request.apply(REQUEST)
    assert edited == [*REQUEST, (b"x-env", b"prod")]


def test_add_appends_and_keeps_the_others() -> None:
    edited = rules(request_add=(("x-tag", "three"),)).request.apply(REQUEST)
    assert edited == [*REQUEST, (b"x-tag", b"three")]


def test_remove_drops_every_line_of_the_name_case_insensitively() -> None:
    edited = rules(request_remove=("X-Tag", "Cookie")).request.apply(REQUEST)
    assert edited == [(b"host", b"backend:8080"), (b"accept", b"*/*")]


def test_remove_then_set_then_add_within_one_table() -> None:
    edited = rules(
        request_remove=("x-tag",), request_set=(("x-tag", "set"),), request_add=(("x-tag", "add"),)
    ).request.apply(REQUEST)
    assert [v for n, v in edited if n == b"x-tag"] == [b"set", b"add"]


def test_request_host_may_be_set() -> None:
    edited = rules(request_set=(("host", "internal.svc"),)).request.apply(REQUEST)
    assert edited[0] == (b"host", b"internal.svc")


def test_response_rules_leave_requests_alone() -> None:
    ruleset = rules(response_remove=("server",), response_set=(("x-frame-options", "DENY"),))
    assert not ruleset.request
    assert ruleset.request.apply(REQUEST) is REQUEST
    response: Headers = [(b"server", b"nginx"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]
    assert ruleset.response.apply(response) == [
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"x-frame-options", b"DENY"),
    ]


def test_every_request_placeholder_expands() -> None:
    template = " ".join(f"{{{name}}}" for name in sorted(REQUEST_PLACEHOLDERS))
    ruleset = rules(request_set=(("x-all", template),))
    assert ruleset.request.placeholders == REQUEST_PLACEHOLDERS
    edited = ruleset.request.apply([], VALUES)
    assert edited == [(b"x-all", b"10.0.0.9 example.org GET /users/7 rid-1 users api")]


def test_response_placeholders_expand() -> None:
    ruleset = rules(response_add=(("server-timing", "proxy;dur={process_time};desc={server}"),))
    assert ruleset.response.apply([], VALUES) == [
        (b"server-timing", b"proxy;dur=0.012;desc=http://10.0.0.2:8000")
    ]


def test_process_time_has_three_decimals() -> None:
    assert format_process_time(0.0123) == b"0.012"
    assert format_process_time(2) == b"2.000"


def test_doubled_braces_are_literal() -> None:
    ruleset = rules(request_set=(("x-json", '{{"id": "{request_id}"}}'),))
    assert ruleset.request.apply([], VALUES) == [(b"x-json", b'{"id": "rid-1"}')]


def test_literal_values_need_no_template_values() -> None:
    ruleset = rules(request_set=(("x-a", "{{literal}}"),))
    assert ruleset.request.placeholders == frozenset()
    assert ruleset.request.apply([]) == [(b"x-a", b"{literal}")]


def test_client_bytes_cannot_inject_a_header_line() -> None:
    ruleset = rules(request_set=(("x-original-host", "{host}"), ("x-path", "{path}")))
    values = TemplateValues(host=b"evil\r\nx-admin: 1", path=b"/a\nb\x00c\td")
    edited = ruleset.request.apply([], values)
    assert edited == [(b"x-original-host", b"evilx-admin: 1"), (b"x-path", b"/abc\td")]


def test_server_rules_apply_first_and_route_rules_after() -> None:
    server = compile_header_rules(
        HeaderRules(
            request_set=(("x-env", "prod"), ("x-team", "platform")),
            request_add=(("x-via", "edge"),),
            response_set=(("x-frame-options", "DENY"),),
        ),
        "server.headers",
    )
    route = rules(
        request_set=(("x-team", "users"),),
        request_remove=("x-via",),
        response_remove=("x-frame-options",),
    )
    merged = server.then(route)
    assert merged.request.apply([]) == [(b"x-env", b"prod"), (b"x-team", b"users")]
    assert merged.response.apply([(b"x-frame-options", b"SAMEORIGIN")]) == []


def test_route_set_after_server_remove_sets() -> None:
    server = compile_header_rules(HeaderRules(request_remove=("x-a",)), "server.headers")
    merged = server.then(rules(request_set=(("x-a", "route"),)))
    assert merged.request.apply([(b"x-a", b"client")]) == [(b"x-a", b"route")]


def test_merged_rules_track_placeholders() -> None:
    server = compile_header_rules(HeaderRules(request_set=(("x-id", "{request_id}"),)), "server")
    merged = server.then(rules(request_remove=("x-id",), request_add=(("x-r", "{route}"),)))
    assert merged.request.placeholders == {"route"}


@pytest.mark.parametrize(
    ("tables", "expected"),
    [
        (
            {"request_set": (("X-Client", "{clientip}"),)},
            "routes.r.headers.request_set.X-Client: unknown placeholder {clientip}",
        ),
        (
            {"request_add": (("x-s", "{server}"),)},
            "routes.r.headers.request_add.x-s: {server} is known only in response rules",
        ),
        (
            {"request_set": (("x-t", "{process_time}"),)},
            "routes.r.headers.request_set.x-t: {process_time} is known only in response rules",
        ),
        (
            {"response_set": (("x-a", "a{b"),)},
            'routes.r.headers.response_set.x-a: unmatched "{" at position 1',
        ),
        (
            {"response_set": (("x-a", "a}b"),)},
            'routes.r.headers.response_set.x-a: unmatched "}" at position 1',
        ),
        (
            {"response_set": (("x-a", "{}"),)},
            "routes.r.headers.response_set.x-a: unknown placeholder {}",
        ),
        (
            {"request_set": (("x-a", "a\r\nx-b: c"),)},
            "routes.r.headers.request_set.x-a: control character '\\r' not allowed",
        ),
        (
            {"request_add": (("x-a", "nul\x00"),)},
            "routes.r.headers.request_add.x-a: control character '\\x00' not allowed",
        ),
        (
            {"request_set": (("x a", "1"),)},
            'routes.r.headers.request_set."x a": not a header name, got "x a"',
        ),
        ({"response_remove": ("",)}, 'routes.r.headers.response_remove: not a header name, got ""'),
        (
            {"response_set": (("Content-Length", "0"),)},
            "routes.r.headers.response_set.Content-Length: Content-Length is set by the proxy",
        ),
        (
            {"request_remove": ("transfer-encoding",)},
            "routes.r.headers.request_remove: transfer-encoding is set by the proxy",
        ),
        (
            {"request_remove": ("host",)},
            "routes.r.headers.request_remove: a request has exactly one Host",
        ),
        (
            {"request_add": (("Host", "x"),)},
            "routes.r.headers.request_add.Host: a request has exactly one Host",
        ),
        (
            {"request_set": (("X-A", "1"), ("x-a", "2"))},
            "routes.r.headers.request_set.x-a: set twice",
        ),
    ],
)
def test_invalid_header_rule_names_its_key_path(tables: dict[str, object], expected: str) -> None:
    assert rules_error(**tables).startswith(expected)


def test_every_header_rule_problem_is_listed() -> None:
    message = rules_error(
        request_set=(("x-a", "{nope}"),), response_add=(("x-b", "{"),), response_remove=("a b",)
    )
    assert message.splitlines() == [
        "routes.r.headers.request_set.x-a: unknown placeholder {nope}",
        'routes.r.headers.response_remove: not a header name, got "a b"',
        'routes.r.headers.response_add.x-b: unmatched "{" at position 0; '
        'write "{{" for a literal brace',
    ]


def test_template_without_values_is_a_wiring_error() -> None:
    with pytest.raises(ValueError, match="TemplateValues"):
        rules(request_set=(("x-id", "{request_id}"),)).request.apply([])


# --- the rules folded into the pass that builds the fields ----------------------------

# Names a rule may touch: forwarded ones (repeated, absent), the proxy's own, one the
# client's Connection names, one the proxy drops on its own (Expect).
_FOLD_REQUEST_NAMES = (
    "x-tag", "x-absent", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "via",
    "x-request-id", "x-hop", "expect", "x-forwarded-prefix",
)  # fmt: skip
_FOLD_RESPONSE_NAMES = (
    "x-tag", "x-absent", "server", "via", "x-request-id", "x-hop", "host", "set-cookie",
)  # fmt: skip
_FOLD_VALUES = ("fixed", "{client_ip}", "{route}-{method} {path}", "{{x}}{request_id}")
_FOLD_RESPONSE_VALUES = (*_FOLD_VALUES, "{process_time}", "{server};{host}")


def _random_tables(
    rng: random.Random, names: tuple[str, ...], values: tuple[str, ...], direction: str
) -> dict[str, object]:
    chosen = rng.sample(names, rng.randint(1, 4))
    sets, adds, removes = [], [], []
    for name in chosen:
        ops = rng.choice(("remove", "set", "add", "remove set", "set add", "remove add"))
        if "remove" in ops:
            removes.append(name)
        if "set" in ops:
            sets.append((name, rng.choice(values)))
        if "add" in ops:
            adds.append((name, rng.choice(values)))
    if direction == "request" and rng.random() < 0.3:
        sets.append(("host", rng.choice(values)))
    return {
        f"{direction}_set": tuple(sets),
        f"{direction}_add": tuple(adds),
        f"{direction}_remove": tuple(removes),
    }


_FOLD_REQUESTS: list[Headers] = [
    [(b"host", b"example.com")],
    [
        (b"host", b"example.com"),
        (b"x-tag", b"one"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"accept", b"*/*"),
        (b"x-tag", b"two"),
        (b"via", b"1.0 edge"),
        (b"x-request-id", b"client-id"),
        (b"expect", b"100-continue"),
        (b"x-forwarded-prefix", b"/api"),
        (b"x-hop", b"1"),
        (b"connection", b"keep-alive, X-Hop"),
    ],
    [(b"x-tag", b"a"), (b"connection", b"x-tag"), (b"x-forwarded-host", b"h"), (b"x-tag", b"b")],
]
_FOLD_RESPONSES: list[Headers] = [
    [(b"content-length", b"2")],
    [
        (b"server", b"nginx"),
        (b"x-tag", b"one"),
        (b"set-cookie", b"a=1"),
        (b"via", b"1.1 origin"),
        (b"x-request-id", b"upstream-id"),
        (b"set-cookie", b"b=2"),
        (b"x-tag", b"two"),
        (b"x-hop", b"1"),
        (b"connection", b"keep-alive, x-hop"),
        (b"host", b"odd"),
    ],
    [(b"x-tag", b"a"), (b"connection", b"X-Tag"), (b"x-tag", b"b"), (b"keep-alive", b"5")],
]


@pytest.mark.parametrize("seed", range(40))
def test_request_rules_folded_into_the_upstream_fields_pass_as_applied_after_it(
    seed: int,
) -> None:
    rng = random.Random(seed)
    for _ in range(10):
        ruleset = rules(**_random_tables(rng, _FOLD_REQUEST_NAMES, _FOLD_VALUES, "request"))
        editor = FieldEditor.of(ruleset.request, request=True)
        assert editor is not None
        for fields in _FOLD_REQUESTS:
            common = dict(
                client_addr="10.0.0.9",
                scheme="http",
                upstream_host=b"backend:8080",
                preserve_host=rng.random() < 0.5,
                request_id=b"rid-1",
                # [server] forwarded = "rfc7239": no X-Forwarded-* of the proxy's own.
                x_forwarded=rng.random() < 0.7,
            )
            built = upstream_request_headers(fields, **common)  # type: ignore[arg-type]
            folded = upstream_request_headers(
                fields,
                **common,  # type: ignore[arg-type]
                edit=editor.edit(VALUES),
            )
            assert folded == ruleset.request.apply(built, VALUES), (ruleset, fields)


@pytest.mark.parametrize("seed", range(40))
def test_response_rules_folded_into_the_client_fields_pass_as_applied_after_it(
    seed: int,
) -> None:
    rng = random.Random(seed)
    for _ in range(10):
        ruleset = rules(
            **_random_tables(rng, _FOLD_RESPONSE_NAMES, _FOLD_RESPONSE_VALUES, "response")
        )
        editor = FieldEditor.of(ruleset.response, request=False)
        assert editor is not None
        for fields in _FOLD_RESPONSES:
            built = client_response_headers(fields, request_id=b"rid-1")
            folded = client_response_headers(fields, request_id=b"rid-1", edit=editor.edit(VALUES))
            assert folded == ruleset.response.apply(built, VALUES), (ruleset, fields)


def test_an_editor_without_rules_is_none_and_a_fixed_one_is_made_once() -> None:
    assert FieldEditor.of(rules().request, request=True) is None
    editor = FieldEditor.of(rules(request_set=(("x-a", "1"),)).request, request=True)
    assert editor is not None
    assert editor.edit(None) is editor.edit(None)


def test_bound_route_values_expand_as_the_template_values_would() -> None:
    ruleset = rules(
        request_set=(("x-r", "{route}/{upstream}"), ("x-m", "{{{route}}} {method}")),
        response_add=(("x-u", "{upstream}"),),
    )
    bound = ruleset.bind({"route": b"users\x01", "upstream": b"api"})
    assert bound.request.placeholders == {"method"}
    assert not bound.response.placeholders
    values = TemplateValues(method=b"GET", route=b"users\x01", upstream=b"api")
    assert bound.request.apply([], values) == ruleset.request.apply([], values)
    assert bound.response.apply([]) == ruleset.response.apply([], values) == [(b"x-u", b"api")]


# --- body transform ----------------------------------------------------------------


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


def load_error(spec: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_body_transform(spec, "routes.r.body_transform")
    return str(info.value)


async def test_sync_and_async_transforms_are_called_alike(module_dir: Path) -> None:
    write_module(
        module_dir,
        "tp_body_ok",
        """
        def upper(body, content_type):
            return body.upper() + content_type.encode()

        async def lower(body, content_type):
            return body.lower()

        class Holder:
            @staticmethod
            def nested(body, content_type):
                return bytearray(b"[" + body + b"]")
        """,
    )
    upper = load_body_transform("tp_body_ok:upper", "routes.r.body_transform")
    lower = load_body_transform("tp_body_ok:lower", "routes.r.body_transform")
    nested = load_body_transform("tp_body_ok:Holder.nested", "routes.r.body_transform")
    assert await run_body_transform(upper, b"abc", ";json") == b"ABC;json"
    assert await run_body_transform(lower, b"ABC", "text/plain") == b"abc"
    assert await run_body_transform(nested, b"x", "text/plain") == b"[x]"


async def test_transform_failures_become_a_500(module_dir: Path) -> None:
    write_module(
        module_dir,
        "tp_body_bad",
        """
        def raises(body, content_type):
            raise KeyError("boom")

        async def returns_str(body, content_type):
            return "text"
        """,
    )
    raises = load_body_transform("tp_body_bad:raises", "k")
    returns_str = load_body_transform("tp_body_bad:returns_str", "k")
    with pytest.raises(BodyTransformError) as info:
        await run_body_transform(raises, b"", "")
    assert info.value.status == 500
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(BodyTransformError, match="returned str, not bytes"):
        await run_body_transform(returns_str, b"", "")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("tp_no_colon", 'routes.r.body_transform: expected "package.module:function"'),
        ("tp.mod:", 'routes.r.body_transform: expected "package.module:function"'),
        ("tp mod:f", 'routes.r.body_transform: expected "package.module:function"'),
        ("tp_missing_xyz:f", "routes.r.body_transform: no module named tp_missing_xyz"),
        ("os.nope_xyz:f", "routes.r.body_transform: no module named os.nope_xyz"),
        ("os:nope_xyz", "routes.r.body_transform: module os has no attribute nope_xyz"),
        ("os:sep", "routes.r.body_transform: os:sep is a str, not a function"),
        ("math:sqrt", "routes.r.body_transform: math:sqrt must take (body, content_type)"),
    ],
)
def test_load_errors_name_key_path_and_cause(spec: str, expected: str) -> None:
    assert load_error(spec).startswith(expected)


def test_module_failing_to_import_is_a_config_error(module_dir: Path) -> None:
    write_module(module_dir, "tp_body_broken", "raise RuntimeError('no database')\n")
    write_module(module_dir, "tp_body_dep", "import tp_absent_dependency_xyz\n")
    assert load_error("tp_body_broken:f") == (
        "routes.r.body_transform: importing tp_body_broken failed: RuntimeError: no database, "
        'got "tp_body_broken:f"'
    )
    assert load_error("tp_body_dep:f") == (
        "routes.r.body_transform: importing tp_body_dep failed: "
        "No module named 'tp_absent_dependency_xyz', "
        'got "tp_body_dep:f"'
    )


_KNOWN_VALUES = (
    "fixed",
    "{client_ip}",
    "{request_id}",
    "{server}",
    "{process_time}",
    "{{x}}{request_id}",
    "{route}:{client_ip}",
    "{server};{process_time}",
)


@pytest.mark.parametrize("seed", range(40))
def test_an_edit_from_the_engines_values_is_the_edit_from_template_values(seed: int) -> None:
    """``edit_known`` (no TemplateValues made) gives what ``edit`` gives, for rules
    that use only the values the engine has (bound as a route binds them)."""
    rng = random.Random(seed)
    known = (b"rid-\x01", b"10.0.0.9\x7f", b"http://10.0.0.2:8000", b"0.012")
    values = TemplateValues(
        request_id=known[0], client_ip=known[1], server=known[2], process_time=known[3]
    )
    for _ in range(10):
        names = _FOLD_RESPONSE_NAMES if rng.random() < 0.5 else _FOLD_REQUEST_NAMES
        ruleset = rules(**_random_tables(rng, names, _KNOWN_VALUES, "response")).bind(
            {"route": b"users", "upstream": b"api"}
        )
        editor = FieldEditor.of(ruleset.response, request=False)
        assert editor is not None
        assert editor.edit_known(*known) == editor.edit(values), ruleset
