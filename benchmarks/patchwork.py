"""Deep neural patchworks (seed 04) against plain sliding-window U-Nets at the same training budget.

One command: makes a large 3D abdomen phantom, trains (1) a patchwork with small matrices at
every level, (2) the same U-Net as a sliding-window model at that small patch and (3) at the
largest patch of the mode, each for the same wall-clock training budget (steps or rounds are
calibrated from a short timed run), then segments the test cases with each (the patchwork with
and without lazy evaluation) and writes Dice per class, inference seconds per case, peak memory
and the fraction of patches lazy evaluation runs into BENCHMARKS.md, with a PNG plot.

Targets (issue 7): patchwork Dice within 0.03 of the large-patch U-Net at <= 1/4 of its peak
memory; lazy evaluation >= 3x faster at a Dice loss <= 0.01.

    python benchmarks/patchwork.py --mode quick   # CPU, about 30 min on 2 cores: 96^3, 16^3 vs 48^3
    python benchmarks/patchwork.py --mode full    # one GPU: 256^3, 32^3 matrices vs 32^3 and 128^3
    python benchmarks/patchwork.py --smoke        # a minute; writes under .bench/ only

Finished trainings and inferences are kept under --work (result.json, info.json), so the full
mode can be run in several calls of a time-limited machine: each call goes on where the last stopped
(--fresh starts over; --one-step exits after each new training, e.g. 10-minute calls:
phantom + patchwork, U-Net small + U-Net large, inference and report).

Peak memory is measured in a fresh process per inference, above what the loaded model and image
hold: on CUDA ``max_memory_allocated``; on the CPU the bytes held in tensors, counted by the
planner's tracker in a pass of their own after the timed one (what CUDA's allocator would count,
less cuDNN workspaces; the RSS, used before, varied by a third from run to run). A last row runs
the patchwork with ``predict --memory`` at the target, a quarter of the large U-Net's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import describe_device, write_section  # noqa: E402

from flexpatch.data.dataset import load_dataset  # noqa: E402
from flexpatch.data.io import read_label  # noqa: E402
from flexpatch.data.phantom import ABDOMEN_LABELS, make_phantom  # noqa: E402
from flexpatch.errors import FlexPatchError  # noqa: E402
from flexpatch.evaluate.metrics import segmentation_metrics  # noqa: E402
from flexpatch.runtime import resolve_device  # noqa: E402

MIB = 2**20
FOV_REL = 1.0  # level 0 sees the whole image: one root patch, global context, least redundancy
CLASSES = {v: k for k, v in ABDOMEN_LABELS.items() if v}


@dataclass(frozen=True)
class Mode:
    side: int
    spacing: float
    cases: int
    test: int
    matrix: int
    large: int
    depth: int
    budget: float  # training seconds per method
    lazy: tuple[float, ...]
    lazy_mix: tuple[float, ...]  # lazy fractions also run with level mix (coarse levels fill the rest)
    batch_pw: int
    sw_batch: int
    # the U-Net's options (smoke: a narrow one, so the suite checks the code, not the machine)
    unet: tuple[tuple[str, int], ...] = ()
    probes: tuple[int, int, int] = (2, 7, 10)  # calibration runs: short, rough rate, least extra steps


MODES = {
    "quick": Mode(96, 2.0, 6, 2, 16, 48, 3, 480.0, (0.5, 0.25), (0.25,), 8, 2),
    # 240 s a method: its one H100 run (2026-11-23, GPU shared with 4 other benchmarks) took 22 min
    "full": Mode(256, 0.75, 8, 3, 32, 128, 3, 240.0, (0.5, 0.25), (0.25,), 16, 2),
    "smoke": Mode(48, 4.0, 3, 1, 16, 32, 2, 8.0, (0.5,), (0.5,), 4, 2, (("channels", 4),), (1, 2, 2)),
}
UNET = {}  # the registry's unet (seed 01's U-Net, 3.33 M parameters) as is


@dataclass
class Result:
    method: str
    train_seconds: float = float("nan")
    steps: int = 0
    infer_seconds: float = float("nan")
    peak_mib: float = float("nan")
    patches_fraction: float = float("nan")
    batch: int = 0  # the inference batch that ran (--memory rows: the planner's)
    refused: str = ""  # why the inference did not run (--memory below the smallest need)
    dice: dict[str, float] = field(default_factory=dict)

    @property
    def mean_dice(self) -> float:
        return float(np.mean(list(self.dice.values()))) if self.dice else float("nan")


def phantom(work: Path, mode: Mode) -> Path:
    ds = work / f"abdomen_{mode.side}"
    if not (ds / "dataset.json").is_file():
        make_phantom(
            ds,
            cases=mode.cases,
            shape=(mode.side,) * 3,
            test_cases=mode.test,
            spacing=(mode.spacing,) * 3,
            lesion_radius=(2.0, 5.0),
            progress=True,
        )
    return ds


def pw_config(mode: Mode, rounds: int) -> Any:
    from flexpatch.patchwork.config import PatchworkConfig

    return PatchworkConfig(
        scheme={
            "depth": mode.depth,
            "matrix": [[mode.matrix] * 3],
            "fov_rel": [FOV_REL] * 3,
            "destvox_rel": [1.0] * 3,
        },
        block_options={**UNET, **dict(mode.unet)},
        intermediate_loss=True,
        rounds=rounds,
        num_patches=8,
        batch_size=mode.batch_pw,
        lr=2e-3,
        ratio=0.5,
        autoweight=1.0,
        workers=1,
        val_fraction=0.0,  # every case trains, as the U-Nets' val_fraction 0: the same data for all
        seed=0,
    )


TARGET_MEMORY = 0.25  # issue 7: the patchwork's peak at most a quarter of the large U-Net's
CALIBRATION_ROUNDS = 5  # patchwork rounds of the timing run
CALIBRATION_SHARE = 0.04  # U-Nets: the second timing run's share of the training budget
ONE_STEP = {"on": False}  # --one-step: stop after each new training (one unit of work per call)


def resumable(out: Path, method: str, fn: Any) -> Result:
    """Train once: a finished method's result.json is reused, so a long run can go on in several calls."""
    done = out / "result.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        return Result(method, saved["train_seconds"], saved["steps"])
    result = fn()
    done.write_text(json.dumps({"train_seconds": result.train_seconds, "steps": result.steps}))
    if ONE_STEP["on"]:
        print(f"--one-step: trained {method}; run the same command again to go on")
        raise SystemExit(0)
    return result


