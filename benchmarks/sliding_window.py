"""Time and peak memory of flexpatch's sliding window against MONAI's ``sliding_window_inference``.

    python benchmarks/sliding_window.py [--device auto|cpu|cuda] [--quick | --smoke] [--out BENCHMARKS.md]
                                        [--net unet|monai-unet] [--repeats R] [--threads T]
                                        [--baseline REV]

Same net (eval mode), same windows: overlap 0.5, Gaussian blend, 4 windows per batch,
one case. GPU: a 256^3 volume, patch 32..256; CPU: 128^3, patch 32..128; ``--quick``:
CPU 64^3 with patch 32/48/64; ``--smoke``: CPU 32^3, patch 16/32, one repeat, report and
figure under ``--work`` only (the tests run it). The tools run under ``torch.inference_mode`` with the
same ``cudnn.benchmark`` setting (on for CUDA). Each row has a warm-up run of each tool,
then R timed repeats whose order rotates (with two tools: ours first / MONAI first alternates),
so no tool always runs on a warmer cache; the table gives best (median) seconds. The outputs
must agree (``assert_close``).

``--baseline REV`` adds a third contestant: flexpatch's ``sliding_window`` as it was at the git
revision REV (``git archive`` of ``src/flexpatch``, imported beside today's package as
``flexpatch_base``), timed in the same run, its output checked against today's; the table
adds its time, memory and the ratios ours/baseline and baseline/MONAI, so a refactor's cost
is measured under the same load as today's code.

Peak memory: on CUDA, ``max_memory_allocated`` above what was allocated before the call
(net and image excluded, output included); on the CPU, the rise of the peak RSS (VmHWM,
reset just before) during one call in a fresh subprocess per measurement (tracemalloc
does not see torch's memory).
The section goes into BENCHMARKS.md (``benchmarks/_report.py``) with a plot of time
against patch size in ``benchmarks/figures/``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

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
BASE_PACKAGE = "flexpatch_base"
# The old tree's own imports, renamed to BASE_PACKAGE: dotted paths (``from flexpatch.x import``,
# ``import flexpatch.x`` and the lazy tables' strings such as "flexpatch.geometry") and the bare
# ``from flexpatch import`` / ``import flexpatch``; paths such as ``~/.flexpatch/`` are left alone.
_OWN_NAME = re.compile(r"(?<![\w./-])flexpatch(?=\.\w)|(?<=\bimport )flexpatch\b|(?<=\bfrom )flexpatch\b")

Runner = Callable[[], torch.Tensor]


@dataclass
class Row:
    """One patch size, per tool ("ours", "monai", "base"): timings (s), peak memory (MiB) and
    each other tool's largest difference from ours."""

    patch: int
    windows: int
    seconds: dict[str, list[float]] = field(default_factory=dict)
    peak: dict[str, float] = field(default_factory=dict)
    diff: dict[str, float] = field(default_factory=dict)

    def best(self, tool: str) -> float:
        return min(self.seconds[tool])

    def ratio(self, tool: str = "ours", other: str = "monai") -> float:
        """Best over best: contention on a shared machine only ever adds time."""
        return self.best(tool) / self.best(other)


