"""Time and peak memory of flexpatch's sliding window against MONAI's ``sliding_window_inference``.

    python benchmarks/sliding_window.py [--device auto|cpu|cuda] [--quick | --smoke] [--out BENCHMARKS.md]
                                        [--net unet|monai-unet] [--repeats R] [--threads T]

Same net (eval mode), same windows: overlap 0.5, Gaussian blend, 4 windows per batch,
one case. GPU: a 256^3 volume, patch 32..256; CPU: 128^3, patch 32..128; ``--quick``:
CPU 64^3 with patch 32/48/64; ``--smoke``: CPU 32^3, patch 16/32, one repeat, report and
figure under ``--work`` only (the tests run it). Both tools run under ``torch.inference_mode`` with the
same ``cudnn.benchmark`` setting (on for CUDA). Each row has a warm-up run of each tool,
then R timed repeats whose order (ours first / MONAI first) alternates, so neither tool
always runs on a warmer cache; the table gives best (median) seconds. The two outputs
must agree (``assert_close``).

Peak memory: on CUDA, ``max_memory_allocated`` above what was allocated before the call
(net and image excluded, output included); on the CPU, the rise of the peak RSS (VmHWM,
reset just before) during one call in a fresh subprocess per measurement (tracemalloc
does not see torch's memory).
The section goes into BENCHMARKS.md (``benchmarks/_report.py``) with a plot of time
against patch size in ``benchmarks/figures/``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _report beside this script
from _report import describe_device, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # mode -> (volume side, patch sides)
    "cuda": (256, (32, 48, 64, 96, 128, 160, 192, 256)),
    "cpu": (128, (32, 48, 64, 96, 128)),
    "quick": (64, (32, 48, 64)),
    "smoke": (32, (16, 32)),
}
OVERLAP, BLEND, WINDOW_BATCH, OUT_CHANNELS = 0.5, "gaussian", 4, 6
MIB = 2**20


@dataclass
class Row:
    """One patch size: timings (s), peak memory (MiB) and the outputs' largest difference."""

    patch: int
    windows: int
    ours: list[float] = field(default_factory=list)
    monai: list[float] = field(default_factory=list)
    ours_peak: float = float("nan")
    monai_peak: float = float("nan")
    max_diff: float = float("nan")

    @property
    def ratio(self) -> float:
        """Best over best: contention on a shared machine only ever adds time."""
        return min(self.ours) / min(self.monai)


def default_net() -> str:
    """flexpatch's seed-01 U-Net when the registry has it, else the equivalent MONAI UNet."""
    try:
        from flexpatch.models import list_models

        return "unet" if "unet" in list_models() else "monai-unet"
    except ImportError:
        return "monai-unet"


