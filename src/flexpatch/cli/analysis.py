"""CLI commands that evaluate and analyse: metrics, sweeps, model comparison, schedules, plans.

Registered on the ``flexpatch`` app by ``flexpatch.cli``; heavy imports stay inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flexpatch.cli.common import DeviceOpt, JsonOpt, PrecisionOpt, emit_json, parse_ints, parse_options
from flexpatch.errors import FlexPatchError, format_shape


def sweep(
    model_dir: Annotated[Path, typer.Argument(help="A folder written by flexpatch train.")],
    dataset_dir: Annotated[
        Path, typer.Argument(help="Dataset whose test cases (imagesTs + labelsTs) are segmented.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Report folder: sweep.csv, sweep.json, sweep.png.")],
    sizes: Annotated[
        str, typer.Option(help="Isotropic window edges: start:stop:step or a list.")
    ] = "32:256:8",
    random: Annotated[int, typer.Option(help="Extra random anisotropic windows within the range.")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the random windows.")] = 0,
    label: Annotated[
        str | None, typer.Option(help="Model name in the report (default: folder name).")
    ] = None,
    overlap: float = 0.5,
    batch: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "float32",
    as_json: JsonOpt = False,
) -> None:
    """Dice against patch size: every isotropic window in the range plus random anisotropic ones."""
    from flexpatch.data.dataset import load_dataset
    from flexpatch.evaluate.sweep import parse_sizes, random_sizes, run_sweep
    from flexpatch.infer.predictor import load_model
    from flexpatch.runtime import check_writable

    check_writable(out, "report folder")
    model = load_model(model_dir, device=device, precision=precision)
    ds = load_dataset(dataset_dir)
    cases = [c for c in ds.test if c.label is not None]
    if not cases:
        raise FlexPatchError(f"{dataset_dir}: no labelled test cases (imagesTs with labelsTs) to sweep")
    windows = parse_sizes(sizes, model.plan.ndim, model.divisor)
    edges = [w[0] for w in windows]
    windows += random_sizes(random, min(edges), max(edges), model.divisor, seed=seed) if random else []
    rows = run_sweep(
        model,
        cases,
        windows,
        overlap=overlap,
        batch_size=batch,
        progress=not as_json,
        label=label or Path(model_dir).name,
    )
    _sweep_report(rows, out, as_json)


def _sweep_report(rows: list[dict], out: Path, as_json: bool) -> None:
    """The sweep's table and plot in ``out`` (under torchrun every process has the rows; the main
    one writes them), and its summary: mean Dice (and wrong side) per window, or JSON."""
    from flexpatch.distributed import current
    from flexpatch.evaluate.sweep import plot_sweep, summarize, write_rows

    if current().main:
        write_rows(rows, out)
        plot_sweep(rows, out / "sweep.png", per_class=True)
    summary = summarize(rows)
    if as_json:
        emit_json({"report": str(out), "summary": summary})
        return
    for size, means in next(iter(summary.values())).items():
        side = f"  wrong side {means['context_error']:.2%}" if "context_error" in means else ""
        typer.echo(f"{size:>14s}  mean Dice {means['mean']:.3f}{side}")
    typer.echo(f"report in {out} (sweep.csv, sweep.json, sweep.png)")


def compare(
    reports: Annotated[list[Path], typer.Argument(help="Report folders written by flexpatch sweep.")],
    png: Annotated[
        Path | None, typer.Option(help="Also draw every model's Dice against the window in this PNG.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Table 1 (all sizes) and Table 2 (isotropic sizes) of mean Dice, with Wilcoxon signed-rank tests."""
    from flexpatch.evaluate.stats import compare as run_compare
    from flexpatch.evaluate.stats import load_rows, markdown_table
    from flexpatch.evaluate.sweep import plot_sweep

    if png is not None and png.exists():
        raise FlexPatchError(f"{png}: exists; choose a new --png file (compare never overwrites one)")
    result = run_compare(reports)
    if png is not None:
        result["png"] = str(plot_sweep(load_rows(reports), png))
    if as_json:
        emit_json(result)
        return
    typer.echo(
        f"{result['n_cases']} cases, {result['n_sizes']} sizes; the p-values rest on "
        f"{result['n_cases']} paired cases\n\nTable 1: mean Dice over all sizes"
    )
    typer.echo(markdown_table(result["table1_all_sizes"], result["wilcoxon_all_sizes"]))
    typer.echo("\nTable 2: mean Dice over isotropic sizes")
    typer.echo(markdown_table(result["table2_isotropic"], result["wilcoxon_isotropic"]))