def fail(message: str) -> NoReturn:
    """A user error (e.g. an unknown revision): one line, exit 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


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
    return net.eval().to(device), net_divisor(net)


def net_divisor(net: torch.nn.Module) -> tuple[int, ...]:
    """What window sides must be multiples of (MONAI's UNet: its three stride-2 levels)."""
    return tuple(getattr(net, "divisor", (8, 8, 8)))


def make_image(side: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn((1, 1, side, side, side), generator=gen).to(device)


def resolve(rev: str) -> str:
    """``rev``'s full commit hash; a one-line error when this clone lacks it (e.g. a shallow one)."""
    cmd = ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        fail(f"--baseline {rev}: cannot run git ({exc})")
    if done.returncode != 0:
        fail(f"--baseline {rev}: no such revision in {ROOT} (a shallow clone? fetch it first)")
    return done.stdout.strip()


def extract_baseline(commit: str, into: Path) -> Path:
    """flexpatch's package at ``commit``, under ``into`` as BASE_PACKAGE with its imports renamed.

    Returns the folder to put on ``sys.path``.
    """
    cmd = ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "src/flexpatch"]
    done = subprocess.run(cmd, capture_output=True, check=False)
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        fail(f"--baseline {commit[:7]}: git archive failed: {reason[-1] if reason else done.returncode}")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        tar.extractall(into, filter="data")
    package = (into / "src" / "flexpatch").rename(into / BASE_PACKAGE)
    for path in package.rglob("*.py"):
        path.write_text(_OWN_NAME.sub(BASE_PACKAGE, path.read_text(encoding="utf-8")), encoding="utf-8")
    return into


@contextlib.contextmanager
def baseline_tree(commit: str | None) -> Iterator[str | None]:
    """The extracted baseline's folder for the run's length (None without ``--baseline``)."""
    if commit is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix=f"{BASE_PACKAGE}_") as tmp:
        yield str(extract_baseline(commit, Path(tmp)))


def _from_today(value: object) -> bool:
    """Whether ``value`` (a module, function or class) comes from today's ``flexpatch``."""
    name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
    return isinstance(name, str) and name.split(".")[0] == "flexpatch"


@functools.cache
def baseline_sliding_window(folder: str) -> Callable[..., torch.Tensor]:
    """The baseline's ``sliding_window``, imported from ``folder`` (see :func:`extract_baseline`).

    An import the rename missed would silently run today's code inside the baseline and hide
    any difference, so the baseline's modules are checked to hold nothing of today's package.
    """
    sys.path.insert(0, folder)
    try:
        module = importlib.import_module(f"{BASE_PACKAGE}.infer.sliding_window")
    except ImportError as exc:
        fail(f"--baseline: its flexpatch.infer.sliding_window does not import ({exc})")
    mixed = sorted(
        name
        for name, mod in list(sys.modules.items())
        if name.split(".")[0] == BASE_PACKAGE and any(map(_from_today, vars(mod).values()))
    )
    if mixed:
        fail(f"--baseline: modules still using today's flexpatch after the rename: {', '.join(mixed)}")
    return module.sliding_window


def runners(
    net: torch.nn.Module,
    image: torch.Tensor,
    patch: int,
    divisor: tuple[int, ...],
    base: str | None = None,
    precision: str = "float32",
) -> dict[str, Runner]:
    """The tools at identical settings, as zero-argument calls; the baseline ("base") when
    ``base`` names its extracted folder. ``precision``: ours only (flexpatch's ``--precision``);
    MONAI and the baseline run float32, their defaults."""
    from monai.inferers import sliding_window_inference

    from flexpatch.infer.precision import resolve_precision, with_precision
    from flexpatch.infer.sliding_window import sliding_window

    roi = (patch,) * 3
    mine = with_precision(net, resolve_precision(precision, image.device))

    def ours() -> torch.Tensor:
        return sliding_window(mine, image, roi, OVERLAP, BLEND, WINDOW_BATCH, divisor=divisor)

    def monai() -> torch.Tensor:
        with torch.inference_mode():
            return sliding_window_inference(image, roi, WINDOW_BATCH, net, overlap=OVERLAP, mode=BLEND)

    fns: dict[str, Runner] = {"ours": ours, "monai": monai}
    if base is not None:
        old = baseline_sliding_window(base)
        fns["base"] = lambda: old(net, image, roi, OVERLAP, BLEND, WINDOW_BATCH, divisor=divisor)
    return fns


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Runner, device: str) -> tuple[float, float]:
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


def cpu_peak(tool: str, args: argparse.Namespace, side: int, patch: int) -> float:
    """Rise of peak RSS (MiB) during one call, measured in a fresh subprocess."""
    cmd = [sys.executable, __file__, "--memory-child", tool, "--net", args.net, "--side", str(side)]
    cmd += ["--patch", str(patch), "--threads", str(args.threads), "--precision", args.precision]
    if tool == "base":
        cmd += ["--baseline-dir", args.base_dir]
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


