"""A spec as the service takes it: its local dataset files found, hashed and swapped for ids.

The same spec file runs locally (`torchyard train`, dataset paths relative to the
spec's folder) and on the service (dataset ids). A client holding a spec of local
paths finds each file here, the service is asked for one of the same bytes
(sha256), and what it lacks is uploaded; the document sent names the ids. The
user's file is never written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchyard.errors import Issue, LocalSpecError

SpecSource = Mapping[str, Any] | str | os.PathLike[str]  # a document, or its file

# The service's dataset ids (app/ids.py): 20 hex characters. Anything else in
# data.train / data.validation is a file on this machine.
_DATASET_ID = re.compile(r"[0-9a-f]{20}")
# Suffix -> the format the engine reads it as (worker/engine/data.py FORMATS).
FORMATS = {".npz": "npz", ".npy": "npy", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class LocalDataset:
    """A dataset file a spec names, as found on this machine."""

    json_path: str  # where the spec names it: data.train, data.validation
    ref: str  # as written in the spec
    file: Path  # resolved (relative refs: against the spec file's folder)
    format: str  # npz, npy, csv, parquet
    sha256: str
    size: int

    @property
    def upload_name(self) -> str:
        # the service knows a format by its canonical suffix (.pq is sent as .parquet)
        return f"{self.file.stem}.{self.format}"


def is_dataset_id(ref: str) -> bool:
    return bool(_DATASET_ID.fullmatch(ref))


def load(spec: SpecSource) -> tuple[dict[str, Any], Path]:
    """(a copy of the spec document, the folder its relative dataset paths are read from).

    A mapping is copied and its paths are relative to the working directory; a file's
    are relative to the file's folder, as `torchyard train` reads them.
    """
    if isinstance(spec, Mapping):
        return copy.deepcopy(dict(spec)), Path.cwd()
    path = Path(spec)
    try:
        document = json.loads(path.read_bytes())
    except OSError as exc:
        raise LocalSpecError([Issue("", f"cannot read {path}: {exc.strerror}")]) from None
    except ValueError as exc:
        raise LocalSpecError([Issue("", f"{path}: malformed JSON: {exc}")]) from None
    if not isinstance(document, dict):
        raise LocalSpecError([Issue("", f"{path}: a spec is a JSON object")])
    return document, path.resolve().parent


def dataset_refs(document: Mapping[str, Any]) -> dict[str, str]:
    """JSON path -> reference, for each dataset the spec names (a split names none).

    A malformed document gives what it has; the service says what is wrong with it.
    """
    data = document.get("data")
    if not isinstance(data, Mapping):
        return {}
    return {
        f"data.{key}": data[key]
        for key in ("train", "validation")
        if isinstance(data.get(key), str) and data[key]
    }


def local_datasets(document: Mapping[str, Any], base: Path) -> list[LocalDataset]:
    """The spec's dataset files on this machine, hashed; ids are left alone.

    Raises LocalSpecError naming each reference that is neither a dataset id nor a
    readable dataset file.
    """
    found: list[LocalDataset] = []
    issues: list[Issue] = []
    hashed: dict[Path, tuple[str, int]] = {}  # one file named twice is read once
    for json_path, ref in dataset_refs(document).items():
        if is_dataset_id(ref):
            continue
        file = Path(ref).expanduser()
        file = file if file.is_absolute() else base / file
        fmt = FORMATS.get(file.suffix.lower())
        if fmt is None:
            issues.append(
                Issue(
                    json_path,
                    f"{ref!r} is neither a dataset id nor a dataset file ({', '.join(FORMATS)})",
                )
            )
            continue
        if not file.is_file():
            issues.append(Issue(json_path, f"no such file {ref!r} (looked at {file})"))
            continue
        try:
            if file not in hashed:
                hashed[file] = (sha256_of(file), file.stat().st_size)
        except OSError as exc:
            issues.append(Issue(json_path, f"cannot read {file}: {exc.strerror}"))
            continue
        digest, size = hashed[file]
        found.append(LocalDataset(json_path, ref, file, fmt, digest, size))
    if issues:
        raise LocalSpecError(issues)
    return found


def sha256_of(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def with_ids(document: Mapping[str, Any], ids: Mapping[str, str]) -> dict[str, Any]:
    """A copy of the document with the dataset at each JSON path (data.train...) set to an id."""
    out = copy.deepcopy(dict(document))
    for json_path, dataset_id in ids.items():
        out["data"][json_path.removeprefix("data.")] = dataset_id
    return out


def with_labels(
    document: Mapping[str, Any],
    *,
    project: str | None = None,
    tags: Iterable[str] | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """A copy of the document with its top-level `project`, `tags` and `note` set where given."""
    out = dict(document)
    if project is not None:
        out["project"] = project
    if tags is not None:
        out["tags"] = list(tags)
    if note is not None:
        out["note"] = note
    return out


def sources_header(datasets: Iterable[LocalDataset]) -> str | None:
    """The X-Dataset-Sources header: JSON path -> the file's absolute path, for the record.

    json.dumps escapes non-ASCII characters, so any path travels in a header.
    """
    sources = {d.json_path: d.file.as_posix() for d in datasets}
    return json.dumps(sources) if sources else None
