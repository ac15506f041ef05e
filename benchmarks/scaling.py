"""Training and prediction on 1 and N processes (torchrun; gloo on the CPU, NCCL on GPUs): steps/s,
patches/s and cases/s, and the scaling efficiency.

Every configuration runs the real command line (``flexpatch train``/``predict``, or the same under
``torchrun --standalone --nproc-per-node N``), interleaved in every repeat so that machine load hits
them alike. A run's fixed costs (starting Python and torch, preprocessing, the last validation) are
taken out by timing two lengths and dividing the difference: train ``--steps`` short and long (the
``seconds`` the command reports for its loop), predict a few cases and many (wall time).

Peers on the CPU: one process with one thread (what one "device" is here), one process with N
threads (the same cores shared by threads instead), N processes with one thread each. On GPUs
(``--device cuda``): 1..N processes, one GPU each. Efficiency = speedup over one process / N.

    python benchmarks/scaling.py                 # CPU, 1 and 2 processes: ~10 minutes on 2 cores
    python benchmarks/scaling.py --device cuda --nproc 1,2,4,8
    python benchmarks/scaling.py --smoke         # a minute, checks the script (under --work)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import describe_device, write_section  # noqa: E402

TINY = {"channels": 8, "levels": 3, "convs_per_level": 2}


def command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "flexpatch", *args]
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [sys.executable, *launch, "-m", "flexpatch", *args]


def run(nproc: int, threads: int, args: list[str]) -> tuple[float, dict]:
    """Wall seconds of the command and its JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(command(nproc, args), capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(command(nproc, args))}\n{proc.stderr[-2000:]}")
    out = proc.stdout.strip()
    return wall, (json.loads(out[out.index("{") :]) if "{" in out else {})


def train_seconds(nproc: int, threads: int, data: Path, work: Path, steps: int, cfg: dict) -> float:
    out = work / f"train-{nproc}p{threads}t-{steps}"
    args = [
        "train", str(data), "--out", str(out), "--overwrite", "--steps", str(steps),
        "--batch", str(cfg["batch"]), "--patch", str(cfg["patch"]), "--val-every", str(10**6),
        "--workers", "0", "--augment", "default",
        "--options", json.dumps(TINY), "--device", cfg["device"], "--json",
    ]  # fmt: skip
    return float(run(nproc, threads, args)[1]["seconds"])


def predict_seconds(nproc: int, threads: int, model: Path, images: Path, work: Path, cfg: dict) -> float:
    out = work / f"predict-{nproc}p{threads}t-{images.name}"
    args = ["predict", str(model), str(images), "--out", str(out), "--device", cfg["device"], "--json"]
    return run(nproc, threads, args)[0]


def peers(cpu: bool, counts: list[int]) -> list[tuple[int, int]]:
    """(processes, threads each) to compare: on the CPU also one process with all the threads."""
    top = max(counts)
    return [(1, 1), (1, top), *[(n, 1) for n in counts if n > 1]] if cpu else [(n, 1) for n in counts]


def measure(cfg: dict, data: Path, work: Path, model: Path, folders: tuple[Path, Path]) -> dict:
    short, long = cfg["steps"]
    few, many = folders
    cases = len(list(many.iterdir())) - len(list(few.iterdir()))
    times: dict[tuple[int, int], dict[str, list[float]]] = {
        p: {"train": [], "predict": []} for p in cfg["peers"]
    }
    for r in range(cfg["repeats"]):
        for p in cfg["peers"]:
            dt = train_seconds(*p, data, work, long, cfg) - train_seconds(*p, data, work, short, cfg)
            times[p]["train"].append(dt / (long - short))
            dp = predict_seconds(*p, model, many, work, cfg) - predict_seconds(*p, model, few, work, cfg)
            times[p]["predict"].append(dp / cases)
            print(f"repeat {r + 1}: {p[0]} process(es) x {p[1]} thread(s): "
                  f"{times[p]['train'][-1]:.3f} s/step, {times[p]['predict'][-1]:.2f} s/case",
                  flush=True)  # fmt: skip
    return {p: {k: median(v) for k, v in t.items()} for p, t in times.items()}


