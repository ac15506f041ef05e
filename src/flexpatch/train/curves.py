"""Training curves: ``progress.png`` in the model folder (as nnU-Net's) and, when asked, TensorBoard
scalars in ``MODEL_DIR/tensorboard``, both from a run's log records alone.

Every method that trains through the harness feeds the same :class:`Curves`: the core trainer and
the cascade with the records of ``log.jsonl`` (one per step; the cascade's carry their ``stage``),
the patchwork with those of ``log.json`` (one per round). The panels are the training loss, the
validation Dice per class and their mean, the learning rate, and the patch size drawn at each step
when it varies (random or growing patches). The picture is redrawn at each validation and at the
end, written atomically, so a finished or killed run's can be drawn again from its log
(:func:`redraw`, ``flexpatch curves MODEL_DIR``).

TensorBoard logging is asked for around a run (``with tensorboard_logging(): train(...)``, what
``flexpatch train --tensorboard`` does): the event files hold the log's records; a resumed run's
continue without the steps it threw away (:func:`open_writer`), and ``flexpatch curves MODEL_DIR
--tensorboard`` rebuilds them from the log.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from flexpatch.data.io import atomic_path
from flexpatch.errors import FlexPatchError

PNG = "progress.png"
TENSORBOARD = "tensorboard"
# panel -> its title, in the order drawn
PANELS = {
    "loss": "training loss",
    "dice": "validation Dice",
    "lr": "learning rate",
    "patch": "patch size drawn (voxels per axis)",
}
Point = tuple[str, str, float, float]  # panel, label, x, y

_TENSORBOARD: ContextVar[bool] = ContextVar("flexpatch_tensorboard", default=False)


@contextmanager
def tensorboard_logging(enabled: bool = True) -> Iterator[None]:
    """Runs started inside also write TensorBoard event files (checked to be possible first)."""
    if enabled:
        check_tensorboard()
    token = _TENSORBOARD.set(enabled)
    try:
        yield
    finally:
        _TENSORBOARD.reset(token)


def check_tensorboard() -> None:
    """Fail in one line when TensorBoard is not installed (it is an optional dependency)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise FlexPatchError(
            "--tensorboard needs the tensorboard package: pip install 'flexpatch[tensorboard]'"
        ) from None


@dataclass
class Series:
    """The curves of a run, one point per record field: ``panels[panel][label] = (xs, ys)``.

    The x axis counts steps (or rounds, for round records); a stage's steps continue after the
    previous stage's (the cascade's fine stage after the rough), and the labels of a staged record
    name their stage. ``names`` gives a class key of ``val_dice`` its name (``"1" -> "liver"``).
    """

    names: Mapping[str, str] = field(default_factory=dict)
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = field(default_factory=dict)
    unit: str = "step"
    stages: list[tuple[float, str]] = field(default_factory=list)  # (x before its first step, name)
    last: float = 0.0

    def add(self, record: Mapping[str, Any]) -> list[Point]:
        """Add one record's points (returned, for TensorBoard); a record without a step is none."""
        x = self._x(record)
        if x is None:
            return []
        stage = record.get("stage")
        points = _points(record, x, self.names, f" ({stage})" if stage is not None else "")
        for panel, label, px, y in points:
            xs, ys = self.panels.setdefault(panel, {}).setdefault(label, ([], []))
            xs.append(px)
            ys.append(y)
        return points

    def _x(self, record: Mapping[str, Any]) -> float | None:
        stage = record.get("stage")
        if stage is not None and (not self.stages or self.stages[-1][1] != str(stage)):
            self.stages.append((self.last, str(stage)))
        offset = self.stages[-1][0] if stage is not None else 0.0
        if isinstance(record.get("step"), int):
            x = offset + record["step"]
        elif isinstance(record.get("round"), int):  # the patchwork's rounds count from 0
            x, self.unit = offset + record["round"] + 1, "round"
        else:
            return None
        self.last = float(x)
        return float(x)

    def points(self) -> Iterator[Point]:
        for panel, curves in self.panels.items():
            for label, (xs, ys) in curves.items():
                yield from ((panel, label, x, y) for x, y in zip(xs, ys, strict=True))

    def shown(self) -> list[str]:
        """The panels worth drawing: all with points, but the patch size only where it varies."""
        out = [p for p in PANELS if self.panels.get(p)]
        patch = self.panels.get("patch", {})
        if not any(len(set(ys)) > 1 for _, ys in patch.values()):
            out = [p for p in out if p != "patch"]
        return out