def schedule(
    max_size: Annotated[str, typer.Option("--max", help="Largest (planned) patch, e.g. 128,128,128.")],
    pools: Annotated[str, typer.Option(help="Poolings per axis, e.g. 5,5,5 (or one number).")],
    mode: Annotated[str, typer.Option(help="resource, performance or random.")] = "resource",
    batch: Annotated[int, typer.Option(help="Batch size at the largest patch.")] = 2,
    steps: Annotated[int, typer.Option(help="Training steps in total.")] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Show the schedule of progressively growing patch sizes: stages, patch and batch sizes, steps."""
    from flexpatch.sampling.progressive import make_schedule

    plan = make_schedule(parse_ints(max_size, "max size"), parse_ints(pools, "pools"), mode, batch, steps)
    if as_json:
        emit_json(plan.to_json())
        return
    typer.echo(f"{plan.describe()}: {len(plan.stages())} stages, batch at the largest patch {batch}")
    for st in plan.stages():
        typer.echo(
            f"  stage {st.index}: patch {format_shape(st.patch):>12s}  batch {st.batch:>3d}  "
            f"steps {st.start}-{st.start + st.steps - 1}"
        )


def plan(
    dataset_dir: Annotated[Path, typer.Argument(help="nnU-Net raw or MSD dataset folder.")],
    memory: Annotated[str, typer.Option(help="Memory budget on the device: 8GB, 2GiB, 512MB or auto.")],
    model: Annotated[str, typer.Option(help="Registered model name (flexpatch models).")] = "unet",
    options: Annotated[
        str | None, typer.Option(help="Model options as JSON, e.g. '{\"hidden_size\": 384}'.")
    ] = None,
    token_class: Annotated[
        str | None, typer.Option(help="Class whose mean object size sets the ViT token size (unetr).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Plan file (default DATASET_DIR/flexpatch_plan.json).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or auto (bfloat16 on CUDA).")] = "auto",
    no_check: Annotated[
        bool,
        typer.Option(
            "--no-check",
            help="Skip measuring the planned sizes: the plan then rests on the small probes alone.",
        ),
    ] = False,
    device: DeviceOpt = "auto",
    nproc: Annotated[
        int,
        typer.Option(
            help="Devices a torchrun training shares (one process each): the batch is planned per device "
            "and the plan's global batch is N times it."
        ),
    ] = 1,
    as_json: JsonOpt = False,
) -> None:
    """The largest training patch and batch, and inference window and batch, that fit a memory budget.

    The planned sizes are then measured on the device, and planned again where the small
    probes were off. Writes the plan as JSON; `flexpatch train DATASET_DIR --out MODEL_DIR --plan PLAN`
    trains with it.
    """

    from flexpatch.data.io import save_json
    from flexpatch.plan.dataset import plan_dataset
    from flexpatch.runtime import check_writable

    target = out or Path(dataset_dir) / "flexpatch_plan.json"
    check_writable(target.parent, "plan folder")
    result = plan_dataset(
        dataset_dir, memory, model, parse_options(options), device=device, dtype=dtype,
        token_class=token_class, progress=not as_json, check=not no_check, processes=nproc,
    )  # fmt: skip
    result["train_command"] = f"flexpatch train {dataset_dir} --out MODEL_DIR --plan {target}" + (
        f" --nproc {nproc}" if nproc > 1 else ""
    )
    save_json(target, result)
    if as_json:
        emit_json({**result, "plan_file": str(target)})
    else:
        _print_plan(result, model, target)


def _print_plan(result: dict, model: str, target: Path) -> None:
    """The plan in words: budget, training patch, inference window, token size, where it was written."""
    from flexpatch.plan.budget import format_bytes

    train, infer, x = result["train"], result["infer"], format_shape
    typer.echo(
        f"{model} on {result['device']} ({result['dtype']}), budget {format_bytes(result['budget_bytes'])}"
    )
    per = (
        f" per device, global {train['global_batch']} on {result['processes']}"
        if result["processes"] > 1
        else ""
    )
    typer.echo(f"  train:   patch {x(train['patch'])}, batch {train['batch']}{per} ({_peaks(train)})")
    typer.echo(
        f"  predict: window {x(infer['window'])}, {infer['batch']} per batch, stitching on "
        f"{infer['stitch_device']}, for the median image {x(infer['image_shape'])} ({_peaks(infer)})"
    )
    if result["tokens"]:
        t = result["tokens"]
        typer.echo(
            f"  tokens:  class {t['class_name']!r}, mean {t['mean_volume_mm3']:.1f} mm^{len(t['spacing'])}, "
            f"equivalent diameter {t['diameter_mm']:.1f} mm -> token {x(t['token_size'])}, "
            f"window {x(t['window'])}"
        )
    typer.echo(f"plan written to {target}\ntrain with: {result['train_command']}")


def _peaks(choice: dict) -> str:
    """The predicted peak, and the measured one where the plan was checked."""
    from flexpatch.plan.budget import format_bytes

    text = f"predicted peak {format_bytes(choice['predicted'])}"
    return text if choice["measured"] is None else f"{text}, measured {format_bytes(choice['measured'])}"


def evaluate(
    pred_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder of predicted label maps (.nii.gz, .nii, .mha, .nrrd, .png, .tif), or a parent of "
            "cross-validation folds: every fold_K/validation together (the cross-validation result)."
        ),
    ],
    label_dir: Annotated[
        Path, typer.Argument(help="Folder of reference label maps, paired by case id (any of those formats).")
    ],
    labels_from: Annotated[Path | None, typer.Option(help="dataset.json giving class names.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write metrics.csv and summary.json here.")] = None,
    hd95: Annotated[
        bool,
        typer.Option(help="Compute the surface metrics: 95th-percentile Hausdorff distance and NSD."),
    ] = True,
    nsd_tolerance: Annotated[
        float,
        typer.Option(
            "--nsd-tolerance",
            metavar="MM",
            help="Normalised Surface Dice tolerance in mm: NSD is the share of both boundaries "
            "lying within this distance of the other boundary (voxel spacing from the label's affine).",
        ),
    ] = 1.0,
    partial: Annotated[
        bool,
        typer.Option(
            "--partial",
            help="Evaluate the predictions present when some reference cases have none "
            "(nnU-Net's chill); the report says how many of the reference cases were scored.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Dice, IoU, precision, recall, HD95 and NSD per case and class."""
    from flexpatch.distributed import current
    from flexpatch.evaluate.metrics import evaluate_folders, read_declared_labels
    from flexpatch.runtime import console

    labels = None if labels_from is None else read_declared_labels(labels_from)
    report = evaluate_folders(
        pred_dir,
        label_dir,
        labels,
        hd95=hd95,
        progress=not as_json,
        labels_source=labels_from,
        nsd_tolerance=nsd_tolerance,
        partial=partial,
    )
    if out is not None and current().main:  # under torchrun every process has the report; one writes it
        report.write(out)
    if as_json:
        emit_json(report.to_json())
    else:
        console.print(report.table())


COMMANDS = (sweep, compare, schedule, plan, evaluate)
