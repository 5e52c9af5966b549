"""Dataset files -> arrays (batches are in `worker.engine.batches`).

Formats: NPZ (named arrays), NPY (one array named "array", or one field per name
of a structured dtype), CSV and Parquet (one field per column; a Parquet
fixed-size list column is a field of shape (k,)). Nothing here unpickles: object
arrays are refused, so a dataset file can never run code.

Every problem with a file is a `DataError` of one line naming the file, the field
and what is wrong; a spec naming a field the file lacks is a `SpecError` with the
JSON path. Errors from numpy, zipfile and pyarrow never escape raw.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from worker.engine.errors import DataError, SpecError, SpecIssue, closest
from worker.engine.fields import FieldInfo
from worker.engine.spec import DataSpec

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq


class _OnFirstUse:
    """A module imported when first used: only CSV and Parquet files need pyarrow, and
    importing it costs a start-up about 0.1 s (`torchyard train` of an NPZ never does)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        import importlib

        return getattr(importlib.import_module(self._name), attr)


if not TYPE_CHECKING:
    pa, pc, pa_csv, pq = map(
        _OnFirstUse, ("pyarrow", "pyarrow.compute", "pyarrow.csv", "pyarrow.parquet")
    )

DEFAULT_MAX_BYTES = 8 * 2**30
DEFAULT_MAX_COLUMNS = 10_000
DEFAULT_MAX_MEMBERS = 10_000
DEFAULT_MAX_SCAN_BYTES = 256 * 2**20
# Describing reads data in pieces this size: its memory does not grow with the file.
SCAN_CHUNK = 4 * 2**20
# A CSV header is read whole before pyarrow sees the file: this much per allowed column.
HEADER_BYTES_PER_COLUMN = 1024
# A Parquet footer (schema and row-group index) is parsed whole by pyarrow.
MAX_PARQUET_FOOTER = 64 * 2**20
SCAN_ROWS = 65_536
CSV_BLOCK = 16 * 2**20
# zipfile reads an NPZ's index whole; numpy's entries take ~100 bytes.
ZIP_INDEX_BYTES_PER_MEMBER = 256
FORMATS = {".npz": "npz", ".npy": "npy", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
FORMAT_NAMES = {"npz": "NPZ", "npy": "NPY", "csv": "CSV", "parquet": "Parquet"}
PICKLE_REFUSED = "holds Python objects (pickle), which torchyard refuses"

# dtype name of a CSV/Parquet text column; anything that is not numeric is refused as a field.
TEXT = "str"


# ------------------------------------------------------------ describing


@dataclass(frozen=True)
class DatasetInfo:
    """What the service stores for an upload: format, row count, each field's shape and dtype.

    `rows` is None when the fields disagree (an NPZ holding both train and test arrays).
    """

    format: str
    rows: int | None
    fields: dict[str, FieldInfo]

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "rows": self.rows,
            "fields": {
                name: {"shape": list(f.shape), "dtype": f.dtype, "num_classes": f.num_classes}
                for name, f in self.fields.items()
            },
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> DatasetInfo:
        fields = {
            name: FieldInfo(tuple(f["shape"]), f["dtype"], f.get("num_classes"))
            for name, f in doc["fields"].items()
        }
        return cls(doc["format"], doc["rows"], fields)


@dataclass(frozen=True)
class ScanBounds:
    """How much work describing one upload may do, whatever the file claims.

    `max_columns` caps CSV/Parquet columns and NPY record fields, `max_members` the
    members of an NPZ; both are counted before pyarrow or zipfile parse a header or an
    index (a 400,000-member zip index alone takes seconds and hundreds of MB).
    `max_scan_bytes` is the integer data read to count classes, smallest fields first:
    a field past it is described without `num_classes`.
    """

    max_columns: int = DEFAULT_MAX_COLUMNS
    max_members: int = DEFAULT_MAX_MEMBERS
    max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES


# The zip end records' layout: zipfile's own (undocumented) constants.
_ZIP_LAYOUT: Any = zipfile


def describe(
    path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, bounds: ScanBounds | None = None
) -> DatasetInfo:
    """Every field of a dataset file with its per-sample shape, dtype and class count.

    Bounded work: counts are checked first (`ScanBounds`); data is read in chunks of
    `SCAN_CHUNK`, never a whole array or table (a CSV is read once in blocks).
    """
    path = Path(path)
    fmt = file_format(path)
    bounds = bounds or ScanBounds()
    with _file_errors(path, fmt), _open(path, fmt, max_bytes, bounds) as source:
        names = source.names()
        if fmt != "npz" and len(names) > bounds.max_columns:
            what = "record fields" if fmt == "npy" else "columns"
            raise DataError(
                f"{path.name}: has {len(names):,} {what}, over the limit of {bounds.max_columns:,}"
            )
        layouts = {name: source.layout(name) for name in names}
        classes = _count_classes(source, layouts, bounds.max_scan_bytes)
        rows = source.rows()
    fields = {
        name: FieldInfo(shape, dtype, classes.get(name)) for name, (shape, dtype) in layouts.items()
    }
    if not fields:
        raise DataError(f"{path.name}: holds no arrays or columns")
    if rows == 0:
        raise DataError(f"{path.name}: has no rows")
    return DatasetInfo(fmt, rows, fields)


def read_fields(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, FieldInfo]:
    return describe(path, max_bytes=max_bytes).fields


def file_format(path: Path) -> str:
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise DataError(
            f"{Path(path).name}: unsupported file type; expected one of {', '.join(FORMATS)}"
        )
    return fmt


def _field_info(source: _Source, name: str, *, with_classes: bool) -> FieldInfo:
    shape, dtype = source.layout(name)
    classes = None
    if with_classes and dtype.startswith(("int", "uint")):
        # A bad column the spec may never use must not fail the description; its
        # problem is reported when a spec loads it.
        with contextlib.suppress(DataError):
            classes = _num_classes(source.read(name))
    return FieldInfo(shape, dtype, classes)


def _num_classes(values: np.ndarray) -> int | None:
    if values.size == 0 or values.min() < 0:
        return None
    return int(values.max()) + 1


def _count_classes(
    source: _Scannable, layouts: dict[str, tuple[tuple[int, ...], str]], budget: int
) -> dict[str, int | None]:
    """max + 1 of each integer field whose data fits in what is left of `budget`.

    Smallest first: labels are usually the smallest integer field, and a big uint8
    image array must not use the budget up before them.
    """
    ints = [name for name, (_, dtype) in layouts.items() if dtype.startswith(("int", "uint"))]
    costs = {name: source.scan_cost(name) for name in ints}
    classes: dict[str, int | None] = {}
    for name in sorted(ints, key=costs.__getitem__):
        cost = costs[name]
        if cost > budget:
            break
        budget -= cost
        # A bad column the spec may never use must not fail the description; its
        # problem is reported when a spec loads it.
        with contextlib.suppress(DataError):
            classes[name] = _classes_of(source.int_range(name))
    return classes


def _classes_of(span: tuple[int, int] | None) -> int | None:
    if span is None or span[0] < 0:
        return None
    return span[1] + 1


def _widen(span: tuple[int, int] | None, lo: int, hi: int) -> tuple[int, int]:
    return (lo, hi) if span is None else (min(span[0], lo), max(span[1], hi))


class _ShortData(ValueError):
    """Array data that ends before its header's shape says it should."""


def _stream_range(
    fp: Any, dtype: np.dtype, nbytes: int, field: str | None = None
) -> tuple[int, int] | None:
    """Lowest and highest value of `nbytes` of raw array data read from `fp` in chunks."""
    step = max(1, SCAN_CHUNK // dtype.itemsize) * dtype.itemsize
    span: tuple[int, int] | None = None
    left = nbytes
    while left:
        chunk = fp.read(min(step, left))
        if not chunk or len(chunk) % dtype.itemsize:
            raise _ShortData("data is shorter than its header says")
        left -= len(chunk)
        values = np.frombuffer(chunk, dtype=dtype)
        if field is not None:
            values = values[field]
        if values.size:
            span = _widen(span, int(values.min()), int(values.max()))
    return span


# ------------------------------------------------------------- resolving


def resolve_fields(
    data: DataSpec, fields: dict[str, FieldInfo]
) -> tuple[dict[str, FieldInfo], dict[str, FieldInfo]]:
    """Model input and output names -> the FieldInfo the dataset gives each.

    A list of k columns is one field of shape (k,). Every problem is reported
    together in one SpecError, each with its JSON path.
    """
    issues: list[SpecIssue] = []
    inputs = _resolve_group("data.inputs", data.input_fields(), data.single_input, fields, issues)
    targets = _resolve_group(
        "data.targets", data.target_fields(), data.single_output, fields, issues
    )
    if issues:
        raise SpecError(issues)
    return inputs, targets


def _resolve_group(
    root: str,
    named: dict[str, str | list[str]],
    single: bool,
    fields: dict[str, FieldInfo],
    issues: list[SpecIssue],
) -> dict[str, FieldInfo]:
    out: dict[str, FieldInfo] = {}
    for model_name, ref in named.items():
        base = root if single else f"{root}.{model_name}"
        info = _resolve_ref(base, ref, fields, issues)
        if info is not None:
            out[model_name] = info
    return out


def _resolve_ref(
    path: str, ref: str | list[str], fields: dict[str, FieldInfo], issues: list[SpecIssue]
) -> FieldInfo | None:
    if isinstance(ref, str):
        problem = _field_problem(ref, fields)
        if problem:
            issues.append(SpecIssue(path, problem))
            return None
        return fields[ref]
    columns: list[FieldInfo] = []
    for i, name in enumerate(ref):
        problem = _field_problem(name, fields)
        if not problem and fields[name].shape != ():
            problem = (
                f"field '{name}' has shape {fields[name].shape} per row; "
                "a list of columns takes one number per row from each"
            )
        if problem:
            issues.append(SpecIssue(f"{path}[{i}]", problem))
        else:
            columns.append(fields[name])
    return _stacked_info(columns) if len(columns) == len(ref) else None


def _field_problem(name: str, fields: dict[str, FieldInfo]) -> str | None:
    info = fields.get(name)
    if info is None:
        return _no_field(name, list(fields))
    if not is_numeric(info.dtype):
        found = "text" if info.dtype == TEXT else f"{info.dtype} values"
        return f"field '{name}' holds {found}, not numbers"
    return None


def _no_field(name: str, available: list[str]) -> str:
    near = closest(name, available)
    hint = f"closest: {', '.join(near)}; " if near else ""
    shown = ", ".join(available[:20])
    if len(available) > 20:
        shown += f", ... ({len(available) - 20} more)"
    return f"dataset has no field '{name}' ({hint}fields: {shown or 'none'})"


def _stacked_info(columns: list[FieldInfo]) -> FieldInfo:
    dtypes = [np.dtype(c.dtype) for c in columns]
    if any(d.kind == "f" for d in dtypes):
        return FieldInfo((len(columns),), "float32")
    dtype = np.result_type(*dtypes)
    known = [c.num_classes for c in columns if c.num_classes is not None]
    classes = max(known) if dtype.kind in "iu" and len(known) == len(columns) else None
    return FieldInfo((len(columns),), dtype.name, classes)


def is_numeric(dtype: str) -> bool:
    """Booleans, integers and floats; not text, dates, objects or records."""
    try:
        return np.dtype(dtype).kind in "biuf"
    except TypeError:
        return False


# --------------------------------------------------------------- loading


@dataclass
class ArrayData:
    """One split held as numpy arrays, one row per sample, already in their final dtypes."""

    inputs: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def subset(self, index: np.ndarray) -> ArrayData:
        return ArrayData(
            {k: v[index] for k, v in self.inputs.items()},
            {k: v[index] for k, v in self.targets.items()},
        )

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.inputs.values(), *self.targets.values()))


