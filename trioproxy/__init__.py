"""trioproxy: a streaming, cancellation-safe reverse proxy built on trio."""

from trioproxy.balance.library import HealthChecker, LoadBalancer
from trioproxy.config import Config, ConfigError
from trioproxy.engine import Engine
from trioproxy.errors import ProxyError
from trioproxy.server.listener import ProxyServer
from trioproxy.upstream.origin import UpstreamURL

__all__ = [
    "Config",
    "ConfigError",
    "Engine",
    "HealthChecker",
    "LoadBalancer",
    "ProxyError",
    "ProxyServer",
    "UpstreamURL",
]
__version__ = "0.1.0"
