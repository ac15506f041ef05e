"""Datasets on disk: the nnU-Net v2 raw layout and the Medical Segmentation Decathlon layout.

``load_dataset`` reads ``dataset.json`` and lists the cases without touching the
images (except one header, to find the number of spatial axes); ``load_case``
reads one case and checks that its files agree with each other.

nnU-Net v2 (``channel_names``, ``labels`` name->value, ``file_ending``; with
``regions_class_order``, ``labels`` name->values defines regions, see :mod:`flexpatch.data.regions`)::

    root/dataset.json
    root/imagesTr/CASE_0000.nii.gz, CASE_0001.nii.gz, ...   one file per channel
    root/labelsTr/CASE.nii.gz
    root/imagesTs/...  (root/labelsTs/... optional)

MSD (``modality``, ``labels`` value->name, ``training``/``test`` lists of files);
an image may be one 4D file holding all channels. Images are NIfTI, ``.mha``/``.nrrd``, PNG/TIFF or
nnU-Net's 3D TIFF (:mod:`flexpatch.data.io`); ``overwrite_image_reader_writer`` is checked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from flexpatch.data.io import (
    IMAGE_SUFFIXES,
    PLAIN_2D_SUFFIXES,
    Volume,
    read_image,
    read_label,
    spatial_ndim,
    suffix_of,
)
from flexpatch.data.readers import reader_ndim
from flexpatch.data.regions import Regions, parse_regions, regions_to_json
from flexpatch.errors import FlexPatchError

SUPPORTED_ENDINGS = IMAGE_SUFFIXES
AFFINE_ATOL = 1e-3


@dataclass(frozen=True)
class Case:
    """One case: its input channel files and, for training cases, its label map.

    Attributes:
        id: the case name (label file name without its ending).
        images: one file per input channel, or one multi-channel file (MSD 4D).
        label: the label map, or None where there is none (test cases).
    """

    id: str
    images: tuple[Path, ...]
    label: Path | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "images": [str(p) for p in self.images],
            "label": None if self.label is None else str(self.label),
        }


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` and the folders say about a dataset.

    Attributes:
        root: the dataset folder.
        name: the dataset's name (``name`` in dataset.json, else the folder name).
        layout: ``"nnunet"`` or ``"msd"``.
        channel_names: one name per input channel, e.g. ``("CT",)``.
        labels: class name -> label value, background 0 included: the values the label files
            hold. A region dataset's are derived from its regions (``label_<v>`` for each value
            a region lists), so that every value check and sampler works on them unchanged.
        file_ending: the image file ending, e.g. ``".nii.gz"``.
        training: the labelled cases.
        test: the cases of ``imagesTs`` (labelled where ``labelsTs`` holds their label).
        ndim: spatial dimensions, 2 or 3.
        mirrored_pairs: label names that differ only by side (``"mirrored_pairs": [["kidney_left",
            "kidney_right"]]`` in dataset.json): mirroring would swap them, so it is turned off, and
            the sweep reports how often they are confused.
        regions: nnU-Net's region-based labels, ``(name, label values)`` per region in
            dataset.json's order, one network output (sigmoid) each; empty for a plain dataset.
        regions_class_order: the value each region writes back into a label map, in order.
    """

    root: Path
    name: str
    layout: str
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    file_ending: str
    training: tuple[Case, ...]
    test: tuple[Case, ...]
    ndim: int
    mirrored_pairs: tuple[tuple[str, str], ...] = ()
    regions: Regions = ()
    regions_class_order: tuple[int, ...] = ()

    @property
    def out_channels(self) -> int:
        """The network's outputs: one sigmoid per region, else one softmax channel per class."""
        return len(self.regions) or self.num_classes

    @property
    def num_classes(self) -> int:
        """Number of output classes: the largest label value plus one, the ``ignore`` label aside
        (nnU-Net's "don't care" value: not a class, it gets no loss and no metric)."""
        return max(v for k, v in self.labels.items() if k != "ignore") + 1

    @property
    def ignore_label(self) -> int | None:
        """The value of the ``ignore`` label, if dataset.json declares one."""
        return self.labels.get("ignore")

    @property
    def normalizations(self) -> tuple[str, ...]:
        """Each channel's intensity normalisation, from its name (see :func:`scheme_of`)."""
        return tuple(scheme_of(name) for name in self.channel_names)

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "name": self.name,
            "layout": self.layout,
            "channel_names": list(self.channel_names),
            "labels": dict(self.labels),
            "file_ending": self.file_ending,
            "ndim": self.ndim,
            "num_classes": self.num_classes,
            "mirrored_pairs": [list(p) for p in self.mirrored_pairs],
            **self._regions_json(),
            "training": [c.to_json() for c in self.training],
            "test": [c.to_json() for c in self.test],
        }

    def _regions_json(self) -> dict[str, Any]:
        """A plain dataset's record stays as it was before regions."""
        if not self.regions:
            return {}
        return {
            "regions": regions_to_json(self.regions),
            "regions_class_order": list(self.regions_class_order),
        }


