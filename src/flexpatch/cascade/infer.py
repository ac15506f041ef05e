"""Segment-then-segment (seed 05): a rough pass on the downscaled image, then one fine pass per object.

The rough network sees the whole image resized to S per axis. Each connected component of its
upsampled mask gives a box, squared, padded by S//8 and shifted inside the image
(:func:`object_boxes`: the authors' ``cropping.py`` rules in N-D). Each box of the full-resolution
image is resized to S (:func:`crop_resize`), segmented by the fine network, resized back and fused
(:func:`paste_back`): OR of thresholded masks (the paper) or the maximum of probabilities.

Resizing keeps voxel centres aligned (``align_corners=False``) both ways: crop voxel j of a box of
w voxels from s samples image index ``s - 0.5 + (j + 0.5) * w / S``, which ``F.interpolate`` back
to w voxels inverts. All of it runs on the preprocessed grid; :class:`Cascade` restores the result
onto the input's own grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from flexpatch.accumulator import Accumulator
from flexpatch.axes import per_axis
from flexpatch.data.io import Volume, load_json, save_json
from flexpatch.data.resample import restore, restore_chunked
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.postprocess import read_postprocessing
from flexpatch.geometry import Patch, Shape, extract
from flexpatch.infer.predictor import LoadedModel, load_model
from flexpatch.infer.runner import Prediction, Written, cases_for, label_dtype, names_by_value, run_prediction
from flexpatch.infer.tta import Mirrored, mirroring_for

CASCADE_FILE = "cascade.json"
FUSIONS = ("or", "max")
OVERSIZE = ("drop", "clip")
Resampling = Literal["nearest", "linear"]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box of image voxels: ``start`` (first voxel) and ``size`` per axis."""

    start: Shape
    size: Shape

    def __post_init__(self) -> None:
        if len(self.start) != len(self.size) or any(w < 1 for w in self.size):
            raise FlexPatchError(f"box start {self.start} / size {self.size}: one value per axis, sizes >= 1")

    @classmethod
    def whole(cls, shape: Sequence[int]) -> Box:
        """The box covering a whole image of ``shape``."""
        return cls((0,) * len(shape), tuple(int(n) for n in shape))

    @property
    def ndim(self) -> int:
        return len(self.size)

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(s, s + w) for s, w in zip(self.start, self.size, strict=True))

    def patch(self, shape: Sequence[int]) -> Patch:
        """The box resampled on ``shape`` voxels, voxel centres aligned (a plain box when sizes match)."""
        centre = [s + (w - 1) / 2 for s, w in zip(self.start, self.size, strict=True)]
        width = [w * (n - 1) / n for w, n in zip(self.size, shape, strict=True)]
        return Patch.scaled(centre, width, shape)


def object_extents(mask: np.ndarray | torch.Tensor, per_class: bool = True) -> list[tuple[int, Shape, Shape]]:
    """``(class, start, size)`` of the bounding box of every connected component (full connectivity).

    With ``per_class`` each class has its own components (touching organs get one box each);
    otherwise components of ``mask > 0``, labelled with their most frequent class.
    """
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.dtype == bool:
        m = m.astype(np.uint8)
    if not np.issubdtype(m.dtype, np.integer) or (m.size and m.min() < 0):
        raise FlexPatchError(f"mask of shape {m.shape} must hold non-negative integer labels, got {m.dtype}")
    structure = ndimage.generate_binary_structure(m.ndim, m.ndim)
    out = []
    # one class's mask at a time: a mask per class held together is an image-sized array each
    for cls in [int(c) for c in np.unique(m) if c > 0] if per_class else [0]:
        labelled, _ = ndimage.label(m == cls if per_class else m > 0, structure=structure)
        for i, sl in enumerate(ndimage.find_objects(labelled), start=1):
            if not per_class:
                cls = int(np.bincount(m[sl][labelled[sl] == i]).argmax())
            out.append((cls, tuple(s.start for s in sl), tuple(s.stop - s.start for s in sl)))
    return out


