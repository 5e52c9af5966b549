"""The artifact store: dataset and checkpoint files under one root folder.

Every path is resolved and checked to stay inside the root. Writes stream into
`<root>/tmp/` while the sha256 is computed, and are renamed into place only when
complete, so an interrupted upload leaves nothing a download could serve.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from app.errors import NotFound, TooLarge

CHUNK = 1 << 20
STALE_TEMP_S = 24 * 3600
MARK_FILE = "artifact_store_mark"  # the mark the database holds too (app/sweep.py)


def job_folder(job_id: str) -> str:
    """Where a job's files live (checkpoints, and the exports cached beside them)."""
    return f"jobs/{job_id}"


class TempFile:
    """A file being written: size and sha256 grow with each chunk."""

    def __init__(self, path: Path, limit: int | None):
        self.path = path
        self.limit = limit
        self.size = 0
        self._hash = hashlib.sha256()
        self._handle: BinaryIO = path.open("wb")

    def write(self, chunk: bytes | memoryview) -> None:
        self.size += len(chunk)
        if self.limit is not None and self.size > self.limit:
            raise TooLarge(f"upload exceeds the limit of {self.limit:,} bytes")
        self._hash.update(chunk)
        self._handle.write(chunk)

    def copy_from(self, source: BinaryIO) -> None:
        while chunk := source.read(CHUNK):
            self.write(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()

    def discard(self) -> None:
        """Close and remove without syncing: nothing will read it (a sync of a big
        abandoned upload would stall the caller for seconds)."""
        self._handle.close()
        self.path.unlink(missing_ok=True)


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = root.expanduser().resolve()
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, relative: str) -> Path:
        """The absolute path of a stored artifact; NotFound for anything outside the root."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root) or path.is_relative_to(self.tmp) or path == self.root:
            raise NotFound("no such artifact")
        return path

    @contextlib.contextmanager
    def writing(self, limit: int | None = None) -> Iterator[TempFile]:
        """A temp file that is removed unless `commit()` moved it into place."""
        temp = TempFile(self.tmp / f"{uuid.uuid4().hex}.part", limit)
        try:
            yield temp
        finally:
            temp.discard()  # after commit() the temp name is gone already

    def commit(self, temp: TempFile, relative: str) -> Path:
        """Atomically move a complete temp file to `relative` (replacing any file there)."""
        temp.close()
        target = self.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp.path, target)
        return target

    def exists(self, relative: str) -> bool:
        try:
            return self.path(relative).is_file()
        except NotFound:
            return False

    def bytes_with_exports(self, relative: str) -> int:
        """The file's size plus the exports cached beside it (0 if it is gone)."""
        try:
            path = self.path(relative)
        except NotFound:
            return 0
        total = 0
        for stored in (path, *cached_beside(path)):
            with contextlib.suppress(FileNotFoundError):
                total += stored.stat().st_size
        return total

    def delete(self, relative: str) -> None:
        with contextlib.suppress(NotFound, FileNotFoundError):
            path = self.path(relative)
            path.unlink()
            # exports cached next to weights go with them
            for cached in cached_beside(path):
                cached.unlink(missing_ok=True)

    def delete_tree(self, relative: str) -> None:
        with contextlib.suppress(NotFound):
            shutil.rmtree(self.path(relative), ignore_errors=True)

    @property
    def mark_path(self) -> Path:
        return self.root / MARK_FILE

    def read_mark(self) -> str | None:
        try:
            return self.mark_path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def claim_mark(self, mark: str) -> str:
        """Write `mark` unless the root holds one; returns the root's mark either way.
        Written under a temp name and linked into place: two writers agree on the first."""
        tmp = self.tmp / f"mark.{uuid.uuid4().hex}"
        tmp.write_text(mark + "\n")
        try:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self.mark_path)
        finally:
            tmp.unlink(missing_ok=True)
        return self.read_mark() or mark

    def sweep_temp(self, older_than_s: float = STALE_TEMP_S) -> int:
        """Remove temp files left by uploads that died; young ones may still be in flight."""
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self.tmp.glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed


def cached_beside(path: Path) -> list[Path]:
    """Exports cached next to a weights file (`<stem>.pt2`, `<stem>.onnx`, ...), not the file."""
    return [p for p in path.parent.glob(f"{path.stem}.*") if p != path]


def owner_stem(name: str) -> str:
    """The weights file a name in a checkpoint folder belongs to, by its stem: `best-3-ab.pt2`
    and `best-3-ab.safetensors` both belong to `best-3-ab`. Temp files start with a dot."""
    return name.split(".", 1)[0]
