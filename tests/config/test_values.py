"""The checks of config values: what they accept, what they return, the reason they give."""

from __future__ import annotations

import pytest

from trioproxy.config import values
from trioproxy.config.values import Invalid

pytestmark = pytest.mark.timeout(10)


def reason(check: values.Convert, value: object) -> list[tuple[str, str]]:
    with pytest.raises(Invalid) as info:
        check(value)
    return info.value.problems


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (2, 2.0),
        (0.5, 0.5),
        (0, 0.0),
        ("2", 2.0),
        ("2.5", 2.5),
        (".5", 0.5),
        ("250ms", 0.25),
        ("2s", 2.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        (" 10 S ", 10.0),
        ("1.5h", 5400.0),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert values.duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("abc", 'must be a duration (seconds, or like "250ms", "2s", "5m", "1h"), got "abc"'),
        ("5d", 'must be a duration (seconds, or like "250ms", "2s", "5m", "1h"), got "5d"'),
        (True, 'must be a duration (seconds, or like "250ms", "2s", "5m", "1h"), got true'),
        ([1], 'must be a duration (seconds, or like "250ms", "2s", "5m", "1h"), got [1]'),
        (-1, "must be >= 0, got -1"),
        (float("inf"), "must be finite, got inf"),
        ("-2s", 'must be a duration (seconds, or like "250ms", "2s", "5m", "1h"), got "-2s"'),
    ],
)
def test_bad_durations(value: object, expected: str) -> None:
    assert reason(values.duration, value) == [("", expected)]


def test_positive_duration_refuses_zero() -> None:
    assert reason(values.positive_duration, "0s") == [("", 'must be > 0, got "0s"')]
    assert values.positive_duration("1ms") == 0.001


@pytest.mark.parametrize(
    ("value", "size"),
    [(0, 0), (65536, 65536), ("65536", 65536), ("64k", 65536), ("10m", 10 << 20),
     ("1g", 1 << 30), ("64KiB", 65536), ("2kb", 2048)],
)  # fmt: skip
def test_sizes(value: object, size: int) -> None:
    assert values.size(value) == size


@pytest.mark.parametrize("value", ["lots", "1.5m", "-1", "10t", 1.5, False])
def test_bad_sizes(value: object) -> None:
    [(at, text)] = reason(values.size, value)
    assert text.startswith('must be a size in bytes (like 65536, "64k", "10m"), got ')
    assert at == ""


def test_sizes_never_negative() -> None:
    assert reason(values.size, -1) == [("", "must be >= 0, got -1")]
    assert reason(values.positive_size, 0) == [("", "must be > 0, got 0")]


@pytest.mark.parametrize("value", [0, 80, 65535, "8080"])
def test_ports(value: object) -> None:
    assert values.port(value) == int(value)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("70000", 'must be 0..65535, got "70000"'),
        (70000, "must be 0..65535, got 70000"),
        (-1, "must be 0..65535, got -1"),
        ("http", 'must be 0..65535, got "http"'),
        (True, "must be 0..65535, got true"),
    ],
)
def test_bad_ports(value: object, expected: str) -> None:
    assert reason(values.port, value) == [("", expected)]


def test_counts_ratios_booleans() -> None:
    assert values.count("3") == 3
    assert values.count(0) == 0
    assert reason(values.positive_count, 0) == [("", "must be a whole number >= 1, got 0")]
    assert reason(values.count, "x") == [("", 'must be a whole number >= 0, got "x"')]
    assert values.integer(-5) == -5
    assert values.integer("+7") == 7
    assert values.ratio("0.25") == 0.25
    assert values.ratio(1) == 1.0
    assert reason(values.ratio, 2) == [("", "must be a number between 0 and 1, got 2")]
    for word in ("true", "1", "YES", "on"):
        assert values.boolean(word) is True
    for word in ("false", "0", "no", "Off"):
        assert values.boolean(word) is False
    assert reason(values.boolean, "maybe") == [("", 'must be true or false, got "maybe"')]
    assert reason(values.boolean, 1) == [("", "must be true or false, got 1")]


def test_choices() -> None:
    assert values.log_level("DEBUG") == "debug"
    assert values.health_method("get") == "GET"
    assert values.http_parser("h11") == "h11"
    assert reason(values.log_level, "loud") == [
        ("", 'must be one of critical, error, warning, info, debug; got "loud"')
    ]


def test_paths_regexes_and_references() -> None:
    assert values.url_path("/users") == "/users"
    assert reason(values.url_path, "users") == [("", 'must start with "/", got "users"')]
    assert values.regex(r"^/v[0-9]+/items$") == r"^/v[0-9]+/items$"
    [(_, text)] = reason(values.regex, "^/(old")
    assert text.startswith("not a valid regular expression (missing ), unterminated subpattern")
    assert text.endswith('got "^/(old"')
    assert values.import_ref("mypkg.transforms:add_tenant") == "mypkg.transforms:add_tenant"
    assert reason(values.import_ref, "mypkg.transforms.add_tenant") == [
        ("", 'must be "package.module:function", got "mypkg.transforms.add_tenant"')
    ]


