"""The contenders: what each one is, what it needs, and the command that starts it.

Every contender is one process tree started on the proxy core (``taskset -c 1``) in front
of a back end that runs on the load core:

``direct``
    no proxy: a fresh instance of the scenario's back end itself, on the proxy core.
    It is the floor every proxy is compared with.
``nginx``
    nginx as a reverse proxy, one worker, upstream keep-alive on.
``fastapi-reverse-proxy``
    its README's app (one shared httpx client) under uvicorn, one process.
``velithon``
    its gateway's ``forward_to`` endpoint under ``velithon run --workers 1`` (granian:
    a supervisor and one worker process; both are counted), with ``--backpressure
    16384`` (granian's default lets 1024 connections in at once).
``trioproxy``, ``trioproxy-h11``
    ``python -m trioproxy --http auto`` (httptools when installed) and ``--http h11``,
    with ``--max-connections-per-upstream 4096`` so that 1000 event streams can each
    hold an upstream connection (the default cap is 256).
``trioproxy-50routes``
    ``trioproxy`` with ``--config`` instead of ``--upstream``: a gateway config of 50
    routes (``bench/gateway.py``), written into the measurement's directory. The
    scenario's paths are requested under ``/shop``, where the measured route serves
    them (rewritten to the back end's ``/v1/``). It joins only the scenarios made
    for it (``routes-64``, the smoke run's ``smoke-routes-16``).
``nginx-tls``, ``trioproxy-tls``
    ``nginx`` and ``trioproxy`` terminating TLS (``ssl`` on the listener;
    ``--certfile``/``--keyfile``) with the same certificate (a trustme CA's
    ECDSA P-256 leaf for 127.0.0.1, written into the measurement's directory);
    their back end is plain http. They join only the TLS scenarios.
``trioproxy-nometrics``
    ``trioproxy`` with ``--no-metrics``: no Prometheus metrics and no LLM stream meter
    (``trioproxy`` has both, as by default). ``trioproxy / trioproxy-nometrics`` is
    their cost (issue 14: >= 0.90 of small-GET req/s, <= 1 ms added to the p99 of an
    LLM token stream's events). It joins ``get-small-16``, ``get-small-64``,
    ``sse-llm-1000`` and ``sse-llm-100`` only.
``trioproxy-asgi``
    the ASGI front end, ``hypercorn --worker-class trio trioproxy.asgi:app`` in one
    process, configured as ``trioproxy`` (a TOML file: the back end as the group
    ``default``, 4096 upstream connections, log level warning).
``fastapi-trioproxy``
    the ``fastapi-reverse-proxy`` contender's app with only its import changed
    (``trioproxy.asgi``), on hypercorn's trio worker in one process.
    Both join only the ASGI front end's scenarios.
``trioproxy-baseline``
    ``trioproxy`` run from another source tree (``--baseline-src DIR``), in the same
    run: ``trioproxy / trioproxy-baseline`` is what the commits between them changed.

Access logs are off everywhere (trioproxy runs at ``--log-level warning``), so that no
contender pays for writing a line per request.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import attrs

from bench import gateway as gateway_config
from bench import nginx
from bench.env import BENCH_DIR, PEERS_DIR, Tools

REPO_DIR = BENCH_DIR.parent


@attrs.frozen
class Launch:
    argv: list[str]
    env: dict[str, str] = attrs.field(factory=dict)
    cwd: Path | None = None


@attrs.frozen
class Site:
    """Where a contender runs and what it sits in front of."""

    tools: Tools
    #: The back end kind: ``http`` (nginx), ``pyhttp`` (bench.servers http), ``sse``, ``ws``.
    backend: str
    #: ``HOST:PORT`` of the running back end.
    upstream: str
    port: int
    prefix: Path
    nofile: int
    #: The source tree trioproxy runs from (its root, holding ``trioproxy/``).
    trioproxy_src: Path = REPO_DIR
    #: The source tree ``trioproxy-baseline`` runs from (``--baseline-src``).
    baseline_src: Path | None = None


@attrs.frozen
class Contender:
    name: str
    needs: frozenset[str]
    launch: Callable[[Site], Launch]
    #: What to say when it refuses a WebSocket upgrade; ``None`` for a contender that
    #: proxies WebSocket, whose refusal is then a failure, not "n/a".
    no_websocket: str | None = "upgrade refused"
    #: Prepended to every path a scenario requests through it (``/shop`` for the
    #: 50-route config, whose measured route serves the back end's paths there).
    mount: str = ""
    #: The only scenarios it joins; ``None``: every one.
    scenarios: frozenset[str] | None = None
    #: ``https``: it terminates TLS (clients speak TLS to it; its back end is plain).
    scheme: str = "http"


def _direct(site: Site) -> Launch:
    if site.backend == "http":
        assert site.tools.nginx is not None
        conf = nginx.write_backend(site.prefix, site.port, site.nofile)
        return Launch(nginx.command(site.tools.nginx, conf))
    kind = "http" if site.backend == "pyhttp" else site.backend
    return Launch(
        [sys.executable, "-m", "bench.servers", kind, "--port", str(site.port)], cwd=REPO_DIR
    )


def _nginx(site: Site) -> Launch:
    assert site.tools.nginx is not None
    conf = nginx.write_proxy(
        site.prefix, site.port, site.upstream, site.nofile, stream=site.backend == "sse"
    )
    return Launch(nginx.command(site.tools.nginx, conf))


def tls_pair(directory: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 from a throwaway trustme CA (its default key type,
    ECDSA P-256) and its key, written into ``directory``; the same kind for every
    TLS contender."""
    import trustme

    cert, key = directory / "site.pem", directory / "site.key"
    leaf = trustme.CA().issue_cert("127.0.0.1", "localhost")
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    for extra in leaf.cert_chain_pems[1:]:
        extra.write_to_path(str(cert), append=True)
    return str(cert), str(key)