# nnU-Net's channel_names that name a scheme (any other name, e.g. "T2" or "PET", is z-scored)
_SCHEME_OF_NAME = {
    "ct": "ct", "nonorm": "none", "zscore": "zscore", "rescale_to_0_1": "rescale", "rgb_to_0_1": "rgb"
}  # fmt: skip


def refuse_regions(ds: DatasetInfo, method: str) -> None:
    """One line for a method that trains one softmax class per label value: region-based labels
    (overlapping regions with sigmoid outputs) are the core trainer's."""
    if ds.regions:
        raise FlexPatchError(
            f"{ds.root / 'dataset.json'}: region-based labels train with the core trainer, not {method}"
        )


def scheme_of(channel_name: str) -> str:
    """The normalisation of a channel named as in nnU-Net's ``channel_names``: a CT channel by its
    Hounsfield window, ``noNorm`` none, ``rescale_to_0_1`` min-max, ``rgb_to_0_1`` / 255, the rest
    (MR, PET, microscopy, ...) z-scored per image."""
    return _SCHEME_OF_NAME.get(channel_name.strip().lower(), "zscore")


def load_dataset(root: str | Path) -> DatasetInfo:
    """Read a dataset folder in the nnU-Net v2 raw layout or the MSD layout.

    Args:
        root: the folder holding ``dataset.json``.

    Raises:
        FlexPatchError: the folder, ``dataset.json``, a required field or a listed
            image is missing, the JSON is invalid, the file ending is unsupported,
            or there are no training cases.
    """
    root = Path(root)
    if not root.is_dir():
        raise FlexPatchError(f"{root}: dataset folder not found")
    meta_path = root / "dataset.json"
    meta = _read_meta(meta_path)
    if "channel_names" in meta:
        info = _load_nnunet(root, meta, meta_path)
    elif "modality" in meta:
        info = _load_msd(root, meta, meta_path)
    else:
        raise FlexPatchError(
            f"{meta_path}: missing required field 'channel_names' (nnU-Net) or 'modality' (MSD)"
        )
    return info


def load_case(case: Case, ndim: int, labels: dict[str, int] | None = None) -> tuple[Volume, Volume | None]:
    """Read a case: all channels stacked as ``(C, *spatial)`` and its label map.

    Args:
        case: the case to read.
        ndim: spatial dimensions (2 or 3).
        labels: declared classes; when given, label values outside them are an error.

    Raises:
        FlexPatchError: channel files differ in shape or affine, the label does not
            match the image in shape or affine, or it holds undeclared values.
    """
    vols = [read_image(p, ndim) for p in case.images]
    first = vols[0]
    for v in vols[1:]:
        if v.spatial_shape != first.spatial_shape:
            raise FlexPatchError(
                f"{v.path}: shape {v.spatial_shape} differs from {first.path.name} {first.spatial_shape}"
            )
        if not np.allclose(v.affine, first.affine, atol=AFFINE_ATOL):
            raise FlexPatchError(f"{v.path}: affine differs from {first.path}")
    data = vols[0].data if len(vols) == 1 else np.concatenate([v.data for v in vols], axis=0)
    image = Volume(data, first.affine, ndim, first.path)
    if case.label is None:
        return image, None
    label = read_label(case.label, ndim)
    _check_label(image, label, labels)
    return image, label


