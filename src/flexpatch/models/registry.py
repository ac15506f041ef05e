"""One interface to every network: ``create_model(name, ndim, in_channels, out_channels, **kwargs)``.

Each registered model has a builder, a divisor rule (patch sizes must be multiples of
it on every axis) and a one-line description. A built model carries ``.spec``, the
:class:`ModelSpec` that rebuilds it (saved as JSON in model folders), and ``.divisor``.

Builders take ``ndim``, ``in_channels`` and ``out_channels`` plus keyword options with
defaults; the spec records every option, defaults included, so a saved model rebuilds
the same network even if a default changes later.
"""

from __future__ import annotations

import importlib
import inspect
import json
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexpatch.axes import nearest_valid, per_axis
from flexpatch.errors import FlexPatchError
from flexpatch.schema import check_fields

if TYPE_CHECKING:
    from torch import nn

DivisorRule = Callable[[int, dict], tuple[int, ...]] | int
_BASE_ARGS = ("ndim", "in_channels", "out_channels")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a model.

    Attributes:
        name: registry name.
        ndim: spatial dimensions (2 or 3).
        in_channels: image channels.
        out_channels: output channels.
        kwargs: every other constructor option, JSON-serialisable.
    """

    name: str
    ndim: int
    in_channels: int
    out_channels: int
    kwargs: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """A plain dict for ``json.dump``."""
        return {
            "name": self.name,
            "ndim": self.ndim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kwargs": _jsonable(self.kwargs, self.name),
        }

    @classmethod
    def from_json(cls, d: dict, source: str | Path = "model spec") -> ModelSpec:
        """The inverse of :meth:`to_json`; names ``source`` (the file) and the offending key when
        ``d`` is malformed (every field is checked by type: :func:`~flexpatch.schema.check_fields`)."""
        check_fields(cls, d, source)
        keys = {"name", "ndim", "in_channels", "out_channels", "kwargs"}
        missing, extra = sorted(keys - d.keys()), sorted(d.keys() - keys)
        if missing or extra:
            raise FlexPatchError(f"{source}: has missing keys {missing} / unknown keys {extra}")
        return cls(d["name"], d["ndim"], d["in_channels"], d["out_channels"], dict(d["kwargs"]))


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    divisor: DivisorRule
    description: str


_REGISTRY: dict[str, _Entry] = {}
# Models whose modules are heavy to import register themselves on first use.
_LAZY: dict[str, str] = {"unetr": "flexpatch.models.unetr"}


def register_model(
    name: str, builder: Callable[..., nn.Module], divisor: DivisorRule, description: str
) -> None:
    """Add a network to the registry.

    Args:
        name: lowercase identifier, unique.
        builder: ``builder(ndim, in_channels, out_channels, **options)`` returning logits
            ``(N, out_channels, *spatial)``; options need defaults and JSON-serialisable values.
        divisor: an int for every axis, or ``rule(ndim, options) -> tuple`` with one int per
            axis, where ``options`` holds every builder option, defaults filled in.
        description: one line shown by ``flexpatch models``.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise FlexPatchError(f"model name {name!r} must be a lowercase identifier")
    if name in _REGISTRY:
        raise FlexPatchError(f"model {name!r} is already registered")
    if not callable(builder):
        raise FlexPatchError(f"builder for model {name!r} is not callable")
    if not callable(divisor) and not (isinstance(divisor, int) and divisor >= 1):
        raise FlexPatchError(f"divisor for model {name!r} must be a positive int or a callable")
    if not description or "\n" in description:
        raise FlexPatchError(f"model {name!r} needs a one-line description")
    _REGISTRY[name] = _Entry(builder, divisor, description)


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(set(_REGISTRY) | set(_LAZY))


def model_description(name: str) -> str:
    """The one-line description of a registered model."""
    return _entry(name).description


def create_model(
    name: str, ndim: int = 3, in_channels: int = 1, out_channels: int = 2, **kwargs: Any
) -> nn.Module:
    """Build a registered network; it gets ``.spec`` (:class:`ModelSpec`) and ``.divisor``.

    Raises:
        FlexPatchError: unknown name (the message lists the known ones) or bad options.
    """
    return build(ModelSpec(name, ndim, in_channels, out_channels, kwargs))