def _nginx_tls(site: Site) -> Launch:
    assert site.tools.nginx is not None
    conf = nginx.write_proxy(
        site.prefix,
        site.port,
        site.upstream,
        site.nofile,
        stream=site.backend == "sse",
        tls=tls_pair(site.prefix),
    )
    return Launch(nginx.command(site.tools.nginx, conf))


def _fastapi(site: Site) -> Launch:
    assert site.tools.peers_python is not None
    return Launch(
        [
            site.tools.peers_python,
            "-m",
            "uvicorn",
            "fastapi_app:app",
            "--app-dir",
            str(PEERS_DIR),
            "--host",
            "127.0.0.1",
            "--port",
            str(site.port),
            "--no-access-log",
            "--log-level",
            "warning",
            # uvicorn closes idle keep-alive connections after 5 s by default; the idle
            # scenario holds them longer, as every other contender does by default.
            "--timeout-keep-alive",
            "300",
            "--backlog",
            "4096",
        ],
        env={"BENCH_UPSTREAM": f"http://{site.upstream}"},
    )


def _velithon(site: Site) -> Launch:
    assert site.tools.peers_python is not None
    velithon = str(Path(site.tools.peers_python).parent / "velithon")
    return Launch(
        [
            velithon,
            "run",
            "--app",
            "velithon_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(site.port),
            "--workers",
            "1",
            "--log-level",
            "WARNING",
            # granian serves at most backlog/workers = 1024 connections at once by
            # default; raised like trioproxy's upstream cap, for the 10k idle scenario.
            "--backpressure",
            "16384",
        ],
        env={"BENCH_UPSTREAM": f"http://{site.upstream}"},
        cwd=PEERS_DIR,
    )


def _trioproxy(
    http: str,
    *,
    gateway: bool = False,
    baseline: bool = False,
    tls: bool = False,
    metrics: bool = True,
) -> Callable[[Site], Launch]:
    def launch(site: Site) -> Launch:
        if gateway:
            # Every route's group is the scenario's back end: nothing else differs.
            upstream = ["--config", str(gateway_config.write_config(site.prefix, site.upstream))]
        else:
            upstream = ["--upstream", f"http://{site.upstream}"]
        if tls:
            cert, key = tls_pair(site.prefix)
            upstream += ["--certfile", cert, "--keyfile", key]
        src = site.trioproxy_src
        if baseline:
            assert site.baseline_src is not None, "trioproxy-baseline needs --baseline-src"
            src = site.baseline_src
        return Launch(
            [
                sys.executable,
                "-m",
                "trioproxy",
                *upstream,
                "--port",
                str(site.port),
                "--http",
                http,
                "--log-level",
                "warning",
                # Its default cap (256 upstream connections) would queue SSE streams
                # 257 and up; nginx has no cap, and the peers' caps are their defaults.
                "--max-connections-per-upstream",
                "4096",
                *([] if metrics else ["--no-metrics"]),
            ],
            # ``python -m`` puts the working directory first on sys.path.
            cwd=src,
        )

    return launch


