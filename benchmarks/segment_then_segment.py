"""Segment-then-segment (seed 05): the rough model alone at S against the cascade, for every S.

One command: for each task (nuclei on the 2D cells phantom; liver lesions, lesion against
everything else, on the 3D abdomen phantom) and each network input size S, trains a cascade
(``train_cascade``), segments the test images with the rough model alone on the whole image
resized to S (the baseline, ``Cascade.predict(..., baseline=True)``) and with the cascade, and
writes per-image Dice, IoU, precision and recall (means over test images, as the paper),
inference seconds per image and peak memory into BENCHMARKS.md, with a PNG plot and the
issue's target (cells at S = 32: cascade Dice >= baseline + 0.20, with higher recall).

    python benchmarks/segment_then_segment.py --mode quick   # CPU, < 10 min on 2 cores
    python benchmarks/segment_then_segment.py --mode full    # one GPU, every S; call again to go on
    python benchmarks/segment_then_segment.py --mode cpu     # every S on 2 CPU cores, about an hour
    python benchmarks/segment_then_segment.py --smoke        # seconds; writes under .bench/ only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import describe_device, write_section  # noqa: E402

from flexpatch.cascade.config import CascadeConfig  # noqa: E402
from flexpatch.cascade.infer import Cascade, load_cascade  # noqa: E402
from flexpatch.cascade.train import train_cascade  # noqa: E402
from flexpatch.data.dataset import Case, load_case, load_dataset  # noqa: E402
from flexpatch.data.io import read_label, save_json, write_image  # noqa: E402
from flexpatch.data.phantom import ABDOMEN_LABELS, make_phantom  # noqa: E402
from flexpatch.errors import FlexPatchError  # noqa: E402
from flexpatch.evaluate.metrics import segmentation_metrics  # noqa: E402
from flexpatch.runtime import resolve_device  # noqa: E402

METRICS = ("dice", "iou", "precision", "recall")
METHODS = ("baseline", "cascade")
MIB = 2**20
DATA_FIELDS = ("kind", "ndim", "shape", "cases", "test", "spacing", "radius")
TARGET_GAIN = 0.20  # the paper's cells at S = 32: Dice .573 -> .806


@dataclass(frozen=True)
class Task:
    """One dataset and the cascades trained on it, one per input size S.

    ``jitter`` (the fine stage's box augmentation) and ``min_side`` (rough components below it
    are noise) are in voxels of the image, so they scale with the objects: the paper's 16 and 5
    pixels fit nuclei in 256^2 images, not lesions a few voxels across.
    """

    kind: str  # "cells" or "lesions"
    ndim: int
    shape: int
    cases: int
    test: int
    sizes: tuple[int, ...]
    steps: int
    batch: int
    jitter: int = 16  # the paper's, in pixels
    min_side: int = 5  # the paper's, in pixels
    spacing: float = 2.0  # lesions: the abdomen phantom's default (cells are always 1 mm)
    radius: tuple[float, float] = (2.0, 5.0)  # lesions, in voxels

    @property
    def name(self) -> str:
        return f"{self.kind} {self.ndim}D"


# Cells keep the paper's jitter and min side; a lesion of radius 3 is 6 voxels across.
# fmt: off
MODES: dict[str, tuple[Task, ...]] = {  # kind, ndim, shape, cases, test, sizes, steps, batch, ...
    "quick": (
        Task("cells", 2, 256, 24, 8, (32, 64), 300, 8),
        Task("lesions", 3, 64, 16, 10, (32,), 250, 2, jitter=4, min_side=3, spacing=3.0, radius=(3, 7)),
    ),
    "full": (
        Task("cells", 2, 256, 64, 16, (32, 64, 128, 256), 2000, 8),
        Task("lesions", 3, 128, 40, 16, (32, 64, 96), 1500, 2, jitter=8, min_side=3, radius=(4, 10)),
    ),
    # full's data and sizes with quick's network and steps: every S of the issue without a GPU
    "cpu": (
        Task("cells", 2, 256, 64, 16, (32, 64, 128, 256), 300, 8),
        Task("lesions", 3, 128, 40, 16, (32, 64, 96), 250, 2, jitter=8, min_side=3, radius=(4, 10)),
    ),
    "smoke": (
        Task("cells", 2, 64, 4, 2, (16, 32), 2, 2, jitter=4, min_side=2),
        Task("lesions", 3, 32, 4, 6, (16,), 2, 2, jitter=2, min_side=2, spacing=6.0, radius=(2, 4)),
    ),
}
# fmt: on
# the seed-01 U-Net; quick mode halves its convolutions to fit the CPU budget, smoke shrinks it
MODEL_KWARGS: dict[str, dict[str, int]] = {
    "quick": {"convs_per_level": 2},
    "full": {},
    "cpu": {"convs_per_level": 2},
    "smoke": {"channels": 4, "levels": 2, "convs_per_level": 2},
}


def lesion_dataset(abdomen: Path, out: Path) -> Path:
    """A binary copy of an abdomen phantom: label 1 where the label is a lesion, 0 elsewhere.

    Test cases without a lesion are left out: Dice is undefined on them, and a per-image mean
    taken over different images for the two methods would compare nothing.
    """
    ds = load_dataset(abdomen)
    lesion = ABDOMEN_LABELS["lesion"]
    (out / "dataset.json").unlink(missing_ok=True)  # until rewritten, the folder is incomplete
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):  # an earlier run's cases must not mix in
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    kept = {"Tr": 0, "Ts": 0}
    for split, cases in (("Tr", ds.training), ("Ts", ds.test)):
        for case in cases:
            if case.label is None:
                raise FlexPatchError(f"{abdomen}: case {case.id} has no label")
            label = read_label(case.label, ndim=3)
            mask = (label.data == lesion).astype(np.uint8)
            if split == "Ts" and not mask.any():
                continue
            write_image(out / f"labels{split}" / case.label.name, mask, label.affine)
            for image in case.images:
                shutil.copyfile(image, out / f"images{split}" / image.name)
            kept[split] += 1
    if kept["Ts"] == 0:
        raise FlexPatchError(f"{abdomen}: no test case holds a lesion; ask for more test cases")
    meta = json.loads((abdomen / "dataset.json").read_text())
    meta.pop("mirrored_pairs", None)  # it names the abdomen's kidneys; lesion vs rest has no sides
    meta.update(
        name="phantom_lesions",
        description=f"liver lesions of {abdomen.name}, lesion vs rest",
        labels={"background": 0, "lesion": 1},
        numTraining=kept["Tr"],
        numTest=kept["Ts"],
    )
    save_json(out / "dataset.json", meta)  # last: its presence marks a complete dataset
    return out


def make_data(task: Task, work: Path) -> Path:
    """The task's dataset under ``work``, made once and reused while the task's data settings hold."""
    out = work / task.kind
    # as JSON gives it back (tuples as lists), to compare with the stamp of the last run
    settings = json.loads(json.dumps({k: v for k, v in asdict(task).items() if k in DATA_FIELDS}))
    stamp = work / f"{task.kind}.data.json"
    if (out / "dataset.json").exists() and stamp.exists() and json.loads(stamp.read_text()) == settings:
        return out
    stamp.unlink(missing_ok=True)
    common = dict(cases=task.cases, shape=(task.shape,) * task.ndim, ndim=task.ndim, seed=0)
    if task.kind == "cells":
        make_phantom(out, kind="cells", test_cases=task.test, overwrite=True, **common)
    else:
        abdomen = make_phantom(
            work / "abdomen",
            overwrite=True,
            kind="abdomen",
            test_cases=task.test,
            spacing=(task.spacing,) * task.ndim,
            lesion_radius=task.radius,
            **common,
        )
        lesion_dataset(abdomen, out)
    save_json(stamp, settings)
    return out


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """``fn()``, its seconds and, on CUDA, its peak memory in MiB above the allocation before it."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - before) / MIB if cuda else float("nan")
    return out, seconds, peak


