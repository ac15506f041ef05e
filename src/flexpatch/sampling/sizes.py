"""Patch-size samplers: which matrix shape the network sees at each training step.

A sampler draws from an explicit ``torch.Generator`` (TorchIO's random/deterministic
split), so a run's sizes can be logged, replayed and tested. ``parse_patch_spec``
turns the CLI's ``--patch-size`` text into a sampler and validates it against the
network's divisor (``2 ** number_of_downsamplings`` per axis).

Spec grammar (``ndim`` axes, sizes in voxels):

- ``64,64,64`` or ``64`` (isotropic): a fixed size.
- ``uniform:32-192``: each axis independently uniform over the multiples of the
  divisor in ``[32, 192]`` (patch-size augmentation); per-axis ranges as
  ``uniform:32-192,32-192,16-64``.
- ``uniform-iso:32-192``: one value for all axes.
- ``list:32x32x32,64x64x64`` (or ``list:32,64``, isotropic items): uniform over a list.

Other kinds plug in through :func:`register_size_kind`; ``progressive:MODE:SIZE``
(progressive growing, :mod:`flexpatch.sampling.progressive`) is one, and it also needs the run's
batch size and number of steps (``parse_patch_spec(..., batch=, steps=)``).

A sampler may also follow the training step (:class:`StepSizeSampler`: ``size_at`` and
``batch_at``, e.g. a growing schedule); :func:`size_for_step` and :func:`batch_for_step`
ask it, and fall back to ``draw`` and the configured batch size for samplers that don't.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from flexpatch.axes import nearest_valid, per_axis, round_down, round_up
from flexpatch.errors import FlexPatchError, format_shape

Shape = tuple[int, ...]


@runtime_checkable
class SizeSampler(Protocol):
    """Anything that draws a patch size from a generator."""

    def draw(self, generator: torch.Generator) -> Shape:
        """One patch size, using only ``generator`` for randomness."""
        ...

    def max_size(self) -> Shape:
        """The largest size it can return per axis (the validation / inference size)."""
        ...

    def describe(self) -> str:
        """A spec string that :func:`parse_patch_spec` reads back into an equal sampler."""
        ...


@runtime_checkable
class StepSizeSampler(SizeSampler, Protocol):
    """A sampler whose size and batch size depend on the training step (a schedule)."""

    def size_at(self, step: int, generator: torch.Generator) -> Shape:
        """The patch size of step ``step``; any randomness comes from ``generator`` only."""
        ...

    def batch_at(self, step: int) -> int:
        """The batch size of step ``step``."""
        ...


def size_for_step(sampler: SizeSampler, step: int, generator: torch.Generator) -> Shape:
    """The size of step ``step``: the sampler's schedule, else a draw that ignores the step."""
    if isinstance(sampler, StepSizeSampler):
        return sampler.size_at(step, generator)
    return sampler.draw(generator)


def batch_for_step(sampler: SizeSampler, step: int, default: int) -> int:
    """The batch size of step ``step``: the sampler's schedule, else ``default`` (the config's)."""
    return int(sampler.batch_at(step)) if isinstance(sampler, StepSizeSampler) else int(default)


def _check_positive(size: Sequence[int], what: str) -> Shape:
    size = tuple(int(s) for s in size)
    if not size or any(s <= 0 for s in size):
        raise FlexPatchError(f"{what} {size} must have positive values on every axis")
    return size


@dataclass(frozen=True)
class FixedSize:
    """Always the same size."""

    size: Shape

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _check_positive(self.size, "patch size"))

    def draw(self, generator: torch.Generator) -> Shape:
        return self.size

    def max_size(self) -> Shape:
        return self.size

    def describe(self) -> str:
        return ",".join(str(s) for s in self.size)


def _multiples(low: int, high: int, divisor: int) -> list[int]:
    return list(range(max(round_up(low, divisor), divisor), high + 1, divisor))