#: The scenarios of TLS termination (the ``-tls`` contenders join only these).
TLS_SCENARIOS = frozenset({"tls-small-64", "tls-handshake-16"})


def _hypercorn(site: Site, app: str) -> list[str]:
    """hypercorn's trio worker serving ``app`` in the contender's own process (no
    worker child), with the keep-alive and backlog limits raised as for uvicorn."""
    return [
        sys.executable,
        "-m",
        "hypercorn",
        "--worker-class",
        "trio",
        "--workers",
        "0",
        "--bind",
        f"127.0.0.1:{site.port}",
        "--keep-alive",
        "300",
        "--backlog",
        "4096",
        "--log-level",
        "warning",
        app,
    ]


def _trioproxy_asgi(site: Site) -> Launch:
    # The same settings as the ``trioproxy`` contender, as a file (the group's
    # connection cap has no environment variable).
    config = site.prefix / "trioproxy-asgi.toml"
    config.write_text(
        '[server]\nlog_level = "warning"\n\n'
        f'[upstreams.default]\nservers = ["http://{site.upstream}"]\n'
        "pool = { max_connections = 4096 }\n"
    )
    return Launch(
        _hypercorn(site, "trioproxy.asgi:app"),
        env={"TRIOPROXY_CONFIG": str(config)},
        cwd=site.trioproxy_src,
    )


def _fastapi_trioproxy(site: Site) -> Launch:
    return Launch(
        _hypercorn(site, "fastapi_trioproxy_app:app"),
        env={"BENCH_UPSTREAM": f"http://{site.upstream}", "PYTHONPATH": str(site.trioproxy_src)},
        cwd=PEERS_DIR,
    )


#: The scenarios of the ASGI front end (``bench/scenarios.py``), the only ones its
#: contenders join.
ASGI_SCENARIOS = frozenset({"asgi-get-64", "asgi-download-1m", "asgi-h2-64"})


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("direct", frozenset(), _direct),
        Contender("nginx", frozenset({"nginx"}), _nginx),
        Contender(
            "fastapi-reverse-proxy",
            frozenset({"peers"}),
            _fastapi,
        ),
        Contender(
            "velithon",
            frozenset({"peers"}),
            _velithon,
            no_websocket="its gateway forwards plain HTTP only",
        ),
        Contender("trioproxy", frozenset(), _trioproxy("auto"), no_websocket=None),
        Contender("trioproxy-h11", frozenset(), _trioproxy("h11"), no_websocket=None),
        Contender(
            "trioproxy-50routes",
            frozenset(),
            _trioproxy("auto", gateway=True),
            no_websocket=None,
            mount=gateway_config.MOUNT,
            scenarios=frozenset({"routes-64", "smoke-routes-16"}),
        ),
        Contender(
            "trioproxy-nometrics",
            frozenset(),
            _trioproxy("auto", metrics=False),
            no_websocket=None,
            scenarios=frozenset({"get-small-16", "get-small-64", "sse-llm-1000", "sse-llm-100"}),
        ),
        Contender(
            "trioproxy-asgi",
            frozenset(),
            _trioproxy_asgi,
            no_websocket=None,
            scenarios=ASGI_SCENARIOS,
        ),
        Contender(
            "fastapi-trioproxy",
            frozenset(),
            _fastapi_trioproxy,
            no_websocket=None,
            scenarios=ASGI_SCENARIOS,
        ),
        Contender(
            "trioproxy-baseline",
            frozenset(),
            _trioproxy("auto", baseline=True),
            no_websocket=None,
        ),
        Contender(
            "nginx-tls",
            frozenset({"nginx"}),
            _nginx_tls,
            scenarios=TLS_SCENARIOS,
            scheme="https",
        ),
        Contender(
            "trioproxy-tls",
            frozenset(),
            _trioproxy("auto", tls=True),
            no_websocket=None,
            scenarios=TLS_SCENARIOS,
            scheme="https",
        ),
    )
}

#: The contenders every ratio is taken for, and the ones they are taken against.
OURS = (
    "trioproxy",
    "trioproxy-h11",
    "trioproxy-50routes",
    "trioproxy-tls",
    "trioproxy-asgi",
    "fastapi-trioproxy",
)
PEERS = (
    "nginx",
    "fastapi-reverse-proxy",
    "velithon",
    "direct",
    "trioproxy-baseline",
    "nginx-tls",
    "trioproxy-nometrics",
)