def build(spec: ModelSpec) -> nn.Module:
    """Rebuild the network a :class:`ModelSpec` describes (freshly initialised).

    The option ``hyper`` (``True`` or a dict of :class:`~flexpatch.models.hyper.HyperConfig`
    settings) wraps the model in a :class:`~flexpatch.models.hyper.PatchSizeHypernet`; the
    wrapper's spec records every hyper setting and its divisor is the base model's.
    """
    if "hyper" in spec.kwargs:
        return _build_hyper(spec)
    entry = _entry(spec.name)
    for key in _BASE_ARGS:
        value = getattr(spec, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise FlexPatchError(f"model {spec.name}: {key} must be a positive integer, got {value!r}")
    if spec.ndim not in (2, 3):
        raise FlexPatchError(f"model {spec.name}: ndim must be 2 or 3, got {spec.ndim}")
    options = _resolve(spec.name, entry.builder, spec.kwargs)
    resolved = ModelSpec(spec.name, spec.ndim, spec.in_channels, spec.out_channels, options)
    try:
        model = entry.builder(spec.ndim, spec.in_channels, spec.out_channels, **options)
    except (TypeError, ValueError) as err:
        # Bad option values surface here from third-party constructors (MONAI).
        raise FlexPatchError(f"model {spec.name} with options {options}: {err}") from err
    model.spec = resolved
    model.divisor = _divisor(spec.name, entry.divisor, spec.ndim, options)
    return model


def _build_hyper(spec: ModelSpec) -> nn.Module:
    options = dict(spec.kwargs)
    hyper = options.pop("hyper")
    base = build(ModelSpec(spec.name, spec.ndim, spec.in_channels, spec.out_channels, options))
    if hyper is None or hyper is False:
        return base
    from flexpatch.models.hyper import HyperConfig, PatchSizeHypernet

    config = HyperConfig.from_value(hyper)
    net = PatchSizeHypernet(base, **config.to_json())
    net.spec = ModelSpec(
        spec.name,
        spec.ndim,
        spec.in_channels,
        spec.out_channels,
        {**base.spec.kwargs, "hyper": config.to_json()},
    )
    net.divisor = base.divisor
    return net


def model_divisor(name: str, ndim: int, **kwargs: Any) -> tuple[int, ...]:
    """The per-axis multiple that patch sizes of this model (with these options) must be."""
    kwargs.pop("hyper", None)  # the hypernetwork changes weights, never shapes
    entry = _entry(name)
    return _divisor(name, entry.divisor, ndim, _resolve(name, entry.builder, kwargs))


def check_patch_size(
    patch: Sequence[int], divisor: Sequence[int], what: str = "patch size", *, model: str | None = None
) -> tuple[int, ...]:
    """Validate a patch size against a model's divisor and return it as a tuple of ints.

    A patch equal to the divisor on every axis passes, but leaves one voxel at the
    bottleneck, where instance normalisation (unet, dynunet, basicunet, swinunetr) fails;
    training sizes should exceed the divisor on at least one axis.

    Raises:
        FlexPatchError: wrong number of axes, a side <= 0, or a side not divisible; the
            message names the nearest valid sizes per offending axis.
    """
    divisor = tuple(int(d) for d in divisor)
    try:
        size = tuple(operator.index(s) for s in patch)
    except TypeError:
        raise FlexPatchError(f"{what} {tuple(patch)} must be integers") from None
    for_model = f" for model {model}" if model else ""
    if len(size) != len(divisor):
        raise FlexPatchError(f"{what} {size} has {len(size)} axes, expected {len(divisor)}{for_model}")
    if any(s <= 0 for s in size):
        raise FlexPatchError(f"{what} {size} must be positive on every axis{for_model}")
    bad = [axis for axis, (s, d) in enumerate(zip(size, divisor, strict=True)) if s % d]
    if bad:
        hints = "; ".join(f"{_either(*nearest_valid(size[a], divisor[a]))} on axis {a}" for a in bad)
        raise FlexPatchError(
            f"{what} {size} is not divisible by {divisor}{for_model}: nearest valid sizes {hints}"
        )
    return size


def check_trainable(
    size: Sequence[int], divisor: Sequence[int], what: str = "patch size", model: str = ""
) -> None:
    """Refuse a training size equal to the divisor on every axis: one voxel at the bottleneck,
    where instance normalisation cannot train (a one-line error, not torch's traceback)."""
    if all(int(s) <= int(d) for s, d in zip(size, divisor, strict=True)):
        doubled = tuple(2 * int(d) for d in divisor)
        raise FlexPatchError(
            f"{what} {tuple(size)} leaves one voxel at the bottleneck of {model or 'the model'} "
            f"(divisor {tuple(divisor)}): training needs a larger size on one axis, e.g. {doubled}"
        )


def _either(below: int, above: int) -> str:
    return str(above) if below == above else f"{below} or {above}"


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY and name in _LAZY:
        importlib.import_module(_LAZY[name])
    if name not in _REGISTRY:
        raise FlexPatchError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name]


def _resolve(name: str, builder: Callable[..., nn.Module], kwargs: dict) -> dict:
    """Every builder option with defaults filled in, as JSON values (tuples become lists)."""
    signature = inspect.signature(builder)
    try:
        bound = signature.bind(0, 0, 0, **kwargs)
    except TypeError as err:
        options = [p for p in signature.parameters if p not in _BASE_ARGS]
        raise FlexPatchError(f"model {name}: {err}; its options are {options}") from None
    bound.apply_defaults()
    options: dict = {}
    for key, value in list(bound.arguments.items())[len(_BASE_ARGS) :]:
        if signature.parameters[key].kind is inspect.Parameter.VAR_KEYWORD:
            options.update(value)
        else:
            options[key] = value
    return _jsonable(options, name)


def _jsonable(options: dict, name: str) -> dict:
    try:
        return json.loads(json.dumps(options))
    except (TypeError, ValueError) as err:
        raise FlexPatchError(f"model {name}: options must be JSON-serialisable ({err})") from None


