"""One prediction run for every method: cases in, label maps (and probabilities) out.

A method gives the runner one function, ``segment(volume) -> Prediction``; the runner does what
is the same for every method: which files make a case and whether the output folder may hold
the results (:func:`cases_for`), reading a case (:func:`read_case`), writing its outputs on the
input's grid with the input's header and the label names (:func:`~flexpatch.data.io.write_like`),
one progress bar, and the per-case information each method reports (:class:`Written`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flexpatch.data.io import (
    IMAGE_SUFFIXES,
    PLAIN_2D_SUFFIXES,
    Volume,
    channel_count,
    read_image,
    suffix_of,
    write_like,
)
from flexpatch.distributed import Dist, current
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.postprocess import cut_to_largest_
from flexpatch.runtime import check_writable, progress_bar

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
PROBABILITIES = "probabilities"  # subfolder of a prediction folder


@dataclass(frozen=True)
class Prediction:
    """What a method's ``segment`` gives back for one case.

    Attributes:
        labels: the label map ``(*spatial)`` on the input's grid; with ``channels``, a
            ``(C, *spatial)`` output instead (a patchwork's masks or probabilities by --out-type).
        probabilities: ``(C, *spatial)`` on the same grid, for ``--probabilities``; None when
            the method was not asked for them.
        affine: the output grid's voxel -> world affine when it is not the input's (a
            patchwork's ``sampling_factor``); None on the input's grid.
        channels: ``labels`` has a leading channel axis.
        info: what the method reports about the case (boxes, patches, timings), collected in
            :attr:`Written.info`.
        summary: a few words for the progress bar after the case name.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    affine: np.ndarray | None = None
    channels: bool = False
    info: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""


Segmenter = Callable[[Volume], Prediction]


class Written(list[Path]):
    """The label maps written, in case order, with each method's report per case in ``info``.

    A list, so that every predict-files function keeps returning its paths; ``info`` carries
    what used to be written into option objects (a patchwork's statistics, a cascade's boxes).
    """

    def __init__(self, paths: Sequence[Path] = (), info: Mapping[str, dict[str, Any]] | None = None) -> None:
        super().__init__(paths)
        self.info: dict[str, dict[str, Any]] = dict(info or {})


def label_dtype(num_classes: int) -> type:
    """The smallest integer type of a label map: uint8 (every viewer reads it), else int16."""
    return np.uint8 if num_classes < 256 else np.int16


def names_by_value(labels: Mapping[str, int]) -> dict[int, str]:
    """A plan's or dataset.json's ``{name: value}`` as the ``{value: name}`` a label table holds."""
    return {int(value): str(name) for name, value in labels.items()}


def run_prediction(
    cases: Mapping[str, Sequence[Path]],
    out_dir: str | Path,
    ndim: int,
    segment: Segmenter,
    *,
    label_names: Mapping[int, str] | None = None,
    save_probabilities: bool = False,
    progress: bool = True,
    describe: str = "predict",
    largest_component: Sequence[int] = (),
) -> Written:
    """Segment every case and write ``out_dir/CASE.<ending>``; probabilities, when asked, go to
    ``out_dir/probabilities/CASE.nii.gz`` (classes last), a folder of their own so that
    ``out_dir`` pairs file by file with a folder of reference labels.

    The label maps are written in the input's format (:func:`output_suffix`: ``.mha`` in,
    ``.mha`` out, as nnU-Net).
    Every file is written atomically and a case's label map last: a label map on disk means
    its case is complete, and a failure (in ``segment`` or a write) leaves no partial file.
    ``largest_component``: classes cut to their largest connected component in every label map
    (the model's post-processing, decided on validation; :mod:`flexpatch.evaluate.postprocess`).

    Under torchrun each process segments every ``world``-th case (its own device) and every
    process returns the whole run's :class:`Written`, in case order; the main process shows progress.
    """
    out, dist = Path(out_dir), current()
    dist.start()
    mine = dict(dist.split(list(cases.items())))
    written = Written()
    with progress_bar(disable=not progress or not dist.main) as bar:
        task = bar.add_task(describe, total=len(mine), info="")
        for case, files in mine.items():
            volume = read_case(files, ndim)
            prediction = segment(volume)
            if largest_component and not prediction.channels:
                labels = cut_to_largest_(prediction.labels, largest_component)  # ours: no copy
                prediction = dataclasses.replace(prediction, labels=labels)
            ending = output_suffix(volume, prediction)
            path = _write_case(out, case, ending, volume, prediction, label_names, save_probabilities)
            written.append(path)
            written.info[case] = dict(prediction.info)
            summary = f"{case}: {prediction.summary}" if prediction.summary else case
            bar.update(task, advance=1, info=summary)
    return _gathered(written, dist)


def _gathered(written: Written, dist: Dist) -> Written:
    """Every process's :class:`Written` as one, in case order (each process's own when alone)."""
    if not dist.active:
        return written
    whole = dist.gather([(path, case, info) for path, (case, info) in zip(written, written.info.items())])
    return Written([path for path, _, _ in whole], {case: info for _, case, info in whole})


def output_suffix(volume: Volume, prediction: Prediction) -> str:
    """The ending of a case's label map: its input's, so that every method writes the format it
    read (a NIfTI, ``.mha`` or ``.nrrd`` holds any output with its grid). A PNG or TIFF holds one
    map on the input's own grid and no orientation: a patchwork's masks or probabilities
    (channels) or its finer grid (``sampling_factor``) go to NIfTI instead of losing them."""
    ending = suffix_of(Path(volume.path)) if volume.path is not None else ".nii.gz"
    if ending not in PLAIN_2D_SUFFIXES:
        return ending
    moved = prediction.affine is not None and not np.allclose(prediction.affine, volume.affine, atol=1e-6)
    return ".nii.gz" if prediction.channels or moved else ending


def _write_case(
    out: Path,
    case: str,
    suffix: str,
    volume: Volume,
    prediction: Prediction,
    names: Mapping[int, str] | None,
    save_probabilities: bool,
) -> Path:
    """The probabilities first, the label map last (its presence marks a complete case)."""
    if save_probabilities:
        if prediction.probabilities is None:
            raise FlexPatchError(f"{volume.path}: this method gave no probabilities to write")
        probs = np.asarray(prediction.probabilities, dtype=np.float32)
        target = out / PROBABILITIES / f"{case}.nii.gz"
        write_like(target, probs, volume, channels=True, affine=prediction.affine)
    path = out / f"{case}{suffix}"
    channels, affine = prediction.channels, prediction.affine
    return write_like(path, prediction.labels, volume, channels=channels, label_names=names, affine=affine)


def cases_for(inputs: Sequence[str | Path], channels: int, out_dir: str | Path) -> dict[str, list[Path]]:
    """The cases of a prediction run (see :func:`group_inputs`), checked against its output folder
    before any work: the folder must be writable and must not hold an input, which an output of
    the same name would replace."""
    cases = group_inputs(inputs, channels)
    out = Path(out_dir).resolve()
    check_writable(out)
    for files in cases.values():
        for f in files:
            if f.resolve().is_relative_to(out):
                raise FlexPatchError(f"{out_dir}: output folder holds the input {f}; choose another --out")
    return cases


def group_inputs(inputs: Sequence[str | Path], channels: int) -> dict[str, list[Path]]:
    """Case id -> channel files. Folders are expanded; nnU-Net's ``CASE_0000`` suffixes group channels.
    A case of one file may hold all channels (MSD's 4D images, an ITK vector image, RGB): its header
    is read to check that it holds ``channels``."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            # dot files: macOS resource forks (._case.nii.gz), temporaries of a killed run (.tmp-*)
            found = sorted(
                p for p in item.iterdir() if suffix_of(p) in IMAGE_SUFFIXES and not p.name.startswith(".")
            )
            if not found:
                raise FlexPatchError(f"{item}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif item.exists():
            files.append(item)
        else:
            raise FlexPatchError(f"{item}: file not found")
    cases: dict[str, list[Path]] = {}
    for f in files:
        stem = f.name[: -len(suffix_of(f))]
        m = CHANNEL_SUFFIX.match(stem)
        cases.setdefault(m["case"] if m else stem, []).append(f)
    for case, chans in cases.items():
        if channels > 1 and len(chans) != channels:
            _check_one_file_channels(case, chans, channels)
    return cases


def _check_one_file_channels(case: str, files: Sequence[Path], channels: int) -> None:
    """Accept a case of one file holding all ``channels``; any other count is one line."""
    if len(files) != 1:
        raise FlexPatchError(
            f"{files[0]}: case {case} has {len(files)} channel files, the model expects {channels}"
        )
    held = channel_count(files[0])
    if held != channels:
        raise FlexPatchError(
            f"{files[0]}: case {case} has 1 file, holding {held} channel(s); the model expects {channels}"
        )


def read_case(files: Sequence[Path], ndim: int) -> Volume:
    """A case's channel files as one volume ``(C, *spatial)``; the channels must share the grid
    (shape, and affine within 1e-3), or their voxels would not be the same points."""
    vols = [read_image(f, ndim=ndim) for f in sorted(files)]
    for v in vols[1:]:
        if v.data.shape[1:] != vols[0].data.shape[1:]:
            raise FlexPatchError(f"{v.path}: shape {v.data.shape[1:]} differs from {vols[0].path}")
        if not np.allclose(v.affine, vols[0].affine, atol=1e-3):
            raise FlexPatchError(f"{v.path}: affine differs from {vols[0].path} (tolerance 1e-3)")
    return Volume(np.concatenate([v.data for v in vols]), vols[0].affine, ndim, vols[0].path)