def make_net(name: str, device: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The network (seeded, eval mode, on ``device``) and its size divisor."""
    torch.manual_seed(0)
    if name == "unet":
        from flexpatch.models import create_model

        net = create_model("unet", ndim=3, in_channels=1, out_channels=OUT_CHANNELS)
    else:
        from monai.networks.nets import UNet

        net = UNet(3, 1, OUT_CHANNELS, channels=(16, 32, 64, 128), strides=(2, 2, 2))
    divisor = tuple(getattr(net, "divisor", (8, 8, 8)))
    return net.eval().to(device), divisor


def make_image(side: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn((1, 1, side, side, side), generator=gen).to(device)


def runners(
    net: torch.nn.Module, image: torch.Tensor, patch: int, divisor: tuple[int, ...]
) -> dict[str, Callable]:
    """The two tools at identical settings, as zero-argument calls."""
    from monai.inferers import sliding_window_inference

    from flexpatch.infer.sliding_window import sliding_window

    roi = (patch,) * 3

    def ours() -> torch.Tensor:
        return sliding_window(net, image, roi, OVERLAP, BLEND, WINDOW_BATCH, divisor=divisor)

    def monai() -> torch.Tensor:
        with torch.inference_mode():
            return sliding_window_inference(image, roi, WINDOW_BATCH, net, overlap=OVERLAP, mode=BLEND)

    return {"ours": ours, "monai": monai}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], torch.Tensor], device: str) -> tuple[float, float]:
    """Seconds for one call, and its CUDA peak memory above the starting allocation (MiB; NaN on CPU)."""
    cuda = device.startswith("cuda")
    sync(device)
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / MIB if cuda else float("nan")
    del out
    return seconds, peak


def cpu_peak(tool: str, net_name: str, side: int, patch: int, threads: int) -> float:
    """Rise of peak RSS (MiB) during one call, measured in a fresh subprocess."""
    cmd = [sys.executable, __file__, "--memory-child", tool, "--net", net_name, "--side", str(side)]
    cmd += ["--patch", str(patch), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory subprocess failed: {done.stderr.strip()[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"])


def _proc_status_kib(name: str) -> int:
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {name}")


def memory_child(tool: str, net_name: str, side: int, patch: int) -> None:
    """Body of the subprocess: one call of ``tool`` in a fresh process; print its peak RSS rise.

    The peak RSS mark is reset to the current RSS first (Linux clear_refs), so a
    higher peak left by importing libraries cannot hide the call's own; without
    that, fall back to the rise of ``ru_maxrss``.
    """
    net, divisor = make_net(net_name, "cpu")
    image = make_image(side, "cpu")
    fn = runners(net, image, patch, divisor)[tool]
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before, peak = _proc_status_kib("VmRSS"), lambda: _proc_status_kib("VmHWM")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    fn()
    print(json.dumps({"peak_mib": (peak() - before) / 1024}))


def measure(args: argparse.Namespace, device: str, side: int, patches: tuple[int, ...]) -> list[Row]:
    from rich.progress import Progress

    from flexpatch.infer.sliding_window import window_layout

    net, divisor = make_net(args.net, device)
    image = make_image(side, device)
    rows = []
    steps_per_row = 2 + 2 * args.repeats + (0 if device.startswith("cuda") else 2)
    with Progress() as bar:
        task = bar.add_task(f"{side}^3 on {device}", total=steps_per_row * len(patches))
        for patch in patches:
            bar.update(task, description=f"{side}^3, patch {patch}")
            row = Row(patch, len(window_layout((side,) * 3, (patch,) * 3, OVERLAP, divisor)[2]))
            fns = runners(net, image, patch, divisor)
            ours, ref = fns["ours"](), fns["monai"]()  # warm-up (cudnn autotuning, caches) and agreement
            sync(device)
            row.max_diff = float((ours.float() - ref.float()).abs().max())
            # cuDNN convolutions run in TF32 and some algorithms are not deterministic: run-to-run
            # differences of ~5e-3 on logits are noise there, not disagreement
            tol = 2e-2 if device.startswith("cuda") else 1e-4
            torch.testing.assert_close(ours, ref, atol=tol, rtol=0)
            del ours, ref
            bar.advance(task, 2)
            peaks: dict[str, list[float]] = {"ours": [], "monai": []}
            for r in range(args.repeats):
                for tool in ("ours", "monai") if r % 2 == 0 else ("monai", "ours"):
                    seconds, peak = timed(fns[tool], device)
                    getattr(row, tool).append(seconds)
                    peaks[tool].append(peak)
                    bar.advance(task)
            if device.startswith("cuda"):
                row.ours_peak, row.monai_peak = min(peaks["ours"]), min(peaks["monai"])
            else:
                row.ours_peak = cpu_peak("ours", args.net, side, patch, args.threads)
                row.monai_peak = cpu_peak("monai", args.net, side, patch, args.threads)
                bar.advance(task, 2)
            rows.append(row)
    return rows


def target(rows: list[Row]) -> str:
    """The core issue's verdict: never slower than MONAI at any size."""
    worst = max(rows, key=lambda r: r.ratio)
    verdict = "met" if worst.ratio <= 1.0 else "MISSED"
    return (
        f"**Target** (ratio ours/MONAI <= 1.0 at every size): worst {worst.ratio:.3f} at "
        f"{worst.patch}^3: {verdict}"
    )


def markdown_table(rows: list[Row]) -> str:
    head = (
        "| patch | windows | flexpatch s | MONAI s | ratio ours/MONAI | flexpatch peak MiB | MONAI peak MiB "
        "| max abs diff |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r.patch}^3 | {r.windows} | {min(r.ours):.3f} ({statistics.median(r.ours):.3f}) "
        f"| {min(r.monai):.3f} ({statistics.median(r.monai):.3f}) | {r.ratio:.3f} "
        f"| {r.ours_peak:.0f} | {r.monai_peak:.0f} | {r.max_diff:.1e} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    patches = [r.patch for r in rows]
    ax.plot(patches, [min(r.ours) for r in rows], "o-", label="flexpatch sliding_window")
    ax.plot(patches, [min(r.monai) for r in rows], "s--", label="MONAI sliding_window_inference")
    ax.set(xlabel="patch side (voxels, cubic)", ylabel="seconds (best of repeats)", yscale="log", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args: argparse.Namespace, device: str, side: int, rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sliding window, {side}^3 volume, {args.net}, {device}")
    for col in (
        "patch",
        "windows",
        "ours best s",
        "MONAI best s",
        "ratio",
        "ours MiB",
        "MONAI MiB",
        "max diff",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        ours, monai = min(r.ours), min(r.monai)
        cells = (r.patch, r.windows, f"{ours:.3f}", f"{monai:.3f}", f"{r.ratio:.3f}")
        table.add_row(*map(str, cells), f"{r.ours_peak:.0f}", f"{r.monai_peak:.0f}", f"{r.max_diff:.1e}")
    Console().print(table)

    kind = "cuda" if device.startswith("cuda") else "cpu"
    mode = "smoke" if args.smoke else "quick" if args.quick else ""
    suffix = f"{kind}_{mode}" if mode else kind
    figures = Path(args.work) if args.smoke else ROOT / "benchmarks" / "figures"
    figure = figures / f"sliding_window_{suffix}.png"
    plot(rows, figure, f"{side}^3 volume, {args.net}, {kind}")
    default = Path(args.work) / "BENCHMARKS.md" if args.smoke else ROOT / "BENCHMARKS.md"
    out = Path(args.out or default).resolve()
    link = os.path.relpath(figure, out.parent)
    memory = (
        "CUDA `max_memory_allocated` above the allocation before the call (output in, net and image out)"
        if kind == "cuda"
        else "rise of peak RSS (VmHWM, reset first) in one call in a fresh subprocess; varies ~15% run to run"
    )
    threads = f"{torch.get_num_threads()} CPU threads" if kind == "cpu" else "cudnn.benchmark on"
    body = (
        f"Volume {side}^3, one case, net `{args.net}` (1 -> {OUT_CHANNELS} channels, eval), "
        f"overlap {OVERLAP}, {BLEND} blend, {WINDOW_BATCH} windows per batch, "
        f"both tools under `torch.inference_mode`, {threads}. "
        f"Seconds: best (median) of {args.repeats} repeats after a warm-up, order alternating; "
        "the ratio is best over best. "
        f"Peak memory: {memory}.\n\n{markdown_table(rows)}\n\n{target(rows)}\n\n"
        f"![time vs patch size]({link})"
    )
    title = f"Sliding-window inference vs MONAI ({kind}{f', {mode}' if mode else ''})"
    command = "python benchmarks/sliding_window.py " + " ".join(sys.argv[1:])
    write_section(out, f"sliding-window-{suffix}", title, body, command.strip(), describe_device(device))
    print(f"wrote {out} and {figure}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CPU, 64^3 volume, patch 32/48/64")
    size.add_argument("--smoke", action="store_true", help="CPU, 32^3, patch 16/32, one repeat: seconds")
    p.add_argument("--out", help="Markdown file (default BENCHMARKS.md; smoke: WORK/BENCHMARKS.md)")
    p.add_argument("--work", default=str(ROOT / ".bench" / "sliding_window"), help="smoke's folder")
    p.add_argument("--net", choices=("unet", "monai-unet"), default=default_net())
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3 on CUDA, 2 on CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--memory-child", choices=("ours", "monai"), help=argparse.SUPPRESS)
    p.add_argument("--side", type=int, help=argparse.SUPPRESS)
    p.add_argument("--patch", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    if args.memory_child:
        memory_child(args.memory_child, args.net, args.side, args.patch)
        return
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" or args.quick or args.smoke else device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 3 if device == "cuda" else 2
    side, patches = SETTINGS["smoke" if args.smoke else "quick" if args.quick else device]
    rows = measure(args, device, side, patches)
    report(args, device, side, rows)


if __name__ == "__main__":
    main()
