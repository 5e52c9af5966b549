"""Shared fixtures: real datasets written to disk once per session; the machine's share
of each test when pytest-xdist runs two test processes."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def examples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of examples/ with its data written by the examples' own scripts."""
    from examples.make_digits import write_digits
    from examples.make_tabular import write_tabular

    out = tmp_path_factory.mktemp("examples")
    for spec in EXAMPLES.glob("*.json"):
        shutil.copy(spec, out / spec.name)
    write_digits(out / "data")
    write_tabular(out / "data")
    return out


@pytest.fixture
def load_example(examples_dir: Path):
    """Return (spec dict, resolver) for an example, for tweaking in a test."""

    def load(name: str) -> tuple[dict, object]:
        doc = json.loads((examples_dir / name).read_text())

        def resolve(ref: str) -> Path:
            path = Path(ref)
            return path if path.is_absolute() else examples_dir / path

        return doc, resolve

    return load


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Iterator[None]:
    """Under pytest-xdist, a test marked `exclusive` (it asserts wall-clock bounds, such
    as a stop within 5 s) has the machine to itself: it waits for the other test process
    to end its current test, which waits in turn. Held from setup to teardown, so module
    fixtures (a service stack starting) fall inside too. Without xdist: nothing."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        yield
        return
    exclusive = item.get_closest_marker("exclusive") is not None
    with open(Path(tempfile.gettempdir()) / f"torchyard-tests-{run}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
