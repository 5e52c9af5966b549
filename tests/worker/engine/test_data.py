"""Dataset files -> arrays -> batches, on real files written to tmp_path."""

from __future__ import annotations

import io
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from examples.make_digits import write_digits
from examples.make_tabular import write_tabular
from worker.engine.batches import InMemoryBatches, StreamingBatches, epoch_order, make_batches
from worker.engine.data import (
    ArrayData,
    DatasetInfo,
    describe,
    load_arrays,
    read_fields,
    resolve_fields,
    split_validation,
)
from worker.engine.errors import DataError, SpecError
from worker.engine.fields import FieldInfo
from worker.engine.spec import DataSpec

CPU = torch.device("cpu")


def data_spec(inputs, targets, **options) -> DataSpec:
    return DataSpec.model_validate(
        {"train": "unused", "inputs": inputs, "targets": targets, **options}
    )


def data_error(call, *args, **kwargs) -> str:
    """The message of the DataError a call raises; always one line."""
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def example_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("data")
    digits_train, digits_val = write_digits(out)
    csv_path, parquet_path = write_tabular(out)
    return {"train": digits_train, "val": digits_val, "csv": csv_path, "parquet": parquet_path}


# ------------------------------------------------------------ round trips


def test_digits_npz_describes_and_loads(example_files):
    info = describe(example_files["train"])
    assert info.format == "npz"
    assert info.rows == 1437
    expected = {
        "x": FieldInfo((1, 8, 8), "float32"),
        "y": FieldInfo((), "int64", num_classes=10),
        "rows": FieldInfo((8,), "float32"),
        "cols": FieldInfo((8,), "float32"),
        "ink": FieldInfo((), "float32"),
    }
    assert info.fields == expected
    assert read_fields(example_files["val"]) == expected
    arrays = load_arrays(example_files["train"], data_spec("x", "y"))
    with np.load(example_files["train"]) as raw:
        np.testing.assert_array_equal(arrays.inputs["input"], raw["x"])
        np.testing.assert_array_equal(arrays.targets["output"], raw["y"])
    assert arrays.inputs["input"].dtype == np.float32
    assert arrays.targets["output"].dtype == np.int64
    assert len(arrays) == 1437
    assert arrays.inputs["input"].min() >= 0.0 and arrays.inputs["input"].max() <= 1.0


def test_digits_split_is_stratified_and_reproducible(example_files, tmp_path):
    write_digits(tmp_path)
    for name in ("digits_train.npz", "digits_val.npz"):
        assert (tmp_path / name).read_bytes() == (example_files["train"].parent / name).read_bytes()
    with np.load(example_files["val"]) as val:
        assert set(np.bincount(val["y"])) <= {35, 36, 37}


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_table_columns_describe_and_stack(example_files, kind):
    info = describe(example_files[kind])
    assert (info.format, info.rows) == (kind, 2000)
    assert list(info.fields) == ["age", "height", "weight", "label", "score"]
    assert info.fields["age"] == FieldInfo((), "float64")
    assert info.fields["label"] == FieldInfo((), "int64", num_classes=3)

    spec = data_spec(["age", "height", "weight"], {"risk": "label", "score": "score"})
    arrays = load_arrays(example_files[kind], spec)
    table = pq.read_table(example_files["parquet"])
    expected = np.stack([table[c].to_numpy() for c in ("age", "height", "weight")], axis=1)
    np.testing.assert_allclose(arrays.inputs["input"], expected.astype(np.float32))
    assert arrays.inputs["input"].shape == (2000, 3) and arrays.inputs["input"].dtype == np.float32
    np.testing.assert_array_equal(arrays.targets["risk"], table["label"].to_numpy())
    assert arrays.targets["risk"].dtype == np.int64
    assert arrays.targets["score"].dtype == np.float32


def test_csv_header_spaces_are_not_part_of_names(tmp_path):
    path = tmp_path / "spaced.csv"
    path.write_text("a, b\n1, 2.5\n3, 4.5\n")
    assert list(read_fields(path)) == ["a", "b"]


def test_npy_plain_array_is_the_field_named_array(tmp_path):
    path = tmp_path / "plain.npy"
    values = np.arange(30, dtype=np.float64).reshape(10, 3)
    np.save(path, values)
    assert describe(path) == DatasetInfo("npy", 10, {"array": FieldInfo((3,), "float64")})
    arrays = load_arrays(path, data_spec("array", "array"))  # an autoencoder's data
    np.testing.assert_array_equal(arrays.inputs["input"], values.astype(np.float32))
    assert arrays.targets["output"].dtype == np.float32


