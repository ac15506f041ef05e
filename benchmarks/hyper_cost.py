"""What does a hypernetwork training step cost against the plain model's? Seconds per training
step (forward, Dice+CE, backward, AdamW) of the default U-Net, plain and wrapped in the
patch-size hypernetwork with each subset of predicted weights.

The default subset of ``--hyper`` must keep a step within about 2x the plain model's (issue
"workflow" part 7). The variants run interleaved in every repeat (plain, then each subset,
then again), in one process with one thread, so machine load hits them alike; the table gives
medians.

    python benchmarks/hyper_cost.py               # CPU, 32^3 batch 2: a few minutes
    python benchmarks/hyper_cost.py --device cuda
    python benchmarks/hyper_cost.py --smoke       # seconds, checks the script (under --work)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import describe_device, write_section  # noqa: E402

from flexpatch.models import create_model  # noqa: E402
from flexpatch.train.loss import segmentation_loss  # noqa: E402

# None: the plain model; else the --hyper-subset value
VARIANTS: tuple[str | None, ...] = (None, "norm+last", "all")
TARGET = 2.0  # a hypernetwork step may cost at most this many plain steps


def _label(variant: str | None) -> str:
    return "plain" if variant is None else f"--hyper {variant}"


def make(variant: str | None, model_kwargs: dict) -> torch.nn.Module:
    kwargs = dict(model_kwargs)
    if variant is not None:
        kwargs["hyper"] = {"subset": variant}
    return create_model("unet", ndim=3, in_channels=1, out_channels=3, **kwargs)


def step_seconds(net: torch.nn.Module, patch: int, batch: int, steps: int, device: str) -> float:
    """Median seconds of ``steps`` training steps after one warm-up step (allocations, Adam's states)."""
    net = net.to(device).train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = segmentation_loss(True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, patch, patch, patch, generator=gen).to(device)
    y = torch.randint(0, 3, (batch, 1, patch, patch, patch), generator=gen).to(device)

    def one() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    one()
    return median(one() for _ in range(steps))


def measure(patch: int, batch: int, repeats: int, steps: int, device: str, model_kwargs: dict) -> dict:
    """Per variant: the median over repeats of each repeat's median step time, plus sizes."""
    times: dict[str | None, list[float]] = {v: [] for v in VARIANTS}
    sizes: dict[str | None, tuple[int, int]] = {}
    for r in range(repeats):
        for variant in VARIANTS:
            net = make(variant, model_kwargs)
            total = sum(p.numel() for p in net.parameters())
            trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
            sizes[variant] = (total, trained)
            seconds = step_seconds(net, patch, batch, steps, device)
            times[variant].append(seconds)
            print(f"repeat {r + 1}/{repeats} {_label(variant)}: {seconds:.3f} s/step", flush=True)
            del net
            gc.collect()
    return {v: (median(t), *sizes[v]) for v, t in times.items()}


def report(result: dict, patch: int, batch: int, load: str, threads: int, net: str) -> str:
    plain = result[None][0]
    lines = [
        f"{net} (3D, 1 channel, 3 classes), patch {patch}^3, batch {batch}, {threads} thread(s); "
        "seconds per training step (forward, Dice+CE, backward, AdamW), median of the repeats, the "
        f"variants interleaved. Machine load (1/5/15 min): {load}.",
        "",
        "| variant | parameters | trained | s/step | x plain |",
        "|---|---|---|---|---|",
    ]
    for variant, (seconds, total, trained) in result.items():
        lines.append(
            f"| {_label(variant)} | {total / 1e6:.1f} M | {trained / 1e6:.1f} M | {seconds:.3f} | "
            f"{seconds / plain:.2f} |"
        )
    within = [v for v in VARIANTS if v is not None and result[v][0] / plain <= TARGET]
    lines += [
        "",
        f"Target (issue 'workflow' part 7: the default subset's step at most {TARGET:g}x the plain "
        "model's): within it "
        + (", ".join(_label(v) for v in within) if within else "none")
        + "; `--hyper` defaults to `--hyper-subset norm+last`: "
        + ("PASS" if "norm+last" in within else "MISS"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/tmp/flexpatch_hyper_cost"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # smoke: a narrow U-Net at 16^3 so that even "all" takes seconds; the full run is the default net
    patch, repeats, steps, kwargs = (16, 1, 1, {"channels": 4}) if args.smoke else (32, 3, 3, {})
    load_before = "/".join(f"{v:.1f}" for v in os.getloadavg())
    result = measure(patch, 2, repeats, steps, args.device, kwargs)
    load = f"{load_before} before, {'/'.join(f'{v:.1f}' for v in os.getloadavg())} after"
    net = "U-Net with channels 4" if args.smoke else "Default U-Net"
    body = report(result, patch, 2, load, args.threads, net)
    print(body)
    cmd = (
        "python benchmarks/hyper_cost.py"
        + (" --smoke" if args.smoke else "")
        + (f" --device {args.device}" if args.device != "cpu" else "")
        + (f" --threads {args.threads}" if args.threads != 1 else "")
    )
    target = args.work / "BENCHMARKS.md" if args.smoke else ROOT / "BENCHMARKS.md"
    key = "hyper-cost-smoke" if args.smoke else f"hyper-cost-{args.device.split(':')[0]}"
    title = "Hypernetwork: cost of a training step by subset"
    write_section(target, key, title, body, cmd, describe_device(args.device))


if __name__ == "__main__":
    main()
