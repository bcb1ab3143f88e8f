"""The layered loader: defaults < TOML file < .env < environment < flags, and its errors.

Everything goes through the command line's own parser (``build_parser`` and
``sources_from_args``) with an ``environ`` dict and ``tmp_path`` as the working
directory; nothing touches ``os.environ`` or opens a socket.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trioproxy.__main__ import build_parser, config_from_args, sources_from_args, summary
from trioproxy.config import ConfigError
from trioproxy.config.load import ConfigSources, load_config
from trioproxy.config.model import (
    Config,
    HeaderRules,
    MatchSpec,
    RespondSpec,
    RewriteSpec,
)

pytestmark = pytest.mark.timeout(10)

#: The example of issue 13, as it is.
EXAMPLE = (Path(__file__).parent / "example.toml").read_text()

SIMPLE = """\
[upstreams.default]
servers = ["http://127.0.0.1:9000"]
"""


def sources(cwd: Path, *argv: str, environ: dict[str, str] | None = None) -> ConfigSources:
    parser = build_parser()
    return sources_from_args(parser, parser.parse_args(argv), environ or {}, str(cwd))


def load(cwd: Path, *argv: str, environ: dict[str, str] | None = None) -> Config:
    return load_config(sources(cwd, *argv, environ=environ))


def errors(cwd: Path, *argv: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(cwd, *argv, environ=environ)
    assert str(info.value) == "\n".join(info.value.errors)
    return list(info.value.errors)


def write(directory: Path, name: str, text: str) -> str:
    (directory / name).write_text(text)
    return name


# --- the file ------------------------------------------------------------------------


def test_the_example_of_issue_13_loads_into_the_model(tmp_path: Path) -> None:
    write(tmp_path, "ca.pem", "")
    config = load(tmp_path, "--config", write(tmp_path, "trioproxy.toml", EXAMPLE))
    assert config.source == str(tmp_path / "trioproxy.toml")
    assert summary(config) == "config OK: 2 routes, 1 upstream groups, 2 servers"

    server = config.server
    assert (server.host, server.port) == ("127.0.0.1", 8080)
    assert server.admin is not None and server.admin.port == 9901
    assert server.headers == HeaderRules(response_set=(("x-proxy-by", "trioproxy"),))

    api = config.upstreams["api"]
    assert [(s.url.text, s.weight, s.max_inflight) for s in api.servers] == [
        ("http://10.0.0.1:9000", 1, None),
        ("http://10.0.0.2:9000", 3, 100),
    ]
    assert api.strategy == "least_connections"
    assert api.health.path == "/healthz"
    assert api.health.expect is not None and str(api.health.expect) == "200"
    assert api.breaker.failure_threshold == 5
    assert api.breaker.half_open_max == 3
    assert api.breaker.success_threshold == 2
    assert api.retry.attempts == 2
    assert api.pool.idle_timeout == 60.0
    assert api.timeouts.read == 300.0
    assert api.tls.ca == str(tmp_path / "ca.pem")

    users, ping = config.routes
    assert (users.name, users.upstream, users.priority) == ("users", "api", 10)
    assert users.match == MatchSpec(
        host=("api.example.com", "*.example.org"),
        path_prefix="/users/",
        methods=("GET", "POST"),
        headers=(("x-tenant", "blue"),),
    )
    assert users.rewrite == RewriteSpec(strip_prefix="/users", add_prefix="/v1")
    assert users.timeouts.connect == 2.0
    assert users.max_body_size == 1 << 20
    assert users.body_transform == "mypkg.transforms:add_tenant"
    assert users.body_transform_limit == 1 << 20
    assert users.headers.request_set == (("x-gateway", "trioproxy"), ("x-client", "{client_ip}"))
    assert users.headers.response_remove == ("server",)
    assert users.cors is not None and users.cors.allow_credentials and users.cors.max_age == 600
    assert ping.upstream is None
    assert ping.respond == RespondSpec(status=200, body="pong", content_type="text/plain")


def test_a_default_group_alone_gets_the_catch_all_route(tmp_path: Path) -> None:
    config = load(tmp_path, "--config", write(tmp_path, "t.toml", SIMPLE))
    [route] = config.routes
    assert (route.name, route.upstream, route.match) == ("default", "default", MatchSpec())


def test_health_false_and_no_health_check(tmp_path: Path) -> None:
    write(tmp_path, "t.toml", SIMPLE + "health = false\n")
    assert not load(tmp_path, "--config", "t.toml").upstreams["default"].health.enabled
    config = load(tmp_path, "--upstream", "http://a:1", "--no-health-check")
    assert not config.upstreams["default"].health.enabled
    assert load(tmp_path, "--upstream", "http://a:1").upstreams["default"].health.enabled


def test_admin_is_off_unless_asked_for(tmp_path: Path) -> None:
    assert load(tmp_path, "--upstream", "http://a:1").server.admin is None
    assert (
        load(tmp_path, "--upstream", "http://a:1", "--admin-host", "0.0.0.0").server.admin is None
    )
    admin = load(tmp_path, "--upstream", "http://a:1", "--admin-port", "9000").server.admin
    assert admin is not None and (admin.host, admin.port) == ("127.0.0.1", 9000)
    write(tmp_path, "t.toml", '[server]\nadmin = { host = "0.0.0.0" }\n' + SIMPLE)
    admin = load(tmp_path, "--config", "t.toml").server.admin
    assert admin is not None and (admin.host, admin.port) == ("0.0.0.0", 9901)


# --- layers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "dotenv", "env", "flag", "port"),
    [
        (True, False, False, False, 1001),
        (True, True, False, False, 1002),
        (True, True, True, False, 1003),
        (True, True, True, True, 1004),
        (False, True, False, True, 1004),
        (False, True, True, False, 1003),
        (False, False, False, False, 8080),
    ],
)
def test_precedence_file_dotenv_environment_flags(
    tmp_path: Path, file: bool, dotenv: bool, env: bool, flag: bool, port: int
) -> None:
    write(tmp_path, "t.toml", "[server]\nport = 1001\n" + SIMPLE)
    if dotenv:
        write(tmp_path, ".env", "TRIOPROXY_PORT=1002\n")
    argv = ["--config", "t.toml"] if file else ["--upstream", "http://a:1"]
    if flag:
        argv += ["--port", "1004"]
    environ = {"TRIOPROXY_PORT": "1003"} if env else {}
    assert load(tmp_path, *argv, environ=environ).server.port == port


def test_every_server_scalar_has_its_variable(tmp_path: Path) -> None:
    environ = {
        "TRIOPROXY_HOST": "0.0.0.0",
        "TRIOPROXY_PORT": "0",
        "TRIOPROXY_HTTP": "h11",
        "TRIOPROXY_LOG_LEVEL": "debug",
        "TRIOPROXY_GRACE": "1m",
        "TRIOPROXY_HEADER_TIMEOUT": "500ms",
        "TRIOPROXY_BODY_TIMEOUT": "7",
        "TRIOPROXY_KEEPALIVE_TIMEOUT": "0",
        "TRIOPROXY_MAX_HEADER_SIZE": "32k",
        "TRIOPROXY_MAX_BODY_SIZE": "10m",
        "TRIOPROXY_WS_MAX_MESSAGE_SIZE": "1m",
        "TRIOPROXY_WS_IDLE_TIMEOUT": "1h",
        "TRIOPROXY_ADMIN_PORT": "9999",
        "TRIOPROXY_UPSTREAM": "http://a:1",
    }
    server = load(tmp_path, environ=environ).server
    assert (server.host, server.port, server.http, server.log_level) == (
        "0.0.0.0",
        0,
        "h11",
        "debug",
    )
    assert (server.grace, server.header_timeout, server.body_timeout) == (60.0, 0.5, 7.0)
    assert (server.keepalive_timeout, server.max_header_size) == (0.0, 32768)
    assert (server.max_body_size, server.ws_max_message_size) == (10 << 20, 1 << 20)
    assert server.ws_idle_timeout == 3600.0
    assert server.admin is not None and server.admin.port == 9999


def test_empty_variables_count_as_unset_and_foreign_ones_are_left_alone(tmp_path: Path) -> None:
    environ = {
        "TRIOPROXY_PORT": "",
        "TRIOPROXY_WSTEST": "wstest",
        "TRIOPROXY_UPSTREAM": "http://a:1",
    }
    assert load(tmp_path, environ=environ).server.port == 8080


def test_config_file_named_by_environment_or_dotenv_and_the_flag_wins(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", "[server]\nport = 1\n" + SIMPLE)
    write(tmp_path, "b.toml", "[server]\nport = 2\n" + SIMPLE)
    write(tmp_path, "c.toml", "[server]\nport = 3\n" + SIMPLE)
    assert load(tmp_path, environ={"TRIOPROXY_CONFIG": "a.toml"}).server.port == 1
    write(tmp_path, ".env", "TRIOPROXY_CONFIG=b.toml\n")
    assert load(tmp_path).server.port == 2
    assert load(tmp_path, environ={"TRIOPROXY_CONFIG": "a.toml"}).server.port == 1
    assert (
        load(tmp_path, "--config", "c.toml", environ={"TRIOPROXY_CONFIG": "a.toml"}).server.port
        == 3
    )


def test_dotenv_syntax_is_python_dotenvs_and_os_environ_is_untouched(tmp_path: Path) -> None:
    write(
        tmp_path,
        ".env",
        "# a FastAPI app's .env\nDATABASE_URL=postgres://x\nexport TRIOPROXY_PORT='1234'\n"
        'BASE=10.0.0\nTRIOPROXY_UPSTREAM="http://${BASE}.1:9000 http://${BASE}.2:9000"\n',
    )
    before = dict(os.environ)
    config = load(tmp_path)
    assert dict(os.environ) == before
    assert config.server.port == 1234
    assert [s.url.text for s in config.upstreams["default"].servers] == [
        "http://10.0.0.1:9000",
        "http://10.0.0.2:9000",
    ]


def test_env_file_flag(tmp_path: Path) -> None:
    write(tmp_path, "prod.env", "TRIOPROXY_PORT=99999\nTRIOPROXY_UPSTREAM=http://a:1\n")
    write(tmp_path, ".env", "TRIOPROXY_PORT=1\n")
    assert errors(tmp_path, "--env-file", "prod.env") == [
        'prod.env TRIOPROXY_PORT: must be 0..65535, got "99999"'
    ]
    assert errors(tmp_path, "--env-file", "missing.env", "--upstream", "http://a:1") == [
        '--env-file: cannot read "missing.env": No such file or directory'
    ]


def test_a_missing_dot_env_is_fine(tmp_path: Path) -> None:
    assert load(tmp_path, "--upstream", "http://a:1").server.port == 8080


def test_trioproxy_upstream_builds_the_default_route(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        environ={"TRIOPROXY_UPSTREAM": "http://a:1,weight=3 http://b:2\nhttps://c, http://d:4"},
    )
    servers = config.upstreams["default"].servers
    assert [(s.url.text, s.weight) for s in servers] == [
        ("http://a:1", 3),
        ("http://b:2", 1),
        ("https://c", 1),
        ("http://d:4", 1),
    ]
    assert [route.upstream for route in config.routes] == ["default"]
    # The flag replaces the variable's list.
    config = load(
        tmp_path, "--upstream", "http://z:9", environ={"TRIOPROXY_UPSTREAM": "http://a:1"}
    )
    assert [s.url.text for s in config.upstreams["default"].servers] == ["http://z:9"]


def test_trioproxy_upstream_errors_name_the_variable(tmp_path: Path) -> None:
    assert errors(tmp_path, environ={"TRIOPROXY_UPSTREAM": "http://a:1 ftp://b"}) == [
        "environment TRIOPROXY_UPSTREAM: 'ftp://b': scheme must be http or https"
    ]


def test_backend_url_is_upstream(tmp_path: Path) -> None:
    a = load(tmp_path, "--backend-url", "http://a:1,weight=2", "--upstream", "http://b:2")
    b = load(tmp_path, "--upstream", "http://a:1,weight=2", "--backend-url", "http://b:2")
    assert a == b
    assert errors(tmp_path, "--backend-url", "ftp://x") == [
        "--backend-url: 'ftp://x': scheme must be http or https"
    ]


def test_upstream_replaces_the_servers_of_a_file_default_group(tmp_path: Path) -> None:
    write(tmp_path, "t.toml", SIMPLE)
    config = load(tmp_path, "--config", "t.toml", "--upstream", "http://other:1")
    assert [s.url.text for s in config.upstreams["default"].servers] == ["http://other:1"]


def test_group_flags_apply_to_every_group(tmp_path: Path) -> None:
    write(
        tmp_path,
        "t.toml",
        '[upstreams.a]\nservers = ["http://a:1"]\nstrategy = "random"\n'
        'timeouts = { connect = "1s" }\n'
        '[upstreams.b]\nservers = ["http://b:1"]\n'
        '[routes.a]\nupstream = "a"\nmatch = { path_prefix = "/a/" }\n'
        '[routes.b]\nupstream = "b"\n',
    )
    config = load(
        tmp_path, "--config", "t.toml", "--strategy", "fastest", "--retries", "0", "--insecure"
    )
    for group in config.upstreams.values():
        assert group.strategy == "fastest"
        assert group.retry.attempts == 0
        assert group.tls.verify is False
    assert config.upstreams["a"].timeouts.connect == 1.0
    # A bad group flag is one line, not one per group.
    assert errors(tmp_path, "--config", "t.toml", "--retries", "x") == [
        '--retries: must be a whole number >= 0, got "x"'
    ]


def test_upstream_with_file_routes_is_an_error_naming_both(tmp_path: Path) -> None:
    write(tmp_path, "ca.pem", "")
    write(tmp_path, "t.toml", EXAMPLE)
    message = (
        "cannot be combined with the routes of t.toml (routes.users, routes.ping); "
        "give the servers in an [upstreams.NAME] table there"
    )
    assert errors(tmp_path, "--config", "t.toml", "--upstream", "http://a:1") == [
        f"--upstream: {message}"
    ]
    assert errors(tmp_path, "--config", "t.toml", environ={"TRIOPROXY_UPSTREAM": "http://a:1"}) == [
        f"environment TRIOPROXY_UPSTREAM: {message}"
    ]
    assert errors(tmp_path, "--config", "t.toml", "--demo") == [f"--demo: {message}"]


def test_demo_needs_no_servers(tmp_path: Path) -> None:
    config = load(tmp_path, "--demo")
    assert config.server.demo
    assert config.upstreams["default"].servers == ()
    assert [route.upstream for route in config.routes] == ["default"]


def test_watch(tmp_path: Path) -> None:
    assert load(tmp_path, "--config", write(tmp_path, "t.toml", SIMPLE), "--watch").watch
    assert not load(tmp_path, "--config", "t.toml").watch
    assert errors(tmp_path, "--watch", "--upstream", "http://a:1") == [
        "--watch: needs a config file (--config FILE or TRIOPROXY_CONFIG)"
    ]


# --- errors ----------------------------------------------------------------------------


def file_errors(tmp_path: Path, text: str) -> list[str]:
    return errors(tmp_path, "--config", write(tmp_path, "trioproxy.toml", text))


ROUTE = '[upstreams.api]\nservers = ["http://a:1"]\n[routes.users]\nupstream = "api"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            ROUTE + 'rewrite = { strip_prefix = "users" }\n',
            'routes.users.rewrite.strip_prefix: must start with "/", got "users"',
        ),
        ("[server]\nport = 70000\n" + SIMPLE, "server.port: must be 0..65535, got 70000"),
        (
            '[server]\ngrace = "soon"\n' + SIMPLE,
            'server.grace: must be a duration (seconds, or like "250ms", "2s", "5m", "1h"), '
            'got "soon"',
        ),
        (
            '[server]\nmax_header_size = "big"\n' + SIMPLE,
            'server.max_header_size: must be a size in bytes (like 65536, "64k", "10m"), got "big"',
        ),
        (
            ROUTE + 'match = { path_regex = "^/v[0-9+/items$" }\n',
            "routes.users.match.path_regex: not a valid regular expression "
            '(unterminated character set at position 3), got "^/v[0-9+/items$"',
        ),
        (
            ROUTE + 'body_transform = "mypkg.transforms"\n',
            'routes.users.body_transform: must be "package.module:function", '
            'got "mypkg.transforms"',
        ),
        (
            SIMPLE + 'tls = { ca = "nope.pem" }\n',
            'upstreams.default.tls.ca: cannot read "nope.pem": No such file or directory',
        ),
        (
            ROUTE.replace('upstream = "api"', 'upstream = "apx"'),
            'routes.users.upstream: no upstream group "apx" (did you mean "api"?) (defined: api)',
        ),
        (
            ROUTE + 'respond = { body = "hi" }\n',
            'routes.users: needs exactly one of "upstream" and "respond"',
        ),
        (
            ROUTE.replace('upstream = "api"', "priority = 1"),
            'routes.users: needs exactly one of "upstream" and "respond"',
        ),
        (
            '[upstreams.default]\nstrategy = "random"\n',
            'upstreams.default: needs "servers", a list of at least one server',
        ),
        (
            "[upstreams.default]\nservers = []\n",
            "upstreams.default.servers: must list at least one server",
        ),
        (
            SIMPLE + 'strategy = "fastes"\n',
            "upstreams.default.strategy: unknown balancing strategy 'fastes': expected one of "
            "round_robin, random, weighted, least_connections, fastest, or package.module:Name "
            "for a custom one",
        ),
        (
            ROUTE + '[routes.users.headers]\nrequest_set = { "X Bad" = "1" }\n',
            'routes.users.headers.request_set."X Bad": must be a header name, got "X Bad"',
        ),
        (
            ROUTE + '[routes.users.cors]\nallow_origins = ["*"]\nallow_credentials = true\n',
            'routes.users.cors.allow_credentials: cannot be true with allow_origins = ["*"] '
            "(browsers refuse it)",
        ),
        (
            ROUTE + 'rewrite = { regex = "^/old/(.*)$" }\n',
            'routes.users.rewrite: "regex" and "replacement" go together',
        ),
        (
            SIMPLE + 'health = "off"\n',
            'upstreams.default.health: must be a table or false, got "off"',
        ),
        (
            SIMPLE + 'health = { expect = [200, "2xx"] }\n',
            "upstreams.default.health.expect: must be HTTP statuses 100..599 or ranges like "
            '"200-299", got [200, "2xx"]',
        ),
        (
            "[server]\nport = 8080\nadmin = { port = 8080 }\n" + SIMPLE,
            "server.admin.port: same port as the proxy's (8080)",
        ),
        (ROUTE + "priority = 1.5\n", "routes.users.priority: must be a whole number, got 1.5"),
    ],
)
def test_each_error_names_file_key_path_and_value(tmp_path: Path, text: str, expected: str) -> None:
    assert file_errors(tmp_path, text) == [f"trioproxy.toml: {expected}"]


def test_server_entries_are_located_by_index(tmp_path: Path) -> None:
    text = '[upstreams.default]\nservers = ["http://a:1", { url = "http://b:2", weight = 0 }]\n'
    assert file_errors(tmp_path, text) == [
        "trioproxy.toml: upstreams.default.servers[1].weight: must be a whole number >= 1, got 0"
    ]


def test_duplicate_routes(tmp_path: Path) -> None:
    text = ROUTE + 'match = { methods = ["GET", "POST"] }\n'
    text += '[routes.again]\nupstream = "api"\nmatch = { methods = ["POST", "GET"] }\n'
    assert file_errors(tmp_path, text) == [
        "trioproxy.toml: routes.again: same match and priority as routes.users, "
        "so it would never be used"
    ]
    assert load(tmp_path, "--config", write(tmp_path, "ok.toml", text + "priority = 1\n"))


def test_unknown_keys_at_any_depth(tmp_path: Path) -> None:
    text = """\
