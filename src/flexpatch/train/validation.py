"""Validation of the core trainer: sliding-window predictions of the held-out cases, their Dice,
and the post-processing decided on them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexpatch.data.context import with_context
from flexpatch.data.preprocess import Plan, load_preprocessed
from flexpatch.data.regions import THRESHOLD, region_mask, to_labels, written_truth
from flexpatch.distributed import Dist
from flexpatch.evaluate.metrics import dice_torch
from flexpatch.evaluate.postprocess import case_decision, decision
from flexpatch.infer.sliding_window import sliding_window
from flexpatch.train.config import TrainConfig


@torch.no_grad()
def _outputs(
    net: torch.nn.Module, cases: list[Path], patch: tuple[int, ...], device: torch.device, config: TrainConfig
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """``(probabilities (C, *S), label (*S))`` of each preprocessed case (sliding window at
    ``patch``, the image with its context channels): softmax, or sigmoids with ``regions``."""
    was_training = net.training
    net.eval()
    try:
        for path in cases:
            array, label, props = load_preprocessed(path)
            image = torch.from_numpy(with_context(array, props["resampled_affine"], config.context))
            logits = sliding_window(
                net, image[None], patch, overlap=config.val_overlap, divisor=net.divisor, device=device,
                batch_size=4,
            )[0].float().cpu()  # fmt: skip
            yield logits, label
    finally:
        net.train(was_training)


def predictions(
    net: torch.nn.Module,
    cases: list[Path],
    patch: tuple[int, ...],
    plan: Plan,
    device: torch.device,
    config: TrainConfig,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(prediction, truth)`` label maps of each preprocessed case; the ignore label (the only value
    >= ``plan.num_classes``) is background in both, so it is neither hit nor miss. A region model's
    prediction is its written-back label map, and the truth what perfect regions write back."""
    return _label_maps(_outputs(net, cases, patch, device, config), plan)


def _label_maps(
    outputs: Iterable[tuple[torch.Tensor, np.ndarray]], plan: Plan
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    order = plan.regions_class_order
    for logits, label in outputs:
        care = label < plan.num_classes
        if order:
            pred = to_labels(torch.sigmoid(logits).numpy(), order)
            truth = written_truth(label, plan.regions, order)
        else:
            pred, truth = logits.argmax(0).numpy(), label.astype(np.int64)
        yield np.where(care, pred, 0), np.where(care, truth, 0)


def validate(
    net: torch.nn.Module,
    cases: list[Path],
    patch: tuple[int, ...],
    plan: Plan,
    device: torch.device,
    config: TrainConfig,
    dist: Dist = Dist(),
) -> dict[int | str, float]:
    """Mean Dice per foreground class (by value) over ``cases``; for a region model, per region (by
    name) of its thresholded sigmoid (> 0.5) against the region's mask. Under torchrun each process
    predicts its share of the cases and every process gets the mean over all."""
    outputs = _outputs(net, dist.split(cases), patch, device, config)
    return _per_class(dist.gather([_case_dice(logits, label, plan) for logits, label in outputs]), plan)


def validate_and_decide(
    net: torch.nn.Module,
    cases: list[Path],
    patch: tuple[int, ...],
    plan: Plan,
    device: torch.device,
    config: TrainConfig,
    dist: Dist = Dist(),
) -> tuple[dict[int | str, float], dict[str, Any]]:
    """:func:`validate`, and from the same predictions the post-processing decision (largest
    component per class, :func:`~flexpatch.evaluate.postprocess.decide`): one pass over the cases.
    A region model decides on its written-back label maps, per value of ``regions_class_order``:
    what prediction writes and what the decision is applied to."""
    outputs = list(_outputs(net, dist.split(cases), patch, device, config))
    scores = dist.gather([_case_dice(logits, label, plan) for logits, label in outputs])
    order = plan.regions_class_order
    classes = sorted(set(order)) if order else list(range(1, plan.num_classes))
    cases_decided = dist.gather([case_decision(p, t, classes) for p, t in _label_maps(outputs, plan)])
    return _per_class(scores, plan), decision(cases_decided, classes)


def _per_class(scores: list[torch.Tensor], plan: Plan) -> dict[int | str, float]:
    mean = torch.nanmean(torch.stack(scores).float(), dim=0)
    if plan.regions:
        return {name: float(v) for (name, _), v in zip(plan.regions, mean, strict=True)}
    return {c + 1: float(v) for c, v in enumerate(mean)}


def _case_dice(logits: torch.Tensor, label: np.ndarray, plan: Plan) -> torch.Tensor:
    """One case's Dice per foreground class, or per region; ignored voxels are off in both."""
    truth, care = torch.from_numpy(label.astype(np.int64)), torch.from_numpy(label < plan.num_classes)
    if plan.regions:
        pred = (torch.sigmoid(logits) > THRESHOLD) & care
        ref = torch.stack([region_mask(truth, values) for _, values in plan.regions]) & care
        return dice_torch(pred[None], ref[None])[0]
    onehot = lambda x: torch.nn.functional.one_hot(x, plan.num_classes).movedim(-1, 0)  # noqa: E731
    return dice_torch(onehot(logits.argmax(0) * care)[None], onehot(truth * care)[None])[0, 1:]
