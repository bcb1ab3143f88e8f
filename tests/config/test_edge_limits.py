"""``rate_limit``, ``max_inflight`` and ``[server] redis`` in the config file: what
loads, and one line per error naming the file, key path and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from trioproxy.__main__ import build_parser, sources_from_args
from trioproxy.config import ConfigError
from trioproxy.config.load import load_config
from trioproxy.config.model import Config, RateLimitSpec, RedisSettings

pytestmark = pytest.mark.timeout(10)

GROUP = '[upstreams.api]\nservers = ["http://127.0.0.1:9000"]\n'
ROUTE = '[routes.api]\nupstream = "api"\n'


def load(cwd: Path, text: str, *argv: str, environ: dict[str, str] | None = None) -> Config:
    (cwd / "t.toml").write_text(text)
    parser = build_parser()
    args = parser.parse_args(["--config", "t.toml", *argv])
    return load_config(sources_from_args(parser, args, environ or {}, str(cwd)))


def errors(cwd: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(cwd, text)
    return list(info.value.errors)


def test_the_issue_shape_loads(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        GROUP
        + """
[server]
redis = { url = "redis://127.0.0.1:6379/0", timeout = "50ms", on_store_error = "deny" }
rate_limit_max_keys = 5000

[routes.api]
upstream = "api"
max_inflight = 100
rate_limit = [
  { average = 100, period = "1m", burst = 20, key = "ip" },
  { average = 1000, period = "1h", key = "header:X-API-Key", store = "redis" },
  { average = 5, key = "api_key" },
  { average = 50, period = 10, key = "route" },
]
""",
    )
    assert config.server.redis == RedisSettings(
        url="redis://127.0.0.1:6379/0", timeout=0.05, on_store_error="deny"
    )
    assert config.server.rate_limit_max_keys == 5000
    (route,) = config.routes
    assert route.max_inflight == 100
    assert route.rate_limit == (
        RateLimitSpec(average=100, period=60.0, burst=20, key="ip"),
        RateLimitSpec(average=1000, period=3600.0, key="header:x-api-key", store="redis"),
        RateLimitSpec(average=5, key="api_key"),
        RateLimitSpec(average=50, period=10.0, key="route"),
    )


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, GROUP + ROUTE)
    assert config.server.redis is None
    assert config.server.rate_limit_max_keys == 100_000
    assert config.routes[0].rate_limit == ()
    assert config.routes[0].max_inflight is None
    redis = load(tmp_path, GROUP + "[server]\nredis = {}\n" + ROUTE).server.redis
    assert redis == RedisSettings(
        url="redis://127.0.0.1:6379/0", timeout=0.05, on_store_error="allow"
    )


def test_each_error_names_file_key_path_and_value(tmp_path: Path) -> None:
    lines = errors(
        tmp_path,
        GROUP
        + """
[server]
redis = { url = "http://127.0.0.1:6379", timeout = "fast", on_store_error = "maybe" }
rate_limit_max_keys = 0

[routes.api]
upstream = "api"
max_inflight = -1
rate_limit = [
  { average = 0, period = "1x", burst = 0, key = "ipp", stroe = "redis" },
  { period = "1h", key = "header:x api", store = "disk" },
]
""",
    )
    assert lines == [
        "t.toml: server.rate_limit_max_keys: must be a whole number >= 1, got 0",
        't.toml: server.redis.url: must be like "redis://127.0.0.1:6379/0", '
        'got "http://127.0.0.1:6379"',
        't.toml: server.redis.timeout: must be a duration (seconds, or like "250ms", "2s", '
        '"5m", "1h"), got "fast"',
        't.toml: server.redis.on_store_error: must be one of allow, deny; got "maybe"',
        't.toml: routes.api.rate_limit[0].stroe: unknown key (did you mean "store"?)',
        "t.toml: routes.api.rate_limit[0].average: must be a whole number >= 1, got 0",
        't.toml: routes.api.rate_limit[0].period: must be a duration (seconds, or like "250ms", '
        '"2s", "5m", "1h"), got "1x"',
        "t.toml: routes.api.rate_limit[0].burst: must be a whole number >= 1, got 0",
        "t.toml: routes.api.rate_limit[0].key: must be one of ip, route, api_key, header:NAME; "
        'got "ipp"',
        "t.toml: routes.api.rate_limit[1].key: must be one of ip, route, api_key, header:NAME; "
        'got "header:x api"',
        't.toml: routes.api.rate_limit[1].store: must be one of memory, redis; got "disk"',
        't.toml: routes.api.rate_limit[1]: needs "average", the requests allowed per period',
        "t.toml: routes.api.max_inflight: must be a whole number >= 1, got -1",
    ]


def test_a_redis_limit_needs_server_redis(tmp_path: Path) -> None:
    lines = errors(
        tmp_path,
        GROUP
        + """
[routes.api]
upstream = "api"
rate_limit = [{ average = 1 }, { average = 5, store = "redis" }]
""",
    )
    assert lines == [
        't.toml: routes.api.rate_limit[1].store: "redis" needs [server] redis = '
        '{ url = "redis://..." }'
    ]


def test_rate_limit_must_be_tables(tmp_path: Path) -> None:
    lines = errors(tmp_path, GROUP + '[routes.api]\nupstream = "api"\nrate_limit = [5]\n')
    assert lines == ["t.toml: routes.api.rate_limit[0]: must be a table, got 5"]


def test_max_keys_from_the_environment(tmp_path: Path) -> None:
    config = load(tmp_path, GROUP + ROUTE, environ={"TRIOPROXY_RATE_LIMIT_MAX_KEYS": "77"})
    assert config.server.rate_limit_max_keys == 77