def _value(v: Any) -> float:
    """A logged number as a float; NaN for what is not one (a non-finite value is kept as NaN)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _points(record: Mapping[str, Any], x: float, names: Mapping[str, str], sfx: str) -> list[Point]:
    """The points of one record: loss, learning rate, validation Dice (per class and mean), patch."""
    out: list[Point] = []
    if "loss" in record:
        out.append(("loss", f"train{sfx}", x, _value(record["loss"])))
    if "lr" in record:
        out.append(("lr", f"lr{sfx}", x, _value(record["lr"])))
    dice = record.get("val_dice")
    mean = record.get("val_mean")
    if isinstance(dice, Mapping):
        out += [("dice", f"{names.get(str(k), str(k))}{sfx}", x, _value(v)) for k, v in dice.items()]
        if mean is None:
            values = [_value(v) for v in dice.values()]
            mean = float(np.nanmean(values)) if any(not math.isnan(v) for v in values) else math.nan
    elif dice is not None and mean is None:  # older cascade logs: the mean alone
        mean = dice
    if mean is not None:
        out.append(("dice", f"mean{sfx}", x, _value(mean)))
    if isinstance(record.get("patch"), list):
        out += [("patch", f"axis {i}{sfx}", x, _value(s)) for i, s in enumerate(record["patch"])]
    return out


def series(records: Iterable[Mapping[str, Any]], names: Mapping[str, str] | None = None) -> Series:
    """The curves of ``records``, in order."""
    out = Series(dict(names or {}))
    for record in records:
        out.add(record)
    return out


def draw_progress(curves: Series, path: Path, title: str = "") -> bool:
    """Draw ``curves`` into the PNG ``path`` (atomically); False when there is nothing to draw.

    Matplotlib's Agg canvas is used directly, so drawing touches no global backend (a notebook's
    pyplot stays as it is) and needs no display.
    """
    shown = curves.shown()
    if not shown:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height = 2.3 * len(shown) + 0.7
    fig = Figure(figsize=(10, height))
    FigureCanvasAgg(fig)
    # fixed margins: a layout engine draws the figure twice, which doubles a long run's cost
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.5 / height, top=1 - 0.5 / height, hspace=0.35)
    axes = fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, shown, strict=True):
        _draw_panel(ax, panel, curves.panels[panel])
        for x, _ in curves.stages[1:]:  # where the next stage starts
            ax.axvline(x, color="grey", linewidth=0.8, linestyle=":")
    axes[-1].set_xlabel(curves.unit)
    fig.suptitle(title or _title(curves), fontsize=11)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return True


# a fixed legend place: "best" searches every point, slow on a long run's loss
_LEGEND = {"loss": "upper right", "dice": "lower right", "lr": "upper right", "patch": "upper left"}
_MAX_POINTS = 5000  # drawn per curve: a long run's raw loss is thinned, its moving average is not


def _draw_panel(ax: Any, panel: str, curves: dict[str, tuple[list[float], list[float]]]) -> None:
    ax.set_title(PANELS[panel], fontsize=9, loc="left")
    for label, (xs, ys) in curves.items():
        x, y = np.asarray(xs), np.asarray(ys)
        if panel == "loss":
            _draw_loss(ax, label, x, y)
        elif panel == "dice":
            mean = label.startswith("mean")
            style = {"linestyle": "--", "marker": "o", "linewidth": 2} if mean else {"marker": "."}
            ax.plot(x, y, markersize=3, label=label, **style)
        elif panel == "patch":
            _draw_patch(ax, label, x, y, curves)
        else:
            ax.plot(x, y, label=label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc=_LEGEND[panel])


def _draw_patch(
    ax: Any, label: str, x: np.ndarray, y: np.ndarray, curves: dict[str, tuple[list[float], list[float]]]
) -> None:
    """One axis's sizes as dots; an axis equal to the first at every step is that one's (cubes)."""
    first = next(iter(curves))
    if label != first and curves[label] == curves[first]:
        return
    same = all(c == curves[first] for c in curves.values())
    step = max(1, len(x) // _MAX_POINTS)
    size = 2 if len(x) > 1000 else 4
    ax.plot(x[::step], y[::step], ".", markersize=size, label="every axis" if same else label)


def _draw_loss(ax: Any, label: str, x: np.ndarray, y: np.ndarray) -> None:
    """The raw loss, faint, and its moving average over a fiftieth of the run (steps are noisy)."""
    step = max(1, len(x) // _MAX_POINTS)
    (line,) = ax.plot(x[::step], y[::step], linewidth=0.6, alpha=0.35)
    window = len(y) // 50
    if window >= 2:
        kernel = np.ones(window) / window
        smooth = np.convolve(y, kernel, mode="valid")
        ax.plot(x[window - 1 :], smooth, color=line.get_color(), label=f"{label} (mean of {window})")
    else:
        line.set_label(label)
        line.set_alpha(1.0)


def _title(curves: Series) -> str:
    """Where the run stands, and its last stage's best mean validation Dice."""
    text = f"{curves.unit} {curves.last:g}"
    means = [label for label in curves.panels.get("dice", {}) if label.startswith("mean")]
    if means:
        xs, ys = curves.panels["dice"][means[-1]]
        if any(not math.isnan(v) for v in ys):
            i, stage = int(np.nanargmax(ys)), means[-1][len("mean") :]
            text += f", best mean Dice {ys[i]:.3f}{stage} at {curves.unit} {xs[i]:g}"
    return text