def test_npy_structured_array_gives_a_field_per_name(tmp_path):
    path = tmp_path / "records.npy"
    records = np.zeros(6, dtype=[("x", "<f4", (2,)), ("y", ">i8")])
    records["x"] = np.arange(12).reshape(6, 2)
    records["y"] = [0, 1, 2, 0, 1, 4]
    np.save(path, records)
    assert describe(path).fields == {
        "x": FieldInfo((2,), "float32"),
        "y": FieldInfo((), "int64", num_classes=5),
    }
    arrays = load_arrays(path, data_spec("x", "y"))
    np.testing.assert_array_equal(arrays.inputs["input"], records["x"])
    np.testing.assert_array_equal(arrays.targets["output"], [0, 1, 2, 0, 1, 4])
    # Big-endian on disk, native in memory: torch refuses anything else.
    assert arrays.targets["output"].dtype == np.dtype("int64")
    assert torch.from_numpy(arrays.targets["output"]).tolist() == [0, 1, 2, 0, 1, 4]


def test_parquet_fixed_size_list_column_is_a_vector_field(tmp_path):
    path = tmp_path / "vectors.parquet"
    flat = pa.array(np.arange(12, dtype=np.float32))
    table = pa.table(
        {"emb": pa.FixedSizeListArray.from_arrays(flat, 3), "y": pa.array([1, 0, 1, 1])}
    )
    pq.write_table(table, path)
    assert describe(path).fields["emb"] == FieldInfo((3,), "float32")
    arrays = load_arrays(path, data_spec("emb", "y"))
    np.testing.assert_array_equal(arrays.inputs["input"], np.arange(12).reshape(4, 3))


def test_targets_are_cast_and_reshaped_as_the_loss_asks(example_files):
    arrays = load_arrays(
        example_files["train"],
        data_spec("x", "y"),
        input_dtypes={"input": "float64"},
        target_dtypes={"output": "float32"},
        target_shapes={"output": (1,)},
    )
    assert arrays.inputs["input"].dtype == np.float64
    assert arrays.targets["output"].shape == (1437, 1)
    assert arrays.targets["output"].dtype == np.float32


def test_dataset_info_round_trips_through_json(example_files):
    info = describe(example_files["csv"])
    assert DatasetInfo.from_dict(info.as_dict()) == info


# --------------------------------------------------------- resolve_fields

FIELDS = {
    "age": FieldInfo((), "float64"),
    "height": FieldInfo((), "int32"),
    "y": FieldInfo((), "int64", num_classes=3),
}


def spec_error(data: DataSpec, fields: dict[str, FieldInfo]) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        resolve_fields(data, fields)
    return [(issue.path, issue.message) for issue in info.value.issues]


def test_column_list_is_one_field_of_k_values():
    inputs, targets = resolve_fields(data_spec(["age", "height"], "y"), FIELDS)
    assert inputs == {"input": FieldInfo((2,), "float32")}
    assert targets == {"output": FieldInfo((), "int64", num_classes=3)}
    fields = {**FIELDS, "z": FieldInfo((), "int8", num_classes=7)}
    inputs, _ = resolve_fields(data_spec({"ids": ["height", "y", "z"]}, "y"), fields)
    assert inputs == {"ids": FieldInfo((3,), "int64", num_classes=None)}
    inputs, _ = resolve_fields(data_spec({"ids": ["y", "z"]}, "y"), fields)
    assert inputs == {"ids": FieldInfo((2,), "int64", num_classes=7)}


def test_missing_fields_are_reported_together_with_their_paths():
    issues = spec_error(
        data_spec({"meta": ["age", "agee"], "h": "hieght"}, "score"),
        FIELDS,
    )
    assert issues == [
        (
            "data.inputs.meta[1]",
            "dataset has no field 'agee' (closest: age; fields: age, height, y)",
        ),
        (
            "data.inputs.h",
            "dataset has no field 'hieght' (closest: height; fields: age, height, y)",
        ),
        ("data.targets", "dataset has no field 'score' (fields: age, height, y)"),
    ]


def test_missing_column_in_a_plain_list_has_an_index_path():
    issues = spec_error(data_spec(["age", "weight"], {"out": ["y", "nope"]}), FIELDS)
    assert [path for path, _ in issues] == ["data.inputs[1]", "data.targets.out[1]"]


def test_text_and_non_scalar_columns_are_refused():
    fields = {**FIELDS, "name": FieldInfo((), "str"), "img": FieldInfo((2, 2), "float32")}
    issues = spec_error(data_spec(["age", "img"], "name"), fields)
    assert issues == [
        (
            "data.inputs[1]",
            "field 'img' has shape (2, 2) per row; "
            "a list of columns takes one number per row from each",
        ),
        ("data.targets", "field 'name' holds text, not numbers"),
    ]


