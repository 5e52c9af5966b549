"""A job's metric history: plain lists, and a pandas DataFrame for who has pandas."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    import pandas


class Point(TypedDict):
    step: int
    epoch: int
    value: float | None  # None for NaN or Inf
    time: float  # seconds since the epoch


class Metrics(dict[str, list[Point]]):
    """Metric name -> its points in step order, as GET /jobs/{id}/metrics answers."""

    def series(self, name: str) -> tuple[list[int], list[float | None]]:
        """(steps, values) of one metric: what a plot takes."""
        points = self.get(name, [])
        return [p["step"] for p in points], [p["value"] for p in points]

    def to_pandas(self) -> pandas.DataFrame:
        """One row per point: columns name, step, epoch, value (NaN for None), time.

        `df.pivot(index="step", columns="name", values="value")` gives a column per metric.
        Needs pandas (`pip install pandas`), which torchyard does not install.
        """
        try:
            import pandas
        except ImportError:
            raise ImportError(
                "Metrics.to_pandas needs pandas: pip install pandas (or torchyard[pandas])"
            ) from None
        rows: list[dict[str, Any]] = [
            {"name": name, **point} for name, points in self.items() for point in points
        ]
        frame = pandas.DataFrame(rows, columns=["name", "step", "epoch", "value", "time"])
        return frame.astype({"value": "float64"})
