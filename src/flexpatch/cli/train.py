"""``flexpatch train``: one network (plain or hypernetwork), a segment-then-segment cascade, or a
deep neural patchwork; the cascade and patchwork runs are in ``cli.cascade`` and ``cli.patchwork``."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer

from flexpatch.cli.cascade import resume_cli as cascade_resume_cli
from flexpatch.cli.cascade import train_cli as cascade_train_cli
from flexpatch.cli.common import (
    DeviceOpt,
    JsonOpt,
    ThreadsOpt,
    emit_json,
    finite,
    parse_floats,
    parse_ints,
    parse_options,
    use_cores,
)
from flexpatch.cli.patchwork import resume_cli as patchwork_resume_cli
from flexpatch.cli.patchwork import train_cli as patchwork_train_cli
from flexpatch.errors import FlexPatchError, format_shape

# The options of ``train``, one type each, so that its signature reads as a table.
DatasetArg = Annotated[Path, typer.Argument(help="nnU-Net raw or MSD dataset folder.")]
DEFAULT_STEPS = 1000
OutOpt = Annotated[Path, typer.Option("--out", help="Model folder to write.")]
ModelOpt = Annotated[str | None, typer.Option(help="Registered model name (flexpatch models); default unet.")]
PatchOpt = Annotated[
    str | None,
    typer.Option(
        help="64,64,64 | 64 | uniform:32-192 | uniform-iso:32-192 | list:32x32x32,64x64x64 | "
        "progressive:resource|performance|random (with --max-patch); default 64,64,64."
    ),
]
MaxPatchOpt = Annotated[
    str | None, typer.Option(help="Largest patch of a progressive schedule, e.g. 128,128,128.")
]
OptionsOpt = Annotated[
    str | None,
    typer.Option(
        help="Model options as JSON, e.g. '{\"token_size\": 8}' for unetr; over a --plan's. "
        "Patchwork: the blocks' options, over the --patchwork-options file's, key by key."
    ),
]
HyperOpt = Annotated[
    bool, typer.Option("--hyper", help="Wrap the model in the patch-size hypernetwork (HN).")
]
HyperSubsetOpt = Annotated[
    str,
    typer.Option(
        help="HN: predict 'norm+last' (norm affines and the output layer: a step at about the plain "
        "model's cost), 'all' weights (the paper; ~3x a plain step), or 'auto' (all up to 5M params)."
    ),
]
CascadeOpt = Annotated[
    str | None, typer.Option(help="'sts': segment-then-segment (rough + fine model at --input-size).")
]
InputSizeOpt = Annotated[int, typer.Option(help="Cascade: network input size S per axis.")]
CascadeOptionsOpt = Annotated[
    str | None,
    typer.Option(
        help='Cascade: other settings as JSON, e.g. \'{"jitter": 8, "fine_from_rough": false, '
        '"min_side": 3, "fuse": "max"}\' (see CascadeConfig).'
    ),
]
PatchworkOpt = Annotated[
    bool,
    typer.Option("--patchwork", help="Train a deep neural patchwork (nested patches, coarse to fine)."),
]
DepthOpt = Annotated[int | None, typer.Option(help="Patchwork: levels, coarse to fine (default 3).")]
MatrixOpt = Annotated[
    str | None, typer.Option(help="Patchwork: matrix per level, e.g. 32 or 32,32,32 (default 32).")
]
FovRelOpt = Annotated[
    str | None, typer.Option(help="Patchwork: coarsest patch relative to the image, e.g. 0.9.")
]
FovMmOpt = Annotated[str | None, typer.Option(help="Patchwork: coarsest patch in mm.")]
DestvoxRelOpt = Annotated[
    str | None, typer.Option(help="Patchwork: finest voxel relative to the image's (default 1).")
]
DestvoxMmOpt = Annotated[str | None, typer.Option(help="Patchwork: finest voxel in mm.")]
RoundsOpt = Annotated[
    int | None, typer.Option(help="Patchwork: rounds of freshly drawn patch sets (default 20).")
]
NumPatchesOpt = Annotated[
    int | None, typer.Option(help="Patchwork: chains drawn per image and round (default 16).")
]
HardMiningOpt = Annotated[
    float | None, typer.Option(help="Patchwork: keep 1-1/(1+h) of the hardest patches per round.")
]
PatchworkOptionsOpt = Annotated[
    Path | None,
    typer.Option(help="Patchwork: JSON file with any other option (see README), e.g. augmentation."),
]
BatchOpt = Annotated[int | None, typer.Option(help="Patches per step; default 2.")]
ContextOpt = Annotated[
    str,
    typer.Option(
        help="Location context: coords gives the network coordinate channels in the body's frame "
        "(a small window then knows where it is); none. Saved with the model."
    ),
]
AugmentOpt = Annotated[
    str,
    typer.Option(
        help="Data augmentation: default (nnU-Net's: rotation, zoom, mirroring, noise, blur, brightness, "
        "contrast, low resolution, gamma), none, heavy, or JSON changes, e.g. '{\"p_mirror\": 0}'."
    ),
]
OptimizerOpt = Annotated[str, typer.Option(help="adamw or sgd (both with poly decay).")]
ValEveryOpt = Annotated[int, typer.Option(help="Validate every N steps.")]
ValPatchOpt = Annotated[str | None, typer.Option(help="Validation window (default: largest training patch).")]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        help="Data-loading processes (default: 0 on 2 cores or fewer, else half the cores, at most 4; "
        "patchwork: its own default)."
    ),
]
SpacingOpt = Annotated[str | None, typer.Option(help="Target spacing in mm (default: the dataset's median).")]
AmpOpt = Annotated[bool, typer.Option(help="bfloat16 autocast on CUDA.")]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue from MODEL_DIR/model_last.pt (patchwork: resume.pt); with --steps (patchwork: "
        "--rounds) a finished run goes on longer.",
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace the model folder of an earlier run (else a non-empty --out is refused)."
    ),
]
StepsOpt = Annotated[int | None, typer.Option(help="Optimiser steps in total (default 1000).")]
PlanOpt = Annotated[
    Path | None, typer.Option("--plan", help="A plan from flexpatch plan: its model, patch and batch.")
]
InitFromOpt = Annotated[
    Path | None, typer.Option(help="Model folder whose matching weights start the run (transfer).")
]
FreezeLoadedOpt = Annotated[
    bool, typer.Option("--freeze-loaded", help="Keep the weights loaded by --init-from fixed.")
]
LoadedLrScaleOpt = Annotated[
    float, typer.Option(help="Learning-rate factor for the weights loaded by --init-from.")
]
TensorboardOpt = Annotated[
    bool,
    typer.Option(
        "--tensorboard",
        help="Also log the curves of progress.png to MODEL_DIR/tensorboard (needs tensorboard installed).",
    ),
]
FoldOpt = Annotated[
    str | None,
    typer.Option(
        help="Cross-validation fold, 0..n-1 or all (nnU-Net's splits_final.json beside dataset.json, "
        "written once when absent): trains into OUT/fold_K and predicts its validation cases."
    ),
]
NprocOpt = Annotated[
    int | None,
    typer.Option(
        help="Train on N processes of this machine (one per GPU; gloo on the CPU): a shortcut for "
        "torchrun --standalone --nproc-per-node N -m flexpatch train ... --batch is the global batch."
    ),
]
NumFoldsOpt = Annotated[
    int | None, typer.Option(help="Folds of a splits_final.json written now (default 5).")
]


def train(
    dataset_dir: DatasetArg,
    out: OutOpt,
    model: ModelOpt = None,
    patch: PatchOpt = None,
    max_patch: MaxPatchOpt = None,
    options: OptionsOpt = None,
    hyper: HyperOpt = False,
    hyper_subset: HyperSubsetOpt = "norm+last",
    cascade: CascadeOpt = None,
    input_size: InputSizeOpt = 64,
    cascade_options: CascadeOptionsOpt = None,
    patchwork: PatchworkOpt = False,
    depth: DepthOpt = None,
    matrix: MatrixOpt = None,
    fov_rel: FovRelOpt = None,
    fov_mm: FovMmOpt = None,
    destvox_rel: DestvoxRelOpt = None,
    destvox_mm: DestvoxMmOpt = None,
    rounds: RoundsOpt = None,
    num_patches: NumPatchesOpt = None,
    hard_mining: HardMiningOpt = None,
    patchwork_options: PatchworkOptionsOpt = None,
    steps: StepsOpt = None,
    batch: BatchOpt = None,
    lr: float = 1e-3,
    optimizer: OptimizerOpt = "adamw",
    val_every: ValEveryOpt = 100,
    val_patch: ValPatchOpt = None,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    foreground_ratio: float = 0.33,
    augment: AugmentOpt = "default",
    context: ContextOpt = "none",
    spacing: SpacingOpt = None,
    seed: int = 0,
    amp: AmpOpt = True,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    plan: PlanOpt = None,
    init_from: InitFromOpt = None,
    freeze_loaded: FreezeLoadedOpt = False,
    loaded_lr_scale: LoadedLrScaleOpt = 1.0,
    tensorboard: TensorboardOpt = False,
    fold: FoldOpt = None,
    num_folds: NumFoldsOpt = None,
    nproc: NprocOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train on patches: fixed, augmented or growing sizes; plain, hypernetwork, cascade or patchwork.
    Curves go to MODEL_DIR/progress.png. Under torchrun (or --nproc) the processes split the batch."""
    if nproc is not None:
        raise typer.Exit(torchrun(nproc))
    _run(SimpleNamespace(**locals()))


