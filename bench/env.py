"""What a run needs from the machine, where it is, and how to get what is missing.

The project's virtualenv runs the bench, trioproxy and the bench's own servers and
clients. nginx and wrk come from Debian. The Python peers (and matplotlib, for the
chart) live in their own virtualenv, ``bench/.venv-peers``, that ``--install-peers``
creates with ``python -m venv`` + pip: nothing of theirs enters the project's runtime
dependencies, and their dependency pins cannot clash with the project's.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import attrs

BENCH_DIR = Path(__file__).resolve().parent
PEERS_VENV = BENCH_DIR / ".venv-peers"
PEERS_DIR = BENCH_DIR / "peers"

#: What the peers' virtualenv holds. The two peers are pinned to the versions the bench
#: was written against (velithon: ``forward_to`` works in 0.6.10, ``Gateway.add_route``
#: does not); uvicorn[standard] is how FastAPI apps are usually served (uvloop, httptools).
PEER_REQUIREMENTS = (
    "fastapi-reverse-proxy==0.4.0",
    "uvicorn[standard]>=0.30",
    "velithon==0.6.10",
    "matplotlib>=3.8",
)
PEER_MODULES = ("fastapi_reverse_proxy", "uvicorn", "velithon")
PEER_DISTRIBUTIONS = (
    "fastapi-reverse-proxy",
    "fastapi",
    "httpx",
    "uvicorn",
    "uvloop",
    "httptools",
    "velithon",
    "granian",
    "matplotlib",
)

HOW_TO = {
    "nginx": "apt-get install nginx   (Debian/Ubuntu; any nginx >= 1.15.3 in PATH will do)",
    "wrk": "apt-get install wrk",
    "h2load": "apt-get install nghttp2-client   (h2load, for the HTTP/2 scenario)",
    "taskset": "apt-get install util-linux",
    "peers": "python -m bench --install-peers   (creates bench/.venv-peers with pip)",
    "matplotlib": "python -m bench --install-peers   (matplotlib goes into bench/.venv-peers)",
}


@attrs.frozen
class Tools:
    nginx: str | None
    wrk: str | None
    peers_python: str | None
    peers_matplotlib: bool
    versions: dict[str, str]
    h2load: str | None = None

    def missing(self, needs: set[str]) -> list[str]:
        have = {
            "nginx": self.nginx is not None,
            "wrk": self.wrk is not None,
            "h2load": self.h2load is not None,
            "taskset": shutil.which("taskset") is not None,
            "peers": self.peers_python is not None,
            "matplotlib": self.peers_matplotlib,
        }
        return sorted(need for need in needs if not have.get(need, False))


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.exists()), None
    )


def _command_version(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (proc.stdout + proc.stderr).strip().splitlines()[0] if proc.stdout + proc.stderr else "?"


def _peer_versions(python: str) -> dict[str, str] | None:
    """Versions of the peers' distributions, or None if their modules do not import."""
    script = (
        "import importlib, importlib.metadata as m, json, sys\n"
        f"for mod in {PEER_MODULES!r}: importlib.import_module(mod)\n"
        "out = {}\n"
        f"for d in {PEER_DISTRIBUTIONS!r}:\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    try:
        proc = subprocess.run(
            [python, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    versions: dict[str, str] = json.loads(proc.stdout)
    return versions


def discover() -> Tools:
    nginx = _which("nginx")
    wrk = _which("wrk")
    h2load = _which("h2load")
    versions = {"python": sys.version.split()[0]}
    for dist in (
        "trioproxy", "trio", "h11", "httptools", "trio-websocket", "wsproto", "hypercorn",
        "starlette", "fastapi", "h2",
    ):  # fmt: skip
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    if nginx:  # "nginx version: nginx/1.22.1"
        versions["nginx"] = _command_version([nginx, "-v"]).rpartition("/")[2]
    if wrk:  # "wrk debian/4.1.0-3+b2 [epoll] Copyright ..."
        versions["wrk"] = _command_version([wrk, "--version"]).split(" [")[0].removeprefix("wrk ")
    if h2load:  # "h2load nghttp2/1.52.0"
        versions["h2load"] = _command_version([h2load, "--version"]).rpartition("/")[2]
    peers_python: str | None = None
    matplotlib = False
    python = PEERS_VENV / "bin" / "python"
    if python.exists():
        peer_versions = _peer_versions(str(python))
        if peer_versions is not None:
            peers_python = str(python)
            versions.update(peer_versions)
            matplotlib = "matplotlib" in peer_versions
    return Tools(
        nginx=nginx,
        wrk=wrk,
        peers_python=peers_python,
        peers_matplotlib=matplotlib,
        versions=versions,
        h2load=h2load,
    )


def install_peers() -> None:
    """Create ``bench/.venv-peers`` (if needed) and pip-install the peers into it.

    Raises:
        subprocess.CalledProcessError: venv or pip failed (their output is on stderr).
    """
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {PEERS_VENV}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    print(f"installing {' '.join(PEER_REQUIREMENTS)}", file=sys.stderr)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            *PEER_REQUIREMENTS,
        ],
        check=True,
    )