def _check_label(image: Volume, label: Volume, labels: dict[str, int] | None) -> None:
    if label.spatial_shape != image.spatial_shape:
        raise FlexPatchError(
            f"{label.path}: label shape {label.spatial_shape} differs from image {image.path} "
            f"shape {image.spatial_shape}"
        )
    if not np.allclose(label.affine, image.affine, atol=AFFINE_ATOL):
        raise FlexPatchError(f"{label.path}: label affine differs from image {image.path} (tolerance 1e-3)")
    if labels is not None:
        found = np.unique(label.data)
        extra = sorted(set(found.tolist()) - set(labels.values()))
        if extra:
            raise FlexPatchError(
                f"{label.path}: label values {extra} are not declared in dataset.json labels "
                f"{sorted(labels.values())}"
            )


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FlexPatchError(f"{path}: dataset.json not found")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlexPatchError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise FlexPatchError(f"{path}: expected a JSON object at the top level")
    return meta


def _require(meta: dict[str, Any], fields: tuple[str, ...], path: Path) -> None:
    missing = [f for f in fields if f not in meta]
    if missing:
        raise FlexPatchError(f"{path}: missing required field(s) {', '.join(repr(f) for f in missing)}")


def _ordered_names(mapping: Any, field: str, path: Path) -> tuple[str, ...]:
    """Values of a ``{"0": name, "1": name}`` mapping, ordered by their integer key."""
    if not isinstance(mapping, dict) or not mapping:
        raise FlexPatchError(f'{path}: \'{field}\' must be a non-empty object like {{"0": "CT"}}')
    try:
        keys = sorted(mapping, key=int)
    except ValueError:
        raise FlexPatchError(f'{path}: \'{field}\' keys must be channel indices "0", "1", ...') from None
    if [int(k) for k in keys] != list(range(len(keys))):
        raise FlexPatchError(f"{path}: '{field}' keys must be 0..{len(keys) - 1}, found {keys}")
    return tuple(str(mapping[k]) for k in keys)


def _check_labels(labels: dict[str, int], path: Path) -> dict[str, int]:
    values = list(labels.values())
    if len(set(values)) != len(values):
        raise FlexPatchError(f"{path}: 'labels' assigns the same value to two classes: {labels}")
    if 0 not in values:
        raise FlexPatchError(f"{path}: 'labels' must declare background as value 0, found {labels}")
    if "ignore" in labels and labels["ignore"] != max(values):
        raise FlexPatchError(f"{path}: the 'ignore' label must have the largest value (as nnU-Net's)")
    # one output channel per value up to the largest: {0, 255} would make 256 channels
    regular = sorted(v for name, v in labels.items() if name != "ignore")
    if regular != list(range(len(regular))):
        raise FlexPatchError(
            f"{path}: label values must be consecutive 0..{len(regular) - 1} (as nnU-Net's), found "
            f"{regular}; renumber them in 'labels' and in the label files (e.g. 255 -> 1)"
        )
    return labels


def _nnunet_labels(raw: Any, path: Path) -> dict[str, int]:
    if not isinstance(raw, dict) or not raw:
        raise FlexPatchError(f"{path}: 'labels' must be a non-empty object like {{\"background\": 0}}")
    labels: dict[str, int] = {}
    for name, value in raw.items():
        if isinstance(value, list):  # nnU-Net refuses regions without an order to write them back in
            raise FlexPatchError(
                f"{path}: label '{name}' lists values {value} (a region); region-based labels need "
                "'regions_class_order' (as in nnU-Net)"
            )
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FlexPatchError(
                f"{path}: label '{name}' has value {value!r}; expected a non-negative integer"
            )
        labels[str(name)] = value
    return _check_labels(labels, path)