def step_time(long_s: float, long_n: int, short_s: float, short_n: int) -> float:
    """Seconds per step (or round) from two timed runs of ``long_n`` and ``short_n``: their difference
    divided, which leaves start-up out. At smoke sizes that difference can be noise, even negative:
    floored at a quarter of the long run's mean, so it cannot size a run of thousands of steps (a
    smoke run's U-Net probe once ran 1201 steps, and its training 30000 in another)."""
    return max((long_s - short_s) / max(long_n - short_n, 1), long_s / long_n / 4, 1e-4)


def train_patchwork(ds: Path, out: Path, mode: Mode, device: str) -> Result:
    return resumable(out, "patchwork", lambda: _train_patchwork(ds, out, mode, device))


def _train_patchwork(ds: Path, out: Path, mode: Mode, device: str) -> Result:
    from flexpatch.patchwork.train import train_patchwork as run

    # rounds 2 to 5 time the steady state (round 1 also forks the workers and crops inline)
    run(
        ds,
        out / "calibrate",
        pw_config(mode, CALIBRATION_ROUNDS),
        device=device,
        progress=False,
        overwrite=True,
    )
    log = json.loads((out / "calibrate" / "log.json").read_text())
    per_round = step_time(log[-1]["seconds"], CALIBRATION_ROUNDS, log[0]["seconds"], 1)
    rounds = max(2, int(mode.budget / per_round))
    done = run(ds, out / "model", pw_config(mode, rounds), device=device, progress=True, overwrite=True)
    return Result("patchwork", done["seconds"], rounds)


