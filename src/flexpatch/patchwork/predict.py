"""A trained patchwork's folder: loading it, segmenting volumes with it, writing the outputs.

The application itself (patches from coarse to fine, lazy evaluation, stitching) is
:mod:`flexpatch.patchwork.apply`; this module gives it a model folder's network, scheme, labels
and thresholds, and turns its stitched result into label maps, masks or probabilities on the
input's world grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexpatch.checkpoint import load_checkpoint
from flexpatch.data.io import Volume
from flexpatch.errors import FlexPatchError
from flexpatch.infer.runner import Prediction, Written, cases_for, run_prediction
from flexpatch.patchwork.apply import Applied, ApplyOptions, apply_image
from flexpatch.patchwork.files import BEST, CONFIG, WEIGHTS, load_meta
from flexpatch.patchwork.losses import LabelEmbedding
from flexpatch.patchwork.model import PatchworkNet
from flexpatch.patchwork.outputs import parse_out_type, to_output
from flexpatch.patchwork.scheme import Scheme
from flexpatch.runtime import resolve_device


@dataclass
class LoadedPatchwork:
    """A trained patchwork: network, scheme, labels and (for many labels) the label embedding."""

    net: PatchworkNet
    scheme: Scheme
    meta: dict[str, Any]
    embedding: LabelEmbedding | None
    device: torch.device
    thresholds: list[float] | None = None  # per label, tuned on the validation cases (DNP's mask default)
    plans: dict = field(default_factory=dict, repr=False)  # batches planned for --memory (apply_image)

    @property
    def categorical(self) -> bool:
        return bool(self.meta["config"]["categorical"])

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            return logits  # responses are stitched; classes are decoded after stitching
        return torch.softmax(logits, 1) if self.categorical else torch.sigmoid(logits)


def load_patchwork(model_dir: str | Path, device: str = "auto", checkpoint: str = "best") -> LoadedPatchwork:
    """A trained patchwork: the best validation round's weights (``best``, when the run validated;
    else the last) or the last round's (``last``)."""
    if checkpoint not in ("best", "last"):
        raise FlexPatchError(f"unknown checkpoint {checkpoint!r}; choose best or last")
    meta = load_meta(model_dir)
    dev = resolve_device(device)
    best = Path(model_dir) / BEST
    path = best if checkpoint == "best" and best.is_file() else Path(model_dir) / WEIGHTS
    state = load_checkpoint(path, map_location="cpu")
    try:
        scheme = Scheme.from_json(meta["scheme"])
        net = PatchworkNet.from_config(meta["net"])
        net.load_state_dict(state["net"])
        embedding = None
        if state.get("embedding") is not None:
            cfg = meta["config"]
            embedding = LabelEmbedding(len(meta["label_values"]) + 1, cfg["embedding_dim"])
            embedding.load_state_dict(state["embedding"])
            embedding.to(dev).eval()
    except (FlexPatchError, KeyError, TypeError, RuntimeError) as err:
        # a folder written by another flexpatch version, or edited by hand: one line, not a traceback
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FlexPatchError(
            f"{Path(model_dir) / CONFIG}: not a patchwork this version can load ({reason})"
        ) from None
    return LoadedPatchwork(net.to(dev).eval(), scheme, meta, embedding, dev, state.get("thresholds"))


def load_patchworks(model_dirs: Sequence[str | Path], device: str = "auto") -> list[LoadedPatchwork]:
    """One patchwork, or the members of an ensemble (nnU-Net's ensemble of folds): checked to share
    what the mean of their probabilities needs (scheme, so the output grid, labels, channels and
    activation) and, when several, to stitch probabilities (no label embedding)."""
    if not model_dirs:
        raise FlexPatchError("an ensemble needs at least one model folder")
    models = [load_patchwork(d, device) for d in model_dirs]
    first = Path(model_dirs[0]) / CONFIG
    for model, folder in zip(models[1:], model_dirs[1:], strict=True):
        if _averaged(model) != _averaged(models[0]):
            raise FlexPatchError(
                f"{Path(folder) / CONFIG}: scheme, labels, channels or activation differ from {first}; "
                "an ensemble averages patchworks of one configuration"
            )
    embedded = [d for model, d in zip(models, model_dirs, strict=True) if model.embedding is not None]
    if len(models) > 1 and embedded:
        raise FlexPatchError(
            f"{embedded[0]}: a patchwork with a label embedding stitches embedding responses, not "
            "probabilities; it cannot be averaged in an ensemble"
        )
    return models