@dataclass(frozen=True)
class UniformSize:
    """Uniform over the multiples of ``divisor`` in ``[low, high]``, per axis.

    Attributes:
        low: smallest size per axis (rounded up to the divisor).
        high: largest size per axis (rounded down to the divisor).
        divisor: the network's size divisor per axis.
        isotropic: draw one value shared by all axes (a multiple of every divisor,
            inside every axis' range) instead of one value per axis.
    """

    low: Shape
    high: Shape
    divisor: Shape
    isotropic: bool = False

    def __post_init__(self) -> None:
        for name in ("low", "high", "divisor"):
            object.__setattr__(self, name, _check_positive(getattr(self, name), f"uniform size {name}"))
        if not len(self.low) == len(self.high) == len(self.divisor):
            raise FlexPatchError(
                f"uniform size low {self.low}, high {self.high} and divisor {self.divisor} differ in axes"
            )
        for lo, hi, d in zip(self.low, self.high, self.divisor, strict=True):
            if lo > hi:
                raise FlexPatchError(f"uniform size range {lo}-{hi} is empty (low > high)")
            if not _multiples(lo, hi, d):
                below, above = round_down(lo, d), round_up(hi, d)
                near = f"sizes {below} or {above}" if below > 0 else f"size {above}"
                raise FlexPatchError(
                    f"uniform size range {lo}-{hi} holds no multiple of {d}: nearest valid {near}"
                )
        if self.isotropic and not self.candidates()[0]:
            raise FlexPatchError(
                f"isotropic uniform size: no single value lies in every range {self.low}-{self.high} "
                f"and is divisible by {self.divisor}"
            )

    def candidates(self) -> list[list[int]]:
        """The values an axis can take (one list shared by all axes when isotropic)."""
        per_axis = [
            _multiples(lo, hi, d) for lo, hi, d in zip(self.low, self.high, self.divisor, strict=True)
        ]
        if not self.isotropic:
            return per_axis
        common = set(per_axis[0]).intersection(*per_axis[1:])
        return [sorted(common)]

    def draw(self, generator: torch.Generator) -> Shape:
        cands = self.candidates()
        picks = [c[int(torch.randint(len(c), (1,), generator=generator))] for c in cands]
        return tuple(picks * len(self.low)) if self.isotropic else tuple(picks)

    def max_size(self) -> Shape:
        cands = self.candidates()
        return tuple([cands[0][-1]] * len(self.low)) if self.isotropic else tuple(c[-1] for c in cands)

    def describe(self) -> str:
        kind = "uniform-iso" if self.isotropic else "uniform"
        ranges = [f"{lo}-{hi}" for lo, hi in zip(self.low, self.high, strict=True)]
        return f"{kind}:{ranges[0]}" if len(set(ranges)) == 1 else f"{kind}:{','.join(ranges)}"


@dataclass(frozen=True)
class ChoiceSize:
    """Uniform over a list of sizes."""

    sizes: tuple[Shape, ...]

    def __post_init__(self) -> None:
        if not self.sizes:
            raise FlexPatchError("patch size list is empty")
        sizes = tuple(_check_positive(s, "patch size") for s in self.sizes)
        if len({len(s) for s in sizes}) != 1:
            raise FlexPatchError(f"patch sizes {[format_shape(s) for s in sizes]} differ in number of axes")
        object.__setattr__(self, "sizes", sizes)

    def draw(self, generator: torch.Generator) -> Shape:
        return self.sizes[int(torch.randint(len(self.sizes), (1,), generator=generator))]

    def max_size(self) -> Shape:
        return tuple(max(axis) for axis in zip(*self.sizes, strict=True))

    def describe(self) -> str:
        return "list:" + ",".join(format_shape(s) for s in self.sizes)


# ---------------------------------------------------------------- parsing

SpecParser = Callable[..., SizeSampler]


class _Kind(NamedTuple):
    parser: SpecParser
    example: str
    needs_run: bool = False


_KINDS: dict[str, _Kind] = {}


def register_size_kind(kind: str, parser: SpecParser, example: str, *, needs_run: bool = False) -> None:
    """Make ``kind:...`` specs known to :func:`parse_patch_spec`.

    Args:
        kind: the prefix before the colon.
        parser: ``parser(body, ndim, divisor) -> SizeSampler`` for the text after the colon.
        example: a sample spec shown in error messages.
        needs_run: the parser also takes the run's ``batch=`` and ``steps=`` keywords (each
            None when the caller gave none), as a schedule over the training steps does.
    """
    _KINDS[kind] = _Kind(parser, example, needs_run)


