"""Speed issue 21, part 1: does ``predict --precision bfloat16`` keep the float32 result's Dice?

Trains a fixed-size U-Net on the 3D abdomen phantom (the demo's data), then predicts its test cases
with ``predict_files`` in float32 and in bfloat16, interleaved, each repeat a whole prediction
(read, sliding window, restore, write), and scores both with ``evaluate``. The speed of the sliding
window itself against MONAI is ``benchmarks/sliding_window.py --precision bfloat16``.

    python benchmarks/precision.py            # 96^3 phantom, 600 training steps (CPU, ~10 min)
    python benchmarks/precision.py --smoke    # seconds; writes under --work only

Target (issue 21): mean Dice within 0.001 of float32's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _report import describe_device, write_section  # noqa: E402

MODES = {
    "full": {"shape": 96, "cases": 8, "test": 4, "steps": 600, "patch": 32, "repeats": 3},
    "smoke": {"shape": 32, "cases": 3, "test": 1, "steps": 2, "patch": 16, "repeats": 1},
}
PRECISIONS = ("float32", "bfloat16")
TARGET = 0.001
MODEL = {"channels": 16, "levels": 3}  # the CLI's default U-Net is wider; this one trains in minutes


def prepare(work: Path, m: dict) -> tuple[Path, Path]:
    """The phantom and a model trained on it, made once per --work."""
    from flexpatch.data.phantom import make_phantom
    from flexpatch.train.config import TrainConfig
    from flexpatch.train.loop import train

    data, model = work / "phantom", work / "model"
    if not (data / "dataset.json").is_file():
        make_phantom(
            data, cases=m["cases"], shape=(m["shape"],) * 3, test_cases=m["test"], seed=0, progress=False
        )
    if not (model / "model_best.pt").is_file():
        config = TrainConfig(model_kwargs=MODEL, patch=str(m["patch"]), steps=m["steps"], batch=2, workers=0,
                             val_every=max(1, m["steps"]), augment="none", seed=0)  # fmt: skip
        print(f"training a U-Net for {m['steps']} steps at {m['patch']}^3", flush=True)
        train(data, model, config, device="cpu", progress=True, overwrite=True)
    return data, model


def predict_all(data: Path, model: Path, work: Path, repeats: int) -> dict[str, list[float]]:
    """Seconds of each precision's whole prediction of the test cases, interleaved."""
    from flexpatch.infer.predictor import load_model, predict_files

    seconds: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    loaded = {p: load_model(model, device="cpu", precision=p) for p in PRECISIONS}
    shutil.rmtree(work / "pred", ignore_errors=True)  # this script's own outputs of an earlier run
    for r in range(repeats):
        for p in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
            out = work / "pred" / f"{p}_{r}"  # predict never overwrites: a folder per repeat
            start = time.perf_counter()
            predict_files(loaded[p], [data / "imagesTs"], out, progress=False, tta="none")
            seconds[p].append(time.perf_counter() - start)
            print(f"  {p}: {seconds[p][-1]:.1f} s", flush=True)
    return seconds


def scores(data: Path, work: Path) -> dict[str, dict[str, float]]:
    """Mean Dice per class and over classes of each precision's predictions."""
    from flexpatch.evaluate.metrics import evaluate_folders

    result = {}
    labels = json.loads((data / "dataset.json").read_text())["labels"]
    for p in PRECISIONS:
        pred = work / "pred" / f"{p}_0"
        report = evaluate_folders(pred, data / "labelsTs", labels, hd95=False, progress=False)
        summary = report.summary()
        result[p] = {name: float(v["dice"]["mean"]) for name, v in summary["classes"].items()}
        result[p]["mean"] = float(summary["mean"]["dice"]["mean"])
    return result


def report(m: dict, dice: dict, seconds: dict, load: str) -> tuple[str, bool]:
    classes = list(dice["float32"])
    lines = [
        "| precision | predict s (median) | " + " | ".join(classes) + " |",
        "|---" * (len(classes) + 2) + "|",
    ]
    for p in PRECISIONS:
        cells = " | ".join(f"{dice[p][c]:.4f}" for c in classes)
        lines.append(f"| {p} | {statistics.median(seconds[p]):.1f} | {cells} |")
    delta = abs(dice["bfloat16"]["mean"] - dice["float32"]["mean"])
    worst = max(abs(dice["bfloat16"][c] - dice["float32"][c]) for c in classes)
    speed = statistics.median(seconds["float32"]) / statistics.median(seconds["bfloat16"])
    met = delta <= TARGET
    body = (
        f"3D abdomen phantom {m['shape']}^3, {m['cases']} training and {m['test']} test cases; a U-Net "
        f"{json.dumps(MODEL)} trained {m['steps']} steps at {m['patch']}^3 (float32, no augmentation). "
        f"`predict_files` of the test cases at the training window, overlap 0.5, no mirroring, on the CPU "
        f"({torch.get_num_threads()} threads), float32 and bfloat16 interleaved, {m['repeats']} repeats; "
        f"Dice from `evaluate`, mean over test cases. Machine load (1/5/15 min): {load}.\n\n"
        + "\n".join(lines)
        + f"\n\nWhole prediction, float32 over bfloat16: {speed:.2f}x. Largest change of a class's Dice: "
        f"{worst:.4f}.\n\n**Target** (mean Dice within {TARGET} of float32's): "
        f"|{dice['bfloat16']['mean']:.4f} - {dice['float32']['mean']:.4f}| = {delta:.4f}: "
        f"{'met' if met else 'MISSED'}"
    )
    return body, met


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes; writes under --work only")
    p.add_argument("--work", type=Path, default=ROOT / ".bench" / "precision")
    args = p.parse_args(argv)
    mode = "smoke" if args.smoke else "full"
    m = MODES[mode]
    work = (args.work / mode).resolve()
    work.mkdir(parents=True, exist_ok=True)
    start_load = "/".join(f"{v:.1f}" for v in os.getloadavg())
    data, model = prepare(work, m)
    seconds = predict_all(data, model, work, m["repeats"])
    dice = scores(data, work)
    load = f"{start_load} at the start, {'/'.join(f'{v:.1f}' for v in os.getloadavg())} at the end"
    body, _ = report(m, dice, seconds, load)
    out = work / "BENCHMARKS.md" if args.smoke else ROOT / "BENCHMARKS.md"
    command = "python benchmarks/precision.py " + " ".join(sys.argv[1:] if argv is None else argv)
    title = f"Inference in bfloat16: Dice and time against float32 ({mode})"
    write_section(out, f"precision-{mode}", title, body, command.strip(), describe_device("cpu"))
    print(body)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