def test_statuses() -> None:
    assert str(values.statuses([204, 200])) == "204,200"
    assert str(values.statuses(200)) == "200"
    assert str(values.statuses([200, "300-399"])) == "200,300-399"
    assert str(values.statuses("200,204")) == "200,204"  # as --health-expect gives it
    assert 204 in values.statuses("200-299") and 300 not in values.statuses("200-299")
    assert reason(values.statuses, [200, 600]) == [
        ("", 'must be HTTP statuses 100..599 or ranges like "200-299", got [200, 600]')
    ]
    assert values.status(404) == 404
    assert reason(values.status, 99) == [("", "must be an HTTP status 200..599, got 99")]


def test_header_tables_keep_order_and_lower_case_names() -> None:
    table = {"X-Gateway": "trioproxy", "X-Client": "{client_ip}", "a": "1"}
    assert values.header_table(table) == (
        ("x-gateway", "trioproxy"),
        ("x-client", "{client_ip}"),
        ("a", "1"),
    )
    assert reason(values.header_table, {"bad name": "x", "ok": 3}) == [
        ('."bad name"', 'must be a header name, got "bad name"'),
        (".ok", "must be a string, got 3"),
    ]
    assert reason(values.header_table, {"x": "a\r\nb"}) == [
        (".x", 'must not contain CR, LF or NUL, got "a\\r\\nb"')
    ]
    assert values.header_names(["Server", "X-Internal"]) == ("server", "x-internal")
    assert reason(values.header_names, ["ok", "no way"]) == [
        ("[1]", 'must be a header name, got "no way"')
    ]


def test_hosts_methods_origins() -> None:
    assert values.host_patterns(["API.example.com", "*.example.org"]) == (
        "api.example.com",
        "*.example.org",
    )
    assert values.host_patterns("localhost:8080") == ("localhost:8080",)
    assert reason(values.host_patterns, ["a.*.com"]) == [
        ("[0]", 'must be a host name or "*.domain", got "a.*.com"')
    ]
    assert values.methods(["get", "POST"]) == ("GET", "POST")
    assert values.origins(["*", "https://app.example.com:8443"]) == (
        "*",
        "https://app.example.com:8443",
    )
    assert reason(values.origins, ["https://app.example.com/"]) == [
        (
            "[0]",
            'must be "*" or an origin like "https://app.example.com", got "https://app.example.com/"',
        )
    ]


def test_path_tables() -> None:
    assert values.path_table({"/users": "/accounts"}) == (("/users", "/accounts"),)
    assert reason(values.path_table, {"/a": "b"}) == [('."/a"', 'must start with "/", got "b"')]


def test_servers_as_strings_and_tables() -> None:
    first, second = values.servers(
        ["http://10.0.0.1:9000,weight=2", {"url": "http://10.0.0.2:9000", "max_inflight": 100}]
    )
    assert (first.url.text, first.weight) == ("http://10.0.0.1:9000", 2)
    assert (second.url.text, second.weight, second.max_inflight) == ("http://10.0.0.2:9000", 1, 100)
    assert reason(
        values.servers,
        ["ftp://x", {"url": "http://a", "wieght": 3}, {"weight": 0}],
    ) == [
        ("[0]", "'ftp://x': scheme must be http or https"),
        ("[1].wieght", 'unknown key (did you mean "weight"?)'),
        ("[2].weight", "must be a whole number >= 1, got 0"),
        ("[2]", 'needs a "url"'),
    ]


def test_server_list_text_splits_on_white_space_and_commas() -> None:
    assert values.server_list_text(" http://a:1  http://b:2,http://c:3 ") == [
        "http://a:1",
        "http://b:2",
        "http://c:3",
    ]
    assert values.server_list_text("http://a:1,weight=3,max_inflight=5 http://b:2") == [
        "http://a:1,weight=3,max_inflight=5",
        "http://b:2",
    ]
    assert values.server_list_text("") == []


def test_strategy_names_are_checked_by_make_strategy() -> None:
    assert values.strategy("least-connections") == "least-connections"
    [(_, text)] = reason(values.strategy, "fastes")
    assert text.startswith("unknown balancing strategy 'fastes'")


def test_show_quotes_like_toml() -> None:
    assert values.show("a") == '"a"'
    assert values.show(True) == "true"
    assert values.show([1, "b"]) == '[1, "b"]'
    assert values.show({"a": 1}) == "{ a = 1 }"