def memory_child(tool: str, net_name: str, side: int, patch: int, base: str | None, precision: str) -> None:
    """Body of the subprocess: one call of ``tool`` in a fresh process; print its peak RSS rise.

    The peak RSS mark is reset to the current RSS first (Linux clear_refs), so a
    higher peak left by importing libraries cannot hide the call's own; without
    that, fall back to the rise of ``ru_maxrss``.
    """
    net, divisor = make_net(net_name, "cpu")
    image = make_image(side, "cpu")
    fn = runners(net, image, patch, divisor, base, precision)[tool]
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before, peak = _proc_status_kib("VmRSS"), lambda: _proc_status_kib("VmHWM")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    fn()
    print(json.dumps({"peak_mib": (peak() - before) / 1024}))


def check_agreement(fns: dict[str, Runner], row: Row, device: str, precision: str = "float32") -> None:
    """Warm-up call of each tool (cudnn autotuning, caches); every output must match ours (in
    float32; ours in bfloat16 differs by its rounding: the difference is recorded, not checked)."""
    outs = {tool: fn() for tool, fn in fns.items()}
    sync(device)
    # cuDNN convolutions run in TF32 and some algorithms are not deterministic: run-to-run
    # differences of ~5e-3 on logits are noise there, not disagreement
    tol = 2e-2 if device.startswith("cuda") else 1e-4
    for tool in list(outs)[1:]:
        row.diff[tool] = float((outs["ours"].float() - outs[tool].float()).abs().max())
        if precision != "float32":
            continue
        torch.testing.assert_close(
            outs[tool], outs["ours"], atol=tol, rtol=0, msg=lambda m, t=tool: f"{t}: {m}"
        )


def measure_row(
    args: argparse.Namespace,
    device: str,
    net: torch.nn.Module,
    image: torch.Tensor,
    patch: int,
    advance: Callable[[int], None],
) -> Row:
    from flexpatch.infer.sliding_window import window_layout

    divisor = net_divisor(net)
    side = image.shape[-1]
    row = Row(patch, len(window_layout((side,) * 3, (patch,) * 3, OVERLAP, divisor)[2]))
    fns = runners(net, image, patch, divisor, args.base_dir, args.precision)
    check_agreement(fns, row, device, args.precision)
    advance(len(fns))
    tools = list(fns)
    row.seconds = {tool: [] for tool in tools}
    peaks: dict[str, list[float]] = {tool: [] for tool in tools}
    for r in range(args.repeats):
        k = r % len(tools)  # rotate, so each tool leads in turn
        for tool in tools[k:] + tools[:k]:
            seconds, peak = timed(fns[tool], device)
            row.seconds[tool].append(seconds)
            peaks[tool].append(peak)
            advance(1)
    for tool in tools:
        if device.startswith("cuda"):
            row.peak[tool] = min(peaks[tool])
        else:
            row.peak[tool] = cpu_peak(tool, args, side, patch)
            advance(1)
    return row


def measure(args: argparse.Namespace, device: str, side: int, patches: tuple[int, ...]) -> list[Row]:
    from rich.progress import Progress

    net, _ = make_net(args.net, device)
    image = make_image(side, device)
    tools = 3 if args.base_dir else 2
    steps_per_row = tools * (1 + args.repeats + (0 if device.startswith("cuda") else 1))
    rows = []
    with Progress() as bar:
        task = bar.add_task(f"{side}^3 on {device}", total=steps_per_row * len(patches))
        for patch in patches:
            bar.update(task, description=f"{side}^3, patch {patch}")
            rows.append(measure_row(args, device, net, image, patch, lambda n: bar.advance(task, n)))
    return rows


def target(rows: list[Row], base: str | None) -> str:
    """The core issue's verdict: never slower than MONAI at any size; with a baseline, also
    issue 16's: the ratio to MONAI no worse than the baseline's (ours/baseline <= 1.0)."""
    checks = [("ours/MONAI", "monai", "")]
    if base:
        checks.append(("ours/baseline", "base", f", the baseline at {base}"))
    return "\n\n".join(verdict(rows, name, other, note) for name, other, note in checks)