def _ints(text: str, spec: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise FlexPatchError(
            f"patch size {spec!r}: {text!r} is not a comma-separated list of integers"
        ) from None


def _check_divisible(size: Shape, divisor: Shape, spec: str) -> None:
    for s, d in zip(size, divisor, strict=True):
        if s % d:
            below, above = nearest_valid(s, d)
            near = f"sizes {below} or {above}" if below != above else f"size {above}"
            where = "" if spec == str(s) else f" (in {spec!r})"
            raise FlexPatchError(f"patch size {s}{where} is not divisible by {d}: nearest valid {near}")


def one_size(text: str, ndim: int, divisor: Shape, spec: str, sep: str) -> Shape:
    """One patch size, ``48`` (isotropic) or one size per axis joined by ``sep`` (``48,64,32`` or
    ``48x64x32``), checked against the data's ``ndim`` and the network's ``divisor``; ``spec`` is
    the whole text, for the errors."""
    where = "" if text == spec else f" (in {spec!r})"
    values = _ints(text.replace(sep, ","), spec)
    message = f"patch size {text!r}{where} has {len(values)} axes but the data are {ndim}D"
    size = per_axis(values, ndim, "patch size", message=message)
    if any(v <= 0 for v in size):
        raise FlexPatchError(f"patch size {text!r}{where} must be positive on every axis")
    _check_divisible(size, divisor, spec)
    return size


def _parse_uniform(body: str, ndim: int, divisor: Shape, isotropic: bool) -> UniformSize:
    kind = "uniform-iso" if isotropic else "uniform"
    spec = f"{kind}:{body}"
    parts = body.split(",")
    message = f"patch size {spec!r} gives {len(parts)} ranges but the data are {ndim}D"
    ranges = per_axis(parts, ndim, "patch size ranges", cast=str, message=message)
    lows, highs = [], []
    for r in ranges:
        parts = r.split("-")
        if len(parts) != 2:
            raise FlexPatchError(f"patch size {spec!r}: range {r!r} is not LOW-HIGH (e.g. 32-192)")
        lo, hi = _ints(",".join(parts), spec)
        lows.append(lo)
        highs.append(hi)
    return UniformSize(tuple(lows), tuple(highs), divisor, isotropic=isotropic)


def _parse_list(body: str, ndim: int, divisor: Shape) -> ChoiceSize:
    items = [t for t in body.split(",") if t.strip()]
    return ChoiceSize(tuple(one_size(t, ndim, divisor, f"list:{body}", "x") for t in items))


register_size_kind("uniform", lambda b, n, d: _parse_uniform(b, n, d, False), "uniform:32-192")
register_size_kind("uniform-iso", lambda b, n, d: _parse_uniform(b, n, d, True), "uniform-iso:32-192")
register_size_kind("list", _parse_list, "list:32x32x32,64x64x64")


def parse_patch_spec(
    spec: str,
    ndim: int,
    divisor: int | Sequence[int],
    *,
    batch: int | None = None,
    steps: int | None = None,
) -> SizeSampler:
    """Read a ``--patch-size`` spec (see the module docstring) into a sampler.

    Args:
        spec: e.g. ``"64,64,64"``, ``"64"``, ``"uniform:32-192"``, ``"list:32x32,64x64"``,
            ``"progressive:performance:128x128x128"``.
        ndim: number of spatial axes of the data.
        divisor: size divisor of the network, one int or one per axis.
        batch: the run's batch size (at the largest patch); only kinds that schedule over
            the run (``progressive``) use it, and they require it.
        steps: the run's number of training steps; as ``batch``.

    Raises:
        FlexPatchError: unknown kind, wrong number of axes, non-positive or
            non-divisible size (naming the nearest valid ones), or an empty range.
    """
    message = f"size divisor {divisor!r} must be positive with {ndim} axes"
    divs = per_axis(divisor, ndim, "size divisor", message=message)
    if any(d <= 0 for d in divs):
        raise FlexPatchError(message)
    spec = spec.strip().replace(" ", "")
    if not spec:
        raise FlexPatchError("patch size spec is empty")
    if ":" not in spec:
        return FixedSize(one_size(spec, ndim, divs, spec, ","))
    kind, body = spec.split(":", 1)
    if kind not in _KINDS:
        known = ", ".join(["fixed (e.g. 64,64,64)"] + [f"{k} (e.g. {e.example})" for k, e in _KINDS.items()])
        raise FlexPatchError(f"unknown patch size kind {kind!r} in {spec!r}; known kinds: {known}")
    entry = _KINDS[kind]
    if entry.needs_run:
        return entry.parser(body, ndim, divs, batch=batch, steps=steps)
    return entry.parser(body, ndim, divs)


def smallest_sizes(sampler: SizeSampler) -> list[Shape]:
    """The smallest sizes a sampler can draw (per-axis minima), for checks before training."""
    if isinstance(sampler, FixedSize):
        return [sampler.size]
    if isinstance(sampler, ChoiceSize):
        return list(sampler.sizes)
    if isinstance(sampler, UniformSize):
        cands = sampler.candidates()
        first = [c[0] for c in cands]
        return [tuple(first * len(sampler.low)) if sampler.isotropic else tuple(first)]
    stages = getattr(sampler, "stages", None)  # a ProgressiveSchedule (which imports this module)
    if callable(stages):
        return [stage.patch for stage in stages()]
    return []
