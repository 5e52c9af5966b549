"""Shared fixtures: real datasets written to disk once per session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