def _averaged(model: LoadedPatchwork) -> tuple:
    """What must agree for two patchworks' stitched probabilities to be averaged voxel by voxel."""
    return model.scheme, list(model.meta["label_values"]), model.meta["in_channels"], model.categorical


def stitched(model: LoadedPatchwork, volume: Volume, opts: ApplyOptions) -> Applied:
    """The stitched probabilities (or embedding responses) of one volume on the output grid."""
    if volume.data.shape[0] != model.meta["in_channels"]:
        expected = model.meta["in_channels"]
        raise FlexPatchError(f"{volume.path}: {volume.data.shape[0]} channels, patchwork wants {expected}")
    return apply_image(
        model.net,
        volume.data,
        volume.affine,
        model.scheme,
        opts,
        model.activation,
        model.categorical,
        model.device,
        # with a label embedding the block outputs are features: rank patches by their class logits
        None if model.embedding is None else model.embedding.logits,
        normalized=model.categorical and model.embedding is None,
        plans=model.plans,
    )


def mean_stitched(models: Sequence[LoadedPatchwork], volume: Volume, opts: ApplyOptions) -> Applied:
    """The members' stitched probabilities averaged (one member: its own); the statistics are the
    first member's with the patches of all members summed. One running sum: besides it only the
    member running holds its result."""
    applied = stitched(models[0], volume, opts)
    if len(models) == 1:
        return applied
    total, patches = applied.values.float(), list(applied.stats["patches"])
    for model in models[1:]:
        other = stitched(model, volume, opts)
        if other.values.shape != total.shape or not np.allclose(other.grid, applied.grid):
            # one scheme gives one output grid: not a user's error
            raise RuntimeError("members of one scheme stitched on different output grids")
        total += other.values.to(total.device, torch.float32)
        patches = [a + b for a, b in zip(patches, other.stats["patches"], strict=True)]
        del other
    total /= len(models)
    return Applied(total, applied.grid, {**applied.stats, "patches": patches, "members": len(models)})


def label_map(model: LoadedPatchwork, values_out: torch.Tensor) -> np.ndarray:
    """The atlas predict writes: the decoded label embedding, or the most probable label."""
    values = model.meta["label_values"]
    if model.embedding is not None:
        idx = model.embedding.decode(values_out).cpu().numpy()
        return np.array([0, *values])[idx].astype(np.int16)
    return to_output(values_out, "atlas", model.categorical, values)


