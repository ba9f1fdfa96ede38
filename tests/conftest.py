"""Shared pytest setup: the ``--update-golden`` flag and the ``golden`` fixture; ``qgraph_home``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qgraph.devtools.golden import compare_or_update

pytest_plugins = ["pytester"]

GOLDEN_DIR = Path(__file__).parent / "golden"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite golden graph files instead of comparing")


class Golden:
    """Compare a graph with ``tests/golden/<rel>``, or rewrite it under --update-golden."""

    def __init__(self, update: bool, root: Path) -> None:
        self.update = update
        self.root = root

    def path(self, rel: str) -> Path:
        return self.root / rel

    def check(self, graph: Any, rel: str) -> None:
        compare_or_update(graph, self.root / rel, update=self.update)


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Golden:
    return Golden(bool(request.config.getoption("--update-golden")), GOLDEN_DIR)


@pytest.fixture
def qgraph_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty QGRAPH_HOME of this test's own (it does not exist until something is cached), with the hub offline."""
    monkeypatch.setenv("QGRAPH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "home"
