"""Comparing models over a patch-size sweep: the hypernetwork paper's Tables 1 and 2, with Wilcoxon tests.

Table 1 averages Dice over every swept size (isotropic and random anisotropic),
Table 2 over the isotropic sizes only. Models are compared pairwise with the
Wilcoxon signed-rank test, paired over (case, size) on the per-class Dice.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

from flexpatch.data.io import load_json
from flexpatch.errors import FlexPatchError


def load_rows(report_dirs: Sequence[Path]) -> list[dict]:
    """Rows of ``sweep.json`` from each report folder (each folder one or more models)."""
    rows: list[dict] = []
    for d in map(Path, report_dirs):
        data = load_json(d / "sweep.json" if d.is_dir() else d)
        if not isinstance(data, dict) or "rows" not in data:
            raise FlexPatchError(f"{d}: not a sweep report (no 'rows' in sweep.json)")
        rows += data["rows"]
    if not rows:
        raise FlexPatchError("no sweep rows found in " + ", ".join(map(str, report_dirs)))
    return rows


def dice_table(rows: Sequence[dict], isotropic_only: bool = False) -> dict[str, dict[str, float]]:
    """model -> class -> mean Dice over cases and sizes (NaN-aware), plus "average" over classes."""
    table: dict[str, dict[str, float]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == model and (r["isotropic"] or not isotropic_only)]
        classes = list(dict.fromkeys(r["class"] for r in sel))
        means = {c: float(np.nanmean([_f(r["dice"]) for r in sel if r["class"] == c])) for c in classes}
        means["average"] = float(np.nanmean(list(means.values())))
        table[model] = means
    return table


def _f(v: object) -> float:
    return float("nan") if v is None else float(v)  # JSON stores NaN as null


def paired(
    rows: Sequence[dict], a: str, b: str, cls: str | None = None, isotropic_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Dice of models ``a`` and ``b`` paired over (case, size[, class]).

    With ``cls`` None each pair is the mean over classes.
    """

    def key_values(model: str) -> dict[tuple, float]:
        acc: dict[tuple, list[float]] = {}
        for r in rows:
            if r["model"] != model or (isotropic_only and not r["isotropic"]) or (cls and r["class"] != cls):
                continue
            acc.setdefault((r["case"], r["size"]), []).append(_f(r["dice"]))
        return {k: float(np.nanmean(v)) for k, v in acc.items() if np.isfinite(v).any()}

    va, vb = key_values(a), key_values(b)
    keys = sorted(set(va) & set(vb))
    return np.array([va[k] for k in keys]), np.array([vb[k] for k in keys])


def wilcoxon_tests(rows: Sequence[dict], isotropic_only: bool = False) -> list[dict]:
    """Two-sided Wilcoxon signed-rank p-values for every model pair, overall and per class."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    classes = [None, *dict.fromkeys(r["class"] for r in rows)]
    out = []
    for a, b in itertools.combinations(models, 2):
        for cls in classes:
            x, y = paired(rows, a, b, cls, isotropic_only)
            p = float(wilcoxon(x, y).pvalue) if len(x) > 0 and np.any(x != y) else 1.0
            out.append(
                {
                    "a": a,
                    "b": b,
                    "class": cls or "average",
                    "n": len(x),
                    "mean_a": float(np.mean(x)) if len(x) else float("nan"),
                    "mean_b": float(np.mean(y)) if len(y) else float("nan"),
                    "p": p,
                }
            )
    return out


def compare(report_dirs: Sequence[Path]) -> dict:
    """Tables 1 (all sizes) and 2 (isotropic sizes) and the Wilcoxon tests, as one JSON-ready dict."""
    rows = load_rows(report_dirs)
    return {
        "table1_all_sizes": dice_table(rows),
        "table2_isotropic": dice_table(rows, isotropic_only=True),
        "wilcoxon_all_sizes": wilcoxon_tests(rows),
        "wilcoxon_isotropic": wilcoxon_tests(rows, isotropic_only=True),
        "n_sizes": len({r["size"] for r in rows}),
        "n_cases": len({r["case"] for r in rows}),
    }


def markdown_table(table: dict[str, dict[str, float]], tests: Sequence[dict] | None = None) -> str:
    """A Markdown table, models as rows and classes as columns (the hypernetwork paper's layout)."""
    classes = list(next(iter(table.values())))
    lines = ["| model | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for model, row in table.items():
        lines.append(f"| {model} | " + " | ".join(f"{row[c]:.3f}" for c in classes) + " |")
    if tests:
        lines.append("")
        lines += [
            f"- Wilcoxon {t['a']} vs {t['b']} ({t['class']}, n={t['n']}): p = {t['p']:.2g}"
            for t in tests
            if t["class"] == "average"
        ]
    return "\n".join(lines)
