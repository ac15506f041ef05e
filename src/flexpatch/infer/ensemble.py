"""Ensembles of sliding-window models, as nnU-Net's ensemble of cross-validation folds.

``flexpatch predict MODEL_A MODEL_B ... IMAGES --out`` or ``predict FOLDS_PARENT IMAGES --out``
(a folder holding ``fold_0``..``fold_4``) averages the models' probabilities (softmax, or a region
model's sigmoids) case by case, each model at the window asked for (or its own default one), and
writes the labels the first model derives from the mean. All models must share the plan's labels
(and regions, dimensions and channels). Post-processing keeps the largest component only of the
classes every model's ``postprocessing.json`` keeps (the ensemble itself was never validated).
Cascade and patchwork folders are refused for now.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flexpatch.data.io import Volume
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.postprocess import read_postprocessing
from flexpatch.infer.predictor import LoadedModel, load_model
from flexpatch.infer.runner import Prediction, Written, cases_for, run_prediction
from flexpatch.methods import METHOD_FILE, method_of

FOLD_PREFIX = "fold_"


def is_model_folder(path: Path) -> bool:
    """A folder a method wrote (``method.json``), or a parent of ``fold_*`` model folders."""
    return path.is_dir() and ((path / METHOD_FILE).is_file() or bool(fold_folders(path)))


def fold_folders(parent: Path) -> list[Path]:
    """``fold_0``, ``fold_1``, ... under ``parent`` (numerically ordered); ``fold_all`` only when
    there is no numbered fold (as nnU-Net, an ensemble is of the cross-validation folds)."""
    found = [p for p in parent.glob(f"{FOLD_PREFIX}*") if (p / METHOD_FILE).is_file()]
    numbered = sorted((p for p in found if p.name[len(FOLD_PREFIX) :].isdigit()), key=_fold_number)
    return numbered or [p for p in found if p.name == f"{FOLD_PREFIX}all"]


def _fold_number(path: Path) -> int:
    return int(path.name[len(FOLD_PREFIX) :])


def expand_models(paths: Sequence[Path]) -> list[Path]:
    """Model folders: each path itself when it holds ``method.json``, else its fold folders."""
    models: list[Path] = []
    for path in paths:
        if (path / METHOD_FILE).is_file():
            models.append(path)
        elif fold_folders(path):
            models += fold_folders(path)
        else:
            models.append(path)  # the method registry names what is wrong with it
    return models


def load_ensemble(model_dirs: Sequence[Path], device: str = "auto") -> list[LoadedModel]:
    """The models, checked to be sliding-window models with the first one's labels."""
    for d in model_dirs:
        name = method_of(d).name
        if name != "sliding-window":
            raise FlexPatchError(f"{d}: a {name} model folder; ensembles are of sliding-window models so far")
    models = [load_model(d, device=device) for d in model_dirs]
    first = models[0]
    for lm in models[1:]:
        if _outputs(lm) != _outputs(first):
            raise FlexPatchError(
                f"{lm.model_dir / 'plan.json'}: labels, dimensions or channels differ from "
                f"{first.model_dir / 'plan.json'}; an ensemble averages models of one dataset"
            )
    return models


def _outputs(lm: LoadedModel) -> tuple:
    """What must agree for probabilities to be averaged: labels, regions, dimensions, channels."""
    plan = lm.plan
    return plan.labels, plan.regions, plan.regions_class_order, plan.ndim, plan.in_channels


def mean_probabilities(models: Sequence[LoadedModel], volume: Volume, **options: object) -> np.ndarray:
    """The models' probabilities ``(C, *spatial)`` on the volume's grid, averaged; ``options`` are
    :meth:`LoadedModel.segment`'s (``patch_size`` None: each model's own default window)."""
    total: np.ndarray | None = None
    for lm in models:
        probs = lm.segment(volume, probabilities=True, **options)[1]  # type: ignore[arg-type]
        assert probs is not None  # asked for
        total = probs if total is None else np.add(total, probs, out=total)
    assert total is not None  # at least one model
    return total / np.float32(len(models))


def predict_ensemble(
    model_dirs: Sequence[str | Path],
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    patch_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 4,
    device: str = "auto",
    stitch_device: str | None = None,
    save_probabilities: bool = False,
    progress: bool = True,
    tta: str = "auto",
    postprocess: bool = True,
) -> Written:
    """Segment image files with the mean probabilities of several model folders (or fold parents,
    see :func:`expand_models`); the arguments are :func:`~flexpatch.infer.predictor.predict_files`'."""
    models = load_ensemble(expand_models([Path(d) for d in model_dirs]), device)
    for lm in models:
        lm.network(tta)  # a refused --tta fails before any case runs
        lm.window(patch_size)  # as a window too small for a model
    first = models[0]
    cases = cases_for(inputs, first.plan.in_channels, out_dir)
    options = dict(patch_size=patch_size, overlap=overlap, blend=blend, batch_size=batch_size,
                   stitch_device=stitch_device, tta=tta)  # fmt: skip

    def segment(volume: Volume) -> Prediction:
        mean = mean_probabilities(models, volume, **options)
        return Prediction(first.labels(mean), mean if save_probabilities else None)

    kept = set.intersection(*(set(read_postprocessing(lm.model_dir)) for lm in models))
    return run_prediction(
        cases,
        out_dir,
        first.plan.ndim,
        segment,
        label_names=first.label_names,
        save_probabilities=save_probabilities,
        progress=progress,
        describe=f"predict, ensemble of {len(models)}",
        largest_component=sorted(kept) if postprocess else (),
    )
