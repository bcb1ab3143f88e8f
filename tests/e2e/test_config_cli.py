"""``python -m trioproxy --check-config``: the real process on good and bad configurations,
its exit codes and its exact lines, and which layer wins.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "example.toml"


def trioproxy(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m trioproxy *args`` in ``cwd``, with no TRIOPROXY_* variable but ``env``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TRIOPROXY_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "trioproxy", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


@pytest.fixture
def example(tmp_path: Path) -> Path:
    shutil.copy(EXAMPLE, tmp_path / "trioproxy.toml")
    (tmp_path / "ca.pem").write_text("")
    # The body transform it names (python -m puts the working directory on sys.path).
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "transforms.py").write_text(
        "def add_tenant(body: bytes, content_type: str) -> bytes:\n    return body\n"
    )
    return tmp_path


def test_a_good_file(example: Path) -> None:
    result = trioproxy(example, "--check-config", "--config", "trioproxy.toml")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "config OK: 2 routes, 1 upstream groups, 2 servers\n"


def test_a_file_named_by_the_environment(example: Path) -> None:
    result = trioproxy(example, "--check-config", env={"TRIOPROXY_CONFIG": "trioproxy.toml"})
    assert result.stdout == "config OK: 2 routes, 1 upstream groups, 2 servers\n"


def test_a_bad_file_lists_every_error_and_exits_2(example: Path) -> None:
    text = (example / "trioproxy.toml").read_text()
    text = text.replace('strip_prefix = "/users"', 'strip_prefix = "users"')
    text = text.replace('upstream = "api"', 'upstream = "apii"')
    text = text.replace("rise = 2", "rise = 0")
    text = text.replace("[routes.ping]", "[routes.ping]\ntimeout = 3")
    (example / "trioproxy.toml").write_text(text)
    result = trioproxy(
        example, "--check-config", "--config", "trioproxy.toml", env={"TRIOPROXY_PORT": "70000"}
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        'trioproxy.toml: routes.ping.timeout: unknown key (did you mean "timeouts"?)',
        'environment TRIOPROXY_PORT: must be 0..65535, got "70000"',
        "trioproxy.toml: upstreams.api.health.rise: must be a whole number >= 1, got 0",
        'trioproxy.toml: routes.users.rewrite.strip_prefix: must start with "/", got "users"',
        'trioproxy.toml: routes.users.upstream: no upstream group "apii" (did you mean "api"?) '
        "(defined: api)",
    ]


def test_a_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "t.toml").write_text('[server]\nport = "8080\n')
    result = trioproxy(tmp_path, "--check-config", "--config", "t.toml")
    assert result.returncode == 2
    assert result.stderr == "t.toml: line 2, column 13: illegal character '\\n'\n"


@pytest.mark.parametrize(
    ("dotenv", "env", "args", "expected"),
    [
        ("TRIOPROXY_PORT=99999", {}, [], '.env TRIOPROXY_PORT: must be 0..65535, got "99999"'),
        ("TRIOPROXY_PORT=99999", {"TRIOPROXY_PORT": "1"}, [], None),
        ("TRIOPROXY_PORT=1", {"TRIOPROXY_PORT": "x"}, [],
         'environment TRIOPROXY_PORT: must be 0..65535, got "x"'),
        ("", {"TRIOPROXY_PORT": "x"}, ["--port", "2"], None),
        ("TRIOPROXY_PORT=1", {}, ["--port", "-2"], '--port: must be 0..65535, got "-2"'),
    ],
    ids=["dotenv", "env-over-dotenv", "env-bad", "flag-over-env", "flag-bad"],
)  # fmt: skip
def test_which_layer_wins(
    tmp_path: Path, dotenv: str, env: dict[str, str], args: list[str], expected: str | None
) -> None:
    (tmp_path / ".env").write_text(dotenv + "\nTRIOPROXY_UPSTREAM=http://127.0.0.1:1\n")
    result = trioproxy(tmp_path, "--check-config", *args, env=env)
    if expected is None:
        assert (result.returncode, result.stderr) == (0, "")
        assert result.stdout == "config OK: 1 routes, 1 upstream groups, 1 servers\n"
    else:
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr.splitlines() == [expected]


def test_trioproxy_upstream_and_backend_url(tmp_path: Path) -> None:
    result = trioproxy(
        tmp_path,
        "--check-config",
        env={"TRIOPROXY_UPSTREAM": "http://127.0.0.1:1 http://127.0.0.1:2,weight=2"},
    )
    assert result.stdout == "config OK: 1 routes, 1 upstream groups, 2 servers\n"
    result = trioproxy(
        tmp_path, "--check-config", "--backend-url", "http://a:1", "--backend-url", "http://b:1"
    )
    assert result.stdout == "config OK: 1 routes, 1 upstream groups, 2 servers\n"
    result = trioproxy(tmp_path, "--check-config", "--backend-url", "ftp://a")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "--backend-url: 'ftp://a': scheme must be http or https\n"


def test_env_file(tmp_path: Path) -> None:
    (tmp_path / "prod.env").write_text("TRIOPROXY_UPSTREAM=http://a:1\nTRIOPROXY_GRACE=soon\n")
    result = trioproxy(tmp_path, "--check-config", "--env-file", "prod.env")
    assert result.stderr.splitlines() == [
        'prod.env TRIOPROXY_GRACE: must be a duration (seconds, or like "250ms", "2s", "5m", '
        '"1h"), got "soon"'
    ]
    result = trioproxy(tmp_path, "--check-config", "--env-file", "none.env")
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (
        '--env-file: cannot read "none.env": No such file or directory'
    )


def test_upstream_with_file_routes(example: Path) -> None:
    result = trioproxy(
        example, "--check-config", "--config", "trioproxy.toml", "--upstream", "http://a:1"
    )
    assert result.returncode == 2
    assert result.stderr == (
        "--upstream: cannot be combined with the routes of trioproxy.toml "
        "(routes.users, routes.ping); give the servers in an [upstreams.NAME] table there\n"
    )


def test_help_shows_the_new_flags_and_the_layers(tmp_path: Path) -> None:
    result = trioproxy(tmp_path, "--help")
    assert result.returncode == 0
    for flag in ("--config", "--env-file", "--check-config", "--watch", "--backend-url"):
        assert flag in result.stdout
    assert "reload on file change" in result.stdout
    assert "TRIOPROXY_UPSTREAM" in result.stdout
    assert "(default: 8080)" in result.stdout


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_every_example_config_passes_check_config(path: Path, tmp_path: Path) -> None:
    result = trioproxy(tmp_path, "--check-config", "--config", str(path))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("config OK: ")


def test_the_examples_are_there() -> None:
    assert {path.name for path in EXAMPLES} >= {
        "rest-api.toml",
        "llm-openai.toml",
        "websocket-app.toml",
    }