def report(result: dict, cfg: dict, load: str) -> str:
    base = result[(1, 1)]
    lines = [
        f"3D phantom, U-Net {json.dumps(TINY)}, patch {cfg['patch']}^3, global batch {cfg['batch']}, default "
        f"augmentation, loader in the training process(es). Per step: the difference of runs of "
        f"{cfg['steps'][1]} and {cfg['steps'][0]} steps (the loop's own seconds) over the extra steps; "
        f"per case: the difference of predicting {cfg['cases'][1]} and {cfg['cases'][0]} cases (wall time) "
        f"over the extra cases. Medians of {cfg['repeats']} interleaved repeats. Machine load "
        f"(1/5/15 min): {load}.",
        "",
        "| processes x threads | s/step | steps/s | patches/s | speedup | efficiency | s/case | cases/s | "
        "speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (n, t), r in result.items():
        speed, pspeed = base["train"] / r["train"], base["predict"] / r["predict"]
        devices = n * t
        lines.append(
            f"| {n} x {t} | {r['train']:.3f} | {1 / r['train']:.2f} | {cfg['batch'] / r['train']:.1f} | "
            f"{speed:.2f} | {speed / devices:.0%} | {r['predict']:.2f} | {1 / r['predict']:.2f} | "
            f"{pspeed:.2f} |"
        )
    lines += [
        "",
        "Efficiency = speedup over 1 x 1 divided by the cores (CPU) or GPUs used. Every configuration "
        "trains on the same global batches (DDP splits each step's batch; tests/test_distributed.py "
        "checks that the losses equal one process's).",
    ]
    return "\n".join(lines)


def prepare(work: Path, cfg: dict) -> tuple[Path, Path, tuple[Path, Path]]:
    """The phantom, a model to predict with, and two folders of test images (few and many)."""
    from flexpatch.data.phantom import make_phantom

    data = make_phantom(
        work / "data", cases=cfg["train_cases"], shape=(cfg["shape"],) * 3, ndim=3, kind="abdomen", seed=0,
        test_cases=cfg["cases"][1], spacing=(3.0, 3.0, 3.0), progress=False, overwrite=True,
    )  # fmt: skip
    model = work / "model"
    run(1, 1, ["train", str(data), "--out", str(model), "--overwrite", "--steps", "1", "--batch", "2",
               "--patch", str(cfg["patch"]), "--options", json.dumps(TINY), "--device", cfg["device"],
               "--json"])  # fmt: skip
    tests = sorted((data / "imagesTs").iterdir())
    folders = []
    for name, n in zip(("few", "many"), cfg["cases"], strict=True):
        folder = work / name
        folder.mkdir(exist_ok=True)
        for f in tests[:n]:
            if not (folder / f.name).exists():
                (folder / f.name).symlink_to(f)
        folders.append(folder)
    return data, model, (folders[0], folders[1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--nproc", default="2", help="process counts besides 1, e.g. 2 or 2,4,8")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--work", type=Path, default=Path("/tmp/flexpatch_scaling"))
    args = p.parse_args(argv)
    counts = sorted({1, *(int(n) for n in args.nproc.split(","))})
    cfg = {
        "device": args.device, "batch": 2 * max(counts), "patch": 32,
        "peers": peers(args.device == "cpu", counts),
        **({"steps": (2, 4), "cases": (1, 2), "repeats": 1, "shape": 48, "train_cases": 4} if args.smoke
           else {"steps": (5, 25), "cases": (2, 8), "repeats": 3, "shape": 64, "train_cases": 8}),
    }  # fmt: skip
    args.work.mkdir(parents=True, exist_ok=True)
    data, model, folders = prepare(args.work, cfg)
    load_before = "/".join(f"{v:.1f}" for v in os.getloadavg())
    result = measure(cfg, data, args.work, model, folders)
    load = f"{load_before} before, {'/'.join(f'{v:.1f}' for v in os.getloadavg())} after"
    body = report(result, cfg, load)
    print(body)
    cmd = "python benchmarks/scaling.py" + (" --smoke" if args.smoke else "")
    cmd += (f" --device {args.device}" if args.device != "cpu" else "") + (
        f" --nproc {args.nproc}" if args.nproc != "2" else ""
    )
    target = args.work / "BENCHMARKS.md" if args.smoke else ROOT / "BENCHMARKS.md"
    key = "scaling-smoke" if args.smoke else f"scaling-{args.device.split(':')[0]}"
    write_section(target, key, "Scaling: training and prediction on 1 and N processes", body, cmd,
                  describe_device(args.device))  # fmt: skip


if __name__ == "__main__":
    main()