[server]
prot = 8080
demo = true
[servers]
[upstreams.default]
servers = ["http://a:1", { url = "http://b:1", health = "/x" }]
helth = { path = "/h" }
health = { intervall = "1s" }
[routes.users]
upstream = "default"
match = { path_prefx = "/u/" }
rewrite = { strip = "/u" }
[routes.users.headers]
request_sett = {}
"""
    assert file_errors(tmp_path, text) == [
        'trioproxy.toml: server.prot: unknown key (did you mean "port"?)',
        "trioproxy.toml: server.demo: unknown key",
        'trioproxy.toml: servers: unknown key (did you mean "server"?)',
        'trioproxy.toml: upstreams.default.helth: unknown key (did you mean "health"?)',
        "trioproxy.toml: upstreams.default.health.intervall: unknown key "
        '(did you mean "interval"?)',
        'trioproxy.toml: routes.users.match.path_prefx: unknown key (did you mean "path_prefix"?)',
        "trioproxy.toml: routes.users.rewrite.strip: unknown key",
        "trioproxy.toml: routes.users.headers.request_sett: unknown key "
        '(did you mean "request_set"?)',
        "trioproxy.toml: upstreams.default.servers[1].health: unknown key "
        '(did you mean "health_path"?)',
    ]


def test_every_error_is_listed_across_layers(tmp_path: Path) -> None:
    write(tmp_path, ".env", "TRIOPROXY_GRACE=forever\n")
    text = (
        "[server]\nheader_timeout = 0\n"
        + ROUTE
        + 'rewrite = { strip_prefix = "users" }\ntimeouts = { read = "-1s" }\n'
    )
    write(tmp_path, "trioproxy.toml", text)
    assert errors(
        tmp_path,
        "--config",
        "trioproxy.toml",
        "--retry-budget",
        "2",
        "--max-body-size",
        "lots",
        environ={"TRIOPROXY_PORT": "70000", "TRIOPROXY_LOG_LEVEL": "loud"},
    ) == [
        'environment TRIOPROXY_PORT: must be 0..65535, got "70000"',
        "environment TRIOPROXY_LOG_LEVEL: must be one of critical, error, warning, info, debug; "
        'got "loud"',
        '.env TRIOPROXY_GRACE: must be a duration (seconds, or like "250ms", "2s", "5m", "1h"), '
        'got "forever"',
        "trioproxy.toml: server.header_timeout: must be > 0, got 0",
        '--max-body-size: must be a size in bytes (like 65536, "64k", "10m"), got "lots"',
        '--retry-budget: must be a number between 0 and 1, got "2"',
        'trioproxy.toml: routes.users.rewrite.strip_prefix: must start with "/", got "users"',
        "trioproxy.toml: routes.users.timeouts.read: must be a duration (seconds, or like "
        '"250ms", "2s", "5m", "1h"), got "-1s"',
    ]


def test_toml_syntax_errors_name_the_file_and_line(tmp_path: Path) -> None:
    assert file_errors(tmp_path, "[server]\nport = 8080\nhost = \n") == [
        "trioproxy.toml: line 3, column 8: invalid value"
    ]
    assert file_errors(tmp_path, SIMPLE + "servers = []\n") == [
        "trioproxy.toml: line 3, column 13: cannot overwrite a value"
    ]


def test_unreadable_files(tmp_path: Path) -> None:
    assert errors(tmp_path, "--config", "nope.toml") == [
        '--config: cannot read "nope.toml": No such file or directory'
    ]
    assert errors(tmp_path, environ={"TRIOPROXY_CONFIG": "nope.toml"}) == [
        'environment TRIOPROXY_CONFIG: cannot read "nope.toml": No such file or directory'
    ]
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    assert errors(tmp_path, "--config", "bin.toml") == ["bin.toml: not UTF-8 text"]


def test_nothing_to_proxy(tmp_path: Path) -> None:
    assert errors(tmp_path) == [
        "trioproxy: no upstream: give --upstream URL (repeatable), --demo, TRIOPROXY_UPSTREAM, "
        "or a --config file with [routes.NAME] or [upstreams.default]"
    ]
    assert file_errors(tmp_path, "[server]\nport = 1\n") == [
        "trioproxy.toml: no routes: define [routes.NAME] or [upstreams.default], "
        "or give --upstream URL"
    ]


def test_upstream_ca_flag_is_relative_to_the_working_directory(tmp_path: Path) -> None:
    write(tmp_path, "ca.pem", "")
    config = load(tmp_path, "--upstream", "https://a", "--upstream-ca", "ca.pem")
    assert config.upstreams["default"].tls.ca == str(tmp_path / "ca.pem")
    assert errors(tmp_path, "--upstream", "https://a", "--upstream-ca", "no.pem") == [
        '--upstream-ca: cannot read "no.pem": No such file or directory'
    ]


# --- config_from_args and the bridge to today's listener ---------------------------------


def test_config_from_args_exits_2_with_a_line_per_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        config_from_args(["--port", "x", "--grace", "-1"], environ={}, cwd=str(tmp_path))
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        '--port: must be 0..65535, got "x"',
        '--grace: must be a duration (seconds, or like "250ms", "2s", "5m", "1h"), got "-1"',
        "trioproxy: no upstream: give --upstream URL (repeatable), --demo, TRIOPROXY_UPSTREAM, "
        "or a --config file with [routes.NAME] or [upstreams.default]",
    ]


def test_flags_of_before_keep_their_meaning(tmp_path: Path) -> None:
    config = config_from_args(
        [
            "--upstream", "http://a:1", "--port", "0", "--connect-timeout", "1.5",
            "--read-timeout", "60", "--max-header-size", "32k", "--max-body-size", "1m",
            "--health-path", "/hz", "--health-method", "GET", "--breaker-failures", "0",
            "--retries", "1", "--retry-replay-limit", "64k", "--preserve-host",
            "--ws-idle-timeout", "30", "--log-level", "warning",
        ],
        environ={},
        cwd=str(tmp_path),
    )  # fmt: skip
    server, group = config.server, config.upstreams["default"]
    assert [route.name for route in config.routes] == ["default"]
    assert [s.url.text for s in group.servers] == ["http://a:1"]
    assert (server.port, group.timeouts.connect, group.timeouts.read) == (0, 1.5, 60.0)
    assert (server.max_header_size, server.max_body_size) == (32768, 1 << 20)
    assert (group.health.path, group.health.method) == ("/hz", b"GET")
    assert (group.breaker.failure_threshold, group.retry.attempts) == (0, 1)
    assert (group.retry.replay_limit, group.preserve_host) == (65536, True)
    assert (server.ws_idle_timeout, server.log_level, server.admin) == (30.0, "warning", None)


# --- workers (issue 17) --------------------------------------------------------------


def test_workers_from_every_layer(tmp_path: Path) -> None:
    assert load(tmp_path, "--upstream", "http://a").server.workers == 1
    name = write(
        tmp_path,
        "trioproxy.toml",
        '[server]\nworkers = 3\n[upstreams.default]\nservers = ["http://a"]\n',
    )
    assert load(tmp_path, "--config", name).server.workers == 3
    assert load(tmp_path, "--config", name, environ={"TRIOPROXY_WORKERS": "2"}).server.workers == 2
    assert load(tmp_path, "--config", name, "--workers", "4").server.workers == 4
    auto = load(tmp_path, "--upstream", "http://a", "--workers", "auto").server.workers
    assert auto == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_workers_must_be_a_positive_count_or_auto(tmp_path: Path, bad: str) -> None:
    assert errors(tmp_path, "--upstream", "http://a", "--workers", bad) == [
        f'--workers: must be a whole number >= 1 or "auto", got "{bad}"'
    ]
