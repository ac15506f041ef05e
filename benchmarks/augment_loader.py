"""Does data loading keep up with augmentation on? Patches per second of the batch stream with
augmentation off and on (nnU-Net's default set, and heavy), against the training step's own time.

One loader process makes batches at some rate; a training step consumes one batch. The line that
matters is ``workers needed = step rate / loader rate`` with augmentation on: below the machine's
spare cores, training never waits for data. Both stream settings are measured interleaved, in
the same process, on the same cases (synthetic 96^3 CT-like cases, 2 channels), one thread.

    python benchmarks/augment_loader.py              # CPU, about 3 minutes
    python benchmarks/augment_loader.py --device cuda # the step on the GPU, the loader on the CPU
    python benchmarks/augment_loader.py --smoke      # seconds, checks the script (under --work)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import describe_device, write_section  # noqa: E402

from flexpatch.models import create_model  # noqa: E402
from flexpatch.sampling import PatchStream, SamplingConfig, parse_patch_spec  # noqa: E402
from flexpatch.sampling.augment import parse_augment  # noqa: E402
from flexpatch.train.loss import segmentation_loss  # noqa: E402

SETTINGS = ("none", "default", "heavy")


def write_cases(folder: Path, shape: int, count: int) -> list[Path]:
    """Smooth random 2-channel images with blob labels (the stream only needs arrays)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        grid = np.indices((shape,) * 3).astype(np.float32) / shape
        image = np.stack([np.sin(7 * grid[0] + i) + grid[1], np.cos(5 * grid[2]) * grid[0]])
        image += rng.normal(scale=0.1, size=image.shape).astype(np.float32)
        label = ((grid - 0.5) ** 2).sum(0) < 0.05
        label = label.astype(np.int16) + (grid[0] > 0.8).astype(np.int16) * 2
        np.savez(folder / f"case{i}.npz", image=image.astype(np.float32), label=label)
        paths.append(folder / f"case{i}.npz")
    return paths


def stream_rate(paths: list[Path], patch: int, batch: int, setting: str, steps: int, seed: int) -> float:
    """Batches per second of one stream (in this process: one loader worker's rate)."""
    aug = parse_augment(setting)
    cfg = SamplingConfig(batch_size=batch, divisor=(8, 8, 8), augment=None if setting == "none" else aug)
    stream = PatchStream(paths, parse_patch_spec(str(patch), 3, 8), cfg, seed=seed, steps=steps)
    stream.batch(0)  # cases loaded into the cache first: steady state, as in a long run
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        stream.batch(step)
    return steps / (time.perf_counter() - t0)


def step_rate(patch: int, batch: int, device: str, steps: int) -> float:
    """Training steps per second of the default U-Net (forward, Dice+CE, backward, AdamW)."""
    net = create_model("unet", ndim=3, in_channels=2, out_channels=3).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = segmentation_loss(True)
    x = torch.randn(batch, 2, patch, patch, patch, device=device)
    y = torch.randint(0, 3, (batch, 1, patch, patch, patch), device=device)

    def one() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    one()  # warm-up (allocations, cuDNN choice)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def measure(paths: list[Path], patches: list[int], batch: int, repeats: int, steps: int) -> dict:
    """Median stream rate per (patch, setting), the settings interleaved in every repeat."""
    rates: dict[tuple[int, str], list[float]] = {}
    for r in range(repeats):
        for patch in patches:
            for setting in SETTINGS:
                rate = stream_rate(paths, patch, batch, setting, steps, seed=r)
                rates.setdefault((patch, setting), []).append(rate)
                print(f"repeat {r + 1}/{repeats} patch {patch}^3 {setting}: {rate:.1f} batches/s", flush=True)
    return {k: median(v) for k, v in rates.items()}


def report(loader: dict, steps_per_s: dict[int, float], batch: int, load: str) -> str:
    lines = [
        f"Batch {batch}; loader rates in batches/s of ONE loader process (one thread), median of the "
        "repeats, the three settings interleaved; step rate: the default U-Net's training step "
        f"(2 channels, 3 classes) on the benchmark's device. Machine load (1/5/15 min): {load}.",
        "",
        "| patch | step/s | loader none | loader default | loader heavy | workers needed (default) "
        "| workers needed (heavy) | bound by |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for patch, rate in steps_per_s.items():
        need = {s: rate / loader[patch, s] for s in SETTINGS}
        bound = (
            "compute" if need["default"] <= 1 else f"data unless >= {np.ceil(need['default']):.0f} workers"
        )
        lines.append(
            f"| {patch}^3 | {rate:.2f} | {loader[patch, 'none']:.1f} | {loader[patch, 'default']:.1f} | "
            f"{loader[patch, 'heavy']:.1f} | {need['default']:.2f} | {need['heavy']:.2f} | {bound} |"
        )
    worst = max(steps_per_s[p] / loader[p, "default"] for p in steps_per_s)
    lines += [
        "",
        f"Target (issue 'speed' part 4: loader >= 3x what the step consumes): one loader process gives "
        f"{1 / worst:.1f}x the step's consumption at the worst patch with the default set: "
        + ("PASS" if worst <= 1 / 3 else f"MISS with one worker; {np.ceil(3 * worst):.0f} workers reach 3x"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--work", type=Path, default=Path("/tmp/flexpatch_augment_loader"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one loader process, one thread: what a worker has
    shape, patches, repeats, steps = (32, [16], 1, 2) if args.smoke else (96, [32, 48, 64], 3, 12)
    paths = write_cases(args.work / "cases", shape, 2 if args.smoke else 4)
    load_before = "/".join(f"{v:.1f}" for v in os.getloadavg())
    loader = measure(paths, patches, 2, repeats, steps)
    torch.set_num_threads(os.cpu_count() or 1)  # the step uses the machine as training does
    step = {p: step_rate(p, 2, args.device, 1 if args.smoke else 3) for p in patches}
    load = f"{load_before} before, {'/'.join(f'{v:.1f}' for v in os.getloadavg())} after"
    body = report(loader, step, 2, load)
    print(body)
    cmd = (
        "python benchmarks/augment_loader.py"
        + (" --smoke" if args.smoke else "")
        + (f" --device {args.device}" if args.device != "cpu" else "")
    )
    target = args.work / "BENCHMARKS.md" if args.smoke else ROOT / "BENCHMARKS.md"
    key = "augment-loader-smoke" if args.smoke else f"augment-loader-{args.device.split(':')[0]}"
    write_section(target, key, "Augmentation: does loading keep up?", body, cmd, describe_device(args.device))


if __name__ == "__main__":
    main()
