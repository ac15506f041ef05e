"""The ``flexpatch`` command: a thin typer layer over the library.

Heavy modules (torch, MONAI) are imported inside the commands so that
``flexpatch --help`` is instant. Every user error is a ``FlexPatchError``:
printed as one line, exit code 2, no traceback.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from flexpatch.errors import FlexPatchError, format_shape

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="flexpatch: medical image segmentation that stays accurate at any patch size.",
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """``"48,48,32"`` -> (48, 48, 32); a clear error for anything else."""
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise FlexPatchError(f"{what} {text!r} must be integers separated by commas, e.g. 64,64,64") from None
    if not values or any(v <= 0 for v in values):
        raise FlexPatchError(f"{what} {text!r} must be positive on every axis")
    return values


def parse_options(text: str | None, flag: str = "--options") -> dict[str, Any]:
    """A JSON object given on the command line (``'{"token_size": 8}'``); ``{}`` when not given."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise FlexPatchError(f"{flag} {text!r} is not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise FlexPatchError(f"{flag} {text!r} must be a JSON object")
    return value


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    """``"2,2,5"`` -> (2.0, 2.0, 5.0); a clear error for anything else."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise FlexPatchError(f"{what} {text!r} must be numbers separated by commas, e.g. 2,2,5") from None
    if not values or not all(0 < v < float("inf") for v in values):
        raise FlexPatchError(f"{what} {text!r} must be positive on every axis")
    return values


def _finite(value: float) -> float | None:
    """JSON has no NaN: a run with no step or no validation reports null."""
    return value if math.isfinite(value) and value >= 0 else None


def _emit_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@app.command()
def phantom(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the nnU-Net raw dataset.")],
    cases: Annotated[int, typer.Option(help="Training cases.")] = 8,
    shape: Annotated[str, typer.Option(help="Image shape, e.g. 96,96,96 (3D) or 256,256 (2D).")] = "96,96,96",
    ndim: Annotated[int, typer.Option(help="2 or 3.")] = 3,
    kind: Annotated[str, typer.Option(help="abdomen or cells.")] = "abdomen",
    seed: int = 0,
    test_cases: Annotated[int | None, typer.Option(help="Test cases (imagesTs/labelsTs).")] = None,
    spacing: Annotated[str | None, typer.Option(help="Voxel size in mm, e.g. 2,2,2.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the built-in phantom as an nnU-Net raw dataset (nothing is downloaded)."""
    from flexpatch.data.phantom import make_phantom

    sp = parse_floats(spacing, "spacing") if spacing else None
    out = make_phantom(
        out_dir,
        cases,
        parse_ints(shape, "shape"),
        ndim,
        kind,
        seed,
        test_cases,
        spacing=sp,
        progress=not as_json,
    )
    if as_json:
        _emit_json({"dataset_dir": str(out)})
    else:
        typer.echo(f"phantom written to {out}")


@app.command()
def models(as_json: JsonOpt = False) -> None:
    """List the registered networks and the divisibility their input needs."""
    from flexpatch.models import list_models, model_divisor

    rows = {
        name: {"divisor_3d": model_divisor(name, 3), "divisor_2d": model_divisor(name, 2)}
        for name in list_models()
    }
    if as_json:
        _emit_json(rows)
        return
    for name, row in rows.items():
        typer.echo(f"{name:12s} 3D divisible by {row['divisor_3d']}, 2D by {row['divisor_2d']}")