def train_unet(ds: Path, out: Path, mode: Mode, patch: int, device: str) -> Result:
    return resumable(out, f"U-Net {patch}^3", lambda: _train_unet(ds, out, mode, patch, device))


def _train_unet(ds: Path, out: Path, mode: Mode, patch: int, device: str) -> Result:
    from flexpatch.train.config import TrainConfig
    from flexpatch.train.loop import train

    def config(steps: int) -> TrainConfig:
        return TrainConfig(
            model="unet",
            model_kwargs={**UNET, **dict(mode.unet)},
            patch=f"{patch},{patch},{patch}",
            steps=steps,
            batch=2,
            lr=1e-3,
            val_every=10**9,
            val_fraction=0.0,
            workers=1,
            seed=0,
            foreground_ratio=0.33,
            sampling="per_class",
        )

    # The difference of two runs times the steady state (no start-up, no validation). Five steps
    # were too few on an H100 (0.2 s of warm-up noise: the full mode's 32^3 U-Net trained 69 s of
    # a 240 s budget), so a rough rate from them sizes a second probe of about 4% of the budget.
    def seconds(steps: int) -> float:
        folder = out / f"calibrate{steps}"
        run = train(
            ds, folder, config(10**6), device=device, progress=False, stop_after=steps, overwrite=True
        )
        return run.seconds

    first, second, least = mode.probes
    short = seconds(first)
    rough = step_time(seconds(second), second, short, first)
    extra = min(max(least, int(CALIBRATION_SHARE * mode.budget / rough)), 2000)
    steps = max(4, int(mode.budget / step_time(seconds(first + extra), first + extra, short, first)))
    done = train(ds, out / "model", config(steps), device=device, progress=True, overwrite=True)
    return Result(f"U-Net {patch}^3", done.seconds, steps)


def infer_child(args: argparse.Namespace) -> None:
    """One method's inference on every test case in a fresh process; prints time and peak memory."""
    from flexpatch.data.io import read_image

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    files = sorted((Path(args.dataset) / "imagesTs").glob("*_0000.nii.gz"))
    vols = [read_image(f, 3) for f in files]
    if args.infer_child == "patchwork":
        from flexpatch.patchwork.apply import ApplyOptions
        from flexpatch.patchwork.predict import load_patchwork, segment_volume

        model = load_patchwork(args.model, str(device))
        lazy = None if args.lazy <= 0 else args.lazy
        memory = int(args.memory) if args.memory else None
        opts = ApplyOptions(lazy=lazy, batch_size=args.batch, level=args.level, memory=memory)

        def run(v):  # noqa: ANN001, ANN202
            array, _, stats = segment_volume(model, v, opts)
            return array, stats["patches"], stats.get("batch_size", args.batch)
    else:
        from flexpatch.infer.predictor import load_model

        lm = load_model(args.model, device=str(device))

        def run(v):  # noqa: ANN001, ANN202
            probs = lm.probabilities(v, batch_size=args.batch)
            return probs.argmax(0).astype(np.int16), None, args.batch

    try:
        run(vols[0])  # warm-up: cuDNN autotuning, allocator, caches (and --memory's plan)
    except FlexPatchError as e:  # --memory below the patchwork's smallest need: a result, not a crash
        print(json.dumps({"refused": str(e)}))
        return
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    seconds, patches = [], []
    out = Path(args.pred)
    out.mkdir(parents=True, exist_ok=True)
    for f, v in zip(files, vols):
        t = time.perf_counter()
        seg, count, batch = run(v)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
        patches.append(count)
        np.save(out / (f.name.replace("_0000.nii.gz", ".npy")), seg)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:  # the bytes held in tensors, as CUDA's allocator counts them, in a pass of its own (slower)
        from flexpatch.plan.memory import measure_peak

        peak = max(measure_peak(lambda v=v: run(v), "cpu") for v in vols)
    info = {"seconds": float(np.mean(seconds)), "peak_mib": peak / MIB, "patches": patches, "batch": batch}
    print(json.dumps(info))