def expand_box(
    start: Sequence[int],
    size: Sequence[int],
    image_shape: Sequence[int],
    padding: int,
    oversize: str = "drop",
) -> Box | None:
    """Square (cube) a box about its centre, pad it by ``padding`` per side and shift it inside the image.

    Returns None when the box is larger than the image (``oversize="drop"``, the authors' rule);
    ``"clip"`` keeps it, cut to the image on the axes where it does not fit.
    """
    sizes = [max(int(w), 1) for w in size]  # jitter may shrink a side to nothing
    side = max(sizes)
    # the authors move the start back by half the added width, rounded down
    lo = [int(s) - (side - w) // 2 - padding for s, w in zip(start, sizes, strict=True)]
    side += 2 * padding
    out_size = []
    for axis, n in enumerate(image_shape):
        if side > n and oversize == "drop":
            return None
        w = min(side, n)
        lo[axis] = min(max(lo[axis], 0), n - w)
        out_size.append(w)
    return Box(tuple(lo), tuple(out_size))


def boxes_from_extents(
    extents: Sequence[tuple[int, Shape, Shape]],
    image_shape: Sequence[int],
    input_size: int,
    jitter: int = 0,
    generator: torch.Generator | None = None,
    min_side: int = 5,
    oversize: str = "drop",
) -> list[tuple[int, Box]]:
    """:func:`object_boxes` on precomputed :func:`object_extents` (training reuses them every step)."""
    if input_size < 1 or jitter < 0 or min_side < 0:
        raise FlexPatchError(
            f"input size {input_size} must be >= 1, jitter {jitter} and min side {min_side} >= 0"
        )
    if oversize not in OVERSIZE:
        raise FlexPatchError(f"unknown oversize rule {oversize!r}; choose one of {', '.join(OVERSIZE)}")
    ndim, out = len(image_shape), []
    for cls, start, size in extents:
        if min(size) < min_side:  # noise in the rough mask: the check is on the component itself
            continue
        if jitter:
            # added to each start and size before squaring, as the authors' left, top, width, height
            d = torch.randint(-jitter, jitter + 1, (2, ndim), generator=generator).tolist()
            start = tuple(s + j for s, j in zip(start, d[0], strict=True))
            size = tuple(w + j for w, j in zip(size, d[1], strict=True))
        box = expand_box(start, size, image_shape, input_size // 8, oversize)
        if box is not None:
            out.append((cls, box))
    return out


def object_boxes(
    mask: np.ndarray | torch.Tensor,
    input_size: int,
    jitter: int = 0,
    generator: torch.Generator | None = None,
    min_side: int = 5,
    per_class: bool = True,
    oversize: str = "drop",
) -> list[tuple[int, Box]]:
    """One ``(class, box)`` per connected component of a label map ``(*S)``.

    The rules of the authors' ``cropping.py``, in N-D: bounding box; components with a side
    under ``min_side`` voxels dropped; an integer jitter in ``[-jitter, jitter]`` on every start
    and size (training); squared about the centre; padded by ``input_size // 8`` per side;
    shifted inside the image; dropped when larger than the image (see :func:`expand_box`).
    """
    extents = object_extents(mask, per_class)
    return boxes_from_extents(extents, tuple(mask.shape), input_size, jitter, generator, min_side, oversize)


def crop_resize(
    image: torch.Tensor, boxes: Sequence[Box], size: int | Sequence[int], mode: Resampling = "linear"
) -> torch.Tensor:
    """The ``boxes`` of ``image`` ``(C, *S)``, each resized to ``size``: ``(B, C, *size)``.

    ``mode`` is ``linear`` for images, ``nearest`` for label maps (integer dtypes are kept).
    """
    if not boxes:
        raise FlexPatchError("crop_resize needs at least one box")
    shape = per_axis(size, boxes[0].ndim, "crop_resize size")
    if image.ndim != boxes[0].ndim + 1:
        raise FlexPatchError(f"image {tuple(image.shape)} is not (C, *spatial) for {boxes[0].ndim}D boxes")
    return extract(image, [b.patch(shape) for b in boxes], mode=mode, padding="border")


def resize(x: torch.Tensor, size: Sequence[int], mode: Resampling = "linear") -> torch.Tensor:
    """``(C, *S)`` resized to ``size``, voxel centres aligned: the inverse of crop_resize's mapping."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[1:]) == size:
        return x
    if mode == "nearest":
        out = F.interpolate(x[None].float(), size=size, mode="nearest-exact")[0]
        return out.to(x.dtype)
    linear = {2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(x[None].float(), size=size, mode=linear, align_corners=False)[0]


def paste_back(target: torch.Tensor, crop: torch.Tensor, box: Box, fuse: str = "or") -> None:
    """Resize ``crop`` ``(C, *s)`` to the box and fuse it into ``target`` ``(C, *S)`` in place.

    Float crops are resized linearly, others by nearest neighbour. ``or``: target is boolean
    and a float crop is thresholded at 0.5 (the paper); ``max`` / ``min``: elementwise. The
    fusion is the geometry core's accumulator (box mode); the cascade chooses the resize and
    refuses boxes that leave the image, which its own rules never make.
    """
    spatial = tuple(target.shape[1:])
    if target.ndim != box.ndim + 1 or crop.shape[0] != target.shape[0]:
        raise FlexPatchError(f"crop {tuple(crop.shape)} does not fit target {tuple(target.shape)}")
    if any(s < 0 or s + w > n for s, w, n in zip(box.start, box.size, spatial, strict=True)):
        raise FlexPatchError(f"box start {box.start} size {box.size} leaves the image {spatial}")
    if fuse not in ("or", "max", "min"):
        raise FlexPatchError(f"unknown fusion {fuse!r}; choose one of or, max, min")
    if fuse == "or" and target.dtype != torch.bool:
        raise FlexPatchError(f"fuse 'or' needs a boolean target, got {target.dtype}")
    crop = resize(crop, box.size, "linear" if crop.is_floating_point() else "nearest").to(target.device)
    Accumulator(target, fusion=fuse).add_boxes(crop[None], [box.start])


@torch.no_grad()
def rough_probabilities(
    net: torch.nn.Module, image: torch.Tensor, input_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Softmax of the rough network on the whole image resized to S, upsampled linearly: ``(K, *S)``."""
    x = crop_resize(image, [Box.whole(image.shape[1:])], input_size, "linear")
    probs = torch.softmax(net(x.to(device)).float(), dim=1)[0]
    return resize(probs, image.shape[1:], "linear")


@dataclass
class Segmentation:
    """A cascade's answer on one grid: probabilities ``(K, *S)`` (None when not asked for),
    labels ``(*S)``, the boxes used."""

    probabilities: torch.Tensor | np.ndarray | None
    labels: torch.Tensor | np.ndarray
    boxes: list[tuple[int, Box]]


ARGMAX_CHUNK_VOXELS = 1 << 22  # voxels per class whose argmax is taken at once


def _argmax(x: torch.Tensor, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``x.argmax(0)`` of ``(K, *S)`` as ``dtype``, a few rows of the first spatial axis at a time.

    Why: torch's argmax is int64, 8 bytes a voxel: for a whole image (or an image-sized box)
    more than the label map itself; the values are the same, voxel by voxel.
    """
    out = torch.empty(x.shape[1:], dtype=dtype, device=x.device)
    rows = max(1, ARGMAX_CHUNK_VOXELS // max(1, math.prod(x.shape[2:])))
    for i in range(0, x.shape[1], rows):
        out[i : i + rows] = x[:, i : i + rows].argmax(0)
    return out


@torch.no_grad()
def segment(
    rough: torch.nn.Module,
    fine: torch.nn.Module,
    image: torch.Tensor,
    input_size: int,
    *,
    fuse: str = "or",
    min_side: int = 5,
    per_class: bool = True,
    oversize: str = "drop",
    batch_size: int = 16,
    baseline: bool = False,
    device: torch.device | str = "cpu",
    labels_dtype: torch.dtype = torch.long,
) -> Segmentation:
    """Segment-then-segment on a preprocessed image ``(C, *S)``; tensors come back on ``device``.

    ``baseline`` returns the rough pass alone (the downscaled model the paper compares with).
    Outside every box the answer is background, as in the paper. The labels are ``labels_dtype``.

    Memory: the image, the fused probabilities (with ``or`` the masks too) and, while a box is
    pasted back, its probabilities resized to the box; the rough pass's upsampled probabilities
    are dropped once its boxes are drawn, and no argmax or one-hot of a whole image or box is
    held in int64.
    """
    _check_fuse(fuse)
    image = image.to(device)
    rough_p = rough_probabilities(rough, image, input_size, device)
    if baseline:
        return Segmentation(rough_p, _argmax(rough_p, labels_dtype), [])
    k, spatial = rough_p.shape[0], tuple(image.shape[1:])
    small = torch.int16 if k <= 1 << 15 else torch.long  # a class index, not torch's int64 argmax
    rough_labels = _argmax(rough_p, small)
    del rough_p
    boxes = object_boxes(rough_labels, input_size, 0, None, min_side, per_class, oversize)
    del rough_labels
    fused = torch.zeros((k, *spatial), device=device)
    fused[0] = 1.0  # background: the minimum over the crops, foreground the maximum
    # the masks of the crops' labels: what 'or' fuses ('max' takes the fused probabilities alone)
    masks = torch.zeros((k - 1, *spatial), dtype=torch.bool, device=device) if fuse == "or" else None
    classes = torch.arange(1, k, device=device).view(-1, *[1] * len(spatial))
    for i in range(0, len(boxes), batch_size):
        chunk = [b for _, b in boxes[i : i + batch_size]]
        crops = crop_resize(image, chunk, input_size, "linear")
        probs = torch.softmax(fine(crops).float(), dim=1)
        for box, p in zip(chunk, probs, strict=True):
            p = resize(p, box.size, "linear")
            paste_back(fused[:1], p[:1], box, "min")
            paste_back(fused[1:], p[1:], box, "max")
            if masks is not None:  # the foreground classes' one-hot masks (no int64 one-hot)
                paste_back(masks, _argmax(p, small) == classes, box, "or")
            del p
    fused /= fused.sum(0, keepdim=True).clamp_min_(1e-6)
    return Segmentation(fused, _labels(fused, masks, labels_dtype), boxes)


def _check_fuse(fuse: str) -> None:
    if fuse not in FUSIONS:
        raise FlexPatchError(f"unknown fusion {fuse!r}; choose one of {', '.join(FUSIONS)}")


def _labels(fused: torch.Tensor, masks: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The label map ``(*S)`` of the fused probabilities (and with 'or' the crops' masks), a few
    rows at a time (as :func:`_argmax`)."""
    if masks is None:  # 'max'
        return _argmax(fused, dtype)
    # OR: a voxel takes a class some crop gave it; where crops disagree, the most probable of those
    out = torch.empty(fused.shape[1:], dtype=dtype, device=fused.device)
    rows = max(1, ARGMAX_CHUNK_VOXELS // max(1, math.prod(fused.shape[2:])))
    for i in range(0, fused.shape[1], rows):
        m, f = masks[:, i : i + rows], fused[1:, i : i + rows]
        score = f.masked_fill(~m, -1.0)
        out[i : i + rows] = torch.where(m.any(0), score.argmax(0) + 1, 0)
    return out


def is_cascade(model_dir: str | Path) -> bool:
    """True for a folder written by ``train_cascade`` (it holds ``cascade.json``)."""
    return (Path(model_dir) / CASCADE_FILE).is_file()


@dataclass
class Cascade:
    """A trained rough and fine network pair with the box rules they were trained with."""

    rough: LoadedModel
    fine: LoadedModel
    input_size: int
    fuse: str
    rules: dict[str, Any]
    model_dir: Path

    def networks(self, tta: str = "none") -> tuple[torch.nn.Module, torch.nn.Module]:
        """The rough and the fine network, both wrapped for test-time mirroring when ``tta`` asks
        (``auto``: when trained with mirroring; see :func:`~flexpatch.infer.tta.mirroring_for`)."""
        path = self.model_dir / "dataset.json"
        pairs = load_json(path).get("mirrored_pairs", []) if path.is_file() else []
        if not mirroring_for(tta, self.rough.trained_mirrored, pairs, str(self.model_dir)):
            return self.rough.net, self.fine.net
        ndim = self.rough.plan.ndim
        return Mirrored(self.rough.net, ndim), Mirrored(self.fine.net, ndim)

    def predict(
        self,
        volume: Volume,
        fuse: str | None = None,
        baseline: bool = False,
        batch_size: int = 16,
        tta: str = "none",
        probabilities: bool = True,
    ) -> Segmentation:
        """Segment a raw volume; probabilities ``(K, *S)`` (when asked for) and labels ``(*S)``
        (int16) as numpy on its own grid.

        The boxes are on the preprocessed grid (the plan's spacing), where the crops were taken.
        The labels are that grid's, brought back by nearest neighbour: the probabilities are
        brought back (a chunk at a time) only when asked for.
        """
        image, props = self.rough.prepare(volume)
        rough, fine = self.networks(tta)
        seg = segment(
            rough,
            fine,
            image[0],
            self.input_size,
            fuse=fuse or self.fuse,
            batch_size=batch_size,
            baseline=baseline,
            device=self.rough.device,
            labels_dtype=torch.int16,
            **self.rules,
        )
        del image
        boxes, fused, labels = seg.boxes, seg.probabilities if probabilities else None, seg.labels
        del seg  # the fused probabilities go now, unless they are asked for
        labels = restore(labels.cpu().numpy(), props, is_label=True)
        probs = None if fused is None else restore_chunked(fused.cpu().numpy(), props)
        return Segmentation(probs, labels, boxes)


def load_cascade(model_dir: str | Path, device: str = "auto", checkpoint: str = "best") -> Cascade:
    """Load a cascade folder: ``cascade.json`` and two ordinary model folders, ``rough/`` and ``fine/``."""
    model_dir = Path(model_dir)
    if not is_cascade(model_dir):
        raise FlexPatchError(f"{model_dir}: not a segment-then-segment model folder (no {CASCADE_FILE})")
    meta = load_json(model_dir / CASCADE_FILE)
    try:
        rules = {k: meta[k] for k in ("min_side", "per_class", "oversize")}
        size, fuse = int(meta["input_size"]), str(meta["fuse"])
        rough = load_model(model_dir / meta["rough"], device=device, checkpoint=checkpoint)
        fine = load_model(model_dir / meta["fine"], device=device, checkpoint=checkpoint)
    except (KeyError, TypeError, ValueError) as e:
        raise FlexPatchError(f"{model_dir / CASCADE_FILE}: malformed ({e!r})") from None
    return Cascade(rough, fine, size, fuse, rules, model_dir)


def predict_cascade_files(
    model: Cascade | str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    fuse: str | None = None,
    device: str = "auto",
    baseline: bool = False,
    batch_size: int = 16,
    save_probabilities: bool = False,
    progress: bool = True,
    tta: str = "auto",
    postprocess: bool = True,
) -> Written:
    """Segment image files with a cascade into label maps on each input's grid (as ``predict_files``).

    Also writes ``out_dir/boxes.json``: the crops of each case on its preprocessed grid (also
    in the result's ``info[case]["boxes"]``). ``baseline`` segments with the rough model alone
    (whole image at S, upsampled). ``tta`` mirrors both networks' inputs (as ``predict_files``);
    ``postprocess`` applies a ``postprocessing.json`` in the cascade folder, if there is one.
    """
    cascade = model if isinstance(model, Cascade) else load_cascade(model, device=device)
    cascade.networks(tta)  # a refused --tta fails before the first case
    if fuse is not None:
        _check_fuse(fuse)  # before the first case, not after it
    plan = cascade.rough.plan
    cases = cases_for(inputs, plan.in_channels, out_dir)
    dtype = label_dtype(plan.num_classes)

    def segment(volume: Volume) -> Prediction:
        seg = cascade.predict(volume, fuse, baseline, batch_size, tta, probabilities=save_probabilities)
        boxes = [{"class": c, "start": b.start, "size": b.size} for c, b in seg.boxes]
        return Prediction(seg.labels.astype(dtype), seg.probabilities, info={"boxes": boxes})

    written = run_prediction(
        cases,
        out_dir,
        plan.ndim,
        segment,
        label_names=names_by_value(plan.labels),
        save_probabilities=save_probabilities,
        progress=progress,
        describe="baseline" if baseline else "segment-then-segment",
        largest_component=read_postprocessing(cascade.model_dir) if postprocess else (),
    )
    save_json(Path(out_dir) / "boxes.json", {case: info["boxes"] for case, info in written.info.items()})
    return written