def _msd_labels(raw: Any, path: Path) -> dict[str, int]:
    if not isinstance(raw, dict) or not raw:
        raise FlexPatchError(f'{path}: \'labels\' must be a non-empty object like {{"0": "background"}}')
    try:
        labels = {str(name): int(value) for value, name in raw.items()}
    except ValueError:
        raise FlexPatchError(f"{path}: MSD 'labels' keys must be integer values, found {list(raw)}") from None
    if len(labels) != len(raw):
        raise FlexPatchError(f"{path}: 'labels' uses the same class name twice: {raw}")
    if min(labels.values()) < 0:
        raise FlexPatchError(f"{path}: 'labels' values must be non-negative, found {list(raw)}")
    return _check_labels(dict(sorted(labels.items(), key=lambda kv: kv[1])), path)


def _check_ending(ending: Any, path: Path) -> str:
    if not isinstance(ending, str) or ending.lower() not in SUPPORTED_ENDINGS:
        raise FlexPatchError(
            f"{path}: file_ending {ending!r} is not supported (use one of {', '.join(SUPPORTED_ENDINGS)})"
        )
    return ending


def _strip(name: str, ending: str) -> str:
    return name[: -len(ending)]


def _files_with(folder: Path, ending: str) -> list[Path]:
    # dot files are macOS resource forks (MSD archives) or our own atomic temporaries
    return sorted(p for p in folder.iterdir() if p.name.endswith(ending) and not p.name.startswith("."))


def _channel_files(folder: Path, case_id: str, n: int, ending: str) -> tuple[Path, ...]:
    files = tuple(folder / f"{case_id}_{c:04d}{ending}" for c in range(n))
    if ending.lower() in PLAIN_2D_SUFFIXES and files[0].is_file() and not files[-1].is_file():
        return files[:1]  # nnU-Net's natural images: one RGB file holds all channels
    for f in files:
        if not f.is_file():
            raise FlexPatchError(f"{f}: image file of case '{case_id}' not found")
    return files


def _load_nnunet(root: Path, meta: dict[str, Any], path: Path) -> DatasetInfo:
    _require(meta, ("channel_names", "labels", "file_ending"), path)
    channels = _ordered_names(meta["channel_names"], "channel_names", path)
    regions: Regions = ()
    order: tuple[int, ...] = ()
    if "regions_class_order" in meta:
        labels, regions, order = parse_regions(meta["labels"], meta["regions_class_order"], path)
    else:
        labels = _nnunet_labels(meta["labels"], path)
    ending = _check_ending(meta["file_ending"], path)
    labels_tr = root / "labelsTr"
    if not labels_tr.is_dir():
        raise FlexPatchError(f"{labels_tr}: folder not found (empty dataset)")
    training = tuple(
        Case(cid, _channel_files(root / "imagesTr", cid, len(channels), ending), labels_tr / f"{cid}{ending}")
        for cid in (_strip(p.name, ending) for p in _files_with(labels_tr, ending))
    )
    test = _nnunet_test(root, len(channels), ending)
    info = _finish(root, meta, "nnunet", channels, labels, ending, training, test, path)
    if regions and info.mirrored_pairs:
        # a written-back label map does not hold the files' values: pairs of them mean nothing there
        raise FlexPatchError(f"{path}: 'mirrored_pairs' is not supported with region-based labels")
    return replace(info, regions=regions, regions_class_order=order)


def _nnunet_test(root: Path, n_channels: int, ending: str) -> tuple[Case, ...]:
    folder = root / "imagesTs"
    if not folder.is_dir():
        return ()
    suffix_len = len("_0000") + len(ending)
    ids = sorted({p.name[:-suffix_len] for p in _files_with(folder, ending) if len(p.name) > suffix_len})
    return tuple(
        Case(cid, _channel_files(folder, cid, n_channels, ending), _test_label(root, f"{cid}{ending}"))
        for cid in ids
    )


def _test_label(root: Path, name: str) -> Path | None:
    label = root / "labelsTs" / name
    return label if label.is_file() else None


