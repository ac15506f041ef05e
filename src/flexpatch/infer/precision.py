"""The number type of the network's forward pass at inference: float32, or bfloat16 under autocast.

bfloat16 halves the activations and, on a CPU with native bfloat16 instructions (AVX512-BF16 or
AMX, which oneDNN uses), runs convolutions about twice as fast; emulated, it is slower than float32.
``auto`` takes it only where it is native (:func:`native_bfloat16`). The network's outputs come
back in float32, so stitching, softmax and everything after is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from flexpatch.errors import FlexPatchError

PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "auto")


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 natively: CUDA's own check; on the CPU oneDNN's (the
    instructions it needs, detected at run time)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:  # a torch built without oneDNN
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The forward pass's type for ``precision`` (:data:`PRECISIONS`) on ``device``."""
    if precision not in PRECISIONS:
        raise FlexPatchError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


class Autocast(torch.nn.Module):
    """``net`` run under ``torch.autocast`` in ``dtype``, its output in float32. Like
    :class:`~flexpatch.infer.tta.Mirrored` it exposes the network's ``divisor`` and ``spec``, so the
    sliding window and the memory planner use it as the network."""

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.net = net
        self.dtype = dtype
        self.divisor = getattr(net, "divisor", 1)
        self.spec = getattr(net, "spec", None)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.net(x, *args, **kwargs).float()


def with_precision(net: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``net`` itself in float32, else wrapped in :class:`Autocast`."""
    return net if dtype == torch.float32 else Autocast(net, dtype)
