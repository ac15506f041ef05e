"""Ensembles of sliding-window and segment-then-segment models, as nnU-Net's ensemble of
cross-validation folds.

``flexpatch predict MODEL_A MODEL_B ... IMAGES --out`` or ``predict FOLDS_PARENT IMAGES --out``
(a folder holding ``fold_0``..``fold_4``) averages the models' probabilities (softmax, or a region
model's sigmoids) case by case, each model at the window asked for (or its own default one), and
writes the labels the first model derives from the mean. All models must share the plan's labels
(and regions, dimensions and channels). Post-processing is the members' decision when every member
decided the same (their ``postprocessing.json``), else none, said in one line: the ensemble itself
was never validated, and a class one member helps by cutting may be one another hurts.
``memory`` is planned per member as for one model (:meth:`LoadedModel.segment`); the members run one
after the other, so each may use the budget, less the running sum of probabilities the ensemble
holds. A segment-then-segment member gives its fused probabilities on the input grid
(:class:`CascadeMember`); it has no window and no ``memory`` plan. Patchworks, which write on an
output grid of their own, are averaged with patchworks only, by
:func:`~flexpatch.patchwork.predict.predict_patchwork_files` (``flexpatch predict`` picks it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flexpatch.data.io import Volume
from flexpatch.data.resample import RESTORE_CHUNK_VOXELS
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.postprocess import read_postprocessing
from flexpatch.infer.floor import check_floors
from flexpatch.infer.predictor import LoadedModel, load_model
from flexpatch.infer.runner import Prediction, Written, cases_for, label_dtype, run_prediction
from flexpatch.methods import METHOD_FILE, fold_folders, method_of
from flexpatch.plan.budget import parse_budget
from flexpatch.runtime import console


def is_model_folder(path: Path) -> bool:
    """A folder a method wrote (``method.json``), or a parent of ``fold_*`` model folders."""
    return path.is_dir() and ((path / METHOD_FILE).is_file() or bool(fold_folders(path)))


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


@dataclass
class CascadeMember:
    """A segment-then-segment folder in an ensemble: the members' interface of a
    :class:`LoadedModel` (plan, labels, post-processing folder), its probabilities the cascade's
    fused ones on the input grid."""

    cascade: Any  # flexpatch.cascade.infer.Cascade (imported with the cascade, on use)

    @property
    def model_dir(self) -> Path:
        return Path(self.cascade.model_dir)

    @property
    def plan(self) -> Any:
        return self.cascade.rough.plan

    @property
    def device(self) -> Any:
        return self.cascade.rough.device

    @property
    def label_names(self) -> dict[int, str]:
        return self.cascade.rough.label_names

    @property
    def largest_value(self) -> int:
        return self.cascade.rough.largest_value

    def labels(self, probs: np.ndarray) -> np.ndarray:
        return self.cascade.rough.labels(probs)

    def network(self, tta: str = "none") -> None:
        self.cascade.networks(tta)  # a refused --tta fails before any case runs

    def window(self, patch_size: Sequence[int] | None) -> None:
        if patch_size is not None:
            raise FlexPatchError(
                f"{self.model_dir}: a segment-then-segment model has no window (its input size is fixed)"
            )

    def probabilities(
        self, volume: Volume, batch_size: int = 4, tta: str = "none", memory: int | None = None, **_: Any
    ) -> np.ndarray:
        """The fused probabilities on ``volume``'s grid; the sliding window's options do not apply."""
        if memory is not None:
            raise FlexPatchError(f"{self.model_dir}: --memory is for sliding-window models so far")
        probs = self.cascade.predict(volume, batch_size=batch_size, tta=tta, probabilities=True).probabilities
        if probs is None:  # an explicit check: python -O drops an assert
            raise RuntimeError("the cascade returned no probabilities although they were asked for")
        return probs


Member = LoadedModel | CascadeMember


def _load_member(model_dir: Path, device: str, precision: str | None = None) -> Member:
    name = method_of(model_dir).name
    if name == "sliding-window":
        return load_model(model_dir, device=device, precision=precision or "float32")
    if name == "segment-then-segment":
        if precision not in (None, "float32"):
            raise FlexPatchError(f"{model_dir}: --precision is for sliding-window models so far")
        from flexpatch.cascade.infer import load_cascade

        return CascadeMember(load_cascade(model_dir, device=device))
    if name == "patchwork":
        raise FlexPatchError(
            f"{model_dir}: a patchwork writes on an output grid of its own: average patchworks with "
            "flexpatch.patchwork.predict.predict_patchwork_files([...]) (flexpatch predict does)"
        )
    raise FlexPatchError(f"{model_dir}: a {name} model folder cannot be a member of an ensemble")


def load_ensemble(
    model_dirs: Sequence[Path], device: str = "auto", precision: str | None = None
) -> list[Member]:
    """The members, checked to be sliding-window or cascade models with the first one's labels;
    ``precision``: the sliding-window members' (:func:`~flexpatch.infer.predictor.load_model`)."""
    models = [_load_member(d, device, precision) for d in model_dirs]
    first = models[0]
    for lm in models[1:]:
        if _outputs(lm) != _outputs(first):
            raise FlexPatchError(
                f"{lm.model_dir / 'plan.json'}: labels, dimensions or channels differ from "
                f"{first.model_dir / 'plan.json'}; an ensemble averages models of one dataset"
            )
    return models