def _load_msd(root: Path, meta: dict[str, Any], path: Path) -> DatasetInfo:
    _require(meta, ("modality", "labels", "training"), path)
    channels = _ordered_names(meta["modality"], "modality", path)
    labels = _msd_labels(meta["labels"], path)
    entries = meta["training"]
    if not isinstance(entries, list) or not entries:
        raise FlexPatchError(f"{path}: no training cases (empty dataset)")
    first = entries[0].get("image") if isinstance(entries[0], dict) else None
    if not isinstance(first, str):
        raise FlexPatchError(f"{path}: training case {entries[0]!r} has no 'image' file")
    ending = _check_ending(suffix_of(Path(first)), path)
    training = tuple(_msd_case(root, e, len(channels), ending, path, labelled=True) for e in entries)
    test_entries = meta.get("test", [])
    if not isinstance(test_entries, list):
        raise FlexPatchError(f"{path}: 'test' must be a list of image files")
    test = tuple(_msd_case(root, e, len(channels), ending, path, labelled=False) for e in test_entries)
    return _finish(root, meta, "msd", channels, labels, ending, training, test, path)


def _msd_case(root: Path, entry: Any, n_channels: int, ending: str, path: Path, labelled: bool) -> Case:
    image_rel = entry.get("image") if isinstance(entry, dict) else entry
    if not isinstance(image_rel, str):
        raise FlexPatchError(f"{path}: case entry {entry!r} has no 'image' file")
    image = _inside(root, image_rel, path)
    cid = _strip(image.name, ending) if image.name.endswith(ending) else image.stem
    if image.is_file():
        images: tuple[Path, ...] = (image,)
    else:
        # nnU-Net v1 converts MSD datasets to one file per channel but keeps the MSD list
        images = _channel_files(image.parent, cid, n_channels, ending)
    if labelled:
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), str):
            raise FlexPatchError(f"{path}: training case {image_rel!r} has no 'label' file")
        label: Path | None = _inside(root, entry["label"], path)
        if not label.is_file():
            raise FlexPatchError(f"{label}: label file of case '{cid}' not found")
    else:
        label = _test_label(root, image.name)
    return Case(cid, images, label)


def _inside(root: Path, relative: str, path: Path) -> Path:
    """``root / relative``, refused when the name leads out of the dataset folder (``../``, an
    absolute path): a dataset.json must not make us read other files. Symlinks are followed: a
    user's own links to shared storage are a common, legitimate layout."""
    if os.path.isabs(relative) or os.path.normpath(relative).split(os.sep)[0] == "..":
        raise FlexPatchError(f"{path}: file {relative!r} lies outside the dataset folder {root}")
    return root / relative


def _finish(
    root: Path,
    meta: dict[str, Any],
    layout: str,
    channels: tuple[str, ...],
    labels: dict[str, int],
    ending: str,
    training: tuple[Case, ...],
    test: tuple[Case, ...],
    path: Path,
) -> DatasetInfo:
    if not training:
        raise FlexPatchError(f"{path}: no training cases (empty dataset)")
    # nnU-Net's overwrite_image_reader_writer: checked; Tiff3DIO / NaturalImage2DIO decide ndim
    ndim = reader_ndim(meta.get("overwrite_image_reader_writer"), ending, path, meta.get("ndim"))
    if ndim is None:
        ndim = spatial_ndim(training[0].images[0])
    if ndim not in (2, 3):
        raise FlexPatchError(f"{path}: 'ndim' must be 2 or 3, found {ndim!r}")
    return DatasetInfo(
        root=root,
        name=str(meta.get("name", root.name)),
        layout=layout,
        channel_names=channels,
        labels=labels,
        file_ending=ending,
        training=training,
        test=test,
        ndim=int(ndim),
        mirrored_pairs=_mirrored_pairs(meta.get("mirrored_pairs", []), labels, path),
    )


def _mirrored_pairs(raw: Any, labels: dict[str, int], path: Path) -> tuple[tuple[str, str], ...]:
    """dataset.json's ``mirrored_pairs``: pairs of declared label names."""
    ok = isinstance(raw, list) and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) for n in p) for p in raw
    )
    if not ok:
        raise FlexPatchError(
            f'{path}: \'mirrored_pairs\' must be a list of name pairs like [["left", "right"]]'
        )
    unknown = sorted({n for p in raw for n in p} - set(labels) - {"background"})
    if unknown:
        raise FlexPatchError(
            f"{path}: 'mirrored_pairs' names {unknown[0]!r}, which 'labels' does not declare"
        )
    return tuple((a, b) for a, b in raw)