def tensorboard_tag(panel: str, label: str) -> str:
    """``dice/fine/liver`` for the label ``liver (fine)``: TensorBoard's tags allow no spaces or brackets."""
    base, _, stage = label.partition(" (")
    parts = [panel, stage.rstrip(")"), base] if stage else [panel, base]
    return "/".join(re.sub(r"[^-\w.]", "_", p) for p in parts)


def open_writer(logdir: Path, curves: Series, rebuild: bool = False) -> Any:
    """A SummaryWriter into ``logdir`` that goes on after ``curves`` (the log's records so far).

    Event files already there (a resumed run's, an earlier stage's) are kept and continued:
    TensorBoard's ``purge_step`` hides what they hold after the log's last step, so the steps a
    killed run logged past its checkpoint are not shown twice. Without event files, or with
    ``rebuild``, the folder is emptied and filled with ``curves`` first (writing every point again
    costs about a minute per 100k steps: the event files' checksums are computed in Python).
    """
    check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    if not rebuild and any(logdir.glob("events.out.tfevents.*")):
        return SummaryWriter(str(logdir), purge_step=int(curves.last) + 1)
    shutil.rmtree(logdir, ignore_errors=True)
    writer = SummaryWriter(str(logdir))
    write_points(writer, curves.points())
    return writer


def write_points(writer: Any, points: Iterable[Point]) -> None:
    for panel, label, x, y in points:
        writer.add_scalar(tensorboard_tag(panel, label), y, int(x))


