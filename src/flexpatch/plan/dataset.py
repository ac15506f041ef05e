"""The memory plan of a dataset (the ``plan`` command): training patch and batch, inference window and batch.

The dataset is fingerprinted and planned as ``train`` does; the network is probed on the device and
the choices are made by :mod:`flexpatch.plan.planner`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexpatch.axes import round_down
from flexpatch.data.dataset import load_dataset
from flexpatch.data.preprocess import Plan, compute_fingerprint, make_plan, resampled_shape
from flexpatch.errors import FlexPatchError
from flexpatch.models import create_model
from flexpatch.models.tokens import TokenPlan, plan_tokens
from flexpatch.plan.budget import parse_budget
from flexpatch.plan.memory import Prober, calibrate
from flexpatch.plan.planner import Shape, TrainChoice, plan_training, plan_window
from flexpatch.runtime import resolve_device


def plan_dataset(
    dataset_dir: str | Path,
    budget: str | int,
    model: str = "unet",
    model_kwargs: dict[str, Any] | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    token_class: str | None = None,
    target_spacing: Sequence[float] | None = None,
    progress: bool = False,
    check: bool = True,
    processes: int = 1,
) -> dict[str, Any]:
    """The memory plan of a dataset: training patch and batch, inference window and batch (JSON-ready).

    The dataset is fingerprinted and planned as ``train`` does (target spacing, median shape);
    the model is probed on ``device``. With ``token_class``, the token size for that class
    (:func:`flexpatch.models.tokens.plan_tokens`) is planned first and, for ``unetr``, built in,
    so that the patch is a multiple of it; a UNETR's ``img_size`` becomes the planned patch.

    Args:
        dtype: ``float32``, ``bfloat16`` or ``auto`` (bfloat16 on CUDA, as training's AMP).
        check: measure a training step at the planned patch and batch, and the network's
            call at the planned window and batch, and plan again where the small probes
            were off (:mod:`flexpatch.plan.planner`); the saved memory models are anchored there.
        processes: devices a torchrun training shares: the batch fits one device's budget less DDP's
            gradient buckets; ``train.global_batch``, ``processes`` times it, is what ``--batch`` takes.
    """
    ds = load_dataset(dataset_dir)
    fingerprint = compute_fingerprint(ds, progress=progress)
    plan = make_plan(ds, fingerprint, target_spacing=target_spacing)
    dev = resolve_device(device)
    dtype = ("bfloat16" if dev.type == "cuda" else "float32") if dtype == "auto" else dtype
    kwargs = dict(model_kwargs or {})
    tokens = plan_tokens(fingerprint, token_class, plan.target_spacing) if token_class else None
    if tokens is not None and model == "unetr":
        kwargs["token_size"] = list(tokens.token_size)
    net = create_model(model, plan.ndim, plan.in_channels, plan.out_channels, **kwargs)
    limit = parse_budget(budget, dev)
    voxels = _dataset_voxels(fingerprint, plan)
    train, choices = _plan_network(net, plan, voxels, limit, dev, dtype, check, processes)
    if model == "unetr":
        kwargs["img_size"] = list(train.patch)  # the position embeddings' grid: the training patch
    return {
        "dataset": str(dataset_dir),
        "model": model,
        "model_kwargs": kwargs,
        "ndim": plan.ndim,
        "device": str(dev),
        "dtype": dtype,
        "budget_bytes": limit,
        "target_spacing": list(plan.target_spacing),
        "median_shape": list(plan.median_shape),
        "train": choices["train"],
        "infer": choices["infer"],
        "tokens": None if tokens is None else _token_window(tokens, train.patch).to_json(),
        "memory_models": choices["memory_models"],
        "processes": processes,
    }


def _gradient_buckets(net: torch.nn.Module, processes: int, limit: int) -> int:
    """Bytes DistributedDataParallel adds on each device: its buckets, a float32 copy of the gradients."""
    if processes < 1:
        raise FlexPatchError(f"processes {processes} must be at least 1")
    buckets = 4 * sum(p.numel() for p in net.parameters()) if processes > 1 else 0
    if buckets >= limit:
        raise FlexPatchError(
            f"a budget of {limit} bytes does not hold the gradient buckets of {processes} processes "
            f"({buckets} bytes)"
        )
    return buckets


def _dataset_voxels(fingerprint: dict[str, Any], plan: Plan) -> int:
    """Voxels of the training set at the plan's target spacing."""
    shapes = zip(fingerprint["shapes"], fingerprint["spacings"], strict=True)
    return sum(int(np.prod(resampled_shape(s, sp, plan.target_spacing))) for s, sp in shapes)


def _plan_network(
    net: torch.nn.Module,
    plan: Plan,
    voxels: int,
    limit: int,
    dev: torch.device,
    dtype: str,
    check: bool,
    processes: int = 1,
) -> tuple[TrainChoice, dict[str, Any]]:
    """The training choice, and the training and inference choices and memory models as JSON.

    ``net`` is probed on ``dev`` (training in ``dtype``); with ``check``, each choice is checked
    by measurement and its memory model anchored there. Training on ``processes`` devices, each
    step's budget is less DDP's gradient buckets, and its global batch ``processes`` times one's.
    """
    reserved = _gradient_buckets(net, processes, limit)
    train_prober, infer_prober = Prober(net, "train", dev, dtype), Prober(net, "infer", dev)
    train_mm, infer_mm = calibrate(net, prober=train_prober), calibrate(net, prober=infer_prober)
    train = plan_training(
        train_mm, limit - reserved, plan.median_shape, plan.target_spacing, net.divisor,
        dataset_voxels=voxels, measure=train_prober.peak if check else None,
    )  # fmt: skip
    infer = plan_window(
        infer_mm, limit, plan.median_shape, net.divisor, measure=infer_prober.peak if check else None
    )
    return train, {
        "train": {**train.to_json(), "global_batch": train.batch * processes},
        "infer": {**infer.to_json(), "image_shape": list(plan.median_shape)},
        "memory_models": {  # anchored at the measured choices where checked
            "train": (train.model or train_mm).to_json(),
            "infer": (infer.model or infer_mm).to_json(),
        },
    }


def _token_window(tokens: TokenPlan, patch: Shape) -> TokenPlan:
    """The token plan with the window its ViT would take here: the largest multiple of the token
    within the planned patch (a UNETR's patch itself, a multiple of its token by its divisor)."""
    return replace(tokens, window=tuple(max(t, round_down(p, t)) for t, p in zip(tokens.token_size, patch)))