def _status_kib(field: str) -> int:
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(model_dir: str, images: list[str], ndim: int, method: str) -> None:
    """Body of the CPU memory subprocess: one prediction in a fresh process; print its peak RSS rise.

    The cascade and the image are loaded first, then the peak mark is reset (Linux clear_refs),
    so the number is what the call itself adds: preprocessing, both passes and the outputs.
    """
    cascade = load_cascade(model_dir, device="cpu")
    volume, _ = load_case(Case("memory", tuple(Path(p) for p in images), None), ndim)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    cascade.predict(volume, baseline=method == "baseline")
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def cpu_peak(model_dir: Path, case: Case, ndim: int, method: str) -> float:
    """Peak RSS rise (MiB) of one prediction, measured in a fresh subprocess (NaN if it fails).

    In-process numbers would undercount: the allocator hands back memory kept from earlier calls.
    """
    cmd = [sys.executable, __file__, "--memory-child", str(model_dir), "--ndim", str(ndim)]
    cmd += ["--method", method, "--images", *map(str, case.images)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"memory subprocess failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
        return float("nan")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"])


def score(
    cascade: Cascade, cases: list[Case], ndim: int, device: torch.device, cpu_memory: bool = True
) -> dict[str, dict]:
    """Per method: mean over images of each metric (and Dice's std), seconds per image, peak MiB, boxes.

    Peak memory: CUDA, the largest over the images; CPU, one subprocess on the first image
    (all images share a shape), or NaN without ``cpu_memory``.
    """
    runs: dict[str, dict[str, list[float]]] = {m: {} for m in METHODS}
    for i, case in enumerate(cases):
        volume, label = load_case(case, ndim)
        if label is None:
            raise FlexPatchError(f"test case {case.id} has no label in labelsTs")
        for method in METHODS:
            call = partial(cascade.predict, volume, baseline=method == "baseline")
            if i == 0:
                call()  # warm-up: lazy initialisation and cuDNN autotuning are not inference time
            seg, seconds, peak = timed(call, device)
            metrics = segmentation_metrics(seg.labels, label.data, [1], hd95=False)[1]
            row = runs[method]
            for k, v in {**metrics, "seconds": seconds, "peak_mib": peak, "boxes": len(seg.boxes)}.items():
                row.setdefault(k, []).append(v)
    out = {}
    for method, r in runs.items():
        peak = max(r["peak_mib"]) if device.type == "cuda" else float("nan")
        if device.type != "cuda" and cpu_memory:
            peak = cpu_peak(cascade.model_dir, cases[0], ndim, method)
        out[method] = {
            **{k: float(np.nanmean(r[k])) for k in (*METRICS, "seconds", "boxes")},
            "dice_std": float(np.nanstd(r["dice"])),
            "peak_mib": peak,
            "images": len(cases),
        }
    return out


def run_task(task: Task, mode: str, work: Path, device: torch.device, fresh: bool = False) -> list[dict]:
    """Train one cascade per S and score both methods; one row per (S, method).

    The rows of each finished S are kept beside its models and reused while the task, the
    cascade's settings and the device type stay the same (``fresh``: train every S again)."""
    data = make_data(task, work)
    rows = []
    for size in task.sizes:
        config = CascadeConfig.of(
            input_size=size,
            steps=task.steps,
            batch=task.batch,
            jitter=task.jitter,
            min_side=task.min_side,
            val_every=max(task.steps // 4, 1),
            model_kwargs=MODEL_KWARGS[mode],
            seed=0,
        )
        folder = work / f"{task.kind}_S{size}"
        # a finished S is kept (rows.json), so a mode can run over several time-limited calls
        key = json.loads(json.dumps({"task": asdict(task), "config": asdict(config), "device": device.type}))
        done = folder / "rows.json"
        if fresh:
            done.unlink(missing_ok=True)
        if done.is_file() and (saved := json.loads(done.read_text()))["key"] == key:
            rows += saved["rows"]
            continue
        trained = train_cascade(data, folder, config, device=str(device), overwrite=True)
        cascade = load_cascade(trained["model_dir"], device=str(device))
        val = {"baseline": trained["baseline_val_dice"], "cascade": trained["best_val_dice"]}
        new = [
            {
                "task": task.name,
                "S": size,
                "method": method,
                **res,
                "val_dice": val[method],
                "train_s": trained["seconds"],
            }
            for method, res in score(cascade, list(load_dataset(data).test), task.ndim, device).items()
        ]
        save_json(done, {"key": key, "rows": new})
        rows += new
    return rows


def results_table(rows: list[dict]) -> str:
    head = (
        "| task | S | method | Dice | IoU | precision | recall | boxes / image | s / image | peak MiB "
        "| val Dice (training) |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [
        f"| {r['task']} | {r['S']} | {r['method']} | {r['dice']:.3f} ± {r['dice_std']:.3f} | {r['iou']:.3f} "
        f"| {r['precision']:.3f} | {r['recall']:.3f} | {r['boxes']:.1f} | {r['seconds']:.3f} "
        f"| {r['peak_mib']:.0f} | {r['val_dice']:.3f} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def targets(rows: list[dict]) -> list[str]:
    """At the smallest S of each task: cascade Dice >= baseline + 0.20 with higher recall."""
    out = []
    for name in dict.fromkeys(r["task"] for r in rows):
        size = min(r["S"] for r in rows if r["task"] == name)
        base, sts = (
            {r["method"]: r for r in rows if (r["task"], r["S"]) == (name, size)}[m] for m in METHODS
        )
        gain = sts["dice"] - base["dice"]
        met = gain >= TARGET_GAIN and sts["recall"] > base["recall"]
        out.append(
            f"- {name}, S = {size}: cascade Dice {sts['dice']:.3f} vs baseline {base['dice']:.3f} "
            f"({gain:+.3f}), recall {sts['recall']:.3f} vs {base['recall']:.3f} "
            f"({'the paper' if name.startswith('cells') else 'the same rule'}: Dice >= baseline + "
            f"{TARGET_GAIN:.2f} with higher recall: {'met' if met else 'MISSED'})"
        )
    return out


def plot(rows: list[dict], path: Path) -> Path:
    """Dice (solid) and recall (dashed) against S, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, name in zip(axes[0], tasks, strict=True):
        for method, colour in zip(METHODS, ("tab:grey", "tab:blue"), strict=True):
            sel = [r for r in rows if r["task"] == name and r["method"] == method]
            sizes = [r["S"] for r in sel]
            ax.plot(sizes, [r["dice"] for r in sel], "o-", color=colour, label=f"{method} Dice")
            ax.plot(
                sizes, [r["recall"] for r in sel], "s--", color=colour, alpha=0.6, label=f"{method} recall"
            )
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(sizes, [str(v) for v in sizes])
        ax.set(title=name, xlabel="network input size S (voxels per axis)", ylim=(0, 1))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def describe(mode: str, device: torch.device) -> str:
    """The section's opening: methods, metrics, how time and memory were measured, the settings."""
    tasks = [
        f"- {t.name}: {t.shape}^{t.ndim} images"
        + (f" (lesion radius {t.radius} voxels, {t.spacing} mm)" if t.kind == "lesions" else "")
        + f", {t.cases} training / {t.test} test cases"
        + (" (those holding a lesion kept)" if t.kind == "lesions" else "")
        + f"; S = {', '.join(map(str, t.sizes))}; {t.steps} steps per stage, batch {t.batch}, "
        f"jitter {t.jitter}, min side {t.min_side}"
        for t in MODES[mode]
    ]
    memory = (
        "CUDA `max_memory_allocated` above the allocation before the call, the largest over the test images"
        if device.type == "cuda"
        else "the rise of the peak RSS (VmHWM, reset once the models and the image are loaded) during one "
        "prediction of the first test image, in a fresh subprocess"
    )
    return (
        "Baseline: the rough network alone on the whole image resized to S, upsampled back "
        "(`Cascade.predict(..., baseline=True)`); cascade: one box per component of the rough mask, each "
        "resized to S and segmented by the fine network, fused by OR. U-Net of seed 01 "
        f"(kwargs {MODEL_KWARGS[mode] or 'default'}), AdamW 1e-3 poly, seed 0, the fine network starts from "
        "the rough one. Metrics: per-image Dice, IoU, precision, recall of the foreground on the input grid "
        "(`segmentation_metrics`), mean (± std for Dice) over test images. Seconds per image: one "
        f"`Cascade.predict` (preprocessing included) after a warm-up. Peak memory: {memory}.\n\n"
        + "\n".join(tasks)
    )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("quick", "full", "cpu"), default="quick")
    p.add_argument("--smoke", action="store_true", help="tiny data, 2 steps: checks the script in seconds")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", default=str(ROOT / ".bench" / "sts"), help="scratch folder")
    p.add_argument("--out", help="Markdown file (default BENCHMARKS.md; smoke: WORK/smoke/BENCHMARKS.md)")
    p.add_argument("--fresh", action="store_true", help="train every S again (default: keep finished ones)")
    for hidden in ("--memory-child", "--method", "--ndim"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--images", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.images, int(args.ndim), args.method)
        return []
    mode = "smoke" if args.smoke else args.mode
    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True  # every input is S per axis: one autotuning per S
    work = Path(args.work) / mode
    rows = [row for task in MODES[mode] for row in run_task(task, mode, work, device, args.fresh)]
    save_json(work / "results.json", {"mode": mode, "tasks": [asdict(t) for t in MODES[mode]], "rows": rows})
    out = Path(args.out) if args.out else (work / "BENCHMARKS.md" if args.smoke else ROOT / "BENCHMARKS.md")
    png = plot(
        rows, (work if args.smoke else ROOT / "benchmarks" / "figures") / f"segment_then_segment_{mode}.png"
    )
    trained = {f"{r['task']} S={r['S']}": r["train_s"] for r in rows}
    body = "\n\n".join(
        [
            describe(mode, device),
            "Training time, both stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in trained.items()),
            results_table(rows),
            "**Targets**\n\n" + "\n".join(targets(rows)),
            f"![Dice and recall against S]({os.path.relpath(png, out.resolve().parent)})",
        ]
    )
    cmd = "python benchmarks/segment_then_segment.py " + ("--smoke" if args.smoke else f"--mode {mode}")
    write_section(
        out, f"sts-{mode}", f"Segment-then-segment, {mode} mode", body, cmd, describe_device(str(device))
    )
    print(body)
    return rows


if __name__ == "__main__":
    main()
