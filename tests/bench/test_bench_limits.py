"""``bench/limits.py`` must not rot: each of its configs is one the proxy accepts, with
the limits it says it has."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fixtures import REPO_ROOT

from trioproxy.config.load import ConfigSources, load_config

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import limits

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize("name", list(limits.CONFIGS))
def test_each_config_loads(name: str, tmp_path: Path) -> None:
    text = limits.config_text("127.0.0.1:9", "redis://127.0.0.1:6379/0", limits.CONFIGS[name])
    (tmp_path / "c.toml").write_text(text)
    config = load_config(ConfigSources(config_file="c.toml", cwd=str(tmp_path)))
    (route,) = config.routes
    expected = {"plain": 0, "memory": 1, "memory-3": 3, "inflight": 0, "redis": 1}[name]
    assert len(route.rate_limit) == expected
    assert (route.max_inflight is not None) == (name == "inflight")
    assert all((spec.store == "redis") == (name == "redis") for spec in route.rate_limit)