def segment_volume(
    model: LoadedPatchwork | Sequence[LoadedPatchwork],
    volume: Volume,
    opts: ApplyOptions,
    out_type: str = "atlas",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The output array (see :func:`to_output`), its world affine, and statistics; of the mean of
    several members' probabilities when given several (:func:`load_patchworks`).

    A plain ``mask`` uses the thresholds tuned on the validation cases when the model has them
    (DNP's default; an ensemble's when its members agree), else 0.5; ``mask:0.4,0.5`` sets them.
    """
    models = [model] if isinstance(model, LoadedPatchwork) else list(model)
    array, world, applied = _segment(models, volume, opts, out_type)
    return array, world, applied.stats


def _segment(
    models: Sequence[LoadedPatchwork], volume: Volume, opts: ApplyOptions, out_type: str
) -> tuple[np.ndarray, np.ndarray, Applied]:
    """:func:`segment_volume` with the stitched result itself, whose values are the probabilities."""
    first = models[0]
    out_type = _tuned(models, out_type)
    _check_embedding(first, out_type, False)
    applied = mean_stitched(models, volume, opts)
    if first.embedding is not None:
        array = label_map(first, applied.values)
    else:
        array = to_output(applied.values, out_type, first.categorical, first.meta["label_values"])
    return array, _world(volume.affine, applied.grid, first.scheme.ndim), applied


def _tuned(models: Sequence[LoadedPatchwork], out_type: str) -> str:
    """A plain ``mask`` with the members' tuned thresholds (the same in every member), or as given."""
    if parse_out_type(out_type) != ("mask", None) or not models[0].thresholds:
        return out_type
    tuned = [m.thresholds for m in models]
    if any(t != tuned[0] for t in tuned):
        raise FlexPatchError(
            "the ensemble's members tuned different mask thresholds on their validation cases "
            f"({'; '.join(','.join(f'{v:g}' for v in t or []) for t in tuned)}): "
            "give them with --out-type mask:T1,T2,..."
        )
    return "mask:" + ",".join(f"{t:g}" for t in tuned[0])


def _check_embedding(model: LoadedPatchwork, out_type: str, probabilities: bool) -> None:
    """A label embedding's stitched responses are no probabilities: they decode to an atlas only."""
    if model.embedding is None:
        return
    if parse_out_type(out_type)[0] != "atlas":
        raise FlexPatchError(
            "a patchwork with a label embedding writes label atlases only (--out-type atlas)"
        )
    if probabilities:
        raise FlexPatchError(
            "a patchwork with a label embedding stitches embedding responses, not probabilities; "
            "leave out --probabilities"
        )


def _world(affine: np.ndarray, grid: np.ndarray, n: int) -> np.ndarray:
    """The output grid's voxel -> world affine: the input's affine after the output -> input grid."""
    world = np.eye(4)
    world[:n, :n] = affine[:n, :n] @ grid[:n, :n]
    world[:n, 3] = affine[:n, :n] @ grid[:n, n] + affine[:n, 3]
    if n == 2:
        world[2, 2], world[2, 3] = affine[2, 2], affine[2, 3]
    return world


def predict_patchwork_files(
    model_dir: str | Path | Sequence[str | Path],
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    opts: ApplyOptions | None = None,
    out_type: str = "atlas",
    device: str = "auto",
    progress: bool = True,
    memory: str | int | None = None,
    save_probabilities: bool = False,
) -> Written:
    """Segment image files with a patchwork, or with the mean probabilities of several (an ensemble
    of folds: a list of model folders, :func:`load_patchworks`); one file per case in the input's
    format, as every method's (:func:`~flexpatch.infer.runner.output_suffix`; atomic writes).

    ``memory`` (``"2GB"``, ``"auto"``, bytes): a budget on the device; the batch is planned
    within it per case (at most ``opts.batch_size``) and per member, and the choice is reported on
    stderr. ``save_probabilities`` also writes the stitched activations to
    ``out_dir/probabilities/CASE.nii.gz`` (classes last, on the output grid): a softmax over
    background and the labels, or one sigmoid per label for multi-label models. Each case's
    statistics (patches per level, seconds, the batch) are in the result's ``info``.
    """
    from flexpatch.plan.budget import parse_budget

    opts = opts or ApplyOptions()
    parse_out_type(out_type)
    dirs = [model_dir] if isinstance(model_dir, (str, Path)) else list(model_dir)
    models = load_patchworks(dirs, device)
    first = models[0]
    if memory is not None:
        opts = replace(opts, memory=parse_budget(memory, first.device))
    opts.check(first.scheme.depth)
    _check_embedding(first, out_type, save_probabilities)
    _tuned(models, out_type)  # differing thresholds fail before any case runs
    cases = cases_for(inputs, first.meta["in_channels"], out_dir)
    return run_prediction(
        cases,
        out_dir,
        first.scheme.ndim,
        _segmenter(models, opts, out_type, save_probabilities),
        label_names={int(k): v for k, v in first.meta["label_names"].items()},
        save_probabilities=save_probabilities,
        progress=progress,
        describe="patchwork" if len(models) == 1 else f"patchwork, ensemble of {len(models)}",
    )


def _segmenter(
    models: Sequence[LoadedPatchwork], opts: ApplyOptions, out_type: str, probabilities: bool
) -> Callable[[Volume], Prediction]:
    """The runner's ``segment`` for a patchwork (or an ensemble of them); a new --memory choice is
    reported once, not per case."""
    from flexpatch.runtime import console

    reported: str | None = None
    ndim = models[0].scheme.ndim

    def segment(volume: Volume) -> Prediction:
        nonlocal reported
        array, world, applied = _segment(models, volume, opts, out_type)
        stats = applied.stats
        if stats.get("memory_line") and stats["memory_line"] != reported:
            reported = stats["memory_line"]
            console.print(reported, highlight=False, markup=False, soft_wrap=True)
        channels = array.ndim == ndim + 1  # masks or probabilities: channels last
        return Prediction(
            np.moveaxis(array, -1, 0) if channels else array,
            applied.values.float().cpu().numpy() if probabilities else None,
            affine=world,
            channels=channels,
            info=stats,
            summary=f"{sum(stats['patches'])} patches",
        )

    return segment