def _run(args: SimpleNamespace) -> None:
    """``train`` once its options are read: threads and workers, the fold's folder, the run."""
    from flexpatch.train.curves import tensorboard_logging

    # a cascade loads in its own process; the others get the workers chosen for the cores
    planned = 0 if args.workers is None and args.cascade is not None else args.workers
    args.cpu = use_cores(args.threads, planned)
    _fold_folder(args)
    with tensorboard_logging(args.tensorboard):  # every method's run logs through the same curves
        _train(args)


def torchrun(nproc: int) -> int:
    """This command again, without ``--nproc``, on ``nproc`` processes that torchrun's launcher
    starts on this machine (as ``torchrun --standalone``); returns the exit code of the process
    that failed first (2 for a user error, said once by the main process), else 0. Across machines,
    run torchrun yourself (README)."""
    import logging
    import os
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from flexpatch.distributed import current
    from flexpatch.runtime import available_cores

    if nproc < 1:
        raise FlexPatchError(f"--nproc {nproc} must be at least 1")
    if current().active:
        raise FlexPatchError("--nproc is for a plain flexpatch command; torchrun started this one already")
    argv, rest = [], iter(sys.argv[1:])
    for arg in rest:
        if arg == "--nproc":
            next(rest, None)
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    # each process gets its share of the cores: two cores, two processes: one thread each
    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or str(
        max(1, available_cores() // nproc)
    )
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its exit report: ours
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", max_restarts=0,
    )  # fmt: skip
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "flexpatch", *argv)
    except ChildFailedError as e:
        return e.get_first_failure()[1].exitcode or 1
    return 0


