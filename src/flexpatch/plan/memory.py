"""Memory planner: peak memory from probe runs, and the largest patch, window and batch within a budget.

**Estimate.** For a network in one mode (``train``: forward, Dice + CE loss, backward and
optimiser step, in the training loop's order; ``infer``: forward under inference mode),
the peak memory of one call on ``B`` patches of ``V`` voxels is modelled as::

    peak(B, V) = static + scale * (base + B * (per_voxel * V + per_token_pair * (V / token_voxels) ** 2))

- ``static``: bytes held before the call, counted exactly: parameters (and in training
  their gradients, alive during the forward as the loop zeroes them after it, and the
  optimiser's state).
- ``base`` and ``per_voxel``: least squares through probe runs of the whole network at
  three small patch sizes (multiples of its divisor).
- ``per_token_pair``: global self-attention (a ViT: UNETR) holds a tokens x tokens matrix
  per head, quadratic in ``V``, which probes at small sizes barely show. It is fitted on
  one attention block at three token counts; in training every block keeps its matrix
  for the backward pass, so it counts once per block, at inference once.

**Check.** Small probes extrapolate: on CUDA they under-predicted inference at large sizes
by up to 46% (UNETR) and over-predicted UNETR's training by up to 310% (memory-efficient
attention). So a model carries a ``scale`` on its above-``static`` part, and
:meth:`MemoryModel.anchored` sets it from one measured call at the size a planner picked:
the prediction there becomes the measurement, and the others move in proportion.

**Measurement** (the "measured peak" that probes and benchmarks use): on CUDA,
``torch.cuda.max_memory_allocated`` during the call, above what was allocated before it,
plus ``static``; on the CPU, the peak of the bytes held by tensors, tracked at the
dispatcher (a storage counts from the op that allocates it until it is freed, ``static``
tensors from the start). The CPU figure leaves out allocator caches and scratch that
never becomes a tensor (oneDNN workspaces): it is what the run holds, not the RSS.

**Sliding-window inference** adds, on the device that runs the network, the image
(``C_in`` x image voxels x 4 bytes, a padded copy where the window covers an axis) and the
previous batch's outputs; and, on the device that stitches, the output buffer and the
weight sum: ``(C_out + 1)`` x image voxels x 4 bytes (the issue's formula; the weight sum is
made after the forwards), then the probabilities (``C_out`` x image voxels x 4 more).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from flexpatch.errors import FlexPatchError

Shape = tuple[int, ...]
MODES = ("train", "infer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class _LiveBytes(TorchDispatchMode):
    """Running total and peaks of the bytes held by tensor storages that ops allocate.

    An op's output storage counts unless it is one of the op's inputs' (views, in-place
    ops); it stops counting when the storage is freed (a finalizer on the storage object,
    which torch keeps alive exactly as long as the storage). Peaks are kept apart for
    allocations made inside and outside the modules that ``inside()`` reports.
    """

    def __init__(
        self, existing: Iterable[torch.Tensor] = (), inside: Callable[[], bool] | None = None
    ) -> None:
        super().__init__()
        self.live, self.peaks = 0, [0, 0]  # outside, inside
        self.inside = inside or (lambda: False)
        self._sizes: dict[int, int] = {}
        for t in existing:
            self._track(t.untyped_storage())

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._sizes:
            return
        self._sizes[key] = size
        self.live += size
        region = int(self.inside())
        self.peaks[region] = max(self.peaks[region], self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if _plain(t)}
        for t in tree_leaves(out):
            if _plain(t) and t.untyped_storage().data_ptr() not in inputs:
                self._track(t.untyped_storage())
        return out


def _plain(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "meta" and t.layout == torch.strided


@dataclass(frozen=True)
class PhasePeak:
    """One phase of a measured call: the peak bytes of allocations made outside and inside
    the attention blocks, and the bytes still held at its end."""

    outside: int
    inside: int
    end: int

    @property
    def peak(self) -> int:
        return max(self.outside, self.inside)


def measure_phases(
    phases: Sequence[Callable[[], None]],
    device: str | torch.device,
    existing: Iterable[torch.Tensor] = (),
    attention: Sequence[str] = (),
) -> list[PhasePeak]:
    """Run ``phases`` in order and measure each: ``existing``'s bytes plus what the calls allocate.

    Tensors held before the call and not in ``existing`` are left out. ``attention``
    names modules (their ``ModuleTracker`` names) whose forward and backward count as
    inside. On CUDA the allocator's peak of each phase (workspaces included) is added to
    the tensor-level split where it is higher.
    """
    from torch.utils.module_tracker import ModuleTracker

    dev, existing, names = torch.device(device), list(existing), set(attention)
    cuda = dev.type == "cuda"
    out: list[PhasePeak] = []
    with ModuleTracker() as modules:
        inside = (lambda: not names.isdisjoint(modules.parents)) if names else None
        with _LiveBytes(existing, inside) as tracker:
            offset = tensor_bytes(existing) - torch.cuda.memory_allocated(dev) if cuda else 0
            for phase in phases:
                tracker.peaks = [tracker.live, 0]
                if cuda:
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                phase()
                lo, hi = tracker.peaks
                if cuda:
                    torch.cuda.synchronize(dev)
                    extra = max(0, int(torch.cuda.max_memory_allocated(dev)) + offset - max(lo, hi))
                    lo, hi = lo + extra, (hi + extra if hi else 0)
                out.append(PhasePeak(lo, hi, tracker.live))
    return out


def measure_peak(
    fn: Callable[[], None], device: str | torch.device, existing: Iterable[torch.Tensor] = ()
) -> int:
    """Peak bytes while ``fn()`` runs: ``existing`` plus what it allocates (:func:`measure_phases`)."""
    return measure_phases([fn], device, existing)[0].peak


@dataclass(frozen=True)
class MemoryModel:
    """Peak memory of one network call as a function of batch and patch voxels (module docstring).

    The peak is the largest of a few terms, each ``base + batch * (per_voxel * V +
    per_token_pair * tokens**2)`` above ``static``: one per phase of the call (training:
    forward, backward, optimiser step; inference: forward) for allocations made outside
    attention blocks, and one per phase for those made inside them. At small patches the
    backward or the optimiser step peaks highest, at large ones the forward; with global
    attention at many tokens, the attention blocks. ``scale`` multiplies the largest term
    (1 as calibrated; :meth:`anchored` sets it from a measurement).

    Attributes:
        model: registry name (for reports).
        ndim: spatial dimensions.
        mode: ``train`` or ``infer``.
        dtype: ``float32`` or ``bfloat16`` (autocast).
        device: where the probes ran.
        in_channels: image channels.
        out_channels: output channels.
        static: bytes held between calls (weights; gradients and optimiser state in training).
        terms: the fitted ``(base, per_voxel, per_token_pair)`` of each term.
        token_voxels: voxels per token (1 without attention).
        probes: ``(patch, batch, measured peak)`` of the whole-network probes, then of the
            checks that anchored the model.
        scale: factor on the part of every prediction above ``static``.
    """

    model: str
    ndim: int
    mode: str
    dtype: str
    device: str
    in_channels: int
    out_channels: int
    static: int
    terms: tuple[tuple[float, float, float], ...]
    token_voxels: int = 1
    probes: tuple[tuple[Shape, int, int], ...] = ()
    scale: float = 1.0

    def peak(self, patch: Sequence[int], batch: int = 1) -> float:
        """Predicted peak bytes of one call on ``batch`` patches of shape ``patch``."""
        return self.static + self.scale * self._above_static(patch, batch)

    def _above_static(self, patch: Sequence[int], batch: int) -> float:
        voxels = float(np.prod(patch))
        pairs = (voxels / self.token_voxels) ** 2
        return max(a + batch * (b * voxels + c * pairs) for a, b, c in self.terms)

    def anchored(self, patch: Sequence[int], batch: int, measured: int) -> MemoryModel:
        """A copy that predicts ``measured`` bytes at ``(patch, batch)``, with the measurement as a probe.

        The scale is set afresh (the previous one does not compound). Where the unscaled
        prediction, or the measurement, is not above ``static`` (a degenerate fit), the
        scale stays: no factor could make the prediction match.
        """
        above = self._above_static(patch, batch)
        scale = (measured - self.static) / above if above > 0 and measured > self.static else self.scale
        probe = (tuple(int(p) for p in patch), int(batch), int(measured))
        return replace(self, scale=float(scale), probes=(*self.probes, probe))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["terms"] = [list(t) for t in self.terms]
        d["probes"] = [[list(p), b, m] for p, b, m in self.probes]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MemoryModel:
        try:
            d = dict(d)
            d["terms"] = tuple(tuple(float(v) for v in t) for t in d["terms"])
            d["probes"] = tuple((tuple(p), int(b), int(m)) for p, b, m in d.get("probes", ()))
            d["scale"] = float(d.get("scale", 1.0))  # plans written before the check have none
            return cls(**d)
        except (KeyError, TypeError, ValueError) as e:
            raise FlexPatchError(f"memory model: malformed ({e})") from None


def probe_sizes(divisor: Sequence[int]) -> list[Shape]:
    """Three small patches: 2, 3, 4 divisors long on the first axis, 2 on the others.

    Outside attention, peak memory is linear in the voxels, so anisotropic probes keep
    the largest one cheap even for divisors of 32.
    """
    return [(k * divisor[0], *(2 * d for d in divisor[1:])) for k in (2, 3, 4)]


def attention_blocks(net: torch.nn.Module) -> tuple[int, dict[str, torch.nn.Module]]:
    """Voxels per token, and the global self-attention blocks (MONAI's SABlock) by their tracker name."""
    from monai.networks.blocks.selfattention import SABlock

    root = type(net).__name__
    blocks = {f"{root}.{n}": m for n, m in net.named_modules() if isinstance(m, SABlock)}
    if not blocks:
        return 1, {}
    token = next(
        (m.token_size for m in net.modules() if hasattr(m, "token_size") and hasattr(m, "vit")), None
    )
    if token is None:
        raise FlexPatchError(f"{root}: has global attention but no token_size to count its tokens")
    return int(np.prod(token)), blocks


def attention_pairs(
    block: torch.nn.Module, mode: str, device: torch.device, amp: bool
) -> tuple[float, float]:
    """Bytes per (token, token) pair of one attention block: ``(held, peak)``.

    ``held``: what its forward keeps for the backward; ``peak``: the most it holds at
    once in its forward or backward. Quadratics through probes at 128, 256 and 512 tokens,
    each run once before it is measured, as :class:`Prober` does: a one-time allocation (on
    CUDA the cuBLAS workspace of the process's first matrix product, tens of MiB) in the
    first probe would weigh as bytes per pair, 1/49152 of it, and be extrapolated to 4096 tokens.
    """
    probe = copy.deepcopy(block).to(device).train(mode == "train")
    hidden = probe.qkv.in_features if hasattr(probe, "qkv") else probe.to_q.in_features
    counts, held, peak = (128, 256, 512), [], []
    for n in counts:
        if mode == "infer":
            phases = [_forward(probe, (1, n, hidden), device, amp)]
        else:
            state: dict[str, torch.Tensor] = {}

            def forward(n: int = n, state: dict = state) -> None:
                x = torch.randn(1, n, hidden, device=device, requires_grad=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    state["y"] = probe(x).float().sum()

            phases = [forward, lambda state=state: state.pop("y").backward()]
        for phase in phases:  # warm-up
            phase()
        measured = measure_phases(phases, device)
        held.append(measured[0].end)
        peak.append(max(m.peak for m in measured))
    coefficient = lambda ys: max(float(np.polyfit(counts, ys, 2)[0]), 0.0)  # noqa: E731
    return (coefficient(held) if mode == "train" else 0.0), coefficient(peak)


class Prober:
    """Measured peak memory of ``net``'s calls, as a training loop or a predictor makes them.

    Training probes run on a copy (the optimiser changes weights), with the loop's
    Dice + CE loss, gradient clipping and optimiser, in three phases: forward, backward,
    optimiser step.
    Inference probes run ``net`` itself, moved to ``device``, in one phase. Every call is
    made once to warm up (gradients, optimiser state, cuDNN plans), then measured.

    Args:
        net: a registry model (it has ``.spec``).
        mode: ``train`` or ``infer``.
        device: where the calls run.
        dtype: ``float32`` or ``bfloat16`` (autocast, as training with AMP on CUDA).
        optimizer: ``adamw`` (two moments) or ``sgd`` (one).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        mode: str = "train",
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        optimizer: str = "adamw",
    ) -> None:
        if mode not in MODES:
            raise FlexPatchError(f"unknown memory mode {mode!r}; choose train or infer")
        if dtype not in DTYPES:
            raise FlexPatchError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.mode, self.dtype, self.spec = mode, dtype, net.spec
        self.dev, self.amp = torch.device(device), dtype == "bfloat16"
        self.net = copy.deepcopy(net).to(self.dev).train() if mode == "train" else net.to(self.dev).eval()
        self.token_voxels, self.blocks = attention_blocks(self.net)
        self.weights = list(self.net.parameters()) + list(self.net.buffers())
        self.opt: torch.optim.Optimizer | None = None
        if mode == "train":
            from monai.losses import DiceCELoss

            trainable = [p for p in self.net.parameters() if p.requires_grad]
            self.opt = (
                torch.optim.SGD(trainable, lr=1e-9, momentum=0.99, nesterov=True)
                if optimizer == "sgd"
                else torch.optim.AdamW(trainable, lr=1e-9)
            )
            self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def held(self) -> list[torch.Tensor]:
        """What a loop holds between calls: weights, and in training gradients and optimiser state."""
        if self.opt is None:
            return self.weights
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        states = [v for s in self.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return self.weights + grads + states

    def measure(self, patch: Sequence[int], batch: int = 1) -> list[PhasePeak]:
        """Peaks of each phase of one call on ``batch`` patches."""
        x_shape = (batch, self.spec.in_channels, *patch)
        for phase in self._phases(x_shape):  # warm-up
            phase()
        return measure_phases(self._phases(x_shape), self.dev, self.held(), list(self.blocks))

    def peak(self, patch: Sequence[int], batch: int = 1) -> int:
        """The measured peak bytes of one call."""
        return max(p.peak for p in self.measure(patch, batch))

    def _phases(self, x_shape: tuple) -> list[Callable[[], None]]:
        net, dev, amp, opt = self.net, self.dev, self.amp, self.opt
        if opt is None:
            return [_forward(net, x_shape, dev, amp)]
        state: dict[str, torch.Tensor] = {}

        def forward() -> None:
            x = torch.randn(x_shape, device=dev)
            y = torch.randint(0, self.spec.out_channels, (x_shape[0], 1, *x_shape[2:]), device=dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                state["loss"] = self.loss_fn(net(x), y)

        def backward() -> None:
            # Run.step's order (train/run.py): gradients are zeroed after the forward, so they live through it
            opt.zero_grad(set_to_none=True)
            state.pop("loss").backward()

        def step() -> None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)  # the loop's default clipping
            opt.step()

        return [forward, backward, step]


def _forward(net: torch.nn.Module, x_shape: tuple, dev: torch.device, amp: bool) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            net(torch.randn(x_shape, device=dev))

    return run


def calibrate(
    net: torch.nn.Module,
    mode: str = "train",
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    optimizer: str = "adamw",
    sizes: Sequence[Sequence[int]] | None = None,
    prober: Prober | None = None,
) -> MemoryModel:
    """Fit a :class:`MemoryModel` to :class:`Prober` runs of ``net`` (arguments as there).

    Attention: every block keeps its ``held`` matrix until the backward reaches it, so
    outside the blocks ``n * held`` bytes per pair are alive in training (0 at inference),
    and inside one block at most ``(n - 1) * held + peak``.

    Args:
        sizes: probe patches; default :func:`probe_sizes` of the net's divisor.
        prober: one to probe with, kept by the caller to check a plan by measurement
            (:func:`~flexpatch.plan.planner.plan_training`); its mode, device, dtype and
            optimiser replace the arguments. Default: a new one.
    """
    prober = prober or Prober(net, mode, device, dtype, optimizer)
    mode, dtype = prober.mode, prober.dtype
    n = len(prober.blocks)
    held, peak = (
        attention_pairs(next(iter(prober.blocks.values())), mode, prober.dev, prober.amp) if n else (0, 0)
    )
    rows = [(tuple(int(v) for v in s), prober.measure(s)) for s in sizes or probe_sizes(net.divisor)]
    static = tensor_bytes(prober.held())
    voxels = np.array([np.prod(s) for s, _ in rows], dtype=np.float64)
    pairs = (voxels / prober.token_voxels) ** 2
    terms = []
    for phase in range(len(rows[0][1])):
        # the held matrices are freed by the end of the backward: none during the optimiser step
        outside = n * held if phase < 2 else 0.0
        for region, pair in (("outside", outside), ("inside", (n - 1) * held + peak)):
            measured = np.array([getattr(m[phase], region) for _, m in rows], dtype=np.float64)
            if not measured.any():
                continue  # no attention block: nothing was allocated inside one
            slope, base = np.polyfit(voxels, measured - static - pair * pairs, 1)
            terms.append((float(base), max(float(slope), 0.0), float(pair)))
    spec = prober.spec
    return MemoryModel(
        spec.name, spec.ndim, mode, dtype, str(prober.dev), spec.in_channels, spec.out_channels, static,
        tuple(terms), prober.token_voxels, tuple((s, 1, max(p.peak for p in m)) for s, m in rows),
    )  # fmt: skip