def load_arrays(
    path: Path,
    data: DataSpec,
    *,
    input_dtypes: dict[str, str] | None = None,
    target_dtypes: dict[str, str] | None = None,
    target_shapes: dict[str, tuple[int, ...]] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ArrayData:
    """Load the fields the spec names: stack column lists, cast, reshape targets, check values.

    Default dtypes: inputs float32; targets float32 from floats, int64 from ints and bools.
    """
    path = Path(path)
    fmt = file_format(path)
    raw = _read_named_fields(path, fmt, data, max_bytes)
    resolve_fields(data, {name: _array_info(a) for name, a in raw.items()})
    _check_rows(path, raw)
    for name, values in raw.items():
        _check_finite(path, fmt, name, values)

    input_dtypes = input_dtypes or {}
    target_dtypes = target_dtypes or {}
    target_shapes = target_shapes or {}
    inputs = {
        name: _assemble(path, fmt, raw, ref, input_dtypes.get(name, "float32"))
        for name, ref in data.input_fields().items()
    }
    targets = {}
    for name, ref in data.target_fields().items():
        dtype = target_dtypes.get(name) or _default_target_dtype(raw, ref)
        values = _assemble(path, fmt, raw, ref, dtype)
        if name in target_shapes:
            values = _reshape_target(path, name, values, tuple(target_shapes[name]))
        targets[name] = values
    return ArrayData(inputs, targets)


def _read_named_fields(
    path: Path, fmt: str, data: DataSpec, max_bytes: int
) -> dict[str, np.ndarray]:
    needed = list(dict.fromkeys(_field_names(data)))
    with _file_errors(path, fmt), _open(path, fmt, max_bytes) as source:
        if source.rows() == 0:
            raise DataError(f"{path.name}: has no rows")
        available = set(source.names())
        if any(name not in available for name in needed):
            # Raises: reports every missing field with its JSON path.
            resolve_fields(
                data, {n: _field_info(source, n, with_classes=False) for n in source.names()}
            )
        raw = {name: source.read(name) for name in needed}
    if any(len(a) == 0 for a in raw.values()):
        raise DataError(f"{path.name}: has no rows")
    return raw


def _field_names(data: DataSpec) -> Iterator[str]:
    for ref in (*data.input_fields().values(), *data.target_fields().values()):
        yield from ([ref] if isinstance(ref, str) else ref)


def _array_info(values: np.ndarray) -> FieldInfo:
    return FieldInfo(tuple(values.shape[1:]), values.dtype.name)


def _check_rows(path: Path, raw: dict[str, np.ndarray]) -> None:
    counts = {name: len(a) for name, a in raw.items()}
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{name} {n}" for name, n in counts.items())
        raise DataError(f"{path.name}: fields have different numbers of rows: {shown}")


def _check_finite(path: Path, fmt: str, name: str, values: np.ndarray) -> None:
    if values.dtype.kind != "f":
        return
    row = _first_nonfinite_row(values)
    if row is not None:
        raise DataError(f"{path.name}: field '{name}' has NaN/Inf at {_row(fmt, row)}")


def _first_nonfinite_row(values: np.ndarray) -> int | None:
    rows = values.reshape(len(values), -1)
    # Checked in chunks so a large field does not need a boolean copy of itself.
    step = max(1, 2**24 // max(1, rows.shape[1]))
    for start in range(0, len(rows), step):
        bad = ~np.isfinite(rows[start : start + step]).all(axis=1)
        if bad.any():
            return start + int(np.argmax(bad))
    return None


def _row(fmt: str, row: int) -> str:
    # CSV line numbers count the header line and start at 1.
    return f"row {row} (line {row + 2})" if fmt == "csv" else f"row {row}"


def _default_target_dtype(raw: dict[str, np.ndarray], ref: str | list[str]) -> str:
    names = [ref] if isinstance(ref, str) else ref
    return "float32" if any(raw[n].dtype.kind == "f" for n in names) else "int64"


def _assemble(
    path: Path, fmt: str, raw: dict[str, np.ndarray], ref: str | list[str], dtype: str
) -> np.ndarray:
    names = [ref] if isinstance(ref, str) else ref
    target = np.dtype(dtype)
    for name in names:
        _check_cast(path, fmt, name, raw[name], target)
    if isinstance(ref, str):
        values = raw[ref].astype(target, copy=False)
    else:
        values = np.stack([raw[n].astype(target, copy=False) for n in names], axis=1)
    # torch.from_numpy needs writable, native-order, contiguous memory.
    return np.require(values, requirements=["C", "W"])


def _check_cast(path: Path, fmt: str, name: str, values: np.ndarray, target: np.dtype) -> None:
    """Refuse a cast that would change values: 1.5 read as a class index, 1e300 as float32."""
    if values.dtype.kind != "f":
        return
    rows = values.reshape(len(values), -1)
    if target.kind in "iub":
        bad = (rows != np.round(rows)).any(axis=1)
        if bad.any():
            raise DataError(
                f"{path.name}: field '{name}' holds a non-integer value at "
                f"{_row(fmt, int(np.argmax(bad)))}, but is read as {target.name}"
            )
    elif target.kind == "f" and target.itemsize < values.dtype.itemsize:
        largest = float(np.finfo(target).max)
        # Two reductions first: the common case (everything fits) allocates nothing.
        if rows.max() > largest or rows.min() < -largest:
            bad = (np.abs(rows) > largest).any(axis=1)
            raise DataError(
                f"{path.name}: field '{name}' has a value too large for {target.name} "
                f"at {_row(fmt, int(np.argmax(bad)))}"
            )


def _reshape_target(
    path: Path, name: str, values: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    if math.prod(values.shape[1:]) != math.prod(shape):
        raise DataError(
            f"{path.name}: target '{name}' has shape {tuple(values.shape[1:])} per row; "
            f"the loss needs {shape}"
        )
    return values.reshape(len(values), *shape)


def split_validation(train: ArrayData, fraction: float, seed: int) -> tuple[ArrayData, ArrayData]:
    """A seeded random split: the last ceil(fraction * N) rows of a permutation validate."""
    n = len(train)
    n_val = math.ceil(fraction * n)
    if n_val < 1 or n - n_val < 1:
        raise DataError(
            f"data.validation split {fraction} of {n} rows leaves {n - n_val} for training "
            f"and {n_val} for validation; both need at least one"
        )
    order = np.random.default_rng(seed).permutation(n)
    # Sorted so each side keeps the file's order; the training side is shuffled per epoch anyway.
    return train.subset(np.sort(order[: n - n_val])), train.subset(np.sort(order[n - n_val :]))


# --------------------------------------------------------------- sources


class _Source(Protocol):
    def names(self) -> list[str]: ...
    def rows(self) -> int | None: ...
    def layout(self, name: str) -> tuple[tuple[int, ...], str]: ...
    def read(self, name: str) -> np.ndarray: ...


class _Scannable(Protocol):
    """A source `describe` can use: it counts classes without holding a field's data."""

    def names(self) -> list[str]: ...
    def rows(self) -> int | None: ...
    def layout(self, name: str) -> tuple[tuple[int, ...], str]: ...
    def scan_cost(self, name: str) -> int: ...
    def int_range(self, name: str) -> tuple[int, int] | None: ...


@contextlib.contextmanager
def _open(path: Path, fmt: str, max_bytes: int, bounds: ScanBounds | None = None) -> Iterator[Any]:
    """A source of the file; with `bounds` (describing), one that reads nothing whole."""
    if not path.is_file():
        raise DataError(f"{path.name}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path.name}: file is empty")
    if fmt == "npz":
        if bounds is not None:
            _check_zip_index(path, bounds.max_members)
        with zipfile.ZipFile(path) as archive:
            yield _NpzSource(path, archive, max_bytes)
    elif fmt == "npy":
        yield _NpySource(path, max_bytes)
    elif fmt == "csv":
        if bounds is not None:
            yield _CsvScan(path, max_bytes, bounds.max_columns)
        else:
            yield _TableSource(path, _read_csv(path, max_bytes), "csv")
    else:
        if bounds is not None:
            _check_parquet_footer(path)
        with pq.ParquetFile(path) as file:
            yield _ParquetSource(path, file, max_bytes)


@contextlib.contextmanager
def _file_errors(path: Path, fmt: str) -> Iterator[None]:
    """Turn the readers' own exceptions into one line naming the file."""
    try:
        yield
    except (DataError, SpecError):
        raise
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        ValueError,
        OSError,
        NotImplementedError,
        RuntimeError,  # zipfile: "File is encrypted, password required"
        struct.error,
        pa.ArrowException,
    ) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path.name}: not a valid {FORMAT_NAMES[fmt]} file ({detail})") from None


def _too_big(path: Path, size: int, max_bytes: int, what: str) -> DataError:
    return DataError(f"{path.name}: {what} {size:,} bytes, over the limit of {max_bytes:,} bytes")


# ------------------------------------------------------------ NPY / NPZ


@dataclass
class _Header:
    shape: tuple[int, ...]
    dtype: np.dtype
    member: str = ""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_header(path: Path, fp: Any) -> _Header:
    """The .npy header alone: shape and dtype, without reading (or unpickling) the data."""
    major, _minor = np.lib.format.read_magic(fp)
    if major not in (1, 2, 3):
        raise ValueError(f"unknown .npy format version {major}")
    # Version 3 has the layout of version 2 (it only allows UTF-8 field names).
    read = (
        np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    )
    shape, _fortran, dtype = read(fp)
    if dtype.hasobject:
        raise DataError(f"{path.name}: {PICKLE_REFUSED}")
    return _Header(tuple(shape), dtype)


class _NpzSource:
    """Reads members one by one; sizes are checked from the zip index and headers first."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, max_bytes: int):
        self.path = path
        self.archive = archive
        infos = archive.infolist()
        declared = sum(info.file_size for info in infos)
        if declared > max_bytes:
            raise _too_big(path, declared, max_bytes, "members unpack to")
        self.headers: dict[str, _Header] = {}
        for info in infos:
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as fp:
                header = _read_header(path, fp)
            if header.shape:  # a 0-d array has no rows: metadata, not a field
                header.member = info.filename
                self.headers[info.filename.removesuffix(".npy")] = header
        claimed = sum(h.nbytes for h in self.headers.values())
        if claimed > max_bytes:
            raise _too_big(path, claimed, max_bytes, "arrays hold")

    def names(self) -> list[str]:
        return list(self.headers)

    def rows(self) -> int | None:
        counts = {h.shape[0] for h in self.headers.values()}
        return counts.pop() if len(counts) == 1 else None

    def layout(self, name: str) -> tuple[tuple[int, ...], str]:
        header = self.headers[name]
        return header.shape[1:], header.dtype.name

    def read(self, name: str) -> np.ndarray:
        header = self.headers[name]
        with self.archive.open(header.member) as fp:
            values = np.lib.format.read_array(fp, allow_pickle=False)
        if values.shape != header.shape:
            raise ValueError(f"member {header.member} does not match its header")
        return values

    def scan_cost(self, name: str) -> int:
        return self.headers[name].nbytes

    def int_range(self, name: str) -> tuple[int, int] | None:
        header = self.headers[name]
        with self.archive.open(header.member) as fp:
            _read_header(self.path, fp)  # the data follows it
            try:
                return _stream_range(fp, header.dtype, header.nbytes)
            except _ShortData:
                raise ValueError(f"member {header.member} does not match its header") from None


def _check_zip_index(path: Path, max_members: int) -> None:
    """Refuse an NPZ with too many members from its end record, before zipfile reads the index.

    zipfile makes an object per member as it opens an archive (400,000 members: seconds
    and ~250 MB). It reads the index by its size in bytes, not by the count the end
    record claims, so the size is capped too.
    """
    size = path.stat().st_size
    tail_at = max(0, size - _ZIP_LAYOUT.sizeEndCentDir - 0xFFFF)  # the end record, then a comment
    with path.open("rb") as fp:
        fp.seek(tail_at)
        tail = fp.read()
        at = tail.rfind(_ZIP_LAYOUT.stringEndArchive)
        if at < 0 or len(tail) - at < _ZIP_LAYOUT.sizeEndCentDir:
            return  # not a zip file: zipfile says so
        record = struct.unpack(
            _ZIP_LAYOUT.structEndArchive, tail[at : at + _ZIP_LAYOUT.sizeEndCentDir]
        )
        members, index_bytes = record[4], record[5]
        if members == 0xFFFF or index_bytes == 0xFFFFFFFF:
            # zip64: the real numbers are in a second end record, found by a locator
            locator_at = tail_at + at - _ZIP_LAYOUT.sizeEndCentDir64Locator
            if locator_at >= 0:
                fp.seek(locator_at)
                locator = fp.read(_ZIP_LAYOUT.sizeEndCentDir64Locator)
                signature, _, record_at, _ = struct.unpack(
                    _ZIP_LAYOUT.structEndArchive64Locator, locator
                )
                if signature == _ZIP_LAYOUT.stringEndArchive64Locator:
                    fp.seek(record_at)
                    raw = fp.read(_ZIP_LAYOUT.sizeEndCentDir64)
                    if (
                        raw[:4] == _ZIP_LAYOUT.stringEndArchive64
                        and len(raw) == _ZIP_LAYOUT.sizeEndCentDir64
                    ):
                        record64 = struct.unpack(_ZIP_LAYOUT.structEndArchive64, raw)
                        members, index_bytes = record64[7], record64[8]
    if members > max_members:
        raise DataError(
            f"{path.name}: holds {members:,} members, over the limit of {max_members:,}"
        )
    index_limit = max_members * ZIP_INDEX_BYTES_PER_MEMBER
    if index_bytes > index_limit:
        raise DataError(
            f"{path.name}: its zip index is {index_bytes:,} bytes, over the limit of "
            f"{index_limit:,} bytes ({ZIP_INDEX_BYTES_PER_MEMBER} a member)"
        )


class _NpySource:
    """A plain array is the field "array"; a structured array gives one field per name."""

    def __init__(self, path: Path, max_bytes: int):
        self.path = path
        with path.open("rb") as fp:
            self.header = _read_header(path, fp)
            data_start = fp.tell()
        if not self.header.shape:
            raise DataError(f"{path.name}: holds a single value (0-d array), not rows")
        if self.header.nbytes > max_bytes:
            raise _too_big(path, self.header.nbytes, max_bytes, "array holds")
        if path.stat().st_size < data_start + self.header.nbytes:
            raise ValueError("file is truncated")
        self.data_start = data_start
        self._values: np.ndarray | None = None

    def names(self) -> list[str]:
        return list(self.header.dtype.names or ["array"])

    def rows(self) -> int | None:
        return self.header.shape[0]

    def layout(self, name: str) -> tuple[tuple[int, ...], str]:
        dtype = self.header.dtype
        if dtype.names is None:
            return self.header.shape[1:], dtype.name
        member = dtype.fields[name][0]  # type: ignore[index]
        return self.header.shape[1:] + member.shape, member.base.name

    def read(self, name: str) -> np.ndarray:
        if self._values is None:
            self._values = np.load(self.path, allow_pickle=False)
        if self.header.dtype.names is None:
            return self._values
        return self._values[name]

    def scan_cost(self, name: str) -> int:
        return self.header.nbytes  # a record field is read with its whole records

    def int_range(self, name: str) -> tuple[int, int] | None:
        field = None if self.header.dtype.names is None else name
        with self.path.open("rb") as fp:
            fp.seek(self.data_start)
            return _stream_range(fp, self.header.dtype, self.header.nbytes, field)


# ------------------------------------------------------- CSV / Parquet


def _read_csv(path: Path, max_bytes: int) -> pa.Table:
    size = path.stat().st_size
    if size > max_bytes:
        raise _too_big(path, size, max_bytes, "file is")
    try:
        table = pa_csv.read_csv(path)
    except pa.ArrowInvalid as exc:
        ragged = _ragged_line(path)
        if ragged:
            raise DataError(f"{path.name}: {ragged}") from None
        if "Empty CSV" in str(exc):
            raise DataError(f"{path.name}: file is empty") from None
        raise
    # "age, height" is a common header; spaces after commas are not part of the names.
    names = [name.strip() for name in table.column_names]
    seen: set[str] = set()
    for name in names:  # a set, not names.count(): a header may have many thousand columns
        if name in seen:
            raise DataError(f"{path.name}: column '{name}' appears more than once in the header")
        seen.add(name)
    return table.rename_columns(names)


def _csv_header(path: Path, max_columns: int) -> list[str]:
    """The header's column names, from at most a bounded prefix of the file.

    Read before pyarrow sees the file: a header of 238,000 columns took pyarrow 15 s
    or more; it is refused here from its first line.
    """
    limit = 64 * 1024 + HEADER_BYTES_PER_COLUMN * max_columns
    with path.open("rb") as fp:
        head = fp.read(limit + 1)
    end, quotes, start = -1, 0, 0
    while (newline := head.find(b"\n", start)) >= 0:
        quotes += head.count(b'"', start, newline)
        start = newline + 1
        if quotes % 2 == 0:  # not inside a quoted name
            end = newline
            break
    if end < 0:
        if len(head) > limit:
            raise DataError(
                f"{path.name}: the header line is longer than {limit:,} bytes "
                f"(room for {max_columns:,} columns)"
            )
        end = len(head)
    text = head[:end].decode("utf-8").removeprefix("\ufeff")
    names = next(csv.reader(io.StringIO(text, newline="")), [])
    if len(names) > max_columns:
        raise DataError(
            f"{path.name}: the header has {len(names):,} columns, over the limit of {max_columns:,}"
        )
    names = [name.strip() for name in names]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"{path.name}: column '{name}' appears more than once in the header")
        seen.add(name)
    return names


class _CsvScan:
    """A CSV read once, block by block: names, types, rows and integer ranges.

    Never the whole table: pyarrow's streaming reader would fix each column's type
    from the first block, so columns are read as text and typed here block by block,
    widening as pyarrow's whole-file inference (what a job's read uses) does: an
    integer column that shows a 0.5 later is float64, a number column that shows a
    word is text.
    """

    def __init__(self, path: Path, max_bytes: int, max_columns: int):
        self.path = path
        size = path.stat().st_size
        if size > max_bytes:
            raise _too_big(path, size, max_bytes, "file is")
        self.columns = _csv_header(path, max_columns)
        self.kinds = [_ColumnKind() for _ in self.columns]
        self.count = 0
        keys = [str(i) for i in range(len(self.columns))]  # the header is parsed above
        try:
            reader = pa_csv.open_csv(
                path,
                read_options=pa_csv.ReadOptions(
                    skip_rows=1, column_names=keys, block_size=CSV_BLOCK, use_threads=True
                ),
                convert_options=pa_csv.ConvertOptions(
                    column_types=dict.fromkeys(keys, pa.string()), strings_can_be_null=True
                ),
            )
            for batch in reader:
                self.count += batch.num_rows
                for kind, column in zip(self.kinds, batch.columns, strict=True):
                    kind.update(column)
        except pa.ArrowInvalid:
            ragged = _ragged_line(path)
            if ragged:
                raise DataError(f"{path.name}: {ragged}") from None
            raise

    def names(self) -> list[str]:
        return list(self.columns)

    def rows(self) -> int | None:
        return self.count

    def layout(self, name: str) -> tuple[tuple[int, ...], str]:
        return _arrow_layout(self.kinds[self.columns.index(name)].type)

    def scan_cost(self, name: str) -> int:
        return 0  # counted while the file was read

    def int_range(self, name: str) -> tuple[int, int] | None:
        kind = self.kinds[self.columns.index(name)]
        return None if kind.has_nulls else kind.span


class _ColumnKind:
    """The type of one CSV column so far, as pyarrow's inference would find it."""

    def __init__(self) -> None:
        self.order = (pa.int64(), pa.bool_(), pa.float64())
        self.type: pa.DataType = pa.null()  # no value seen yet
        self.rank = 0
        self.span: tuple[int, int] | None = None
        self.has_nulls = False

    def update(self, column: pa.Array) -> None:
        if column.null_count:
            self.has_nulls = True
        if column.null_count == len(column) or self.type == pa.string():
            return
        while self.rank < len(self.order):
            candidate = self.order[self.rank]
            values = _cast_or_none(column, candidate)
            if values is not None:
                self.type = candidate
                if candidate == pa.int64():
                    low_high = pc.min_max(values)
                    if low_high["min"].is_valid:
                        span = (low_high["min"].as_py(), low_high["max"].as_py())
                        self.span = _widen(self.span, *span)
                return
            self.rank += 1
        self.type = pa.string()


