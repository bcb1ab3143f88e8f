"""Where ``trioproxy.asgi``'s app takes its configuration from (no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trioproxy.asgi import create_app
from trioproxy.asgi.app import ProxyApp
from trioproxy.config import Config, ConfigError


def servers(config: Config) -> list[str]:
    return [spec.url.text for spec in config.upstreams["default"].servers]


def test_app_reads_dotenv_and_the_environment_as_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``.env`` in the working directory, then the environment over it."""
    monkeypatch.chdir(tmp_path)
    for name in ("TRIOPROXY_CONFIG", "TRIOPROXY_UPSTREAM", "TRIOPROXY_GRACE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text(
        "TRIOPROXY_UPSTREAM=http://10.0.0.1:9000,http://10.0.0.2:9000\nTRIOPROXY_GRACE=7\n"
    )
    monkeypatch.setenv("TRIOPROXY_GRACE", "3")
    config = ProxyApp().load()
    assert servers(config) == ["http://10.0.0.1:9000", "http://10.0.0.2:9000"]
    assert config.server.grace == 3


def test_trioproxy_config_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRIOPROXY_UPSTREAM", raising=False)
    (tmp_path / "gw.toml").write_text(
        '[upstreams.api]\nservers = ["http://10.0.0.3:9000"]\n\n'
        '[routes.api]\nupstream = "api"\nmatch = { path_prefix = "/api" }\n'
    )
    monkeypatch.setenv("TRIOPROXY_CONFIG", "gw.toml")
    config = ProxyApp().load()
    assert [route.name for route in config.routes] == ["api"]


def test_create_app_takes_a_config_or_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRIOPROXY_UPSTREAM", raising=False)
    monkeypatch.delenv("TRIOPROXY_CONFIG", raising=False)
    path = tmp_path / "one.toml"
    path.write_text('[upstreams.default]\nservers = ["http://10.0.0.4:9000"]\n')
    from_path = create_app(path).load()
    assert servers(from_path) == ["http://10.0.0.4:9000"]
    assert create_app(from_path).load() is from_path


def test_a_bad_config_is_a_config_error_naming_file_key_and_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.toml"
    path.write_text('[upstreams.default]\nservers = ["http://10.0.0.4:9000"]\nstrategy = "nope"\n')
    with pytest.raises(ConfigError) as caught:
        create_app(str(path)).load()
    assert "upstreams.default.strategy" in str(caught.value)
    assert "nope" in str(caught.value)
