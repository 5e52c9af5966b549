"""Write a synthetic table for regression and classification, as CSV and Parquet.

    python examples/make_tabular.py --out examples/data

Columns: age, height, weight (float), label (int 0..2), score (float). The label
and score depend on the other columns, so a small model can learn them; the
numbers come from a seeded generator, so every run writes the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

SEED = 0
ROWS = 2000


def make_table(rows: int = ROWS, seed: int = SEED) -> pa.Table:
    rng = np.random.default_rng(seed)
    age = rng.uniform(18, 80, rows)
    height = rng.normal(170, 10, rows)
    weight = 0.9 * (height - 100) + 0.1 * (age - 40) + rng.normal(0, 6, rows)
    bmi = weight / (height / 100) ** 2
    # Three equal bands of a noisy BMI-and-age score: a classification target with overlap.
    risk = (bmi - 24) / 3 + (age - 50) / 20 + rng.normal(0, 0.3, rows)
    label = np.digitize(risk, np.quantile(risk, [1 / 3, 2 / 3])).astype(np.int64)
    score = 2.0 * bmi - 0.05 * age + 0.02 * height + rng.normal(0, 1, rows)
    return pa.table(
        {
            "age": np.round(age, 1),
            "height": np.round(height, 1),
            "weight": np.round(weight, 1),
            "label": label,
            "score": np.round(score, 3),
        }
    )


def write_tabular(out_dir: Path) -> tuple[Path, Path]:
    """Write tabular.csv and tabular.parquet into out_dir; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = make_table()
    csv_path = out_dir / "tabular.csv"
    parquet_path = out_dir / "tabular.parquet"
    with csv_path.open("wb") as fp:
        # pyarrow quotes header names; a plain header reads better in a spreadsheet or editor.
        fp.write((",".join(table.column_names) + "\n").encode())
        pa_csv.write_csv(table, fp, pa_csv.WriteOptions(include_header=False))
    pq.write_table(table, parquet_path)
    return csv_path, parquet_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/data"), help="output folder")
    args = parser.parse_args()
    for path in write_tabular(args.out):
        print(path)


if __name__ == "__main__":
    main()
