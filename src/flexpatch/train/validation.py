"""Validation of the core trainer: sliding-window predictions of the held-out cases, their Dice,
and the post-processing decided on them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from flexpatch.data.context import with_context
from flexpatch.data.preprocess import load_preprocessed
from flexpatch.evaluate.metrics import dice_torch
from flexpatch.infer.sliding_window import sliding_window
from flexpatch.train.config import TrainConfig


@torch.no_grad()
def predictions(
    net: torch.nn.Module,
    cases: list[Path],
    patch: tuple[int, ...],
    num_classes: int,
    device: torch.device,
    config: TrainConfig,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(prediction, truth)`` label maps of each preprocessed case (sliding window at ``patch``,
    the image with its context channels); the ignore label (the only value >= ``num_classes``) is
    background in both, so it is neither hit nor miss."""
    was_training = net.training
    net.eval()
    try:
        for path in cases:
            array, label, props = load_preprocessed(path)
            image = torch.from_numpy(with_context(array, props["resampled_affine"], config.context))
            logits = sliding_window(
                net, image[None], patch, overlap=config.val_overlap, divisor=net.divisor, device=device,
                batch_size=4,
            )  # fmt: skip
            pred = logits.argmax(1)[0].cpu().numpy()
            care = label < num_classes
            yield np.where(care, pred, 0), np.where(care, label, 0).astype(np.int64)
    finally:
        net.train(was_training)


def validate(
    net: torch.nn.Module,
    cases: list[Path],
    patch: tuple[int, ...],
    num_classes: int,
    device: torch.device,
    config: TrainConfig,
) -> dict[int, float]:
    """Mean Dice per foreground class over ``cases``."""
    onehot = lambda x: torch.nn.functional.one_hot(torch.from_numpy(x), num_classes).movedim(-1, 0)  # noqa: E731
    scores = [
        dice_torch(onehot(pred)[None], onehot(truth)[None])[0, 1:]
        for pred, truth in predictions(net, cases, patch, num_classes, device, config)
    ]
    mean = torch.nanmean(torch.stack(scores).float(), dim=0)
    return {c + 1: float(v) for c, v in enumerate(mean)}
