"""Location context: FP, AP, AP + context, HN + context and a plain MONAI U-Net at one training compute.

One command: makes the 3D abdomen phantom (whose kidneys differ only by the side they lie on),
trains the flexpatch U-Net at a fixed patch (FP), with patch-size augmentation (AP), with AP and
coordinate channels (``context="coords"``), and as the hypernetwork with coordinates, plus a plain
MONAI baseline (``monai.networks.nets.UNet``, DiceCELoss, Adam, random crops at FP's patch), all
with the same steps, batch and seed; then segments the labelled test cases at windows from a
quarter of the image (the smallest multiple of the networks' divisor from there) to 1.5x the image
and writes mean Dice, the drop from each model's best, the left/right context-error rate, the
measured training seconds and training FLOPs, and the targets into BENCHMARKS.md, with a PNG.

    python benchmarks/context.py --mode quick   # CPU, 2 cores, < 30 min (48^3 at 4 mm)
    python benchmarks/context.py --mode full    # one GPU (96^3 at 2 mm, more cases and steps)
    python benchmarks/context.py --mode smoke   # seconds, checks the script (writes under --work only)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import describe_device, write_section  # noqa: E402

from flexpatch.data.dataset import load_dataset  # noqa: E402
from flexpatch.data.io import atomic_path, write_text  # noqa: E402
from flexpatch.data.phantom import make_phantom  # noqa: E402
from flexpatch.data.preprocess import load_preprocessed, preprocess_dataset  # noqa: E402
from flexpatch.data.resample import restore  # noqa: E402
from flexpatch.evaluate.sweep import run_sweep, summarize, write_rows  # noqa: E402
from flexpatch.infer.predictor import LoadedModel, load_model  # noqa: E402
from flexpatch.models import ModelSpec  # noqa: E402
from flexpatch.runtime import resolve_device  # noqa: E402
from flexpatch.train.config import TrainConfig  # noqa: E402
from flexpatch.train.loop import cache_dir_for, split_cases, train  # noqa: E402

MODES: dict[str, dict[str, Any]] = {
    "quick": dict(
        shape=48,
        spacing=4.0,  # the demo's phantom: a 19 cm field of view
        cases=8,
        test=3,
        fixed=32,
        low=16,
        steps=300,  # patch_size_robustness's quick budget: ~2 min per model on 2 cores
        batch=2,
        lr=3e-3,  # as the robustness quick mode: AP is far from converged at 1e-3 after 300 steps
        windows=(16, 24, 32, 40, 48, 64, 72),  # 12 (1/4) is no multiple of the divisor 8
        threads=2,
        workers=0,  # a loader process would compete with the 2 training threads for 2 cores
    ),
    "full": dict(
        shape=96,
        spacing=2.0,
        cases=24,
        test=6,
        fixed=64,
        low=32,
        steps=1500,
        batch=2,
        lr=1e-3,
        windows=(24, 32, 40, 48, 64, 80, 96, 112, 128, 144),
        threads=None,
        workers=6,
    ),
    "smoke": dict(
        shape=32,
        spacing=6.0,
        cases=3,
        test=1,
        fixed=16,
        low=16,
        steps=3,
        batch=2,
        lr=1e-3,
        windows=(16, 32, 48),
        threads=1,
        workers=0,
    ),
}
HYPER = {"subset": "norm+last"}
MONAI_CHANNELS = (16, 32, 64, 128)  # the widths of flexpatch's U-Net (channels 16, 3 levels)
TOLERANCE = {"quarter": 0.05, "third": 0.03}  # the allowed drop from the best Dice
MAX_CONTEXT_ERROR = 0.01

_LOG: Path | None = None


@dataclass
class Results:
    """Per model label: training seconds and FLOPs; ``names``: which labels are FP and MONAI."""

    seconds: dict[str, float]
    flops: dict[str, float]
    names: dict[str, str]
    monai_steps: int = 0


def log(message: str) -> None:
    """A progress line on stdout and in the run's log file (a long run can be followed with tail -f)."""
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    if _LOG is not None:
        with _LOG.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


def has_context() -> bool:
    """Whether this flexpatch's TrainConfig has the ``context`` field (added alongside this benchmark)."""
    return "context" in {f.name for f in dataclasses.fields(TrainConfig)}


