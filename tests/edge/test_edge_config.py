"""The edge's config keys: trusted_proxies, forwarded, allow/deny/auth (and their errors)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from trioproxy.__main__ import build_parser, sources_from_args
from trioproxy.config import ConfigError
from trioproxy.config.load import load_config
from trioproxy.config.model import Config
from trioproxy.snapshot import build_snapshot

pytestmark = pytest.mark.timeout(10)

BASE = """\
[upstreams.default]
servers = ["http://127.0.0.1:9000"]
"""


def load(cwd: Path, text: str, *argv: str, environ: dict[str, str] | None = None) -> Config:
    (cwd / "t.toml").write_text(text)
    parser = build_parser()
    args = parser.parse_args(["--config", "t.toml", *argv])
    return load_config(sources_from_args(parser, args, environ or {}, str(cwd)))


def errors(cwd: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(cwd, text, environ=environ)
    return list(info.value.errors)


def test_server_identity_keys(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[server]\ntrusted_proxies = ["10.0.0.0/8", "::1"]\nforwarded = "both"\n' + BASE,
    )
    assert config.server.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.server.forwarded == "both"
    assert build_snapshot(config).identity.rfc7239
    env = load(
        tmp_path,
        BASE,
        environ={"TRIOPROXY_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.0.0/16"},
    )
    assert len(env.server.trusted_proxies) == 2


def test_identity_errors_name_file_key_and_value(tmp_path: Path) -> None:
    assert errors(tmp_path, '[server]\ntrusted_proxies = ["10.0.0.1/8"]\n' + BASE) == [
        't.toml: server.trusted_proxies[0]: must be an IP network like "10.0.0.0/8" or '
        '"2001:db8::/32", got "10.0.0.1/8"'
    ]
    assert errors(tmp_path, '[server]\nforwarded = "rfc7230"\n' + BASE) == [
        't.toml: server.forwarded: must be one of x-forwarded, rfc7239, both; got "rfc7230"'
    ]


def route(extra: str) -> str:
    return BASE + '[routes.r]\nupstream = "default"\n' + extra


def test_route_access_keys(tmp_path: Path) -> None:
    (tmp_path / "keys.txt").write_text("# ops\nsk-1\n\n  sk-2  \n")
    config = load(
        tmp_path,
        route(
            'allow = ["10.0.0.0/8"]\ndeny = ["10.9.0.0/16"]\n'
            'auth = { api_keys_file = "keys.txt", header = "X-API-Key" }\n'
        ),
    )
    settings = config.routes[0]
    assert settings.allow == (ipaddress.ip_network("10.0.0.0/8"),)
    assert settings.auth is not None
    assert settings.auth.keys == ("sk-1", "sk-2")
    assert settings.auth.header == "x-api-key"
    assert "sk-1" not in repr(config)
    access = build_snapshot(config).routes[0].access
    assert access is not None and access.auth is not None
    assert access.auth.accepts(b"sk-2") and not access.auth.accepts(b"sk-3")
    from_env = load(
        tmp_path,
        route('auth = { api_keys_env = "KEYS", forward_key = true }\n'),
        environ={"KEYS": "a1, b2"},
    )
    auth = from_env.routes[0].auth
    assert auth is not None and auth.keys == ("a1", "b2") and auth.forward_key


def test_keys_from_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("LLM_KEYS=k1,k2\n")
    config = load(tmp_path, route('auth = { api_keys_env = "LLM_KEYS" }\n'))
    auth = config.routes[0].auth
    assert auth is not None and auth.keys == ("k1", "k2")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            'allow = ["10.0.0.0/33"]\n',
            't.toml: routes.r.allow[0]: must be an IP network like "10.0.0.0/8" or '
            '"2001:db8::/32", got "10.0.0.0/33"',
        ),
        (
            'auth = { api_keys_file = "missing.txt" }\n',
            't.toml: routes.r.auth.api_keys_file: cannot read "missing.txt": '
            "No such file or directory",
        ),
        (
            'auth = { api_keys_env = "NOPE" }\n',
            't.toml: routes.r.auth.api_keys_env: environment variable "NOPE" is not set',
        ),
        (
            'auth = { header = "x-api-key" }\n',
            't.toml: routes.r.auth: needs exactly one of "api_keys_file" and "api_keys_env"',
        ),
        (
            'auth = { api_keys_file = "empty.txt" }\n',
            't.toml: routes.r.auth: "empty.txt" holds no key',
        ),
    ],
)
def test_access_errors(tmp_path: Path, extra: str, expected: str) -> None:
    (tmp_path / "empty.txt").write_text("# nothing\n")
    assert errors(tmp_path, route(extra)) == [expected]