def _divisor(name: str, rule: DivisorRule, ndim: int, options: dict) -> tuple[int, ...]:
    given = rule if isinstance(rule, int) else rule(ndim, options)
    message = f"model {name}: divisor rule gave {given!r}, expected {ndim} positive ints"
    value = per_axis(given, ndim, "divisor", message=message)
    if not all(d >= 1 for d in value):
        raise FlexPatchError(message)
    return value


# Built-in networks. MONAI is imported inside the builders so that importing the
# registry (and ``flexpatch --help``) stays fast.


def _unet(
    ndim: int,
    in_channels: int,
    out_channels: int,
    *,
    channels: int = 16,
    levels: int = 3,
    convs_per_level: int = 4,
) -> nn.Module:
    from flexpatch.models.unet import UNet

    return UNet(ndim, in_channels, out_channels, channels, levels, convs_per_level)


def _dynunet(
    ndim: int,
    in_channels: int,
    out_channels: int,
    *,
    strides: Sequence[int | Sequence[int]] = (1, 2, 2, 2),
    kernel_size: int | Sequence[int | Sequence[int]] = 3,
    filters: Sequence[int] | None = None,
    **options: Any,
) -> nn.Module:
    from monai.networks.nets import DynUNet

    if len(strides) < 2:
        raise FlexPatchError(f"dynunet needs at least 2 levels of strides, got {strides}")
    # nnU-Net uses 3^k kernels at every level; an int means exactly that.
    kernels = [kernel_size] * len(strides) if isinstance(kernel_size, int) else kernel_size
    options = {"norm_name": ["instance", {"affine": True}], **options}
    net = DynUNet(ndim, in_channels, out_channels, kernels, strides, strides[1:], filters=filters, **options)
    if net.deep_supervision:
        # Deep supervision returns a stacked tensor of heads in training: not a segmentation output.
        raise FlexPatchError("dynunet: deep_supervision is not supported; train on the final output")
    return net


def _dynunet_divisor(ndim: int, options: dict) -> tuple[int, ...]:
    divisor = [1] * ndim
    for stride in options["strides"]:
        per_axis = stride if isinstance(stride, list) else [stride] * ndim
        if len(per_axis) != ndim:
            raise FlexPatchError(f"dynunet stride {stride} has {len(per_axis)} axes, expected {ndim}")
        divisor = [d * s for d, s in zip(divisor, per_axis, strict=True)]
    return tuple(divisor)


def _segresnet(
    ndim: int,
    in_channels: int,
    out_channels: int,
    *,
    init_filters: int = 16,
    blocks_down: Sequence[int] = (1, 2, 2, 4),
    blocks_up: Sequence[int] | None = None,
    **options: Any,
) -> nn.Module:
    from monai.networks.nets import SegResNet

    # One upsampling block per downsampling step unless the caller chooses otherwise.
    up = blocks_up if blocks_up is not None else [1] * (len(blocks_down) - 1)
    if len(up) != len(blocks_down) - 1:
        # MONAI builds a mismatched network silently; its output would not match the input size.
        raise FlexPatchError(
            f"segresnet blocks_up {up} needs {len(blocks_down) - 1} entries for blocks_down {blocks_down}"
        )
    return SegResNet(
        ndim, init_filters, in_channels, out_channels, blocks_down=blocks_down, blocks_up=up, **options
    )


def _swinunetr(
    ndim: int,
    in_channels: int,
    out_channels: int,
    *,
    feature_size: int = 24,
    patch_size: int = 2,
    **options: Any,
) -> nn.Module:
    import importlib.util

    if importlib.util.find_spec("einops") is None:
        raise FlexPatchError("model swinunetr needs the einops package (pip install einops)")
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(
        in_channels,
        out_channels,
        patch_size=patch_size,
        feature_size=feature_size,
        spatial_dims=ndim,
        **options,
    )


def _basicunet(
    ndim: int,
    in_channels: int,
    out_channels: int,
    *,
    features: Sequence[int] = (16, 16, 32, 64, 128, 16),
    **options: Any,
) -> nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(ndim, in_channels, out_channels, features=features, **options)


register_model(
    "unet",
    _unet,
    lambda ndim, o: (2 ** o["levels"],) * ndim,
    "seed-01 U-Net: 4 convs/level, ConvTranspose up",
)
register_model(
    "dynunet", _dynunet, _dynunet_divisor, "MONAI DynUNet, nnU-Net-like kernels 3 and strides 1,2,2,2"
)
register_model(
    "segresnet",
    _segresnet,
    lambda ndim, o: (2 ** (len(o["blocks_down"]) - 1),) * ndim,
    "MONAI SegResNet, residual encoder (1,2,2,4 blocks), 16 filters",
)
register_model(
    "swinunetr",
    _swinunetr,
    lambda ndim, o: (o["patch_size"] ** 5,) * ndim,
    "MONAI SwinUNETR, shifted-window transformer encoder (needs einops)",
)
register_model("basicunet", _basicunet, 16, "MONAI BasicUNet, 4 max-pool levels, features 16..128")