def _cast_or_none(column: pa.Array, dtype: pa.DataType) -> pa.Array | None:
    try:
        return pc.cast(column, dtype)
    except pa.ArrowInvalid:
        pass
    try:  # pyarrow's CSV reader trims spaces and tabs around numbers; a cast does not
        return pc.cast(pc.utf8_trim(column, " \t"), dtype)
    except pa.ArrowInvalid:
        return None


def _ragged_line(path: Path) -> str | None:
    """pyarrow names a ragged row but not its line; find it by reading the file again."""
    with path.open(newline="", encoding="utf-8", errors="replace") as fp:
        reader = csv.reader(fp)
        header = next(reader, [])
        for row in reader:
            if row and len(row) != len(header):
                return (
                    f"line {reader.line_num} has {len(row)} values; "
                    f"the header has {len(header)} columns"
                )
    return None


class _TableSource:
    def __init__(self, path: Path, table: pa.Table, fmt: str):
        self.path = path
        self.table = table
        self.fmt = fmt

    def names(self) -> list[str]:
        return list(self.table.column_names)

    def rows(self) -> int | None:
        return self.table.num_rows

    def layout(self, name: str) -> tuple[tuple[int, ...], str]:
        return _arrow_layout(self.table.schema.field(name).type)

    def read(self, name: str) -> np.ndarray:
        return _column_values(self.path, self.fmt, name, self.table.column(name))