class Curves:
    """The curves of one run, kept up to date record by record: ``progress.png`` redrawn at each
    validation record (or when ``add`` is told to) and at the end, TensorBoard scalars written as
    they come (when ``tensorboard``, by default as :func:`tensorboard_logging` says).

    Use as a context manager: leaving it draws what is not drawn yet (also when the run failed,
    so that a diverged run can be seen; a drawing error then does not hide the run's own) and
    closes the event files. Ctrl-C leaves at once.
    """

    def __init__(
        self,
        folder: Path,
        records: Iterable[Mapping[str, Any]] = (),
        names: Mapping[str, str] | None = None,
        tensorboard: bool | None = None,
        png: Path | None = None,
        rebuild: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.png = png or self.folder / PNG
        self.series = series(records, class_names(self.folder) if names is None else names)
        self.stale = False
        self.tensorboard = _TENSORBOARD.get() if tensorboard is None else tensorboard
        self.writer: Any = None  # opened on entering, so that no event file is left open
        self.rebuild = rebuild  # the event files from the records alone, not continued

    def add(self, record: Mapping[str, Any], draw: bool | None = None) -> None:
        """Add a record; draw when ``draw``, by default when it holds a validation."""
        points = self.series.add(record)
        if self.writer is not None:
            write_points(self.writer, points)
        self.stale = True
        if ("val_dice" in record) if draw is None else draw:
            self.draw()

    def draw(self) -> bool:
        self.stale = False
        if self.writer is not None:
            self.writer.flush()  # TensorBoard shows the validation as the picture does
        return draw_progress(self.series, self.png, f"{self.folder.name}: {_title(self.series)}")

    def __enter__(self) -> Curves:
        if self.tensorboard:
            self.writer = open_writer(self.folder / TENSORBOARD, self.series, self.rebuild)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self.stale and kind is None:
                self.draw()
            elif self.stale and issubclass(kind, Exception):
                try:
                    self.draw()
                except Exception:  # noqa: BLE001 - the run's own error is the one to see
                    pass
        finally:
            if self.writer is not None:
                self.writer.close()
                self.writer = None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL log; a line a killed run cut short (or no log) is none."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def read_records(folder: Path) -> list[dict[str, Any]]:
    """A model folder's log records: ``log.jsonl`` (core trainer, cascade) or the patchwork's
    ``log.json``; of a patchwork stopped before its end, the longer of that and its ``resume.pt``'s
    log (both are the same run's, from its start)."""
    if (folder / "log.jsonl").is_file():
        return read_jsonl(folder / "log.jsonl")
    found = []
    if (folder / "log.json").is_file():
        try:
            found.append([r for r in json.loads((folder / "log.json").read_text()) if isinstance(r, dict)])
        except (ValueError, TypeError) as e:
            raise FlexPatchError(f"{folder / 'log.json'}: not a training log ({e})") from None
    if (folder / "resume.pt").is_file():
        from flexpatch.checkpoint import load_checkpoint

        found.append([r for r in load_checkpoint(folder / "resume.pt").get("log", []) if isinstance(r, dict)])
    if not found:
        raise FlexPatchError(f"{folder}: no training log (log.jsonl, log.json or resume.pt)")
    return max(found, key=len)


def class_names(folder: Path) -> dict[str, str]:
    """Class key of ``val_dice`` -> name: from the folder's ``dataset.json`` labels (core trainer,
    cascade) or ``patchwork.json``; empty when neither is there (the keys are drawn as they are)."""
    try:
        if (folder / "dataset.json").is_file():
            labels = json.loads((folder / "dataset.json").read_text()).get("labels", {})
            return {
                str(v): str(k) for k, v in labels.items() if isinstance(v, int) and not isinstance(v, bool)
            }
        if (folder / "patchwork.json").is_file():
            return {
                str(k): str(v)
                for k, v in json.loads((folder / "patchwork.json").read_text())["label_names"].items()
            }
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass  # names are a nicety: a damaged file leaves the keys
    return {}


def redraw(folder: str | Path, png: Path | None = None, tensorboard: bool = False) -> dict[str, Any]:
    """Draw a finished or killed run's ``progress.png`` (or ``png``) again from its log, and with
    ``tensorboard`` rebuild its event files; returns what was written and the records read."""
    folder = Path(folder)
    records = read_records(folder)
    with Curves(folder, records, tensorboard=tensorboard, png=png, rebuild=True) as curves:
        if not curves.draw():
            raise FlexPatchError(f"{folder}: its log holds no step to draw yet")
    return {
        "png": str(curves.png),
        "records": len(records),
        "tensorboard": str(folder / TENSORBOARD) if tensorboard else None,
    }
