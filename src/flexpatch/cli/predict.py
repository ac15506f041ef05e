"""``flexpatch predict``: sliding window at any patch size, segment-then-segment cascade, or patchwork,
whichever the model folder holds."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer

from flexpatch.cli.common import (
    DeviceOpt,
    JsonOpt,
    PrecisionOpt,
    ThreadsOpt,
    emit_json,
    parse_ints,
    use_cores,
)
from flexpatch.cli.patchwork import predict_cli as patchwork_predict_cli
from flexpatch.errors import FlexPatchError

# The options of ``predict``, one type each, so that its signature reads as a table.
ModelArg = Annotated[
    Path,
    typer.Argument(
        help="A folder written by flexpatch train, or a folder of fold_0..fold_K model folders "
        "(their ensemble)."
    ),
]
InputsArg = Annotated[
    list[Path],
    typer.Argument(
        help="Image files or folders (nnU-Net CASE_0000 naming groups channels); model folders "
        "leading them join MODEL_DIR in an ensemble that averages the probabilities."
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", help="Output folder for the label maps (the inputs' format).")]
PatchSizeOpt = Annotated[
    str | None, typer.Option(help="Window, e.g. 48,48,48 or 48 (default: training size).")
]
BlendOpt = Annotated[
    str | None, typer.Option(help="gaussian, constant, cos or cos2 (default gaussian; patchwork: cos).")
]
BatchOpt = Annotated[int, typer.Option(help="Windows per forward pass.")]
StitchDeviceOpt = Annotated[str | None, typer.Option(help="Where outputs are accumulated (default: device).")]
ProbabilitiesOpt = Annotated[
    bool,
    typer.Option(
        "--probabilities",
        help="Also write probabilities/CASE.nii.gz (classes last; patchwork: stitched softmax or sigmoids).",
    ),
]
MemoryOpt = Annotated[
    str | None,
    typer.Option(
        help="Memory budget (8GB, 2GiB, auto): on the CPU the whole process's peak, on CUDA the GPU's; "
        "picks the window (unless --patch-size) and the window batch (at most --batch), and retries "
        "smaller on out-of-memory. Patchwork: picks the patch batch (at most --batch). Ensemble: plans "
        "each model in turn, within what the running mean of their probabilities leaves."
    ),
]
TtaOpt = Annotated[
    str,
    typer.Option(
        help="Test-time mirroring: auto (when the model was trained with mirroring, as nnU-Net), "
        "mirror (all axis combinations: 4x the time in 2D, 8x in 3D) or none."
    ),
]
PostprocessOpt = Annotated[
    bool,
    typer.Option(
        help="Apply the model's post-processing (largest connected component of the classes it "
        "helped on validation, postprocessing.json)."
    ),
]
LazyOpt = Annotated[
    float | None, typer.Option(help="Patchwork: fraction of patches per level that get children.")
]
GenerateOpt = Annotated[str, typer.Option(help="Patchwork: tree (covering) or random patches.")]
NumPatchesOpt = Annotated[int, typer.Option(help="Patchwork: level-0 patches of random generation.")]
BranchFactorOpt = Annotated[
    int | None, typer.Option(help="Patchwork: children per parent (random; default round(1/lazy)).")
]
NumChunksOpt = Annotated[int, typer.Option(help="Patchwork: repetitions of the whole process.")]
JitterOpt = Annotated[float, typer.Option(help="Patchwork: tree positions jittered by this fraction.")]
AlphaOpt = Annotated[float, typer.Option(help="Patchwork: sparse suppression alpha.")]
LevelOpt = Annotated[str, typer.Option(help="Patchwork: level to scatter: last, mix or an index.")]
OutTypeOpt = Annotated[str, typer.Option(help="Patchwork: atlas[:t..], mask[:t..], float32, uint8 or int16.")]
SamplingFactorOpt = Annotated[
    float, typer.Option(help="Patchwork: output voxel size = input voxel size / factor.")
]
FuseOpt = Annotated[
    str | None,
    typer.Option(
        help="Cascade: 'or' of the thresholded masks (as the segment-then-segment paper) "
        "or 'max' of the probabilities."
    ),
]
BaselineOpt = Annotated[
    bool,
    typer.Option(
        "--baseline",
        help="Cascade: the rough network alone on the image resized to S (the paper's baseline).",
    ),
]


def predict(
    model_dir: ModelArg,
    inputs: InputsArg,
    out: OutOpt,
    patch_size: PatchSizeOpt = None,
    overlap: float = 0.5,
    blend: BlendOpt = None,
    batch: BatchOpt = 4,
    device: DeviceOpt = "auto",
    stitch_device: StitchDeviceOpt = None,
    probabilities: ProbabilitiesOpt = False,
    memory: MemoryOpt = None,
    tta: TtaOpt = "auto",
    postprocess: PostprocessOpt = True,
    precision: PrecisionOpt = "float32",
    lazy: LazyOpt = None,
    generate: GenerateOpt = "tree",
    num_patches: NumPatchesOpt = 16,
    branch_factor: BranchFactorOpt = None,
    num_chunks: NumChunksOpt = 1,
    jitter: JitterOpt = 0.0,
    alpha: AlphaOpt = 0.0,
    level: LevelOpt = "last",
    out_type: OutTypeOpt = "atlas",
    sampling_factor: SamplingFactorOpt = 1.0,
    fuse: FuseOpt = None,
    baseline: BaselineOpt = False,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Segment images: sliding window at ANY patch size, segment-then-segment cascade, or patchwork."""
    args = SimpleNamespace(**locals())
    from flexpatch.methods import method_of

    use_cores(threads, workers=0)  # inference reads in this process: every core is torch's

    args.patch = parse_ints(patch_size, "patch size") if patch_size else None
    if _ensemble(args):
        return
    method = method_of(model_dir).name  # method.json says which method wrote the folder
    if method == "patchwork":
        _predict_patchwork(args)
        return
    if method != "sliding-window" and precision != "float32":
        raise FlexPatchError(f"{model_dir}: --precision is for sliding-window models so far")
    args.blend = blend or "gaussian"
    if method != "segment-then-segment" and (fuse is not None or baseline):
        raise FlexPatchError(f"{model_dir}: --fuse and --baseline are for segment-then-segment models")
    written = _PREDICT[method](args)
    if as_json:
        emit_json({"out_dir": str(out), "segmentations": [str(p) for p in written]})
    else:
        typer.echo(f"wrote {len(written)} segmentations to {out}")


