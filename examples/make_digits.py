"""Write scikit-learn's bundled digits (8x8 images, 10 classes) as train/validation NPZ files.

    python examples/make_digits.py --out examples/data

Fields: x, the image, float32 (N, 1, 8, 8) scaled to [0, 1]; y, the digit, int64;
and for multi-input, multi-output examples, rows and cols, the mean ink of each
image row and column, float32 (N, 8), and ink, the mean ink of the image, float32 (N,).
The 80/20 split is stratified and seeded, so every run writes the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0


def write_digits(out_dir: Path) -> tuple[Path, Path]:
    """Write digits_train.npz and digits_val.npz into out_dir; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digits = load_digits()  # bundled with scikit-learn: no download
    # Pixel values are 0..16.
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=SEED
    )
    train_path = out_dir / "digits_train.npz"
    val_path = out_dir / "digits_val.npz"
    np.savez(train_path, **digit_fields(x_train, y_train))
    np.savez(val_path, **digit_fields(x_val, y_val))
    return train_path, val_path


def digit_fields(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    image = x[:, 0]
    return {
        "x": x,
        "y": y,
        "rows": image.mean(axis=2),
        "cols": image.mean(axis=1),
        "ink": image.mean(axis=(1, 2)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/data"), help="output folder")
    args = parser.parse_args()
    for path in write_digits(args.out):
        print(path)


if __name__ == "__main__":
    main()