def verdict(rows: list[Row], name: str, other: str, note: str) -> str:
    worst = max(rows, key=lambda r: r.ratio("ours", other))
    ratio = worst.ratio("ours", other)
    met = "met" if ratio <= 1.0 else "MISSED"
    return (
        f"**Target** (ratio {name} <= 1.0 at every size{note}): worst {ratio:.3f} at {worst.patch}^3: {met}"
    )


def columns(base: bool, md: bool) -> list[tuple[str, Callable[[Row], str]]]:
    """(header, cell) of the Markdown table (``md``) or the terminal's; the baseline's at the end,
    so the columns without it stay where they were."""

    def seconds(tool: str) -> Callable[[Row], str]:
        return lambda r: (
            f"{r.best(tool):.3f}" + (f" ({statistics.median(r.seconds[tool]):.3f})" if md else "")
        )

    def ratio(tool: str, other: str) -> Callable[[Row], str]:
        return lambda r: f"{r.ratio(tool, other):.3f}"

    def peak(tool: str) -> Callable[[Row], str]:
        return lambda r: f"{r.peak[tool]:.0f}"

    def diff(tool: str) -> Callable[[Row], str]:
        return lambda r: f"{r.diff[tool]:.1e}"

    cols = [
        ("patch", lambda r: f"{r.patch}^3" if md else str(r.patch)),
        ("windows", lambda r: str(r.windows)),
        ("flexpatch s" if md else "ours best s", seconds("ours")),
        ("MONAI s" if md else "MONAI best s", seconds("monai")),
        ("ratio ours/MONAI" if md else "ratio", ratio("ours", "monai")),
        ("flexpatch peak MiB" if md else "ours MiB", peak("ours")),
        ("MONAI peak MiB" if md else "MONAI MiB", peak("monai")),
        ("max abs diff" if md else "max diff", diff("monai")),
    ]
    if base:
        cols += [
            ("baseline s" if md else "base best s", seconds("base")),
            ("ratio ours/baseline" if md else "ours/base", ratio("ours", "base")),
            ("ratio baseline/MONAI" if md else "base/MONAI", ratio("base", "monai")),
            ("baseline peak MiB" if md else "base MiB", peak("base")),
            ("baseline max abs diff" if md else "base diff", diff("base")),
        ]
    return cols


def markdown_table(rows: list[Row], base: bool) -> str:
    cols = columns(base, md=True)
    head = "| " + " | ".join(h for h, _ in cols) + " |\n|" + "---:|" * len(cols) + "\n"
    return head + "\n".join("| " + " | ".join(cell(r) for _, cell in cols) + " |" for r in rows)