def infer(
    result: Result,
    kind: str,
    model: Path,
    ds: Path,
    pred: Path,
    device: str,
    batch: int,
    lazy: float = 0.0,
    level: str = "last",
    memory: int = 0,
) -> dict:
    """Time one method in a fresh process (reusing pred/info.json of an earlier call), then score it."""
    saved = pred / "info.json"
    if saved.is_file():
        info = json.loads(saved.read_text())
    else:
        cmd = [sys.executable, __file__, "--infer-child", kind, "--model", str(model), "--dataset", str(ds)]
        cmd += ["--pred", str(pred), "--device", device, "--batch", str(batch), "--lazy", str(lazy)]
        cmd += ["--level", level, "--memory", str(memory)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"inference subprocess failed: {done.stderr.strip()[-3000:]}")
        info = json.loads(done.stdout.strip().splitlines()[-1])
        pred.mkdir(parents=True, exist_ok=True)  # a refused run made no folder
        saved.write_text(json.dumps(info))
    if "refused" in info:
        result.refused = info["refused"]
        return info
    result.infer_seconds, result.peak_mib = info["seconds"], info["peak_mib"]
    result.batch = int(info.get("batch", batch))
    result.dice = score(ds, pred)
    return info


def score(ds: Path, pred: Path) -> dict[str, float]:
    """Mean Dice per class over the test cases (cases where a class is absent from both are skipped)."""
    per_class: dict[str, list[float]] = {name: [] for name in CLASSES.values()}
    for lab_path in sorted((ds / "labelsTs").glob("*.nii.gz")):
        label = read_label(lab_path, 3).data
        seg = np.load(pred / lab_path.name.replace(".nii.gz", ".npy"))
        metrics = segmentation_metrics(seg, label, list(CLASSES), hd95=False)
        for value, name in CLASSES.items():
            per_class[name].append(metrics[value]["dice"])
    return {
        k: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan") for k, v in per_class.items()
    }


def table(results: list[Result], full_patches: float) -> str:
    names = list(CLASSES.values())
    head = "| method | train s | steps/rounds | infer s/case | batch | peak MiB | patches run | mean Dice | "
    head += " | ".join(names) + " |\n|" + "---|" * (8 + len(names)) + "\n"
    rows = []
    for r in results:
        if r.refused:  # the planner refused the budget: nothing ran
            rows.append(
                f"| {r.method} | {r.train_seconds:.0f} | {r.steps} | refused |" + " |" * (4 + len(names))
            )
            continue
        frac = "" if np.isnan(r.patches_fraction) else f"{r.patches_fraction:.2f}"
        cells = " | ".join(f"{r.dice.get(n, float('nan')):.3f}" for n in names)
        rows.append(
            f"| {r.method} | {r.train_seconds:.0f} | {r.steps} | {r.infer_seconds:.2f} | {r.batch} | "
            f"{r.peak_mib:.0f} | "
            f"{frac} | {r.mean_dice:.3f} | {cells} |"
        )
    return head + "\n".join(rows) + "\n"


