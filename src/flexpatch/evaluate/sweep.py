"""Dice against patch size: segment test cases at many windows, tabulate and plot.

Why patch-size augmentation and the hypernetwork exist: a network trained at one patch size loses Dice at
smaller windows unless it was trained with patch-size augmentation.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flexpatch.axes import round_up
from flexpatch.data.dataset import Case, load_case
from flexpatch.data.io import atomic_path, write_text
from flexpatch.data.regions import written_truth
from flexpatch.distributed import current
from flexpatch.errors import FlexPatchError, format_shape
from flexpatch.evaluate.metrics import segmentation_metrics
from flexpatch.runtime import generator, progress_bar

if TYPE_CHECKING:  # an annotation only: inference imports evaluate (post-processing), not the reverse
    from flexpatch.infer.predictor import LoadedModel


def parse_sizes(spec: str, ndim: int, divisor: Sequence[int]) -> list[tuple[int, ...]]:
    """``"32:256:8"`` (start:stop:step, inclusive) or ``"32,48,64"``: isotropic sizes valid for the model."""
    try:
        if ":" in spec:
            start, stop, step = (int(v) for v in spec.split(":"))
            values = list(range(start, stop + 1, step))
        else:
            values = [int(v) for v in spec.split(",")]
    except ValueError:
        raise FlexPatchError(
            f"sizes {spec!r}: use start:stop:step (e.g. 32:256:8) or a list (32,48,64)"
        ) from None
    lcm = int(np.lcm.reduce([int(d) for d in divisor]))
    bad = [v for v in values if v <= 0 or v % lcm]
    if bad or not values:
        raise FlexPatchError(
            f"sizes {spec!r}: {bad or 'none'} not positive multiples of the model's divisor {lcm}"
        )
    return [(v,) * ndim for v in values]


def random_sizes(
    count: int, low: int, high: int, divisor: Sequence[int], seed: int = 0
) -> list[tuple[int, ...]]:
    """``count`` anisotropic sizes, each axis uniform over the valid multiples in [low, high]."""
    g = generator(seed)
    choices = [torch.arange(round_up(low, d), high + 1, d) for d in divisor]
    if any(len(c) == 0 for c in choices):
        raise FlexPatchError(f"no valid size in [{low}, {high}] for divisor {tuple(divisor)}")
    return [tuple(int(c[torch.randint(len(c), (1,), generator=g)]) for c in choices) for _ in range(count)]


def run_sweep(
    model: LoadedModel,
    cases: Sequence[Case],
    sizes: Sequence[tuple[int, ...]],
    overlap: float = 0.5,
    batch_size: int = 4,
    progress: bool = True,
    label: str = "model",
) -> list[dict]:
    """One row per (size, case, class): Dice of the model's segmentation at that window, and the
    case's ``context_error`` at it (:func:`context_error`; NaN without mirrored pairs).

    A region model's classes are the values its label maps are written back with (named after
    their regions), scored against what perfect regions write back: the label map a user gets.
    Under torchrun the (case, window) pairs are split across the processes and every process
    returns all rows, in the order of one process.
    """
    dist = current()
    dist.start()
    jobs = dist.split([(c, s) for c in range(len(cases)) for s in range(len(sizes))])
    done: list[list[dict]] = []
    prepared: tuple[int, Any] | None = None
    with progress_bar(disable=not progress or not dist.main) as bar:
        task = bar.add_task(f"sweep {label}", total=len(jobs), info="")
        for c, s in jobs:
            if prepared is None or prepared[0] != c:  # jobs come case by case: read each once
                prepared = (c, _prepare(model, cases[c]))
            done.append(_rows(model, cases[c], prepared[1], sizes[s], (overlap, batch_size), label))
            bar.update(task, advance=1, info=f"{cases[c].id} {sizes[s]}")
    return [row for rows in dist.gather(done) for row in rows]


def _prepare(model: LoadedModel, case: Case) -> tuple[Any, np.ndarray]:
    """A case's model input and its reference label map (what perfect regions write back)."""
    plan = model.plan
    volume, truth = load_case(case, plan.ndim, plan.labels)
    if truth is None:
        raise FlexPatchError(f"{case.images[0]}: sweep needs labelled cases (labelsTs/)")
    reference = (
        written_truth(truth.data, plan.regions, plan.regions_class_order) if plan.regions else truth.data
    )
    return (model.prepare(volume), truth.spacing), reference


