"""The result of evaluating a folder of predictions: per-case rows, a summary, CSV/JSON and a table.

NaN marks a metric that is undefined for a case (for example Dice when a class is
absent from both prediction and label); summaries skip NaN (``nanmean``/``nanstd``)
and report how many values they averaged. JSON has no NaN, so it is written as ``null``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flexpatch.data.io import write_text

if TYPE_CHECKING:
    from rich.table import Table

METRICS: tuple[str, ...] = ("dice", "iou", "precision", "recall", "hd95", "nsd")
_TITLES = {
    "dice": "Dice",
    "iou": "IoU",
    "precision": "Precision",
    "recall": "Recall",
    "hd95": "HD95 (mm)",
    "nsd": "NSD",
}


def _stats(values: list[float]) -> dict[str, float | int]:
    """Mean and population std over the non-NaN values (NaN when there are none)."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:  # np.nanmean would warn on an all-NaN slice
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


def _json_safe(obj: Any) -> Any:
    """Replace NaN/Inf by None so that the JSON is standard (``json`` would write bare ``NaN``)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@dataclass
class EvaluationReport:
    """Per-case, per-class metrics of a set of predictions.

    Attributes:
        per_case: one row per (case, class): ``{"case", "class", "label", <metric>: float}``.
        metrics: the metric names each row carries, in column order.
        missing_cases: reference cases that had no prediction (evaluated with ``partial``).
        nsd_tolerance: the tolerance (mm) of the ``nsd`` column, None when there is none.
    """

    per_case: list[dict[str, Any]] = field(default_factory=list)
    metrics: tuple[str, ...] = METRICS
    missing_cases: list[str] = field(default_factory=list)
    nsd_tolerance: float | None = None

    @property
    def cases(self) -> list[str]:
        return list(dict.fromkeys(r["case"] for r in self.per_case))

    @property
    def classes(self) -> list[str]:
        return list(dict.fromkeys(r["class"] for r in self.per_case))

    def summary(self) -> dict[str, Any]:
        """Mean, std and count of each metric per class, and over classes.

        ``"mean"`` treats the class average of each case (NaN classes skipped) as one
        sample, so its mean and std describe the spread over cases, as for a class.
        ``n_reference_cases`` counts the evaluated cases and those left out (``missing_cases``).
        """
        by_class: dict[str, list[dict[str, Any]]] = {}
        by_case: dict[str, list[dict[str, Any]]] = {}
        for row in self.per_case:
            by_class.setdefault(row["class"], []).append(row)
            by_case.setdefault(row["case"], []).append(row)
        per_class = {
            name: {m: _stats([r[m] for r in rows]) for m in self.metrics} for name, rows in by_class.items()
        }
        overall = {
            m: _stats([_stats([r[m] for r in rows])["mean"] for rows in by_case.values()])
            for m in self.metrics
        }
        return {
            "n_cases": len(by_case),
            "n_reference_cases": len(by_case) + len(self.missing_cases),
            "missing_cases": list(self.missing_cases),
            "classes": per_class,
            "mean": overall,
        }

    def to_json(self) -> dict[str, Any]:
        """Summary and per-case rows, with NaN as None (valid JSON)."""
        return _json_safe(
            {
                "metrics": list(self.metrics),
                "nsd_tolerance_mm": self.nsd_tolerance,
                "summary": self.summary(),
                "per_case": self.per_case,
            }
        )

    def to_csv(self) -> str:
        """One line per (case, class); undefined metrics are written as ``nan``."""
        buf = io.StringIO()
        writer = csv.DictWriter(
            buf, fieldnames=["case", "class", "label", *self.metrics], lineterminator="\n"
        )
        writer.writeheader()
        for row in self.per_case:
            writer.writerow({k: row[k] for k in writer.fieldnames})
        return buf.getvalue()

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """Write ``metrics.csv`` and ``summary.json`` into ``out_dir`` atomically; return their paths."""
        out_dir = Path(out_dir)
        csv_path, json_path = out_dir / "metrics.csv", out_dir / "summary.json"
        write_text(csv_path, self.to_csv())
        write_text(json_path, json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")
        return csv_path, json_path

    def table(self) -> Table:
        """A rich table: one row per class (and the class mean), each metric as mean ± std."""
        from rich.table import Table

        summary = self.summary()
        table = Table(title=self.title())
        table.add_column("class")
        for m in self.metrics:
            title = _TITLES.get(m, m)
            if m == "nsd" and self.nsd_tolerance is not None:
                title = f"NSD ({self.nsd_tolerance:g} mm)"
            table.add_column(title, justify="right")
        for name, stats in summary["classes"].items():
            table.add_row(name, *(_format(m, stats[m]) for m in self.metrics))
        table.add_section()
        table.add_row("mean", *(_format(m, summary["mean"][m]) for m in self.metrics))
        return table

    def title(self) -> str:
        """How many cases were evaluated, and of how many when some had no prediction."""
        n = len(self.cases)
        if not self.missing_cases:
            return f"Evaluation over {n} cases"
        total, shown = n + len(self.missing_cases), ", ".join(self.missing_cases[:3])
        more = ", ..." if len(self.missing_cases) > 3 else ""
        return f"Evaluation over {n} of {total} reference cases (partial; no prediction for {shown}{more})"


def _format(metric: str, stats: dict[str, float | int]) -> str:
    if stats["n"] == 0:
        return "-"
    digits = 2 if metric == "hd95" else 3  # distances in mm; overlaps in [0, 1]
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