def targets(results: list[Result], large: str) -> str:
    by = {r.method: r for r in results}
    pw, big = by["patchwork"], by[large]
    lines = [
        f"- Patchwork Dice {pw.mean_dice:.3f} vs {large} {big.mean_dice:.3f}: "
        f"gap {big.mean_dice - pw.mean_dice:+.3f} "
        f"(target <= 0.03): **{'met' if big.mean_dice - pw.mean_dice <= 0.03 else 'missed'}**",
        f"- Patchwork peak memory {pw.peak_mib:.0f} MiB = {pw.peak_mib / big.peak_mib:.2f}x of {large} "
        f"(target <= {TARGET_MEMORY}): "
        f"**{'met' if pw.peak_mib <= TARGET_MEMORY * big.peak_mib else 'missed'}**",
    ]
    for r in results:
        if r.method.startswith("patchwork, --memory") and r.refused:
            lines.append(f"- {r.method}: **missed**, the planner refused the budget: {r.refused}")
        elif r.method.startswith("patchwork, --memory"):
            lines.append(
                f"- {r.method}: the planner ran batch {r.batch}, peak {r.peak_mib:.0f} MiB = "
                f"{r.peak_mib / big.peak_mib:.2f}x (target <= {TARGET_MEMORY}): "
                f"**{'met' if r.peak_mib <= TARGET_MEMORY * big.peak_mib else 'missed'}**, "
                f"{r.infer_seconds:.2f} s per case, Dice {r.mean_dice:.3f}"
            )
    trained = {r.method: r.train_seconds for r in results if not r.method.startswith("patchwork")}
    if max(trained.values()) > 1.25 * min(trained.values()):
        # calibration extrapolates from a short run, and a shared or warming machine can mislead it
        lines.append(
            "- Training times differ by more than 25% ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in trained.items())
            + "): the comparison is not at equal budget"
        )
    for r in results:
        if r.method.startswith("patchwork lazy"):
            speed = pw.infer_seconds / r.infer_seconds
            loss = pw.mean_dice - r.mean_dice
            ok = speed >= 3 and loss <= 0.01
            lines.append(
                f"- {r.method}: {speed:.2f}x faster, runs {r.patches_fraction:.2f} of the patches, Dice loss "
                f"{loss:+.3f} (target >= 3x at <= 0.01): **{'met' if ok else 'missed'}**"
            )
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    names = [r.method for r in results]
    ax[0].bar(names, [r.mean_dice for r in results], color="tab:blue")
    ax[0].set_ylabel("mean Dice (test cases, 6 classes)")
    ax[1].scatter([r.peak_mib for r in results], [r.infer_seconds for r in results])
    for r in results:
        ax[1].annotate(r.method, (r.peak_mib, r.infer_seconds), fontsize=8)
    ax[1].set_xlabel("peak inference memory (MiB)")
    ax[1].set_ylabel("inference seconds per case")
    for a in ax:
        a.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("quick", "full"), default="quick")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", type=Path, default=ROOT / ".bench" / "patchwork")
    p.add_argument("--budget", type=float, help="training seconds per method (default: the mode's)")
    p.add_argument("--fresh", action="store_true", help="discard earlier results under --work first")
    p.add_argument(
        "--one-step", action="store_true", help="exit after each new training (time-limited calls)"
    )
    p.add_argument("--infer-child", choices=("patchwork", "unet"))
    p.add_argument("--model", type=Path)
    p.add_argument("--dataset", type=Path)
    p.add_argument("--pred", type=Path)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lazy", type=float, default=0.0)
    p.add_argument("--level", choices=("last", "mix"), default="last")
    p.add_argument("--memory", type=int, default=0, help="patchwork inference budget in bytes (0: none)")
    args = p.parse_args()
    if args.infer_child:
        infer_child(args)
        return
    name = "smoke" if args.smoke else args.mode
    mode = MODES[name]
    if args.budget:
        mode = Mode(**{**asdict(mode), "budget": args.budget})
    device = str(resolve_device(args.device))
    ONE_STEP["on"] = args.one_step
    work = args.work / name
    if args.fresh and work.exists():
        shutil.rmtree(work)
    ds = phantom(work, mode)
    load_dataset(ds)
    results = [train_patchwork(ds, work / "patchwork", mode, device)]
    results.append(train_unet(ds, work / f"unet{mode.matrix}", mode, mode.matrix, device))
    results.append(train_unet(ds, work / f"unet{mode.large}", mode, mode.large, device))
    for r, size in ((results[1], mode.matrix), (results[2], mode.large)):
        infer(
            r,
            "unet",
            work / f"unet{size}" / "model",
            ds,
            work / "pred" / f"unet{size}",
            device,
            mode.sw_batch,
        )
    pw = results[0]
    model = work / "patchwork" / "model"
    full = infer(pw, "patchwork", model, ds, work / "pred" / "pw", device, mode.batch_pw)
    full_count = float(np.mean([sum(c) for c in full["patches"]]))
    pw.patches_fraction = 1.0
    for lazy, level in [(f, "last") for f in mode.lazy] + [(f, "mix") for f in mode.lazy_mix]:
        mix = level == "mix"
        r = Result(f"patchwork lazy {lazy}" + (", level mix" if mix else ""), pw.train_seconds, pw.steps)
        pred = work / "pred" / (f"pw_lazy{lazy}" + ("_mix" if mix else ""))
        info = infer(r, "patchwork", model, ds, pred, device, mode.batch_pw, lazy, level)
        r.patches_fraction = float(np.mean([sum(c) for c in info["patches"]])) / full_count
        results.append(r)
    # predict --memory with the memory target as the budget: the planner picks the batch (at most 64)
    budget = int(TARGET_MEMORY * results[2].peak_mib * MIB)
    r = Result(f"patchwork, --memory {TARGET_MEMORY} x U-Net {mode.large}^3", pw.train_seconds, pw.steps)
    infer(r, "patchwork", model, ds, work / "pred" / f"pw_memory{budget}", device, 64, memory=budget)
    r.patches_fraction = 1.0
    results.append(r)
    large = f"U-Net {mode.large}^3"
    body = describe(mode) + "\n" + table(results, full_count) + "\n" + targets(results, large) + "\n"
    command = f"python benchmarks/patchwork.py --mode {args.mode}" + (" --smoke" if args.smoke else "")
    print(body)
    if args.smoke:
        (work / "report.md").write_text(body)
        return
    fig = ROOT / "benchmarks" / "figures" / f"patchwork_{name}.png"
    plot(results, fig)
    body += f"\n![patchwork {name}](benchmarks/figures/{fig.name})\n"
    write_section(
        ROOT / "BENCHMARKS.md",
        f"patchwork-{name}",
        f"Deep neural patchworks ({name})",
        body,
        command,
        describe_device(device),
    )