def test_load_arrays_reports_missing_fields_as_a_spec_error(example_files):
    with pytest.raises(SpecError) as info:
        load_arrays(example_files["train"], data_spec("x", "label"))
    assert str(info.value).startswith("data.targets: dataset has no field 'label'")


# --------------------------------------------------------------- bad data


def test_object_arrays_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    evil = np.array([_RunsOnUnpickle(marker)], dtype=object)
    npz, npy = tmp_path / "evil.npz", tmp_path / "evil.npy"
    np.savez(npz, x=evil, y=np.zeros(1))
    np.save(npy, evil)
    for path in (npz, npy):
        assert "holds Python objects (pickle), which torchyard refuses" in data_error(
            describe, path
        )
        data_error(load_arrays, path, data_spec("x" if path == npz else "array", "y"))
    assert not marker.exists()
    # The file really would have run code: the refusal above is what kept it from doing so.
    np.load(npy, allow_pickle=True)
    assert marker.exists()


class _RunsOnUnpickle:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_npz_that_unpacks_past_the_limit_is_refused_before_decompressing(tmp_path):
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, x=np.zeros(2**20), y=np.zeros(2**20))  # 16 MiB in ~16 KiB
    assert path.stat().st_size < 100_000
    message = data_error(describe, path, max_bytes=2**20)
    assert "zeros.npz: members unpack to 16,777," in message and "limit of 1,048,576" in message


def test_npz_header_claiming_a_huge_array_is_refused_quickly(tmp_path):
    """A zip bomb can lie in its .npy header as well as in the zip index."""
    path = tmp_path / "bomb.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (2**40,)}
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(64))
    start = time.perf_counter()
    message = data_error(load_arrays, path, data_spec("x", "x"))
    assert time.perf_counter() - start < 1.0
    assert "bomb.npz: arrays hold 8,796,093,022,208 bytes, over the limit" in message


def test_truncated_npz_is_not_a_valid_npz(tmp_path, example_files):
    path = tmp_path / "cut.npz"
    path.write_bytes(example_files["train"].read_bytes()[:5000])
    assert data_error(describe, path).startswith("cut.npz: not a valid NPZ file")


def test_corrupted_npz_data_is_not_a_valid_npz(tmp_path):
    path = tmp_path / "flipped.npz"
    np.savez(path, x=np.zeros((100, 4), np.float32), y=np.zeros(100, np.int64))
    raw = bytearray(path.read_bytes())
    raw[400:420] = b"\xff" * 20  # inside x's data: the header stays readable, the CRC breaks
    path.write_bytes(bytes(raw))
    assert "flipped.npz: not a valid NPZ file" in data_error(load_arrays, path, data_spec("x", "y"))