@app.command()
def train(
    dataset_dir: Annotated[Path, typer.Argument(help="nnU-Net raw or MSD dataset folder.")],
    out: Annotated[Path, typer.Option("--out", help="Model folder to write.")],
    model: Annotated[
        str | None, typer.Option(help="Registered model name (flexpatch models); default unet.")
    ] = None,
    patch: Annotated[
        str | None,
        typer.Option(
            help="64,64,64 | 64 | uniform:32-192 | uniform-iso:32-192 | list:32x32x32,64x64x64 | "
            "progressive:resource|performance|random (with --max-patch); default 64,64,64."
        ),
    ] = None,
    max_patch: Annotated[
        str | None, typer.Option(help="Largest patch of a progressive schedule, e.g. 128,128,128.")
    ] = None,
    options: Annotated[
        str | None,
        typer.Option(
            help="Model options as JSON, e.g. '{\"token_size\": 8}' for unetr; over a --plan's. "
            "Patchwork: the blocks' options, over the --patchwork-options file's, key by key."
        ),
    ] = None,
    hyper: Annotated[
        bool, typer.Option("--hyper", help="Wrap the model in the patch-size hypernetwork (HN).")
    ] = False,
    hyper_subset: Annotated[
        str, typer.Option(help="HN: predict 'all' weights, 'norm+last', or 'auto' (all up to 5M params).")
    ] = "auto",
    cascade: Annotated[
        str | None, typer.Option(help="'sts': segment-then-segment (rough + fine model at --input-size).")
    ] = None,
    input_size: Annotated[int, typer.Option(help="Cascade: network input size S per axis.")] = 64,
    cascade_options: Annotated[
        str | None,
        typer.Option(
            help='Cascade: other settings as JSON, e.g. \'{"jitter": 8, "fine_from_rough": false, '
            '"min_side": 3, "fuse": "max"}\' (see CascadeConfig).'
        ),
    ] = None,
    patchwork: Annotated[
        bool, typer.Option("--patchwork", help="Train a deep neural patchwork (nested patches, seed 04).")
    ] = False,
    depth: Annotated[int | None, typer.Option(help="Patchwork: levels, coarse to fine (default 3).")] = None,
    matrix: Annotated[
        str | None, typer.Option(help="Patchwork: matrix per level, e.g. 32 or 32,32,32 (default 32).")
    ] = None,
    fov_rel: Annotated[
        str | None, typer.Option(help="Patchwork: coarsest patch relative to the image, e.g. 0.9.")
    ] = None,
    fov_mm: Annotated[str | None, typer.Option(help="Patchwork: coarsest patch in mm.")] = None,
    destvox_rel: Annotated[
        str | None, typer.Option(help="Patchwork: finest voxel relative to the image's (default 1).")
    ] = None,
    destvox_mm: Annotated[str | None, typer.Option(help="Patchwork: finest voxel in mm.")] = None,
    rounds: Annotated[
        int | None, typer.Option(help="Patchwork: rounds of freshly drawn patch sets (default 20).")
    ] = None,
    num_patches: Annotated[
        int | None, typer.Option(help="Patchwork: chains drawn per image and round (default 16).")
    ] = None,
    hard_mining: Annotated[
        float | None, typer.Option(help="Patchwork: keep 1-1/(1+h) of the hardest patches per round.")
    ] = None,
    patchwork_options: Annotated[
        Path | None,
        typer.Option(help="Patchwork: JSON file with any other option (see README), e.g. augmentation."),
    ] = None,
    steps: int = 1000,
    batch: Annotated[int | None, typer.Option(help="Patches per step; default 2.")] = None,
    lr: float = 1e-3,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd (both with poly decay).")] = "adamw",
    val_every: Annotated[int, typer.Option(help="Validate every N steps.")] = 100,
    val_patch: Annotated[
        str | None, typer.Option(help="Validation window (default: largest training patch).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Data-loading processes.")] = 2,
    foreground_ratio: float = 0.33,
    spacing: Annotated[
        str | None, typer.Option(help="Target spacing in mm (default: the dataset's median).")
    ] = None,
    seed: int = 0,
    amp: Annotated[bool, typer.Option(help="bfloat16 autocast on CUDA.")] = True,
    device: DeviceOpt = "auto",
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from MODEL_DIR/model_last.pt (patchwork: resume.pt).")
    ] = False,
    plan: Annotated[
        Path | None, typer.Option("--plan", help="A plan from flexpatch plan: its model, patch and batch.")
    ] = None,
    init_from: Annotated[
        Path | None, typer.Option(help="Model folder whose matching weights start the run (transfer).")
    ] = None,
    freeze_loaded: Annotated[
        bool, typer.Option("--freeze-loaded", help="Keep the weights loaded by --init-from fixed.")
    ] = False,
    loaded_lr_scale: Annotated[
        float, typer.Option(help="Learning-rate factor for the weights loaded by --init-from.")
    ] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Train on patches: fixed, augmented or growing sizes; plain, hypernetwork, cascade or patchwork."""
    from flexpatch.patchwork.files import RESUME
    from flexpatch.train.config import TrainConfig
    from flexpatch.train.loop import train as run

    if patchwork or (resume and (out / RESUME).is_file()):
        from flexpatch.cli_patchwork import resume_cli, train_cli

        if resume:  # as the core trainer: the saved config, only longer (--rounds) or with other workers
            resume_cli(dataset_dir, out, device, as_json, rounds=rounds, workers=workers)
            return
        scheme = dict(depth=depth, matrix=matrix, fov_rel=fov_rel, fov_mm=fov_mm, destvox_rel=destvox_rel,
                      destvox_mm=destvox_mm)  # fmt: skip
        train_cli(dataset_dir, out, scheme, patchwork_options, device, as_json, block=model, rounds=rounds,
                  num_patches=num_patches, hard_mining=hard_mining, batch_size=batch,
                  lr=lr if lr != 1e-3 else None, seed=seed or None, workers=workers,
                  block_options=parse_options(options) or None)  # fmt: skip
        return
    if cascade_options and cascade is None:
        raise FlexPatchError("--cascade-options is for --cascade sts")
    model, model_kwargs, patch, batch = _from_plan(plan, model, patch, batch)
    model_kwargs.update(parse_options(options))
    if hyper:
        model_kwargs["hyper"] = {"subset": hyper_subset}
    if cascade is not None:
        if init_from is not None:
            raise FlexPatchError("--init-from is for single networks, not --cascade")
        flags = dict(input_size=input_size, model=model, model_kwargs=model_kwargs, steps=steps, batch=batch,
                     lr=lr, seed=seed)  # fmt: skip
        from flexpatch.cli_cascade import train_cli as train_cascade_cli

        options = parse_options(cascade_options, "--cascade-options")
        train_cascade_cli(dataset_dir, out, cascade, flags, options, device, as_json)
        return
    if patch.startswith("progressive") and max_patch:
        patch = f"{patch}:{format_shape(parse_ints(max_patch, 'max patch'))}"
    config = None
    if not resume:
        config = TrainConfig(
            model=model,
            model_kwargs=model_kwargs,
            patch=patch,
            steps=steps,
            batch=batch,
            lr=lr,
            optimizer=optimizer,
            val_every=val_every,
            val_patch=parse_ints(val_patch, "validation patch") if val_patch else None,
            workers=workers,
            foreground_ratio=foreground_ratio,
            target_spacing=parse_floats(spacing, "target spacing") if spacing else None,
            seed=seed,
            amp=amp,
            init_from=str(init_from) if init_from else None,
            freeze_loaded=freeze_loaded,
            loaded_lr_scale=loaded_lr_scale,
        )
    result = run(dataset_dir, out, config, resume=resume, device=device, progress=not as_json)
    summary = {
        "model_dir": str(result.out_dir),
        "steps": result.steps,
        "best_val_dice": _finite(result.best_dice),
        "last_loss": _finite(result.last_loss),
        "seconds": round(result.seconds, 1),
    }
    if (result.out_dir / "transfer.json").is_file() and init_from:
        from flexpatch.data.io import load_json

        transfer = load_json(result.out_dir / "transfer.json")
        summary["init_from"] = {"loaded": len(transfer["loaded"]), "skipped": transfer["skipped"]}
    if as_json:
        _emit_json(summary)
    else:
        typer.echo(
            f"trained {result.steps} steps in {result.seconds:.0f} s; "
            f"best validation Dice {result.best_dice:.3f}"
        )


def _from_plan(
    path: Path | None, model: str | None, patch: str | None, batch: int | None
) -> tuple[str, dict, str, int]:
    """Model, model options, patch and batch: given ones first, then the plan's, then the defaults."""
    if path is None:
        return model or "unet", {}, patch or "64,64,64", batch or 2
    from flexpatch.data.io import load_json

    saved = load_json(path)
    try:
        planned, options = str(saved["model"]), dict(saved["model_kwargs"])
        planned_patch, planned_batch = (
            ",".join(map(str, saved["train"]["patch"])),
            int(saved["train"]["batch"]),
        )
    except (KeyError, TypeError, ValueError):
        raise FlexPatchError(
            f"{path}: not a plan written by flexpatch plan (model, model_kwargs, train)"
        ) from None
    if model is not None and model != planned:
        raise FlexPatchError(
            f"{path}: plans model {planned!r}, not {model!r}; plan again with --model {model}"
        )
    return planned, options, patch or planned_patch, batch or planned_batch