class _ParquetSource:
    """Reads the schema first and each column only when asked for."""

    def __init__(self, path: Path, file: pq.ParquetFile, max_bytes: int):
        self.path = path
        self.fmt = "parquet"
        self.file = file
        meta = self.file.metadata
        size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if size > max_bytes:
            raise _too_big(path, size, max_bytes, "columns unpack to")
        self.schema = self.file.schema_arrow

    def names(self) -> list[str]:
        return list(self.schema.names)

    def rows(self) -> int | None:
        return self.file.metadata.num_rows

    def layout(self, name: str) -> tuple[tuple[int, ...], str]:
        return _arrow_layout(self.schema.field(name).type)

    def read(self, name: str) -> np.ndarray:
        column = self.file.read(columns=[name]).column(0)
        return _column_values(self.path, self.fmt, name, column)

    def scan_cost(self, name: str) -> int:
        meta = self.file.metadata
        leaves = [
            i for i in range(meta.num_columns) if meta.schema.column(i).path.split(".")[0] == name
        ]
        return sum(
            meta.row_group(g).column(i).total_uncompressed_size
            for g in range(meta.num_row_groups)
            for i in leaves
        )

    def int_range(self, name: str) -> tuple[int, int] | None:
        span: tuple[int, int] | None = None
        for batch in self.file.iter_batches(
            batch_size=SCAN_ROWS, columns=[name], use_threads=False
        ):
            values: Any = batch.column(0)
            while pa.types.is_fixed_size_list(values.type):
                if values.null_count:
                    return None
                values = values.flatten()
            if values.null_count:
                return None  # a missing value: reported when a job reads the column
            low_high = pc.min_max(values)
            if low_high["min"].is_valid:
                span = _widen(span, low_high["min"].as_py(), low_high["max"].as_py())
        return span