def flexpatch_models(m: dict[str, Any]) -> dict[str, tuple[str, TrainConfig]]:
    """label -> (folder, config): one budget (steps, batch, seed, learning rate) for all.

    AP draws each axis uniformly from the multiples of 8 in [low, shape], whose mean is FP's edge in
    the quick and full modes, so AP's expected voxels per step equal FP's: equal steps are then
    also (nearly) equal FLOPs, which the report measures rather than assumes.
    Validation runs once, at the end: every model is used with its final weights, as MONAI's is.
    """
    base = dict(
        model="unet",
        steps=m["steps"],
        batch=m["batch"],
        lr=m["lr"],
        val_every=m["steps"],
        val_patch=(m["shape"],) * 3,
        workers=m["workers"],
        seed=0,
    )
    aug = f"uniform:{m['low']}-{m['shape']}"
    span = f"{m['low']}-{m['shape']}"
    models = {
        f"FP {m['fixed']}^3": ("fp", TrainConfig(patch=str(m["fixed"]), **base)),
        f"AP {span}": ("ap", TrainConfig(patch=aug, **base)),
    }
    if not has_context():
        log("note: TrainConfig has no 'context' field in this flexpatch: AP+ctx and HN+ctx are skipped")
        return models
    models[f"AP+ctx {span}"] = ("ap_ctx", TrainConfig(patch=aug, context="coords", **base))
    hn = TrainConfig(patch=aug, model_kwargs={"hyper": HYPER}, context="coords", **base)
    models[f"HN+ctx {span}"] = ("hn_ctx", hn)
    return models


# ---------------------------------------------------------------- training compute


