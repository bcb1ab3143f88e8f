"""The package's public API is what ``trioproxy/__init__.py`` re-exports, and no more."""

import subprocess
import sys

import trioproxy


def test_public_names_are_pinned() -> None:
    assert sorted(trioproxy.__all__) == [
        "Config",
        "ConfigError",
        "Engine",
        "HealthChecker",
        "LoadBalancer",
        "ProxyError",
        "ProxyServer",
        "UpstreamURL",
    ]
    for name in trioproxy.__all__:
        assert getattr(trioproxy, name) is not None


def test_package_ships_type_information() -> None:
    from importlib.resources import files

    assert files("trioproxy").joinpath("py.typed").is_file()


def test_console_script_and_module_agree() -> None:
    """``python -m trioproxy --help`` works without a network or an upstream."""
    result = subprocess.run(
        [sys.executable, "-m", "trioproxy", "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    assert "--upstream" in result.stdout and "--demo" in result.stdout


def test_asgi_public_names_are_pinned() -> None:
    """``trioproxy.asgi``: the app, and fastapi-reverse-proxy's names (a port changes
    only the import)."""
    import trioproxy.asgi

    assert sorted(trioproxy.asgi.__all__) == [
        "AsgiDownstream",
        "AsgiWebSocket",
        "HealthChecker",
        "LoadBalancer",
        "Proxy",
        "ProxyApp",
        "ProxyResponse",
        "ResponseAborted",
        "aclose_pool",
        "app",
        "create_app",
        "proxy_pass",
        "proxy_pass_websocket",
    ]
    assert trioproxy.asgi.LoadBalancer is trioproxy.LoadBalancer
    assert trioproxy.asgi.HealthChecker is trioproxy.HealthChecker