def _check_parquet_footer(path: Path) -> None:
    """pyarrow parses a Parquet footer (schema, row-group index) whole: cap it first."""
    size = path.stat().st_size
    with path.open("rb") as fp:
        fp.seek(max(0, size - 8))
        tail = fp.read(8)
    if len(tail) == 8 and tail[4:] == b"PAR1":
        footer = struct.unpack("<I", tail[:4])[0]
        # one longer than the file is no footer at all: pyarrow says the file is not valid
        if MAX_PARQUET_FOOTER < footer <= size - 12:
            raise DataError(
                f"{path.name}: its footer (schema and index) is {footer:,} bytes, "
                f"over the limit of {MAX_PARQUET_FOOTER:,} bytes"
            )


def _arrow_layout(dtype: pa.DataType) -> tuple[tuple[int, ...], str]:
    """Per-row shape and numpy dtype name; fixed-size lists nest into a shape."""
    shape: list[int] = []
    base = dtype
    while pa.types.is_fixed_size_list(base):
        shape.append(base.list_size)
        base = base.value_type
    if _arrow_numeric(base):
        # an empty array's numpy dtype: to_pandas_dtype() would need pandas (pyarrow < 16)
        return tuple(shape), pa.array([], type=base).to_numpy(zero_copy_only=False).dtype.name
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return (), TEXT
    return (), str(dtype)