def step_shapes(model_dir: Path) -> list[tuple[tuple[int, ...], int]]:
    """(patch, batch) of every training step, from the model folder's log.jsonl."""
    lines = (model_dir / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [(tuple(r["patch"]), int(r["batch"])) for r in records if "patch" in r]


def step_flops(net: torch.nn.Module, channels: int, patch: Sequence[int], batch: int, device: str) -> int:
    """FLOPs of one training step's forward and backward (FlopCounterMode: convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = net.training
    net.train()
    x = torch.randn(batch, channels, *patch, device=device)
    with FlopCounterMode(display=False) as counter:
        net(x).float().sum().backward()
    net.zero_grad(set_to_none=True)
    net.train(was_training)
    return int(counter.get_total_flops())


def training_flops(net: torch.nn.Module, channels: int, model_dir: Path, device: str) -> float:
    """Training FLOPs of the steps the log records.

    Convolution FLOPs grow linearly with the voxels of a batch (patch sides being multiples of the
    divisor); the hypernetwork adds a per-step cost. So two measured steps, the smallest and the
    largest batch drawn, give ``a + b * voxels`` for every step without counting each shape.
    """
    shapes = step_shapes(model_dir)
    voxels = [b * math.prod(p) for p, b in shapes]
    small, large = shapes[int(np.argmin(voxels))], shapes[int(np.argmax(voxels))]
    f_small = step_flops(net, channels, small[0], small[1], device)
    if min(voxels) == max(voxels):
        return float(f_small) * len(shapes)
    f_large = step_flops(net, channels, large[0], large[1], device)
    slope = (f_large - f_small) / (max(voxels) - min(voxels))
    return float(sum(f_small + slope * (v - min(voxels)) for v in voxels))


# ---------------------------------------------------------------- MONAI baseline


class MonaiModel(LoadedModel):
    """A MONAI network inside flexpatch's LoadedModel, so ``run_sweep`` scores it exactly as the
    flexpatch models (same cases, preprocessing, restoring to the original grid and metric),
    while its windows run through ``monai.inferers.sliding_window_inference``."""

    @property
    def divisor(self) -> tuple[int, ...]:
        return (2 ** (len(MONAI_CHANNELS) - 1),) * 3

    def probabilities(  # type: ignore[override]
        self,
        volume: Any,
        patch_size: Sequence[int] | None = None,
        overlap: float = 0.5,
        blend: str = "gaussian",
        batch_size: int = 4,
        **_: Any,
    ) -> np.ndarray:
        from monai.inferers import sliding_window_inference

        image, props = self.prepare(volume) if not isinstance(volume, tuple) else volume
        window = tuple(patch_size) if patch_size is not None else self.train_patch
        with torch.inference_mode():
            # plain MONAI: no cap at the training patch; a window beyond the image is zero-padded
            logits = sliding_window_inference(
                image.to(self.device), window, batch_size, self.net, overlap=overlap, mode=blend
            )
        probs = torch.softmax(torch.as_tensor(logits)[0].float(), dim=0).cpu().numpy()
        return restore(probs, props, is_label=False)


def monai_net(channels: int, classes: int) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=channels,
        out_channels=classes,
        channels=MONAI_CHANNELS,
        strides=(2,) * (len(MONAI_CHANNELS) - 1),
        num_res_units=2,
    )


def monai_steps(reference: LoadedModel, m: dict[str, Any], fp_flops: float, device: str) -> int:
    """Steps at which the MONAI U-Net spends FP's training FLOPs (at FP's patch and batch): its
    strided first layer makes a step far cheaper, so equal steps would not be equal compute."""
    net = monai_net(reference.plan.in_channels, reference.plan.num_classes).to(device)
    per_step = step_flops(net, reference.plan.in_channels, (m["fixed"],) * 3, m["batch"], device)
    return max(1, round(fp_flops / per_step))


def train_monai(
    reference: LoadedModel, data: Path, out: Path, m: dict[str, Any], device: str, steps: int
) -> float:
    """Train the MONAI U-Net on FP's training cases (the same split and preprocessed arrays),
    FP's patch, batch and learning rate, for ``steps`` (FP's FLOPs); returns the loop's seconds.
    Writes model.pt, log.jsonl (patch and batch per step, as flexpatch's) and dataset.json."""
    from monai.data import set_track_meta
    from monai.losses import DiceCELoss
    from monai.transforms import RandCropByPosNegLabeld

    set_track_meta(False)  # plain tensors out of the transforms
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(reference.model_dir / "dataset.json", out / "dataset.json")  # mirrored pairs, if any
    paths = preprocess_dataset(load_dataset(data), reference.plan, cache_dir_for(data, out), progress=False)
    train_paths, _ = split_cases(paths, reference.config["val_fraction"], reference.config["seed"])
    cases = [load_preprocessed(p)[:2] for p in train_paths]
    patch = (m["fixed"],) * 3
    # pos 1 : neg 2 centres a third of the crops on foreground, as flexpatch's foreground_ratio 0.33
    crop = RandCropByPosNegLabeld(("image", "label"), "label", patch, pos=1, neg=2, num_samples=1)
    crop.set_random_state(seed=0)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    net = monai_net(cases[0][0].shape[0], reference.plan.num_classes).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=m["lr"])
    amp = device.startswith("cuda")  # flexpatch trains in bfloat16 autocast on CUDA as well
    lines: list[str] = []
    t0 = time.perf_counter()
    net.train()
    for step in range(1, steps + 1):
        picks = [
            crop({"image": img, "label": lab[None]})[0]
            for img, lab in (cases[i] for i in rng.integers(len(cases), size=m["batch"]))
        ]
        x = torch.stack([torch.as_tensor(p["image"]) for p in picks]).float().to(device)
        y = torch.stack([torch.as_tensor(p["label"]) for p in picks]).long().to(device)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        lines.append(json.dumps({"step": step, "loss": value, "patch": list(patch), "batch": len(picks)}))
        if step % max(steps // 5, 1) == 0:
            log(f"  MONAI step {step}/{steps} loss {value:.3f}")
    seconds = time.perf_counter() - t0
    torch.save(net.state_dict(), out / "model.pt")
    write_text(out / "log.jsonl", "\n".join(lines) + "\n")
    return seconds


def load_monai(reference: LoadedModel, out: Path, m: dict[str, Any], device: str) -> MonaiModel:
    """The trained MONAI U-Net with FP's plan (preprocessing) and labels."""
    net = monai_net(reference.plan.in_channels, reference.plan.num_classes)
    net.load_state_dict(torch.load(out / "model.pt", map_location="cpu"))
    net.to(device).eval()
    patch = [m["fixed"]] * 3
    spec = ModelSpec("monai-unet", 3, reference.plan.in_channels, reference.plan.num_classes)
    method = {"method": "sliding-window", "window": patch, "fixed_size": True, "largest": patch}
    config = {"context": "none", "augment": "none"}
    return MonaiModel(net, spec, reference.plan, config, torch.device(device), out, method)


# ---------------------------------------------------------------- tables and targets


def by_window(rows: list[dict], key: str = "dice") -> dict[str, dict[int, float]]:
    """model -> isotropic window edge -> mean of ``key`` (Dice: over classes of case means, as
    ``summarize``; other keys: over every row that carries a finite value; NaN where none does)."""
    if key == "dice":
        return {
            model: {int(s.split("x")[0]): v["mean"] for s, v in sizes.items()}
            for model, sizes in summarize(rows).items()
        }
    out: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        value = r.get(key)
        cell = out.setdefault(r["model"], {}).setdefault(int(r["size"].split("x")[0]), [])
        if value is not None and np.isfinite(float(value)):
            cell.append(float(value))
    return {k: {w: float(np.mean(v)) if v else math.nan for w, v in d.items()} for k, d in out.items()}


def drops(dice: dict[int, float], image: int) -> tuple[float, float]:
    """Largest drop from the best Dice at windows in [1/4, 1/3) of the image, and from 1/3 up
    (NaN where the sweep has no such window)."""
    best = max(dice.values())
    quarter = [best - d for w, d in dice.items() if image / 4 <= w < image / 3]
    third = [best - d for w, d in dice.items() if w >= image / 3]
    return (max(quarter) if quarter else math.nan, max(third) if third else math.nan)


def _num(value: float, fmt: str = ".3f") -> str:
    return "n/a" if not np.isfinite(value) else format(value, fmt)


def dice_table(
    dice: dict[str, dict[int, float]], image: int, seconds: dict[str, float], flops: dict[str, float]
) -> str:
    windows = sorted(next(iter(dice.values())))
    fp = next(iter(flops.values()))  # FP is the first model
    head = [f"{w}^3 ({w / image:.2g}x)" for w in windows]
    cols = ["model", *head, "best", "drop at 1/4", "drop from 1/3 up", "train s", "train TFLOP", "FLOPs / FP"]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for model, d in dice.items():
        quarter, third = drops(d, image)
        cells = [f"{d[w]:.3f}" for w in windows] + [f"{max(d.values()):.3f}", _num(quarter), _num(third)]
        cells += [f"{seconds[model]:.0f}", f"{flops[model] / 1e12:.2f}", f"{flops[model] / fp:.2f}"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def context_table(errors: dict[str, dict[int, float]]) -> str:
    windows = sorted({w for d in errors.values() for w in d})
    lines = ["| model | " + " | ".join(f"{w}^3" for w in windows) + " |", "|---" * (len(windows) + 1) + "|"]
    for model, d in errors.items():
        cells = [_num(100 * d.get(w, math.nan), ".2f") for w in windows]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("PASS" if ok else "MISS")


def targets(
    dice: dict[str, dict[int, float]], errors: dict[str, dict[int, float]], image: int, names: dict[str, str]
) -> list[str]:
    """The issue's targets for the best flexpatch model (highest mean Dice over the sweep)."""
    fp, monai = names["fp"], names["monai"]
    ours = [k for k in dice if k != monai]
    best = max(ours, key=lambda k: float(np.mean(list(dice[k].values()))))
    d = dice[best]
    quarter, third = drops(d, image)
    q_ok = None if math.isnan(quarter) else quarter <= TOLERANCE["quarter"]
    t_ok = None if math.isnan(third) else third <= TOLERANCE["third"]
    err = [v for v in errors.get(best, {}).values() if np.isfinite(v)]
    e_ok = None if not err else max(err) < MAX_CONTEXT_ERROR
    behind = [w for w in d if w in dice[monai] and d[w] <= dice[monai][w]]
    return [
        f"- Best flexpatch model (highest mean Dice over the sweep): **{best}**",
        f"- Dice within {TOLERANCE['third']} of its best ({max(d.values()):.3f}) at every window from 1/3 of "
        f"the image up: largest drop {_num(third)} ({_verdict(t_ok)})",
        f"- Within {TOLERANCE['quarter']} at 1/4 of the image: drop {_num(quarter)} ({_verdict(q_ok)}"
        + ("; no window in [1/4, 1/3) of the image is a multiple of the divisor" if q_ok is None else "")
        + ")",
        f"- Its best >= FP's best: {max(d.values()):.3f} vs {max(dice[fp].values()):.3f} "
        f"({_verdict(max(d.values()) >= max(dice[fp].values()))})",
        f"- Context error < {100 * MAX_CONTEXT_ERROR:.0f}% at every window: worst "
        f"{_num(100 * max(err), '.2f') + '%' if err else 'n/a'} ({_verdict(e_ok)}"
        + ("; the sweep rows carry no context_error" if e_ok is None else "")
        + ")",
        f"- Ahead of the MONAI baseline at every window: behind or level at "
        f"{', '.join(f'{w}^3' for w in behind) or 'none'} ({_verdict(not behind)})",
    ]


def plot(dice: dict[str, dict[int, float]], image: int, path: Path) -> Path:
    """Mean Dice against the window edge, one line per model; the image size as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, d in dice.items():
        windows = sorted(d)
        ax.plot(windows, [d[w] for w in windows], marker="o", ms=3, label=model)
    ax.axvline(image, color="grey", ls="--", lw=1, label=f"image {image}^3")
    ax.set_xlabel("window edge (voxels, isotropic)")
    ax.set_ylabel("mean Dice (test cases, organs)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Dice against inference window, with and without location context")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the run


def make_data(work: Path, m: dict[str, Any]) -> Path:
    data = work / "phantom"
    if not (data / "dataset.json").exists():
        make_phantom(
            data,
            cases=m["cases"],
            shape=(m["shape"],) * 3,
            ndim=3,
            kind="abdomen",
            seed=0,
            test_cases=m["test"],
            spacing=(m["spacing"],) * 3,
            progress=False,
        )
    return data


def windows_for(model: LoadedModel, m: dict[str, Any]) -> list[tuple[int, ...]]:
    """The mode's windows that are multiples of the model's divisor (the others are reported)."""
    lcm = int(np.lcm.reduce([int(d) for d in model.divisor]))
    skipped = [w for w in m["windows"] if w % lcm]
    if skipped:
        log(f"  windows {skipped} skipped: not multiples of the divisor {lcm}")
    return [(w,) * 3 for w in m["windows"] if w % lcm == 0]


def run_models(work: Path, data: Path, m: dict[str, Any], device: str) -> tuple[list[dict], Results]:
    """Train, count and sweep every model: the sweep rows, and per model its training seconds and FLOPs."""
    test = load_dataset(data).test
    rows: list[dict] = []
    res = Results(seconds={}, flops={}, names={})
    models = flexpatch_models(m)
    for name, (folder, config) in models.items():
        log(f"train {name}: patch {config.patch}, context {getattr(config, 'context', 'none')}")
        result = train(
            data, work / folder, config, device=device, overwrite=True, progress=sys.stderr.isatty()
        )
        model = load_model(work / folder, device=device)
        res.seconds[name] = result.seconds
        res.flops[name] = training_flops(model.net, model.spec.in_channels, work / folder, device)
        log(f"  {result.seconds:.0f} s, {res.flops[name] / 1e12:.2f} TFLOP; sweep")
        rows += run_sweep(model, test, windows_for(model, m), progress=False, label=name)
    reference = load_model(work / "fp", device=device)
    monai = f"MONAI UNet {m['fixed']}^3"
    steps = monai_steps(reference, m, res.flops[next(iter(models))], device)
    log(f"train {monai}: {steps} steps (FP's training FLOPs)")
    res.seconds[monai] = train_monai(reference, data, work / "monai", m, device, steps)
    res.monai_steps = steps
    baseline = load_monai(reference, work / "monai", m, device)
    res.flops[monai] = training_flops(baseline.net, reference.plan.in_channels, work / "monai", device)
    log(f"  {res.seconds[monai]:.0f} s, {res.flops[monai] / 1e12:.2f} TFLOP; sweep")
    rows += run_sweep(baseline, test, windows_for(baseline, m), progress=False, label=monai)
    res.names.update(fp=next(iter(models)), monai=monai)
    return rows, res


def report(rows: list[dict], res: Results, m: dict[str, Any], loads: str, png: str) -> str:
    """The BENCHMARKS.md section's body: setup, compute, load, tables, targets, plot."""
    dice, errors = by_window(rows), by_window(rows, "context_error")
    has_errors = any(np.isfinite(v) for d in errors.values() for v in d.values())
    mean_edge = float(np.mean(range(m["low"], m["shape"] + 1, 8)))
    monai_ratio = res.flops[res.names["monai"]] / res.flops[res.names["fp"]]
    return "\n\n".join(
        [
            f"Phantom abdomen {m['shape']}^3 at {m['spacing']} mm, {m['cases']} training / {m['test']} test "
            f"cases. Every model: {m['steps']} steps, batch {m['batch']}, seed 0, learning rate {m['lr']:g}; "
            "flexpatch: U-Net (16 channels, 3 levels), AdamW poly, one validation at the end (final "
            f"weights used); AP draws each axis from the multiples of 8 in [{m['low']}, {m['shape']}] "
            f"(mean edge {mean_edge:g}; FP {m['fixed']}); HN predicts {HYPER['subset']}; +ctx: coordinate "
            f"channels (context='coords'). MONAI: UNet channels {MONAI_CHANNELS}, 2 residual units, "
            f"DiceCELoss, Adam (constant rate), RandCropByPosNegLabeld crops of {m['fixed']}^3 (1 "
            "foreground : 2 random) from flexpatch's preprocessed training cases (the same split), "
            "inference by monai.inferers.sliding_window_inference (gaussian, overlap 0.5, no cap at the "
            "training patch; windows beyond the image zero-padded). All models are scored by "
            "flexpatch.evaluate.sweep.run_sweep: Dice per organ on the original grid of each test case.",
            "Training compute: the same steps and batch for the flexpatch models. Seconds: the training "
            "loop as measured "
            "(flexpatch's includes its one validation). FLOPs: FlopCounterMode (convolutions and matmuls) "
            "over one forward+backward at the smallest and largest batch the log records, interpolated "
            f"linearly in voxels over every logged step; ratio to FP's. MONAI's UNet strides from its "
            f"first layer, so a step costs far less: it trains {res.monai_steps} steps, FP's FLOPs "
            f"({monai_ratio:.2f}x).",
            f"Machine load (1/5/15-min load average): {loads}.",
            "**Mean Dice by window (mean over organs of the test-case means)**\n\n"
            + dice_table(dice, m["shape"], res.seconds, res.flops),
            "**Context error (% of the voxels of a left/right label pair given the other side)**\n\n"
            + (context_table(errors) if has_errors else "n/a: the sweep rows carry no context_error."),
            "**Targets** (best flexpatch model)\n\n"
            + "\n".join(targets(dice, errors, m["shape"], res.names)),
            f"![Dice against window]({png})",
        ]
    )


def _load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    global _LOG
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=tuple(MODES), default="quick")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", default=str(ROOT / ".bench" / "context"), help="scratch folder")
    p.add_argument("--out", help="Markdown file (default BENCHMARKS.md; smoke: one under --work)")
    p.add_argument("--steps", type=int, help="override the mode's training steps")
    args = p.parse_args(argv)
    m = dict(MODES[args.mode], steps=args.steps or MODES[args.mode]["steps"])
    if m["threads"]:
        torch.set_num_threads(m["threads"])
    device = str(resolve_device(args.device))
    work = Path(args.work) / args.mode
    work.mkdir(parents=True, exist_ok=True)
    _LOG = work / "context.log"
    _LOG.write_text("")
    load_start = _load()
    log(f"context benchmark, {args.mode} mode, device {device}, {torch.get_num_threads()} threads")
    rows, res = run_models(work, make_data(work, m), m, device)
    write_rows(rows, work)
    loads = f"{load_start} at the start, {_load()} at the end, on {os.cpu_count()} cores"
    smoke = args.mode == "smoke"  # smoke writes under --work only, as the other benchmarks' smoke modes
    out = Path(args.out) if args.out else (work / "BENCHMARKS.md" if smoke else ROOT / "BENCHMARKS.md")
    figures = work if smoke else ROOT / "benchmarks" / "figures"
    png = plot(by_window(rows), m["shape"], figures / f"context_{args.mode}.png")
    body = report(rows, res, m, loads, os.path.relpath(png, out.parent))
    cmd = f"python benchmarks/context.py --mode {args.mode}" + (
        f" --steps {args.steps}" if args.steps else ""
    )
    title = f"Location context, {args.mode} mode"
    write_section(out, f"context-{args.mode}", title, body, cmd, describe_device(device))
    log(f"wrote {out} and {png}")
    print(body)


if __name__ == "__main__":
    # off: with sizes drawn per step, cuDNN would re-benchmark every new shape
    torch.backends.cudnn.benchmark = False
    main()