def _ensemble(args: SimpleNamespace) -> bool:
    """Several model folders (those leading the inputs, or a folder of folds): their ensemble
    (:mod:`flexpatch.infer.ensemble`); False for one model."""
    from flexpatch.infer.ensemble import expand_models, is_model_folder, predict_ensemble

    lead = 0
    while lead < len(args.inputs) - 1 and is_model_folder(args.inputs[lead]):
        lead += 1  # the last argument is always an input
    models = expand_models([args.model_dir, *args.inputs[:lead]])
    if len(models) == 1 and models[0] == args.model_dir:
        return False
    args.inputs = args.inputs[lead:]
    if _patchworks(models):  # averaged on their own output grid, with their own options
        args.model_dir = models
        _predict_patchwork(args)
        return True
    written = predict_ensemble(
        models, args.inputs, args.out, args.patch, args.overlap, args.blend or "gaussian",
        args.batch, args.device, args.stitch_device, args.probabilities, progress=not args.as_json,
        tta=args.tta, postprocess=args.postprocess, memory=args.memory, precision=args.precision,
    )  # fmt: skip
    if args.as_json:
        emit_json({"out_dir": str(args.out), "models": [str(m) for m in models],
                   "segmentations": [str(p) for p in written]})  # fmt: skip
    else:
        typer.echo(f"wrote {len(written)} segmentations to {args.out} (ensemble of {len(models)})")
    return True


def _patchworks(models: list[Path]) -> bool:
    """Whether an ensemble's members are patchworks (all of them: a patchwork writes on an output
    grid of its own, so it is averaged only with patchworks)."""
    from flexpatch.methods import method_of

    names = {m: method_of(m).name for m in models}
    if "patchwork" not in names.values():
        return False
    other = next((m for m, name in names.items() if name != "patchwork"), None)
    if other is not None:
        raise FlexPatchError(
            f"{other}: a {names[other]} model in an ensemble of patchworks; a patchwork writes on an "
            "output grid of its own, so it is averaged only with patchworks"
        )
    return True


def _predict_patchwork(args: SimpleNamespace) -> None:
    """A patchwork model folder (or an ensemble of them): its own generation, stitching and output
    options; the sliding window's bfloat16 and mirroring are refused in one line."""
    where = args.model_dir[0] if isinstance(args.model_dir, list) else args.model_dir
    if args.precision != "float32":
        raise FlexPatchError(f"{where}: --precision is for sliding-window models so far")
    if args.tta == "mirror":
        raise FlexPatchError(f"{where}: --tta mirror is for sliding-window and cascade models so far")
    flags = dict(
        lazy=args.lazy, generate=args.generate, num_patches=args.num_patches,
        branch_factor=args.branch_factor, num_chunks=args.num_chunks, jitter=args.jitter, alpha=args.alpha,
        level=args.level, window=args.blend or "cos", sampling_factor=args.sampling_factor,
        batch_size=args.batch,
    )  # fmt: skip
    patchwork_predict_cli(
        args.model_dir, args.inputs, args.out, flags, args.out_type, args.device, args.as_json, args.memory,
        args.probabilities,
    )  # fmt: skip


def _predict_cascade(args: SimpleNamespace) -> list[Path]:
    """A segment-then-segment model folder: the rough network, then the fine one on each crop."""
    from flexpatch.cascade.infer import predict_cascade_files

    if args.memory is not None:
        raise FlexPatchError(
            f"{args.model_dir}: --memory is for sliding-window models and patchworks, not cascades"
        )
    return predict_cascade_files(
        args.model_dir,
        args.inputs,
        args.out,
        fuse=args.fuse,
        baseline=args.baseline,
        device=args.device,
        batch_size=args.batch,
        save_probabilities=args.probabilities,
        progress=not args.as_json,
        tta=args.tta,
        postprocess=args.postprocess,
    )


def _predict_windows(args: SimpleNamespace) -> list[Path]:
    """A single network: sliding window at ``--patch-size`` (or the one ``--memory`` allows)."""
    from flexpatch.infer.predictor import predict_files

    return predict_files(
        args.model_dir,
        args.inputs,
        args.out,
        args.patch,
        args.overlap,
        args.blend,
        args.batch,
        args.device,
        args.stitch_device,
        args.probabilities,
        progress=not args.as_json,
        memory=args.memory,
        tta=args.tta,
        postprocess=args.postprocess,
        precision=args.precision,
    )


# The CLI's part of each registered method (flexpatch.methods): its flags in, files out.
_PREDICT = {"segment-then-segment": _predict_cascade, "sliding-window": _predict_windows}

COMMANDS = (predict,)