def _train(args: SimpleNamespace) -> None:
    """``train``'s work: a patchwork, a cascade or one network, or the resume of one."""
    if _train_patchwork_or_resume(args):
        return
    if args.cascade_options and args.cascade is None:
        raise FlexPatchError("--cascade-options is for --cascade sts")
    args.model, args.model_kwargs, args.patch, args.batch = _from_plan(
        args.plan, args.model, args.patch, args.batch
    )
    args.model_kwargs.update(parse_options(args.options))
    if args.hyper:
        args.model_kwargs["hyper"] = {"subset": args.hyper_subset}
    if args.cascade is not None:
        _train_cascade(args)
    else:
        _train_network(args)


def _fold_folder(args: SimpleNamespace) -> None:
    """``--fold K``: the run goes into ``OUT/fold_K`` (nnU-Net's layout, so that ``predict OUT``
    ensembles the folds), after the dataset's splits_final.json is written or checked."""
    from flexpatch.methods import FOLD_PREFIX
    from flexpatch.train.folds import ensure_splits, parse_fold

    if args.fold is None:
        if args.num_folds is not None:
            raise FlexPatchError("--num-folds is for --fold")
        return
    args.fold = parse_fold(args.fold)
    if args.fold != "all" or args.num_folds is not None:
        from flexpatch.data.dataset import load_dataset

        ids = [case.id for case in load_dataset(args.dataset_dir).training]
        ensure_splits(args.dataset_dir, ids, args.num_folds)  # a bad file fails before preprocessing
    args.out = args.out / f"{FOLD_PREFIX}{args.fold}"


