"""Downloads land whole or not at all: written to a temp name beside the target, then renamed."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_target(out: Path) -> Iterator[Path]:
    """A temp path in `out`'s folder (suffix kept) that replaces `out` on a clean exit.

    The engine has the same helper (worker/engine/files.py); the client keeps its own
    so that it installs without the engine.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
