"""The patch-size hypernetwork: an MLP on the window size predicts a network's weights.

:class:`PatchSizeHypernet` wraps any ``nn.Module`` (every registered model). A small
MLP (the *trunk*, ``layers`` fully connected layers of ``hidden`` units with ReLU) reads
the window size ``z = size / size_scale`` per axis (``x.shape[2:]``; 256 maps the usual
32..256 voxels into (0, 1]), and one linear *head* per predicted parameter tensor
turns the trunk's features into that tensor. The wrapped model then runs with those
tensors through :func:`torch.func.functional_call`, so its code is untouched.

Two parametrisations (``mode``):

- ``"residual"`` (default): ``W(p) = W0 + head(trunk(z))`` with ``W0`` the wrapped model's
  own (frozen) initialisation and the heads zero-initialised (``init_std = 0``), so at
  step 0 the hypernetwork *is* the plain model, with its depth-aware initialisation.
  As in LoRA, the trunk gets its first gradient once the heads have left zero (after
  one optimiser step); ``init_std > 0`` gives it one at once, at the price of a
  slightly perturbed start. The size-independent part of every weight is the head's bias.
- ``"absolute"``: the authors' code, ``W(p) = 5 tanh(head(trunk(z)))`` with every linear
  layer drawn from N(0, 0.025) (weights) and N(0, 0.005) (biases); ``size_scale=1``
  feeds the raw voxel counts as they did. Kept for reproduction. It is worse
  conditioned: the start ignores each layer's fan-in, the tanh saturates and stops the
  gradient of large weights, and raw sizes (~100) push the trunk out of its linear
  range, which is why the authors needed such a small initialisation.

``subset`` chooses which tensors are predicted; the others stay ordinary shared
parameters of the wrapped model, trained directly. ``"all"`` reproduces the paper
(about ``(hidden + 1) x`` the model's size in heads: 170 M for the 3.3 M U-Net);
``"norm+last"`` predicts only the normalisation affines and the final layer, for large
models; ``"auto"`` is ``"all"`` up to 5 M base parameters and ``"norm+last"`` above;
a list of module or parameter names (prefixes on a ``.`` boundary) picks by hand.
``flexpatch train --hyper`` defaults to ``"norm+last"``: measured at 32^3, batch 2, one CPU
thread, its training step costs about the plain U-Net's, ``"all"`` about 3x
(``benchmarks/hyper_cost.py``). ``"auto"`` keeps its meaning, so saved models rebuild as trained.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from torch.func import functional_call

from flexpatch.errors import FlexPatchError

__all__ = ["HyperConfig", "PatchSizeHypernet"]

MODES = ("residual", "absolute")
SUBSETS = ("all", "norm+last", "auto")
# "auto" predicts everything up to this many base parameters: the heads then hold at most
# ~255 M numbers (1 GB in fp32, 3 GB with Adam's states), what the paper's setup needed.
AUTO_ALL_LIMIT = 5_000_000
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_CACHE_SIZES = 8  # a sweep visits sizes one after another; a few cover any back-and-forth


@dataclass(frozen=True)
class HyperConfig:
    """Settings of the hypernetwork, saved in the model spec as ``kwargs["hyper"]``.

    Attributes:
        hidden: units per trunk layer.
        layers: fully connected layers in the trunk.
        subset: ``"all"``, ``"norm+last"``, ``"auto"`` or names of modules/parameters to predict.
        size_scale: the window size is divided by this before entering the trunk.
        mode: ``"residual"`` or ``"absolute"`` (see the module docstring).
        init_std: std of the heads' initial weights in residual mode (0: exactly the plain model).
    """

    hidden: int = 50
    layers: int = 3
    subset: str | tuple[str, ...] = "auto"
    size_scale: float = 256.0
    mode: str = "residual"
    init_std: float = 0.0

    def __post_init__(self) -> None:
        for name in ("hidden", "layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FlexPatchError(f"hyper {name} must be a positive integer, got {value!r}")
        if (
            isinstance(self.size_scale, bool)
            or not isinstance(self.size_scale, (int, float))
            or not self.size_scale > 0
        ):
            raise FlexPatchError(f"hyper size_scale must be a positive number, got {self.size_scale!r}")
        if not isinstance(self.init_std, (int, float)) or not self.init_std >= 0:
            raise FlexPatchError(f"hyper init_std must be >= 0, got {self.init_std!r}")
        # floats in the saved spec whatever the caller passed (256 and 256.0 rebuild the same net)
        object.__setattr__(self, "size_scale", float(self.size_scale))
        object.__setattr__(self, "init_std", float(self.init_std))
        if self.mode not in MODES:
            raise FlexPatchError(f"hyper mode {self.mode!r} unknown; choose one of {', '.join(MODES)}")
        subset = self.subset
        if isinstance(subset, str):
            if subset not in SUBSETS:
                raise FlexPatchError(
                    f"hyper subset {subset!r} unknown; choose {', '.join(SUBSETS)} or a list of names"
                )
        elif (
            not isinstance(subset, (list, tuple))
            or not subset
            or not all(isinstance(s, str) and s for s in subset)
        ):
            raise FlexPatchError(f"hyper subset must be a name or a non-empty list of names, got {subset!r}")
        else:
            object.__setattr__(self, "subset", tuple(subset))

    @classmethod
    def from_value(cls, value: bool | dict | HyperConfig) -> HyperConfig:
        """``True`` (defaults), a dict of settings (missing ones take defaults) or a config."""
        if isinstance(value, HyperConfig):
            return value
        if value is True:
            return cls()
        if not isinstance(value, dict):
            raise FlexPatchError(f"hyper must be true or an object of settings, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise FlexPatchError(f"hyper settings {unknown} unknown; known: {sorted(known)}")
        return cls(**value)

    def to_json(self) -> dict:
        """Every setting, as JSON values."""
        out = asdict(self)
        if isinstance(self.subset, tuple):
            out["subset"] = list(self.subset)
        return out


class PatchSizeHypernet(nn.Module):
    """Predict (some of) the weights of ``target`` from the window size of its input.

    Args:
        target: the wrapped model; its parameters are the base weights ``W0`` (residual
            mode) and the shared ones. It becomes the submodule ``target``.
        hidden, layers, subset, size_scale, mode, init_std: see :class:`HyperConfig`.
        ndim: spatial dimensions; default ``target.spec.ndim`` (registry models).
    """

    def __init__(
        self,
        target: nn.Module,
        hidden: int = 50,
        layers: int = 3,
        subset: str | Sequence[str] = "auto",
        size_scale: float = 256.0,
        mode: str = "residual",
        init_std: float = 0.0,
        ndim: int | None = None,
    ) -> None:
        super().__init__()
        self.config = HyperConfig(hidden, layers, subset, size_scale, mode, init_std)  # type: ignore[arg-type]
        ndim = ndim if ndim is not None else getattr(getattr(target, "spec", None), "ndim", None)
        if ndim not in (2, 3):
            raise FlexPatchError(
                f"hypernetwork needs ndim 2 or 3 (pass ndim= for a non-registry model), got {ndim}"
            )
        self.ndim = ndim
        self.target = target
        self._names = _select(target, self.config.subset)
        # A predicted tensor's own value is W0 (residual) or unused (absolute): never trained directly.
        params = dict(target.named_parameters())
        for name in self._names:
            params[name].requires_grad_(False)
        device = params[self._names[0]].device
        widths = [ndim] + [hidden] * layers
        trunk: list[nn.Module] = []
        for a, b in zip(widths, widths[1:], strict=False):
            trunk += [nn.Linear(a, b, device=device), nn.ReLU()]
        self.trunk = nn.Sequential(*trunk)
        # skip_init: the paper's heads hold ~170 M numbers; initialise them once, below.
        self.heads = nn.ModuleDict(
            {
                _key(n): torch.nn.utils.skip_init(nn.Linear, hidden, params[n].numel(), device=device)
                for n in self._names
            }
        )
        self._init_weights()
        self._cache: OrderedDict[tuple[int, ...], dict[str, torch.Tensor]] = OrderedDict()
        self._stamp: tuple | None = None

    def _init_weights(self) -> None:
        if self.config.mode == "absolute":
            for layer in [*self.trunk, *self.heads.values()]:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, 0.0, 0.025)
                    nn.init.normal_(layer.bias, 0.0, 0.005)
            return
        for head in self.heads.values():
            if self.config.init_std > 0:
                nn.init.normal_(head.weight, 0.0, self.config.init_std)
            else:
                nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    @property
    def predicted_names(self) -> tuple[str, ...]:
        """Names (in ``target``) of the predicted parameter tensors."""
        return self._names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run ``target`` on ``x`` with the weights for its window size ``x.shape[2:]``.

        All windows of a batch share one size, hence one set of weights.
        """
        if x.ndim != self.ndim + 2:
            raise FlexPatchError(
                f"hypernetwork input {tuple(x.shape)} must be (N, C, *spatial) with {self.ndim} spatial axes"
            )
        weights = self._weights(tuple(int(s) for s in x.shape[2:]))
        return functional_call(self.target, weights, (x,))

    def weights_for(self, patch_size: Sequence[int]) -> dict[str, torch.Tensor]:
        """The predicted tensors for one window size, by name in ``target`` (shared ones excluded)."""
        return self._weights(self._size(patch_size))

    def bake(self, patch_size: Sequence[int]) -> nn.Module:
        """A plain copy of ``target`` with the weights for ``patch_size``: no hypernetwork left.

        It keeps the base model's ``.spec`` and ``.divisor``, so it saves and loads like any
        model; every parameter of it is trainable.
        """
        size = self._size(patch_size)
        with torch.no_grad():
            weights = self._predict(size)
            model = copy.deepcopy(self.target)
            for name, value in weights.items():
                model.get_parameter(name).copy_(value)
        model.requires_grad_(True)
        return model.train(self.training)

    def train(self, mode: bool = True) -> PatchSizeHypernet:
        self._cache.clear()
        return super().train(mode)

    def extra_repr(self) -> str:
        return (
            f"ndim={self.ndim}, predicted={len(self._names)} tensors, "
            f"{', '.join(f'{k}={v}' for k, v in self.config.to_json().items())}"
        )

    def _size(self, patch_size: Sequence[int]) -> tuple[int, ...]:
        try:
            size = tuple(int(s) for s in patch_size)
        except (TypeError, ValueError):
            raise FlexPatchError(f"patch size {patch_size!r} must be a sequence of integers") from None
        if len(size) != self.ndim or any(s < 1 for s in size):
            raise FlexPatchError(f"patch size {size} must have {self.ndim} positive sides")
        return size

    def _weights(self, size: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Predicted weights, cached per size when nothing can need their gradient.

        Sliding windows call forward hundreds of times at one size; the cache is dropped
        on ``train()/eval()`` and whenever a parameter changed (optimiser step, load,
        ``.to()``), detected through the tensors' version counters and storage.
        """
        if self.training or torch.is_grad_enabled():
            return self._predict(size)
        stamp = self._version_stamp()
        if stamp is None:
            return self._predict(size)
        if stamp != self._stamp:
            self._cache.clear()
            self._stamp = stamp
        if size in self._cache:
            self._cache.move_to_end(size)
            return self._cache[size]
        weights = self._cache[size] = self._predict(size)
        if len(self._cache) > _CACHE_SIZES:
            self._cache.popitem(last=False)
        return weights

    def _version_stamp(self) -> tuple | None:
        try:
            # _version counts in-place updates (optimiser steps, load_state_dict); data_ptr catches .to()
            return tuple((p._version, p.data_ptr()) for p in self.parameters())
        except RuntimeError:  # inference tensors carry no version counter: do not cache
            return None

    def _predict(self, size: tuple[int, ...]) -> dict[str, torch.Tensor]:
        first = self.trunk[0].weight
        z = torch.tensor(size, dtype=first.dtype, device=first.device) / self.config.size_scale
        params = dict(self.target.named_parameters())
        out = {}
        # In full precision even under AMP: bf16 would round the size code and every weight.
        with torch.autocast(first.device.type, enabled=False):
            h = self.trunk(z)
            for name in self._names:
                base = params[name]
                raw = self.heads[_key(name)](h).view(base.shape)
                out[name] = base + raw if self.config.mode == "residual" else 5.0 * torch.tanh(raw)
        return out


def _key(name: str) -> str:
    # Module names may not contain "."; ":" never occurs in a PyTorch parameter name.
    return name.replace(".", ":")


def _select(target: nn.Module, subset: str | tuple[str, ...]) -> tuple[str, ...]:
    """Names of the parameters to predict, in ``named_parameters`` order."""
    names = [n for n, _ in target.named_parameters()]
    if not names:
        raise FlexPatchError(f"hypernetwork target {type(target).__name__} has no parameters to predict")
    if subset == "auto":
        total = sum(p.numel() for p in target.parameters())
        subset = "all" if total <= AUTO_ALL_LIMIT else "norm+last"
    if subset == "all":
        return tuple(names)
    if subset == "norm+last":
        chosen = set(_norm_and_last(target))
    else:
        missing = [s for s in subset if not any(_under(n, s) for n in names)]
        if missing:
            raise FlexPatchError(
                f"hyper subset {missing} matches no parameter of {type(target).__name__} "
                f"(its parameters start with {sorted({n.split('.')[0] for n in names})})"
            )
        chosen = {n for n in names if any(_under(n, s) for s in subset)}
    return tuple(n for n in names if n in chosen)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _norm_and_last(target: nn.Module) -> list[str]:
    """Normalisation affines, plus the last non-norm module holding parameters (the output layer).

    "Last" is registration order, which is forward order for every registered model;
    pass explicit names for a model where it is not.
    """
    chosen: list[str] = []
    last: list[str] = []
    for prefix, module in target.named_modules():
        own = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
        if isinstance(module, _NORMS):
            chosen += own
        elif own:
            last = own
    return chosen + last