def plot(rows: list[Row], path: Path, title: str, base: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    patches = [r.patch for r in rows]
    ax.plot(patches, [r.best("ours") for r in rows], "o-", label="flexpatch sliding_window")
    ax.plot(patches, [r.best("monai") for r in rows], "s--", label="MONAI sliding_window_inference")
    if base:
        ax.plot(patches, [r.best("base") for r in rows], "^:", label=f"flexpatch sliding_window at {base}")
    ax.set(xlabel="patch side (voxels, cubic)", ylabel="seconds (best of repeats)", yscale="log", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(args: argparse.Namespace, device: str, side: int, rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sliding window, {side}^3 volume, {args.net}, {device}")
    cols = columns(bool(args.base_dir), md=False)
    for header, _ in cols:
        table.add_column(header, justify="right")
    for r in rows:
        table.add_row(*(cell(r) for _, cell in cols))
    # a log file would get rich's 80 columns, too few for the baseline's extra ones
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def describe(args: argparse.Namespace, kind: str, side: int, rows: list[Row], link: str) -> str:
    """The section's body: settings, the table, the verdicts and the figure."""
    base = args.base_commit[:7] if args.base_commit else None
    memory = (
        "CUDA `max_memory_allocated` above the allocation before the call (output in, net and image out)"
        if kind == "cuda"
        else "rise of peak RSS (VmHWM, reset first) in one call in a fresh subprocess; varies ~15% run to run"
    )
    threads = f"{torch.get_num_threads()} CPU threads" if kind == "cpu" else "cudnn.benchmark on"
    baseline = (
        f"Baseline: flexpatch's `sliding_window` at `{base}` (`--baseline {args.baseline}`), imported "
        "beside today's package from `git archive` and timed in the same run; its output is checked "
        "against today's. "
        if base
        else ""
    )
    return (
        f"Volume {side}^3, one case, net `{args.net}` (1 -> {OUT_CHANNELS} channels, eval), "
        f"overlap {OVERLAP}, {BLEND} blend, {WINDOW_BATCH} windows per batch, "
        f"{'all' if base else 'both'} tools under `torch.inference_mode`, {threads}. {baseline}"
        f"{_precision_note(args)}"
        f"Seconds: best (median) of {args.repeats} repeats after a warm-up, order "
        f"{'rotating' if base else 'alternating'}; the ratio is best over best. "
        f"Peak memory: {memory}.\n\n{markdown_table(rows, bool(base))}\n\n{target(rows, base)}\n\n"
        f"![time vs patch size]({link})"
    )


def _precision_note(args: argparse.Namespace) -> str:
    if args.precision == "float32":
        return ""
    return (
        f"flexpatch with `--precision {args.precision}` (autocast; the others float32): its max abs diff "
        "is bfloat16's rounding of the logits, recorded, not checked. "
    )


def report(args: argparse.Namespace, device: str, side: int, rows: list[Row]) -> None:
    print_table(args, device, side, rows)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    mode = "smoke" if args.smoke else "quick" if args.quick else ""
    suffix = (f"{kind}_{mode}" if mode else kind) + (
        "" if args.precision == "float32" else f"_{args.precision}"
    )
    figures = Path(args.work) if args.smoke else ROOT / "benchmarks" / "figures"
    figure = figures / f"sliding_window_{suffix}.png"
    plot(rows, figure, f"{side}^3 volume, {args.net}, {kind}", args.base_commit and args.base_commit[:7])
    default = Path(args.work) / "BENCHMARKS.md" if args.smoke else ROOT / "BENCHMARKS.md"
    out = Path(args.out or default).resolve()
    body = describe(args, kind, side, rows, os.path.relpath(figure, out.parent))
    precision = "" if args.precision == "float32" else f", ours in {args.precision}"
    title = f"Sliding-window inference vs MONAI ({kind}{f', {mode}' if mode else ''}{precision})"
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
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats (default 3 on CUDA, 2 on CPU, 3 with --baseline)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--precision", choices=("float32", "bfloat16", "auto"), default="float32", help="flexpatch's forward"
    )
    p.add_argument(
        "--baseline", metavar="REV", help="also time flexpatch's sliding_window at git revision REV"
    )
    p.add_argument("--memory-child", choices=("ours", "monai", "base"), help=argparse.SUPPRESS)
    p.add_argument("--baseline-dir", help=argparse.SUPPRESS)
    p.add_argument("--side", type=int, help=argparse.SUPPRESS)
    p.add_argument("--patch", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def default_repeats(args: argparse.Namespace, device: str) -> int:
    """One for smoke; else 3 on CUDA and 2 on the CPU, or 3 with a baseline so each tool leads once."""
    if args.smoke:
        return 1
    return 3 if device == "cuda" or args.baseline else 2


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    if args.memory_child:
        memory_child(args.memory_child, args.net, args.side, args.patch, args.baseline_dir, args.precision)
        return
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" or args.quick or args.smoke else device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.repeats is None:
        args.repeats = default_repeats(args, device)
    side, patches = SETTINGS["smoke" if args.smoke else "quick" if args.quick else device]
    args.base_commit = resolve(args.baseline) if args.baseline else None
    with baseline_tree(args.base_commit) as args.base_dir:
        if args.base_dir:
            baseline_sliding_window(args.base_dir)  # a tree that does not import fails before any timing
        rows = measure(args, device, side, patches)
        report(args, device, side, rows)


if __name__ == "__main__":
    main()
