"""Peak inference memory of the patchwork benchmark's methods by tensor accounting, without a GPU.

The patchwork benchmark's memory target (issue 7: at most 1/4 of the large-patch U-Net's peak)
is about GPU memory, which a machine without a GPU cannot measure. The bytes a call holds in
tensors are the same on any device, though: this script counts them on the CPU with the
planner's tracker (every tensor an op allocates, from allocation to release; what CUDA's
``max_memory_allocated`` counts, less cuDNN workspaces and allocator rounding) while each
method segments one image of the mode's size, exactly as the benchmark's inference does
(``segment_volume`` for the patchwork, the predictor's sliding window and softmax for the U-Net).

The networks are untrained: memory does not depend on the weights, and lazy evaluation keeps a
fixed number of patches. As on a GPU, the patchwork's image stays on the host (only its crops
are counted) and the U-Net's image counts (it is moved to the device); the weights are left out,
as the benchmark subtracts what the loaded model holds. A last patchwork row runs ``predict
--memory`` with the target as its budget: the batch is the planner's, and its prediction is
checked against the count.

    python benchmarks/patchwork_memory.py --mode full    # 256^3: about 20 min on 2 CPU cores
    python benchmarks/patchwork_memory.py --mode smoke   # seconds; writes under .bench/ only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import describe_device, write_section  # noqa: E402
from patchwork import CLASSES, MIB, MODES, Mode, pw_config  # noqa: E402

from flexpatch.data.io import Volume  # noqa: E402
from flexpatch.infer.sliding_window import sliding_window  # noqa: E402
from flexpatch.models import create_model  # noqa: E402
from flexpatch.patchwork.apply import ApplyOptions  # noqa: E402
from flexpatch.patchwork.predict import LoadedPatchwork, segment_volume  # noqa: E402
from flexpatch.patchwork.train import build_net  # noqa: E402
from flexpatch.plan.memory import measure_peak  # noqa: E402

TARGET = 0.25  # issue 7: patchwork peak <= 1/4 of the large-patch U-Net's


def _patchwork(mode: Mode) -> LoadedPatchwork:
    config = pw_config(mode, 1)
    scheme = config.scheme_obj(3)
    net = build_net(config, scheme, 1, len(CLASSES)).eval()
    meta = {"config": {"categorical": True}, "label_values": sorted(CLASSES), "in_channels": 1}
    return LoadedPatchwork(net, scheme, meta, None, torch.device("cpu"))


def patchwork_rows(mode: Mode, volume: Volume) -> list[tuple[str, int]]:
    """Peak bytes of the patchwork's inference, plain and with each lazy setting of the benchmark."""
    model = _patchwork(mode)
    # the benchmark's settings at its batch, and the plain patchwork at a quarter of it: the batch's
    # activations are what the patchwork holds besides the stitched sums
    settings = [(None, "last", mode.batch_pw), (None, "last", max(1, mode.batch_pw // 4))]
    settings += [(f, "last", mode.batch_pw) for f in mode.lazy] + [
        (f, "mix", mode.batch_pw) for f in mode.lazy_mix
    ]
    rows = []
    for lazy, level, batch in settings:
        opts = ApplyOptions(lazy=lazy, batch_size=batch, level=level)
        name = "patchwork" + (f" lazy {lazy}" if lazy else "") + (", level mix" if level == "mix" else "")
        name += f", batch {batch}"
        rows.append((name, _timed(name, lambda o=opts: segment_volume(model, volume, o))))
    return rows


def budget_row(mode: Mode, volume: Volume, reference: int) -> tuple[tuple[str, int], str]:
    """The patchwork with ``predict --memory`` at the target (a quarter of ``reference``): the batch
    the planner picks (at most 64), its predicted peak and the measured one (planning included).

    On the CPU the planner also counts the level sources, which the host holds on any device and a
    GPU would not: the budget is raised by their bytes, so that the device's share is the target.
    """
    from flexpatch.patchwork.crop import level_sources
    from flexpatch.patchwork.scheme import ImageFrame, level_widths, undersampling
    from flexpatch.plan.memory import tensor_bytes

    model = _patchwork(mode)
    geom = ImageFrame.of(volume.data.shape[1:], volume.affine, model.scheme.system)
    widths = level_widths(model.scheme, geom)
    host = tensor_bytes(level_sources(volume.data, model.scheme, undersampling(model.scheme, geom, widths)))
    target = int(TARGET * reference)
    opts = ApplyOptions(batch_size=64, memory=target + host)
    stats: dict = {}

    def run() -> None:
        stats.update(segment_volume(model, volume, opts)[2])

    name = f"patchwork, --memory {TARGET} x U-Net {mode.large}^3"
    peak = _timed(name, run)
    note = (
        f"`--memory` row: budget {target / MIB:.0f} MiB on the device (+ {host / MIB:.0f} MiB of level "
        f"sources on the host, which the CPU planner counts); the planner picked batch "
        f"{stats['batch_size']} and predicted {(stats['predicted_peak'] - host) / MIB:.0f} MiB on the "
        f"device; measured {peak / MIB:.0f} MiB, planning probes included."
    )
    return (f"{name} (batch {stats['batch_size']})", peak), note


def unet_rows(mode: Mode, volume: Volume) -> list[tuple[str, int]]:
    """Peak bytes of the sliding-window U-Net at the mode's large patch, the target's reference.

    Not the small patch's: at 256^3 it runs 3375 windows, 20 minutes under the tracker on 2 cores.
    """
    image = torch.from_numpy(volume.data)[None]
    rows = []
    for size in (mode.large,):
        net = create_model("unet", 3, 1, len(CLASSES) + 1).eval()

        @torch.inference_mode()
        def run(net: torch.nn.Module = net, size: int = size) -> None:
            # LoadedModel.probabilities: the window's logits, their softmax, then the label map on the host
            logits = sliding_window(net, image, (size,) * 3, overlap=0.5, blend="gaussian",
                                    batch_size=mode.sw_batch, divisor=net.divisor, device="cpu")  # fmt: skip
            torch.softmax(logits[0].float(), dim=0).numpy().argmax(0)

        name = f"U-Net {size}^3"
        rows.append((name, _timed(name, run, existing=[image])))
    return rows


def _timed(name: str, fn, existing: list[torch.Tensor] | None = None) -> int:  # noqa: ANN001
    start = time.perf_counter()
    peak = measure_peak(fn, "cpu", existing or [])
    print(f"{name}: {peak / MIB:.0f} MiB ({time.perf_counter() - start:.0f} s)", flush=True)
    return peak


def report(mode_name: str, mode: Mode, rows: list[tuple[str, int]], note: str = "") -> str:
    peaks = dict(rows)
    large = peaks[f"U-Net {mode.large}^3"]
    lines = ["| method | peak MiB (tensors) | / U-Net " + f"{mode.large}^3 |", "|---|---:|---:|"]
    lines += [f"| {name} | {peak / MIB:.0f} | {peak / large:.2f} |" for name, peak in rows]
    verdicts = [
        f"- {name}: {peak / large:.2f}x of U-Net {mode.large}^3 by tensor accounting (target <= {TARGET}): "
        f"**{'met' if peak / large <= TARGET else 'missed'}**"
        for name, peak in rows
        if name.startswith(("patchwork, batch", "patchwork, --memory"))
    ]
    return (
        f"One {mode.side}^3 image at {mode.spacing} mm, the {mode_name} mode's methods untrained "
        f"(patchwork: depth {mode.depth}, {mode.matrix}^3 matrices, batch {mode.batch_pw}; U-Net: "
        f"overlap 0.5, gaussian, batch {mode.sw_batch}), peak bytes held in tensors counted on the CPU "
        "(see the script's docstring: what CUDA's max_memory_allocated counts, less cuDNN "
        "workspaces and allocator rounding).\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(verdicts)
        + (f"\n\n{note}" if note else "")
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("quick", "full", "smoke"), default="full")
    p.add_argument("--work", type=Path, default=ROOT / ".bench" / "patchwork_memory", help="smoke's folder")
    p.add_argument("--out", type=Path, help="Markdown file (default BENCHMARKS.md; smoke: in --work)")
    args = p.parse_args(argv)
    mode = MODES[args.mode]
    rng = np.random.default_rng(0)
    data = rng.random((1, *(mode.side,) * 3), dtype=np.float32)
    volume = Volume(data, np.diag([mode.spacing] * 3 + [1.0]), 3)
    torch.manual_seed(0)
    unet = unet_rows(mode, volume)
    budgeted, note = budget_row(mode, volume, unet[-1][1])
    rows = patchwork_rows(mode, volume) + [budgeted] + unet
    body = report(args.mode, mode, rows, note)
    print(body)
    smoke = args.mode == "smoke"
    out = args.out or (args.work / "BENCHMARKS.md" if smoke else ROOT / "BENCHMARKS.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = f"python benchmarks/patchwork_memory.py --mode {args.mode}"
    write_section(
        out,
        f"patchwork-memory-{args.mode}",
        f"Deep neural patchworks: inference memory by tensor accounting ({args.mode})",
        body,
        command,
        describe_device("cpu"),
    )


if __name__ == "__main__":
    main()