def _train_patchwork_or_resume(args: SimpleNamespace) -> bool:
    """A patchwork run, or the resume of a patchwork's or a cascade's (known by its checkpoint);
    False for the rest."""
    from flexpatch.checkpoint import LAST
    from flexpatch.patchwork.files import RESUME

    if args.resume and args.overwrite:
        raise FlexPatchError(f"{args.out}: --resume continues the folder's run, --overwrite replaces it")
    if args.patchwork or (args.resume and (args.out / RESUME).is_file()):
        _train_patchwork(args)
        return True
    if args.resume and (args.out / "rough" / LAST).is_file():  # a cascade: its checkpoint has the rest
        cascade_resume_cli(args.dataset_dir, args.out, args.device, args.as_json)
        return True
    return False


def _train_patchwork(args: SimpleNamespace) -> None:
    """``--patchwork``, or ``--resume`` of one: as the core trainer, the saved config, only longer
    (``--rounds``) or with other workers."""
    if args.resume:
        patchwork_resume_cli(
            args.dataset_dir, args.out, args.device, args.as_json, rounds=args.rounds, workers=args.workers
        )
        return
    keys = ("depth", "matrix", "fov_rel", "fov_mm", "destvox_rel", "destvox_mm")
    scheme = {k: getattr(args, k) for k in keys}
    patchwork_train_cli(
        args.dataset_dir, args.out, scheme, args.patchwork_options, args.device, args.as_json,
        block=args.model, rounds=args.rounds, num_patches=args.num_patches, hard_mining=args.hard_mining,
        batch_size=args.batch, lr=args.lr if args.lr != 1e-3 else None, seed=args.seed or None,
        workers=args.workers, block_options=parse_options(args.options) or None, overwrite=args.overwrite,
        fold=args.fold,
    )  # fmt: skip


def _train_cascade(args: SimpleNamespace) -> None:
    """``--cascade sts``: the rough and the fine network, both at ``--input-size``."""
    if args.init_from is not None:
        raise FlexPatchError("--init-from is for single networks, not --cascade")
    if args.resume:
        raise FlexPatchError(f"{args.out / 'rough' / 'model_last.pt'}: nothing to resume from")
    flags = dict(input_size=args.input_size, model=args.model, model_kwargs=args.model_kwargs,
                 steps=args.steps or DEFAULT_STEPS, batch=args.batch, lr=args.lr, seed=args.seed,
                 fold=args.fold)  # fmt: skip
    options = parse_options(args.cascade_options, "--cascade-options")
    cascade_train_cli(
        args.dataset_dir, args.out, args.cascade, flags, options, args.device, args.as_json, args.overwrite
    )


