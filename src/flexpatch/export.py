"""Export a trained sliding-window model's network for one input window: TorchScript or ONNX.

The exported module maps ``(N, C, *window)`` to the network's logits ``(N, C_out, *window)``, exactly
what flexpatch's sliding window calls it with (:func:`~flexpatch.infer.sliding_window.sliding_window`).
A patch-size hypernetwork predicts its weights from the window it sees (``x.shape[2:]``), so it
is baked at the window first (:meth:`~flexpatch.models.hyper.PatchSizeHypernet.bake`): the exported
module has no size input, and its weights are those of that window only. That is why the window
is fixed: the TorchScript module refuses other sizes in one line, the ONNX graph has fixed spatial
axes (the batch axis is free).

Beside the file, ``FILE.json`` says what running it needs: window, channels (image and location
context), classes and label names, spacing, normalisation, activation. Both are written
atomically; an existing file is replaced only when asked to.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import flexpatch
from flexpatch.data.context import context_channels
from flexpatch.data.io import atomic_path, save_json
from flexpatch.errors import FlexPatchError, format_shape
from flexpatch.infer.predictor import LoadedModel, load_model

FORMATS: tuple[str, ...] = ("torchscript", "onnx")
INPUT, OUTPUT = "image", "logits"  # the ONNX graph's tensor names

__all__ = ["FORMATS", "Exported", "export_info", "export_model", "exported_network", "sidecar_path"]


@dataclass(frozen=True)
class Exported:
    """What :func:`export_model` wrote: the network file, its JSON and the window it runs at."""

    path: Path
    info_path: Path
    window: tuple[int, ...]
    format: str

    def describe(self) -> str:
        return (
            f"exported {self.format} for window {format_shape(self.window)} to {self.path} "
            f"(how to run it: {self.info_path})"
        )


class FixedWindow(nn.Module):
    """The exported network behind a size check: a baked hypernetwork's weights hold at one
    window only, and a wrong size would otherwise run silently with the wrong weights."""

    def __init__(self, net: nn.Module, window: Sequence[int]) -> None:
        super().__init__()
        self.net = net
        self.window: list[int] = [int(w) for w in window]
        self.message: str = (
            f"flexpatch export: this network takes windows (N, C, {', '.join(map(str, self.window))}); "
            "it was exported for that window only"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if list(x.shape[2:]) != self.window:
            raise RuntimeError(self.message)
        return self.net(x)


def sidecar_path(path: str | Path) -> Path:
    """The JSON beside an exported file: ``seg.onnx`` -> ``seg.onnx.json`` (never another's name)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def exported_network(model: LoadedModel, window: tuple[int, ...]) -> nn.Module:
    """A CPU copy of the model's network in eval mode, a hypernetwork baked at ``window``."""
    net = model.net
    if hasattr(net, "bake"):  # PatchSizeHypernet: its weights for this window, no size input left
        baked = net.bake(window)
    else:
        baked = copy.deepcopy(net)
    return baked.cpu().eval().requires_grad_(False)


def export_model(
    model: LoadedModel | str | Path,
    out: str | Path,
    window: Sequence[int],
    format: str = "torchscript",
    overwrite: bool = False,
) -> Exported:
    """Export ``model``'s network for input windows of ``window`` to ``out`` (and ``out.json``).

    ``window`` is checked as ``predict --patch-size`` is (one number: every axis; a multiple of the
    network's divisor; capped at the largest training patch, said once). ``format``: ``torchscript``
    (``torch.jit.load`` reads it) or ``onnx`` (needs the ``onnx`` package; the batch axis is free).
    An existing ``out`` or its JSON is refused unless ``overwrite``.
    """
    if format not in FORMATS:
        raise FlexPatchError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    out, info_path = Path(out), sidecar_path(out)
    _check_target(out, info_path, overwrite)
    lm = model if isinstance(model, LoadedModel) else load_model(model, device="cpu")
    size = lm.window(window)
    net = exported_network(lm, size)
    channels = int(lm.spec.in_channels)
    example = torch.zeros((1, channels, *size))
    writer = _write_onnx if format == "onnx" else _write_torchscript
    with atomic_path(out) as tmp:
        writer(net, example, tmp)
        # inside: a failed JSON write removes the network file too, never one without the other
        save_json(info_path, export_info(lm, size, format, out))
    return Exported(out, info_path, size, format)


def _check_target(out: Path, info_path: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise FlexPatchError(f"{out}: is a folder; --out names the exported file")
    for path in (out, info_path):
        if path.exists() and not overwrite:
            raise FlexPatchError(f"{path}: already exists; pass --overwrite to replace it")


def _write_torchscript(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Traced at the window (every registered network traces; none scripts as is), then the size
    check scripted around it."""
    with warnings.catch_warnings(), torch.no_grad():
        # the tracer warns about the networks' own shape checks: constant at a fixed window
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example)
        module = torch.jit.script(FixedWindow(traced, example.shape[2:]))
        torch.jit.save(module, str(path))


def _write_onnx(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    """The TorchScript-based exporter (torch's newer one needs onnxscript), checked by onnx."""
    try:
        import onnx
    except ImportError:
        raise FlexPatchError(
            "export --format onnx needs the onnx package: pip install 'flexpatch[onnx]'"
        ) from None
    options: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        options["dynamo"] = False
    axes = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(
            net, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
            dynamic_axes=axes, **options,
        )  # fmt: skip
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # onnx raises its own ValidationError types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FlexPatchError(f"exported ONNX graph is invalid ({first})") from None


def export_info(lm: LoadedModel, window: tuple[int, ...], format: str, path: Path) -> dict[str, Any]:
    """What running the exported network needs, as JSON (written beside it as ``FILE.json``)."""
    plan = lm.plan
    extra = context_channels(lm.context, plan.ndim)
    return {
        "flexpatch_version": flexpatch.__version__,
        "format": format,
        "file": path.name,
        "source": str(lm.model_dir),
        "model": lm.spec.name,
        "hypernetwork_baked_at": list(window) if hasattr(lm.net, "bake") else None,
        "window": list(window),
        "input": {
            "name": INPUT,
            "shape": ["N", plan.in_channels + extra, *window],
            "image_channels": plan.in_channels,
            "context": lm.context,
            "context_channels": extra,
        },
        "output": {
            "name": OUTPUT,
            "shape": ["N", plan.out_channels, *window],
            "activation": "sigmoid" if plan.regions else "softmax",
        },
        "classes": plan.num_classes,
        "label_names": {str(v): n for v, n in sorted(lm.label_names.items())},
        "regions": [[name, list(values)] for name, values in plan.regions],
        "regions_class_order": list(plan.regions_class_order),
        "spacing": list(plan.target_spacing),
        "normalisation": [
            {"scheme": scheme, "ct_window": None if ct is None else list(ct)}
            for scheme, ct in zip(plan.normalization, plan.ct_window, strict=True)
        ],
        "divisor": list(lm.divisor),
        "note": _NOTE,
    }


_NOTE = (
    "Resample the image to 'spacing' (mm, per array axis), normalise each channel by its scheme "
    "(ct: clip to ct_window, then scale to [0, 1]; zscore: the image's mean and std; rescale: its "
    "min and max to [0, 1]; rgb: / 255), append the location context channels if any, then slide "
    "the window (flexpatch: overlap 0.5, Gaussian weights), apply the activation and take the "
    "argmax (regions: write each region's value where its sigmoid > 0.5, in regions_class_order). "
    "Every window must be full size: the network's weights hold for this window only."
)