def _arrow_numeric(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype)


def _column_values(path: Path, fmt: str, name: str, column: pa.ChunkedArray) -> np.ndarray:
    shape, dtype = _arrow_layout(column.type)
    if not is_numeric(dtype):
        raise DataError(f"{path.name}: column '{name}' {_not_numbers(fmt, column)}")
    values = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    _check_no_nulls(path, fmt, name, values)
    for _ in shape:
        values = values.flatten()
        _check_no_nulls(path, fmt, name, values, inner=True)
    return values.to_numpy(zero_copy_only=False).reshape(len(column), *shape)


def _check_no_nulls(
    path: Path, fmt: str, name: str, values: pa.Array, *, inner: bool = False
) -> None:
    if values.null_count == 0:
        return
    if inner:
        raise DataError(f"{path.name}: column '{name}' has an empty value inside a list")
    row = int(values.is_null().to_numpy(zero_copy_only=False).argmax())
    # pyarrow reads "", NA and NaN in a CSV as missing; all are missing values to us.
    raise DataError(
        f"{path.name}: column '{name}' has a missing value (empty, NA or NaN) at {_row(fmt, row)}"
    )


def _not_numbers(fmt: str, column: pa.ChunkedArray) -> str:
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return f"has type {column.type}, not numbers"
    for row, value in enumerate(column.to_pylist()):
        if value is not None and not _is_number(value):
            return f"holds text where numbers belong: {value!r} at {_row(fmt, row)}"
    return "holds text where numbers belong"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
