"""nginx configurations, written into a temporary prefix per process.

Both run in the foreground (``daemon off``) with one worker, started as
``nginx -p PREFIX -c PREFIX/nginx.conf`` so they touch nothing outside their prefix:

* the back end serves fixed bodies from files (``/small`` 100 bytes, ``/1m`` 1 MiB),
  also under ``/v1/`` (``/v1/small``: what the 50-route config's route rewrites to);
  ``/upload`` reads the whole request body into memory before it answers, because a
  client such as wrk that is still writing a body when the answer comes stalls (nginx's
  ``return`` answers first and discards the body afterwards);
* the proxy is a plain reverse proxy with upstream keep-alive on; for SSE it does not
  buffer responses, for WebSocket it passes the upgrade, and request bodies are streamed
  (``proxy_request_buffering off``) as the other contenders do.

Keep-alive limits are raised on every side (``keepalive_requests``), so that no
contender pays for reconnections the others do not make.
"""

from __future__ import annotations

from pathlib import Path

from bench.servers import MIB_BODY, SMALL_BODY

_COMMON = """\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections {worker_connections};
    multi_accept on;
}}
"""

_HTTP_COMMON = """\
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 10000000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
"""

_BACKEND = """\
http {{
{http_common}
    upstream self_sink {{
        server 127.0.0.1:{port};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {prefix}/www;
        location = /ready {{
            return 200 "ok\\n";
        }}
        location /v1/ {{
            # The files again, where bench/gateway.py's measured route sends
            # /shop/small (strip_prefix /shop, add_prefix /v1).
            alias {prefix}/www/;
        }}
        location = / {{
            # What a proxy's health check probes by default (trioproxy: HEAD /).
            return 200 "ok\\n";
        }}
        location = /upload {{
            # Read the whole body (kept in memory), then answer through a bodiless
            # subrequest to /ready: see the module docstring.
            client_max_body_size 0;
            client_body_buffer_size 11m;
            proxy_pass http://self_sink/ready;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

_PROXY = """\
http {{
{http_common}
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}
    upstream backend {{
        server {upstream};
        keepalive 128;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port}{ssl} backlog=4096;{tls}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_request_buffering off;
            client_max_body_size 0;
            proxy_read_timeout 600s;
            proxy_buffering {buffering};
        }}
    }}
}}
"""


def _common(prefix: Path, nofile: int) -> dict[str, object]:
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    # Each connection may take two descriptors (client side and upstream side).
    return {
        "prefix": prefix,
        "nofile": nofile,
        "worker_connections": max(1024, nofile - 256),
        "http_common": _HTTP_COMMON.format(prefix=prefix),
    }


def write_backend(prefix: Path, port: int, nofile: int) -> Path:
    """Write the back end's configuration and its files; returns the config path."""
    www = prefix / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "small").write_bytes(SMALL_BODY)
    (www / "1m").write_bytes(MIB_BODY)
    values = _common(prefix, nofile)
    conf = prefix / "nginx.conf"
    conf.write_text(_COMMON.format(**values) + _BACKEND.format(port=port, **values))
    return conf


_TLS = """
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;"""


def write_proxy(
    prefix: Path,
    port: int,
    upstream: str,
    nofile: int,
    *,
    stream: bool,
    tls: tuple[str, str] | None = None,
) -> Path:
    """Write a reverse proxy's configuration; returns the config path.

    Args:
        upstream: ``HOST:PORT`` of the back end.
        stream: pass responses through unbuffered (SSE).
        tls: ``(certificate chain, key)`` files: terminate TLS (TLS 1.2 and 1.3, the
            rest nginx's defaults: session tickets on, no shared session cache).
    """
    values = _common(prefix, nofile)
    conf = prefix / "nginx.conf"
    conf.write_text(
        _COMMON.format(**values)
        + _PROXY.format(
            port=port,
            upstream=upstream,
            buffering="off" if stream else "on",
            ssl=" ssl" if tls else "",
            tls=_TLS.format(cert=tls[0], key=tls[1]) if tls else "",
            **values,
        )
    )
    return conf


def command(nginx: str, conf: Path) -> list[str]:
    return [nginx, "-p", str(conf.parent), "-c", str(conf)]