@app.command()
def predict(
    model_dir: Annotated[Path, typer.Argument(help="A folder written by flexpatch train.")],
    inputs: Annotated[
        list[Path], typer.Argument(help="Image files or folders (nnU-Net CASE_0000 naming groups channels).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder for CASE.nii.gz label maps.")],
    patch_size: Annotated[
        str | None, typer.Option(help="Window, e.g. 48,48,48 or 48 (default: training size).")
    ] = None,
    overlap: float = 0.5,
    blend: Annotated[
        str | None, typer.Option(help="gaussian, constant, cos or cos2 (default gaussian; patchwork: cos).")
    ] = None,
    batch: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    device: DeviceOpt = "auto",
    stitch_device: Annotated[
        str | None, typer.Option(help="Where outputs are accumulated (default: device).")
    ] = None,
    probabilities: Annotated[
        bool, typer.Option("--probabilities", help="Also write probabilities/CASE.nii.gz (classes last).")
    ] = False,
    memory: Annotated[
        str | None,
        typer.Option(
            help="Memory budget on the device (8GB, 2GiB, auto): picks the window (unless --patch-size) "
            "and the window batch (at most --batch), and retries smaller on out-of-memory. "
            "Patchwork: picks the patch batch (at most --batch)."
        ),
    ] = None,
    lazy: Annotated[
        float | None, typer.Option(help="Patchwork: fraction of patches per level that get children.")
    ] = None,
    generate: Annotated[str, typer.Option(help="Patchwork: tree (covering) or random patches.")] = "tree",
    num_patches: Annotated[int, typer.Option(help="Patchwork: level-0 patches of random generation.")] = 16,
    branch_factor: Annotated[
        int | None, typer.Option(help="Patchwork: children per parent (random; default round(1/lazy)).")
    ] = None,
    num_chunks: Annotated[int, typer.Option(help="Patchwork: repetitions of the whole process.")] = 1,
    jitter: Annotated[float, typer.Option(help="Patchwork: tree positions jittered by this fraction.")] = 0.0,
    alpha: Annotated[float, typer.Option(help="Patchwork: sparse suppression alpha.")] = 0.0,
    level: Annotated[str, typer.Option(help="Patchwork: level to scatter: last, mix or an index.")] = "last",
    out_type: Annotated[
        str, typer.Option(help="Patchwork: atlas[:t..], mask[:t..], float32, uint8 or int16.")
    ] = "atlas",
    sampling_factor: Annotated[
        float, typer.Option(help="Patchwork: output voxel size = input voxel size / factor.")
    ] = 1.0,
    fuse: Annotated[
        str | None,
        typer.Option(help="Cascade: 'or' of the thresholded masks (seed 05) or 'max' of the probabilities."),
    ] = None,
    baseline: Annotated[
        bool,
        typer.Option(
            "--baseline",
            help="Cascade: the rough network alone on the image resized to S (the paper's baseline).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Segment images: sliding window at ANY patch size, segment-then-segment cascade, or patchwork."""
    from flexpatch.infer.cascade import is_cascade, predict_cascade_files
    from flexpatch.infer.predictor import predict_files
    from flexpatch.patchwork.files import is_patchwork

    patch = parse_ints(patch_size, "patch size") if patch_size else None
    if is_patchwork(model_dir):
        from flexpatch.cli_patchwork import predict_cli

        flags = dict(
            lazy=lazy, generate=generate, num_patches=num_patches, branch_factor=branch_factor,
            num_chunks=num_chunks, jitter=jitter, alpha=alpha, level=level, window=blend or "cos",
            sampling_factor=sampling_factor, batch_size=batch,
        )  # fmt: skip
        predict_cli(model_dir, inputs, out, flags, out_type, device, as_json, memory)
        return
    blend = blend or "gaussian"
    cascade = is_cascade(model_dir)
    if not cascade and (fuse is not None or baseline):
        raise FlexPatchError(f"{model_dir}: --fuse and --baseline are for segment-then-segment models")
    if cascade and memory is not None:
        raise FlexPatchError(
            f"{model_dir}: --memory is for sliding-window models and patchworks, not cascades"
        )
    if cascade:
        written = predict_cascade_files(
            model_dir,
            inputs,
            out,
            fuse=fuse,
            baseline=baseline,
            device=device,
            batch_size=batch,
            save_probabilities=probabilities,
            progress=not as_json,
        )
    else:
        written = predict_files(
            model_dir,
            inputs,
            out,
            patch,
            overlap,
            blend,
            batch,
            device,
            stitch_device,
            probabilities,
            progress=not as_json,
            memory=memory,
        )
    if as_json:
        _emit_json({"out_dir": str(out), "segmentations": [str(p) for p in written]})
    else:
        typer.echo(f"wrote {len(written)} segmentations to {out}")


@app.command()
def demo(
    out_dir: Annotated[
        Path, typer.Argument(help="Working folder (phantom, models, predictions, report).")
    ] = Path("demo_out"),
    steps: Annotated[int, typer.Option(help="Training steps per model.")] = 300,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """The main job on the phantom: FP, AP and HN U-Nets, Dice at 5 window sizes, a table and a PNG."""
    from flexpatch.demo import run_demo

    result = run_demo(out_dir, steps=steps, device=device, progress=not as_json)
    if as_json:
        _emit_json(result)


def _fail(message: str) -> None:
    # one line whatever a library put in the message, so scripts can grep it
    typer.echo("error: " + " ".join(message.split()), err=True)
    sys.exit(2)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except FlexPatchError as e:
        _fail(str(e))
    except OSError as e:  # disk full, permission denied: the user's machine, not a bug
        _fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


# Commands defined in other modules attach themselves to ``app`` on import (they import it from here).
import flexpatch.cli_analysis  # noqa: E402, F401

if __name__ == "__main__":
    main()
