"""Write a file so readers see the old one or the whole new one, never half of it.

Write to a temp name in the same folder (so the rename stays on one filesystem),
then `os.replace` it over the target, which is atomic on POSIX and Windows. A
crash or an exception while writing leaves the target as it was and removes
the temp file.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path`; on a clean exit move it over `path`.

    The temp name keeps the target's suffix (torch.export insists on `.pt2`) and
    is unique, so two writers of one target never share a temp file; the last
    rename wins. `fsync=True` flushes the file to disk before the rename, for
    files that must survive a power cut and not only a crashed process.
    """
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        yield tmp
        if fsync:
            with tmp.open("rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