def _train_network(args: SimpleNamespace) -> None:
    """One network, plain or hypernetwork, with the core trainer; ``--resume`` continues its run."""
    from flexpatch.runtime import console
    from flexpatch.train.config import TrainConfig
    from flexpatch.train.loop import train as run

    patch = args.patch
    if patch.startswith("progressive") and args.max_patch:
        patch = f"{patch}:{format_shape(parse_ints(args.max_patch, 'max patch'))}"
    config = None
    if not args.resume:
        config = TrainConfig(
            model=args.model,
            model_kwargs=args.model_kwargs,
            patch=patch,
            steps=args.steps or DEFAULT_STEPS,
            batch=args.batch,
            lr=args.lr,
            optimizer=args.optimizer,
            val_every=args.val_every,
            val_patch=parse_ints(args.val_patch, "validation patch") if args.val_patch else None,
            workers=args.cpu.workers,
            foreground_ratio=args.foreground_ratio,
            augment=args.augment,
            context=args.context,
            target_spacing=parse_floats(args.spacing, "target spacing") if args.spacing else None,
            seed=args.seed,
            amp=args.amp,
            init_from=str(args.init_from) if args.init_from else None,
            freeze_loaded=args.freeze_loaded,
            loaded_lr_scale=args.loaded_lr_scale,
            fold=args.fold,
        )
    # on resume, --steps (when given) extends the run; the loader workers are this machine's choice
    # (or --workers): they never change the batches, and the run may go on elsewhere; every other
    # setting is the checkpoint's
    given = {"steps": args.steps, "workers": args.cpu.workers}
    changes = {k: v for k, v in given.items() if v is not None} if args.resume else None
    result = run(args.dataset_dir, args.out, config, resume=args.resume, device=args.device,
                 progress=not args.as_json, overwrite=args.overwrite, changes=changes)  # fmt: skip
    # said after the run: before it, a bad dataset's error must stay the only line on stderr
    console.print(f"[bold]cpu[/] {args.cpu.describe()}")
    _report(result, args.init_from, args.as_json)


def _report(result: Any, init_from: Path | None, as_json: bool) -> None:
    """The run in one line, or as JSON: steps, best validation Dice, last loss, what --init-from loaded"""
    summary = {
        "model_dir": str(result.out_dir),
        "steps": result.steps,
        "best_val_dice": finite(result.best_dice),
        "last_loss": finite(result.last_loss),
        "seconds": round(result.seconds, 1),
    }
    if (result.out_dir / "transfer.json").is_file() and init_from:
        from flexpatch.data.io import load_json

        transfer = load_json(result.out_dir / "transfer.json")
        summary["init_from"] = {"loaded": len(transfer["loaded"]), "skipped": transfer["skipped"]}
    if as_json:
        emit_json(summary)
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
            int(saved["train"].get("global_batch", saved["train"]["batch"])),  # per device x processes
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


def curves(
    model_dir: Annotated[
        Path, typer.Argument(help="A model folder of flexpatch train (any method), finished or stopped.")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="PNG to write (default: MODEL_DIR/progress.png).")
    ] = None,
    tensorboard: Annotated[
        bool, typer.Option("--tensorboard", help="Also rebuild MODEL_DIR/tensorboard from the log.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Draw a run's training curves (loss, validation Dice, learning rate, patch size) from its log."""
    from flexpatch.train.curves import check_tensorboard, redraw

    if not model_dir.is_dir():
        raise FlexPatchError(f"{model_dir}: not a folder")
    if tensorboard:
        check_tensorboard()  # before reading a long log
    result = redraw(model_dir, out, tensorboard)
    if as_json:
        return emit_json(result)
    also = f" and {result['tensorboard']}" if result["tensorboard"] else ""
    typer.echo(f"wrote {result['png']}{also} from {result['records']} log records")


COMMANDS = (train, curves)