def describe(mode: Mode) -> str:
    parts = [
        f"3D abdomen phantom {mode.side}^3 at {mode.spacing} mm,",
        f"{mode.cases} training and {mode.test} test cases.",
        f"Patchwork: depth {mode.depth}, {mode.matrix}^3 matrices at every level, fov_rel {FOV_REL},",
        "finest voxel = the image's, tree generation, cos window,",
        f"one U-Net (seed 01's, {dict(mode.unet) or '3.33 M parameters'}) per level,",
        "intermediate losses, batch Dice + CE,",
        "centres on labels half the time with every label equally likely (DNP's ratio 0.5, autoweight 1),",
        f"8 chains per image and round, batch {mode.batch_pw}.",
        f"Sliding-window U-Nets (the same network) at {mode.matrix}^3 and {mode.large}^3,",
        "batch 2, centres on foreground a third of the time, every class equally likely (nnU-Net's",
        "per-class sampling), overlap 0.5, gaussian blending.",
        f"Each method trains for about {mode.budget:.0f} s",
        "(steps or rounds calibrated from a short timed run).",
        "Dice per class is the mean over test cases; inference seconds per case after a warm-up case;",
        "peak memory of inference in a fresh process, above what the loaded model and image hold (CUDA:",
        "max_memory_allocated; CPU: the bytes held in tensors, counted in a pass of their own).",
        f"The `--memory` row is the patchwork with {TARGET_MEMORY} x the large U-Net's peak as its",
        "budget: the planner picks the batch (at most 64). The U-Nets' training time includes one final",
        "validation pass (sliding window on one held-out case).",
    ]
    return " ".join(parts) + "\n"


if __name__ == "__main__":
    main()