def _rows(
    model: LoadedModel,
    case: Case,
    prepared: tuple[Any, np.ndarray],
    size: tuple[int, ...],
    window: tuple[float, int],
    label: str,
) -> list[dict]:
    """The rows of one case at one window (``window``: overlap and windows per batch)."""
    plan = model.plan
    if plan.regions:
        classes = {name: v for v, name in model.label_names.items() if v > 0}
    else:
        classes = {name: v for name, v in plan.labels.items() if 0 < v < plan.num_classes}
    pairs = [(plan.labels[a], plan.labels[b]) for a, b in model.mirrored_pairs]
    (inputs, spacing), reference = prepared
    seg = model.segment(inputs, size, overlap=window[0], batch_size=window[1])[0]
    scores = segmentation_metrics(seg, reference, list(classes.values()), spacing, hd95=False)
    common = {
        "model": label,
        "size": format_shape(size),
        "isotropic": len(set(size)) == 1,
        "volume": int(np.prod(size)),
        "image": format_shape(tuple(inputs[0].shape[2:])),  # the grid windows are measured on
        "case": case.id,
    }
    wrong_side = context_error(seg, reference, pairs)
    return [
        {**common, "class": name, "dice": scores[value]["dice"], "context_error": wrong_side}
        for name, value in classes.items()
    ]


def context_error(seg: np.ndarray, truth: np.ndarray, pairs: Sequence[tuple[int, int]]) -> float:
    """The share of the voxels of label pairs that differ only by side (``(left, right)`` values)
    given the other side of their pair: a small window that cannot tell where it is mixes them.
    NaN without pairs or without such voxels in ``truth``."""
    wrong = total = 0
    for a, b in pairs:
        in_a, in_b = truth == a, truth == b
        total += int(in_a.sum() + in_b.sum())
        wrong += int((in_a & (seg == b)).sum() + (in_b & (seg == a)).sum())
    return wrong / total if total else float("nan")


def summarize(rows: Sequence[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """model -> size -> {class: mean Dice, ..., "mean": mean over classes} (NaNs ignored), and
    ``context_error``, its mean over cases, where the rows have it and it is defined."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in rows:
        out.setdefault(r["model"], {}).setdefault(r["size"], {}).setdefault(r["class"], []).append(r["dice"])
    table: dict[str, dict[str, dict[str, float]]] = {}
    for m, by_size in out.items():
        table[m] = {}
        for s, by_class in by_size.items():
            means = {
                c: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for c, v in by_class.items()
            }
            means["mean"] = float(np.nanmean(list(means.values())))
            errors = [r.get("context_error") for r in rows if r["model"] == m and r["size"] == s]
            errors = [e for e in errors if e is not None and np.isfinite(e)]
            if errors:
                means["context_error"] = float(np.mean(errors))
            table[m][s] = means
    return table


def write_rows(rows: Sequence[dict], out_dir: Path) -> tuple[Path, Path]:
    """``sweep.csv`` (one row per size, case, class) and ``sweep.json`` (rows + summary), atomically."""
    out_dir = Path(out_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(out_dir / "sweep.csv", buf.getvalue())
    write_text(out_dir / "sweep.json", json.dumps({"rows": list(rows), "summary": summarize(rows)}, indent=1))
    return out_dir / "sweep.csv", out_dir / "sweep.json"


def plot_sweep(rows: Sequence[dict], path: Path, per_class: bool = False) -> Path:
    """Mean Dice (over classes, ± std over cases) against isotropic window edge, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in dict.fromkeys(r["model"] for r in rows):
        iso = [r for r in rows if r["model"] == model and r["isotropic"]]
        edges = sorted({int(r["size"].split("x")[0]) for r in iso})
        groups = ["mean"] + (sorted({r["class"] for r in iso}) if per_class else [])
        for group in groups:
            means, stds = [], []
            for e in edges:
                sel = [
                    r
                    for r in iso
                    if int(r["size"].split("x")[0]) == e and (group == "mean" or r["class"] == group)
                ]
                per_case: dict[str, list[float]] = {}
                for r in sel:
                    per_case.setdefault(r["case"], []).append(r["dice"])
                case_means = np.array([np.nanmean(v) for v in per_case.values()])
                means.append(np.nanmean(case_means))
                stds.append(np.nanstd(case_means))
            m, s = np.array(means), np.array(stds)
            style = "-" if group == "mean" else ":"
            line = ax.plot(edges, m, style, marker="o", ms=3, label=f"{model} {group}")[0]
            if group == "mean":
                ax.fill_between(edges, m - s, m + s, alpha=0.15, color=line.get_color())
    images = [max(int(v) for v in str(r["image"]).split("x")) for r in rows if r.get("image")]
    if images:  # where windows reach the whole image (larger ones run as the largest trained)
        edge = float(np.median(images))
        ax.axvline(edge, color="grey", ls="--", lw=1)
        ax.annotate(f"image {edge:g}", (edge, 0.02), rotation=90, fontsize=8, color="grey", ha="right")
    ax.set_xlabel("window edge (voxels, isotropic)")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Dice against inference patch size")
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)