def _outputs(lm: Member) -> tuple:
    """What must agree for probabilities to be averaged: labels, regions, dimensions, channels."""
    plan = lm.plan
    return plan.labels, plan.regions, plan.regions_class_order, plan.ndim, plan.in_channels


def mean_probabilities(models: Sequence[Member], volume: Volume, **options: object) -> np.ndarray:
    """The models' probabilities ``(C, *spatial)`` on the volume's grid, averaged; ``options`` are
    :meth:`LoadedModel.segment`'s (``patch_size`` None: each model's own default window, or with
    ``memory`` the one planned within it).

    One running sum, the first model's probabilities themselves, summed into and divided in place:
    besides it only the model running holds its probabilities. Why no explicit share is taken from
    ``memory`` for the sum: on the CPU a model's plan sets aside what the process holds, which is
    the sum from the second model on (the first one's probabilities, counted as its output, become
    it); on a GPU the sum is in host memory, outside the device's budget.
    """
    if not models:
        raise FlexPatchError("an ensemble needs at least one model folder")
    total = models[0].probabilities(volume, **options)  # type: ignore[arg-type]
    for lm in models[1:]:
        np.add(total, lm.probabilities(volume, **options), out=total)  # type: ignore[arg-type]
    return np.divide(total, np.float32(len(models)), out=total)


def mean_labels(first: Member, mean: np.ndarray) -> np.ndarray:
    """The first model's labels of the mean probabilities, a few rows at a time: labelling the whole
    image at once takes an int64 index per voxel (800 MB for a 512x512x400 CT), more than a
    model's plan within ``memory`` left for it."""
    labels = np.empty(mean.shape[1:], dtype=label_dtype(first.largest_value + 1))
    step = max(1, RESTORE_CHUNK_VOXELS // max(1, math.prod(mean.shape[2:])))
    for row in range(0, labels.shape[0], step):
        labels[row : row + step] = first.labels(mean[:, row : row + step])
    return labels


def common_postprocessing(models: Sequence[Member]) -> tuple[list[int], str | None]:
    """The classes every member keeps the largest component of, when all decided the same; else
    none, with the line that says so, naming each member's decision."""
    decisions = [sorted(read_postprocessing(lm.model_dir)) for lm in models]
    if all(d == decisions[0] for d in decisions):
        return decisions[0], None
    names = [lm.model_dir.name for lm in models]
    names = names if len(set(names)) == len(names) else [str(lm.model_dir) for lm in models]
    said = "; ".join(
        f"{name} {', '.join(map(str, d)) or 'none'}" for name, d in zip(names, decisions, strict=True)
    )
    return (
        [],
        f"post-processing: none applied, the members decided differently (largest component of: {said})",
    )


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
    memory: str | int | None = None,
    precision: str | None = None,
) -> Written:
    """Segment image files with the mean probabilities of several model folders (or fold parents,
    see :func:`expand_models`); the arguments are :func:`~flexpatch.infer.predictor.predict_files`'.
    ``postprocess``: the members' post-processing when they all decided the same
    (:func:`common_postprocessing`)."""
    models = load_ensemble(expand_models([Path(d) for d in model_dirs]), device, precision)
    for lm in models:
        lm.network(tta)  # a refused --tta fails before any case runs
        lm.window(patch_size)  # as a window too small for a model
    first = models[0]
    budget = None if memory is None else parse_budget(memory, first.device)
    cases = cases_for(inputs, first.plan.in_channels, out_dir)
    if budget is not None:  # before any image is read
        cascade = next((m for m in models if isinstance(m, CascadeMember)), None)
        if cascade is not None:
            raise FlexPatchError(f"{cascade.model_dir}: --memory is for sliding-window models so far")
        check_floors(first, cases, budget, patch_size, overlap, probabilities=True)
    options = dict(patch_size=patch_size, overlap=overlap, blend=blend, batch_size=batch_size,
                   stitch_device=stitch_device, tta=tta, memory=budget)  # fmt: skip

    def segment(volume: Volume) -> Prediction:
        mean = mean_probabilities(models, volume, **options)
        return Prediction(mean_labels(first, mean), mean if save_probabilities else None)

    kept, line = common_postprocessing(models) if postprocess else ([], None)
    written = run_prediction(
        cases,
        out_dir,
        first.plan.ndim,
        segment,
        label_names=first.label_names,
        save_probabilities=save_probabilities,
        progress=progress,
        describe=f"predict, ensemble of {len(models)}",
        largest_component=kept,
    )
    if line is not None:  # after the run: a bad input's error stays the only line on stderr
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    return written