def test_ragged_csv_names_the_line(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("a,b,c\n1,2,3\n4,5,6\n7,8\n9,10,11\n")
    assert data_error(describe, path) == "ragged.csv: line 4 has 2 values; the header has 3 columns"


def test_text_in_a_numeric_column_names_column_and_value(tmp_path):
    path = tmp_path / "text.csv"
    path.write_text("height,y\n1.5,0\ntall,1\n2.5,0\n")
    assert describe(path).fields["height"] == FieldInfo((), "str")
    message = data_error(load_arrays, path, data_spec("height", "y"))
    assert message == (
        "text.csv: column 'height' holds text where numbers belong: 'tall' at row 1 (line 3)"
    )
    with pytest.raises(SpecError) as info:
        resolve_fields(data_spec("height", "y"), read_fields(path))
    assert str(info.value) == "data.inputs: field 'height' holds text, not numbers"


def test_nan_in_a_float_field_names_field_and_row(tmp_path):
    path = tmp_path / "nan.npz"
    x = np.ones((30, 2), np.float32)
    x[17, 1] = np.nan
    x[20, 0] = np.inf
    np.savez(path, x=x, y=np.zeros(30, np.int64))
    message = data_error(load_arrays, path, data_spec("x", "y"))
    assert message == "nan.npz: field 'x' has NaN/Inf at row 17"


def test_inf_and_missing_values_in_csv_name_the_line(tmp_path):
    path = tmp_path / "inf.csv"
    path.write_text("a,b\n1,0.5\n2,1.5\n3,inf\n")
    message = data_error(load_arrays, path, data_spec("a", "b"))
    assert message == "inf.csv: field 'b' has NaN/Inf at row 2 (line 4)"
    path.write_text("a,b\n1,0.5\n2,\n3,NaN\n")
    message = data_error(load_arrays, path, data_spec("a", "b"))
    assert message == "inf.csv: column 'b' has a missing value (empty, NA or NaN) at row 1 (line 3)"


def test_bad_columns_the_spec_does_not_use_are_no_problem(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text("a,notes,count,b\n1,hello,3,0.5\n2,world,,1.5\n")
    info = describe(path)
    assert info.fields["notes"] == FieldInfo((), "str")
    assert info.fields["count"] == FieldInfo((), "int64", num_classes=None)
    arrays = load_arrays(path, data_spec("a", "b"))
    assert arrays.targets["output"].tolist() == [0.5, 1.5]
    message = data_error(load_arrays, path, data_spec("a", "count"))
    assert message == (
        "notes.csv: column 'count' has a missing value (empty, NA or NaN) at row 1 (line 3)"
    )


@pytest.mark.parametrize("suffix", [".npz", ".npy", ".csv", ".parquet"])
def test_empty_file_is_refused(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    assert data_error(describe, path) == f"empty{suffix}: file is empty"


def test_file_without_rows_is_refused(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("a,b\n")
    assert data_error(describe, path) == "header.csv: has no rows"
    assert data_error(load_arrays, path, data_spec("a", "b")) == "header.csv: has no rows"
    path = tmp_path / "none.npz"
    np.savez(path, x=np.zeros((0, 3)), y=np.zeros(0))
    assert data_error(load_arrays, path, data_spec("x", "y")) == "none.npz: has no rows"


def test_fields_with_different_row_counts_are_refused(tmp_path):
    path = tmp_path / "uneven.npz"
    np.savez(path, x=np.zeros((10, 2)), y=np.zeros(9, np.int64))
    assert describe(path).rows is None
    message = data_error(load_arrays, path, data_spec("x", "y"))
    assert message == "uneven.npz: fields have different numbers of rows: x 10, y 9"


def test_unknown_extension_and_missing_file(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("1,2\n")
    assert "data.txt: unsupported file type; expected one of .npz" in data_error(describe, path)
    assert data_error(describe, tmp_path / "gone.npz") == "gone.npz: no such file"


def test_non_integer_values_read_as_class_indices_are_refused(tmp_path):
    path = tmp_path / "soft.npz"
    np.savez(path, x=np.zeros((4, 2)), y=np.array([0.0, 1.0, 1.5, 2.0]))
    message = data_error(load_arrays, path, data_spec("x", "y"), target_dtypes={"output": "int64"})
    assert message == "soft.npz: field 'y' holds a non-integer value at row 2, but is read as int64"
    arrays = load_arrays(path, data_spec("x", "y"), target_dtypes={"output": "float32"})
    assert arrays.targets["output"].tolist() == [0.0, 1.0, 1.5, 2.0]


def test_values_too_large_for_float32_are_refused(tmp_path):
    path = tmp_path / "huge.npz"
    np.savez(path, x=np.array([[1.0], [1e300]]), y=np.zeros(2, np.int64))
    message = data_error(load_arrays, path, data_spec("x", "y"))
    assert message == "huge.npz: field 'x' has a value too large for float32 at row 1"


def test_target_that_cannot_take_the_loss_shape_is_refused(example_files):
    message = data_error(
        load_arrays, example_files["train"], data_spec("y", "x"), target_shapes={"output": (10,)}
    )
    assert (
        message
        == "digits_train.npz: target 'output' has shape (1, 8, 8) per row; the loss needs (10,)"
    )


# ------------------------------------------------------------------ split


def tiny(n: int) -> ArrayData:
    return ArrayData(
        {"input": np.arange(2 * n, dtype=np.float32).reshape(n, 2)},
        {"output": np.arange(n, dtype=np.int64)},
    )


def test_split_is_seeded_disjoint_and_complete():
    train, val = split_validation(tiny(101), 0.2, seed=7)
    assert (len(train), len(val)) == (80, 21)
    rows = np.concatenate([train.targets["output"], val.targets["output"]])
    assert sorted(rows.tolist()) == list(range(101))
    np.testing.assert_array_equal(train.inputs["input"][:, 0], 2 * train.targets["output"])
    again, _ = split_validation(tiny(101), 0.2, seed=7)
    np.testing.assert_array_equal(again.targets["output"], train.targets["output"])
    other, _ = split_validation(tiny(101), 0.2, seed=8)
    assert other.targets["output"].tolist() != train.targets["output"].tolist()


def test_split_needs_a_row_on_each_side():
    message = data_error(split_validation, tiny(1), 0.5, seed=0)
    assert "leaves 0 for training and 1 for validation" in message
    train, val = split_validation(tiny(2), 0.01, seed=0)
    assert (len(train), len(val)) == (1, 1)


# ---------------------------------------------------------------- batches


def batch_rows(batches, epoch: int) -> list[list[int]]:
    """Each batch's row ids (the target is the row number), checked against the input."""
    out = []
    for inputs, targets in batches.epoch(epoch):
        rows = targets["output"]
        assert torch.equal(inputs["input"][:, 0], 2 * rows.float())
        out.append(rows.tolist())
    return out


def in_memory(data: ArrayData, **options) -> InMemoryBatches:
    defaults = {"batch_size": 8, "shuffle": True, "drop_last": False, "device": CPU, "seed": 3}
    return InMemoryBatches(data, **{**defaults, **options})


def test_batch_order_is_a_function_of_seed_and_epoch():
    first = in_memory(tiny(50))
    second = in_memory(tiny(50))
    assert batch_rows(first, 0) == batch_rows(second, 0)
    # Resuming at epoch 2 sees what an uninterrupted run saw at epoch 2.
    assert batch_rows(first, 2) == batch_rows(in_memory(tiny(50)), 2)
    assert batch_rows(first, 0) != batch_rows(first, 1)
    assert batch_rows(first, 0) != batch_rows(in_memory(tiny(50), seed=4), 0)
    flat = [row for batch in batch_rows(first, 1) for row in batch]
    assert sorted(flat) == list(range(50))
    assert flat == epoch_order(50, 3, 1).tolist()


def test_without_shuffle_batches_follow_the_file():
    batches = in_memory(tiny(20), shuffle=False)
    assert batch_rows(batches, 5) == [list(range(0, 8)), list(range(8, 16)), list(range(16, 20))]
    assert (len(batches), batches.num_samples) == (3, 20)


def test_drop_last_leaves_out_the_short_batch():
    batches = in_memory(tiny(20), drop_last=True)
    assert (len(batches), batches.num_samples) == (2, 16)
    assert [len(b) for b in batch_rows(batches, 0)] == [8, 8]
    assert len(in_memory(tiny(5), drop_last=True)) == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_gives_the_same_batches_as_in_memory(num_workers):
    data = tiny(45)
    options = {"batch_size": 8, "shuffle": True, "drop_last": True, "device": CPU, "seed": 11}
    memory = InMemoryBatches(data, **options)
    streaming = StreamingBatches(data, num_workers=num_workers, **options)
    assert (len(streaming), streaming.num_samples) == (len(memory), memory.num_samples)
    for epoch in (0, 1, 4):
        assert batch_rows(streaming, epoch) == batch_rows(memory, epoch)
    for (mi, mt), (si, st) in zip(memory.epoch(2), streaming.epoch(2), strict=True):
        assert torch.equal(mi["input"], si["input"]) and torch.equal(mt["output"], st["output"])
        assert si["input"].dtype == torch.float32 and st["output"].dtype == torch.int64


@pytest.mark.parametrize("kind", [InMemoryBatches, StreamingBatches])
def test_batching_leaves_the_global_rng_alone(kind):
    """Dropout draws from the global RNG: batching must not shift it, or runs diverge."""
    batches = kind(tiny(40), batch_size=8, shuffle=True, drop_last=False, device=CPU, seed=1)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for _ in batches.epoch(0):
        pass
    assert torch.equal(torch.rand(3), expected)


def test_make_batches_picks_in_memory_or_streaming():
    data = tiny(30)

    def kind(policy: str, budget: int | None) -> type:
        spec = data_spec("x", "y", batch_size=4, in_memory=policy)
        batches = make_batches(
            data, spec, device=CPU, seed=0, train=True, memory_budget_bytes=budget
        )
        return type(batches)

    assert kind("always", 0) is InMemoryBatches
    assert kind("never", 2**40) is StreamingBatches
    assert kind("auto", data.nbytes) is InMemoryBatches
    assert kind("auto", data.nbytes - 1) is StreamingBatches
    assert kind("auto", None) is InMemoryBatches  # a quarter of this machine's RAM


def test_validation_batches_never_shuffle_or_drop():
    spec = data_spec("x", "y", batch_size=4, shuffle=True, drop_last=True)
    val = make_batches(tiny(10), spec, device=CPU, seed=0, train=False)
    assert batch_rows(val, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    train = make_batches(tiny(10), spec, device=CPU, seed=0, train=True)
    assert train.num_samples == 8 and batch_rows(train, 0) != [[0, 1, 2, 3], [4, 5, 6, 7]]
