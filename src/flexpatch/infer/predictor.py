"""Load a model folder and segment image files at any patch size, on the input's own grid."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from flexpatch.checkpoint import BEST, LAST, load_checkpoint
from flexpatch.data.context import check_context, with_context
from flexpatch.data.io import Volume, load_json
from flexpatch.data.preprocess import Plan, preprocess_case
from flexpatch.data.regions import to_labels, written_names
from flexpatch.data.resample import restore_slabs
from flexpatch.errors import FlexPatchError, format_shape
from flexpatch.evaluate.postprocess import read_postprocessing
from flexpatch.geometry import slab_axis
from flexpatch.infer.floor import check_floors, cpu_share, outputs_bytes, postprocess_bytes, weight_bytes
from flexpatch.infer.precision import resolve_precision, with_precision
from flexpatch.infer.runner import (
    Prediction,
    Written,
    cases_for,
    label_dtype,
    names_by_value,
    run_prediction,
)
from flexpatch.infer.sliding_window import sliding_window_slabs
from flexpatch.infer.tta import Mirrored, mirroring_for
from flexpatch.infer.within import run_within
from flexpatch.methods import legacy_window, read_method
from flexpatch.models import ModelSpec, build, check_patch_size
from flexpatch.plan.budget import cpu_window_batch, format_bytes, parse_budget, resident_bytes
from flexpatch.plan.memory import Prober, calibrate
from flexpatch.plan.planner import WindowChoice, plan_window
from flexpatch.runtime import console, resolve_device
from flexpatch.sampling.augment import parse_augment

CHECKPOINTS = {"best": BEST, "last": LAST}
T = TypeVar("T")


@dataclass
class LoadedModel:
    """A trained network with everything needed to apply it to raw images."""

    net: torch.nn.Module
    spec: ModelSpec
    plan: Plan
    config: dict[str, Any]  # the training run's settings, as saved in config.json
    device: torch.device
    model_dir: Path
    method: dict[str, Any]  # method.json: the default window and whether the patch size was fixed
    # the calibrated inference memory model, its prober, the measured peaks of the network's
    # calls by (window, batch), and the last line that reported a choice
    _memory: dict = field(default_factory=dict, repr=False)
    # the forward pass's type (flexpatch.infer.precision): float32, or bfloat16 under autocast
    precision: torch.dtype = torch.float32

    @property
    def divisor(self) -> tuple[int, ...]:
        return tuple(self.net.divisor)

    @property
    def train_patch(self) -> tuple[int, ...]:
        """The largest training patch: the default window."""
        return tuple(self.method["window"])

    @property
    def largest_trained(self) -> tuple[int, ...]:
        """The largest training patch per axis: no window runs larger (see :meth:`window`)."""
        return tuple(self.method.get("largest") or self.method["window"])

    @property
    def fixed_size(self) -> bool:
        """Trained at one patch size (FP): other windows may lose accuracy (nnU-Net's warning)."""
        return bool(self.method["fixed_size"])

    def plan_window(
        self,
        image_shape: Sequence[int],
        budget: int,
        patch_size: Sequence[int] | None = None,
        overlap: float = 0.5,
        max_batch: int = 4,
        stitch_device: str | None = None,
    ) -> WindowChoice:
        """The window and window batch that fit ``budget`` bytes for an image (at the model's spacing).

        A given ``patch_size`` is kept; otherwise the largest window that fits, up to the largest
        training patch (the whole image when that covers it). Probes calibrate the memory model
        once per model; the
        network's call at the chosen window and batch is measured (once per window and batch)
        and the plan checked by it (:func:`~flexpatch.plan.planner.checked`).
        """
        if "model" not in self._memory:
            prober = Prober(self.net, "infer", self.device)
            self._memory.update(model=calibrate(self.net, prober=prober), prober=prober, measured={})
        return plan_window(
            self._memory["model"],
            budget,
            image_shape,
            self.divisor,
            window=self.window(patch_size) if patch_size is not None else None,
            max_window=self.largest_trained,  # larger windows run as this one (see window())
            overlap=overlap,
            max_batch=max_batch,
            stitch_device=stitch_device,
            measure=self._measure,
        )

    def _measure(self, window: tuple[int, ...], batch: int) -> int:
        """The measured peak of the network's call, kept: every case of a shape plans the same."""
        measured = self._memory["measured"]
        if (window, batch) not in measured:
            measured[window, batch] = self._memory["prober"].peak(window, batch)
        return measured[window, batch]

    def _report(self, line: str, more: str = "") -> None:
        """One line on stderr per new choice (``line``), not per case; ``more`` is said, not compared."""
        if self._memory.get("line") != line:
            self._memory["line"] = line
            console.print(line + more, highlight=False, markup=False, soft_wrap=True)

    def window(self, patch_size: Sequence[int] | None) -> tuple[int, ...]:
        """Validate a user's window (isotropic when one number is given), capped per axis at the
        largest patch the model was trained on.

        Why the cap: a window larger than every training patch normalises (InstanceNorm) over a
        field no training patch had and lost Dice on real data (e.g. .71 -> .58 for a fixed-size
        model); run as the largest trained window it gives that window's result instead. The
        whole image still runs in one window when it is no larger than the trained patch.
        """
        if patch_size is None:
            return self.train_patch
        patch = tuple(int(p) for p in patch_size)
        if len(patch) == 1:
            patch = patch * self.plan.ndim
        if len(patch) != self.plan.ndim:
            raise FlexPatchError(f"patch size {patch} has {len(patch)} axes, the model is {self.plan.ndim}D")
        patch = check_patch_size(patch, self.divisor, what=f"patch size for model {self.spec.name}")
        capped = tuple(min(p, t) for p, t in zip(patch, self.largest_trained, strict=True))
        told = self._memory.setdefault("capped", set())
        if capped != patch and patch not in told:
            told.add(patch)  # once per window, not once per case
            self._report(
                f"window {format_shape(patch)} is larger than any training patch: "
                f"running {format_shape(capped)}, the largest trained"
            )
        return capped

    @property
    def trained_mirrored(self) -> bool:
        """Whether training mirrored its patches (runs saved before augmentation did not, nor do
        runs on data whose labels differ by side)."""
        return parse_augment(str(self.config.get("augment", "none"))).p_mirror > 0 and not self.mirrored_pairs

    @property
    def mirrored_pairs(self) -> list[Any]:
        """The training dataset's labels that differ only by side (dataset.json's mirrored_pairs)."""
        path = self.model_dir / "dataset.json"
        return list(load_json(path).get("mirrored_pairs", [])) if path.is_file() else []

    def mirrors(self, tta: str = "none") -> bool:
        """Whether ``tta`` mirrors this model's windows (a refused ``tta`` is one line)."""
        return mirroring_for(tta, self.trained_mirrored, self.mirrored_pairs, str(self.model_dir))

    def network(self, tta: str = "none") -> torch.nn.Module:
        """The network to run: wrapped for test-time mirroring when ``tta`` asks for it, and in
        autocast when the model runs in bfloat16 (:attr:`precision`)."""
        net = Mirrored(self.net, self.plan.ndim) if self.mirrors(tta) else self.net
        return with_precision(net, self.precision)

    def prepare(self, volume: Volume) -> tuple[torch.Tensor, dict]:
        """Resample and normalise a raw volume as in training.

        Returns:
            The image ``(1, C, *spatial)`` and the properties that bring outputs back to its grid.
        """
        if volume.data.shape[0] != self.plan.in_channels:
            raise FlexPatchError(
                f"{volume.path}: has {volume.data.shape[0]} channels, "
                f"the model expects {self.plan.in_channels}"
            )
        image, _, props = preprocess_case(volume, None, self.plan)
        image = with_context(image, props["resampled_affine"], self.context)
        return torch.from_numpy(image)[None], props

    @property
    def context(self) -> str:
        """The location context the model was trained with (none for runs saved before it)."""
        return check_context(str(self.config.get("context", "none")))

    def probabilities(
        self,
        volume: Volume | tuple[torch.Tensor, dict],
        patch_size: Sequence[int] | None = None,
        overlap: float = 0.5,
        blend: str = "gaussian",
        batch_size: int = 4,
        stitch_device: str | None = None,
        progress: bool = False,
        memory: int | None = None,
        tta: str = "none",
    ) -> np.ndarray:
        """Softmax probabilities ``(classes, *spatial)`` on the volume's original grid; a region
        model's sigmoids ``(regions, *spatial)`` (see :meth:`labels`).

        ``volume`` may be the result of :meth:`prepare`, so sweeps preprocess each case once.
        With a ``memory`` budget (bytes), the window (unless ``patch_size`` is given) and the
        window batch (at most ``batch_size``) are planned to fit it (:meth:`plan_window`),
        out-of-memory errors are retried smaller, and the choice is reported on stderr.
        ``tta``: ``mirror`` averages the logits over all mirror images, ``auto`` does when the
        model was trained with mirroring (see :func:`~flexpatch.infer.tta.mirroring_for`).
        """
        args = (patch_size, overlap, blend, batch_size, stitch_device, progress, memory, tta)
        probs = self.segment(volume, *args, probabilities=True)[1]
        if probs is None:  # an explicit check: python -O drops an assert
            raise RuntimeError("segment returned no probabilities although they were asked for")
        return probs

    def segment(
        self,
        volume: Volume | tuple[torch.Tensor, dict],
        patch_size: Sequence[int] | None = None,
        overlap: float = 0.5,
        blend: str = "gaussian",
        batch_size: int = 4,
        stitch_device: str | None = None,
        progress: bool = False,
        memory: int | None = None,
        tta: str = "none",
        probabilities: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The label map on the volume's original grid (:meth:`labels` of :meth:`probabilities`),
        and the probabilities when asked for; the arguments are :meth:`probabilities`'.

        Streamed: the sliding window gives its output slab by slab
        (:func:`~flexpatch.infer.sliding_window.sliding_window_slabs`), and each slab is activated,
        brought back to the original grid (:func:`~flexpatch.data.preprocess.restore_slabs`) and
        turned into labels at once. So besides the image and the label map only a band one window
        deep is held, never the whole image's outputs (gigabytes for a CT at several classes),
        unless the probabilities are asked for.
        """
        image, props = self.prepare(volume) if isinstance(volume, Volume) else volume
        net = self.network(tta)
        run = functools.partial(
            self._streamed, net, image, props, overlap=overlap, blend=blend, progress=progress,
            keep_probabilities=probabilities,
        )  # fmt: skip
        if memory is not None:
            share = memory
            if self.device.type == "cpu":
                share = self._cpu_budget(memory, image, props, patch_size, overlap, probabilities)
            shape = tuple(image.shape[2:])
            return self._within(run, shape, (memory, share), patch_size, overlap, batch_size, stitch_device)
        stitch, window = stitch_device or str(self.device), self.window(patch_size)
        batch = cpu_window_batch(window, batch_size) if self.device.type == "cpu" else batch_size
        return run(WindowChoice(window, batch, stitch, predicted=0, budget=0))

    def _streamed(
        self,
        net: torch.nn.Module,
        image: torch.Tensor,
        props: dict,
        choice: WindowChoice,
        *,
        overlap: float,
        blend: str,
        progress: bool,
        keep_probabilities: bool,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One streamed prediction (:meth:`segment`) with a window choice."""
        shape = tuple(image.shape[2:])
        axis = slab_axis(shape, choice.window, overlap, self.divisor)
        slabs = sliding_window_slabs(
            net, image, choice.window, overlap, blend, choice.batch, divisor=self.divisor,
            device=self.device, stitch_device=choice.stitch_device, axis=axis, progress=progress,
        )  # fmt: skip
        activated = ((row, self._activate(logits)) for row, logits in slabs)
        original = tuple(int(s) for s in props["original_shape"])
        labels = np.empty(original, dtype=label_dtype(self.largest_value + 1))
        probs = None
        # the slabs are inference tensors activated in place: the whole loop in inference mode,
        # not only the generator's own steps
        with torch.inference_mode():
            for row, p in restore_slabs(activated, shape[axis], props, axis):
                where = (*[slice(None)] * axis, slice(row, row + p.shape[axis + 1]))
                labels[where] = self.labels(p)
                if keep_probabilities:
                    if probs is None:
                        probs = np.empty((p.shape[0], *original), dtype=np.float32)
                    probs[(slice(None), *where)] = p
        return labels, probs

    def _activate(self, logits: torch.Tensor) -> np.ndarray:
        """Probabilities of ``(C, *S)`` logits, in place (a slab's band need not be copied): one
        sigmoid per region (regions overlap), else softmax."""
        logits = logits.float()
        if self.plan.regions:
            return logits.sigmoid_().cpu().numpy()
        logits.sub_(logits.amax(0, keepdim=True)).exp_()  # softmax: shifted by the maximum, as torch's
        return logits.div_(logits.sum(0, keepdim=True)).cpu().numpy()

    def labels(self, probs: np.ndarray) -> np.ndarray:
        """The label map of :meth:`probabilities`: the most probable class, or for a region model
        nnU-Net's write-back (:func:`~flexpatch.data.regions.to_labels`)."""
        return to_labels(probs, self.plan.regions_class_order)

    @property
    def label_names(self) -> dict[int, str]:
        """Value -> name of the label maps this model writes (a region model's: its regions')."""
        if self.plan.regions:
            background = next((n for n, v in self.plan.labels.items() if v == 0), "background")
            return written_names(self.plan.regions, self.plan.regions_class_order, background)
        return names_by_value(self.plan.labels)

    @property
    def largest_value(self) -> int:
        """The largest value a label map of this model holds (its type must hold it)."""
        return max(self.plan.regions_class_order, default=self.plan.num_classes - 1)

    def _cpu_budget(
        self,
        budget: int,
        image: torch.Tensor,
        props: dict,
        patch_size: Sequence[int] | None,
        overlap: float,
        probabilities: bool,
    ) -> int:
        """What is left of a CPU budget for the sliding window: there it bounds the whole
        process, so what the process holds now (libraries, the input volume; not the prepared
        image or the weights, which the window's plan counts itself), the label map and the
        streamed slabs' restore (for the largest window) are set aside first; what is left must also
        hold the post-processing, which runs in the window's place once it is done."""
        original = tuple(int(s) for s in props["original_shape"])
        held = resident_bytes() - image.numel() * image.element_size() - weight_bytes(self.net)
        outputs = outputs_bytes(self, original, tuple(image.shape[2:]), patch_size, overlap, probabilities)
        after = postprocess_bytes(self, original)
        return cpu_share(budget, held, outputs, original, after=after)  # (the same floor as check_floor's)

    def _within(
        self,
        run: Callable[[WindowChoice], T],
        shape: tuple[int, ...],
        budgets: tuple[int, int],
        patch_size: Sequence[int] | None,
        overlap: float,
        batch_size: int,
        stitch_device: str | None,
    ) -> T:
        """``run`` with the window and batch planned for the sliding window's share of the budget
        (``budgets``: the whole, the share), retried smaller when it runs out of memory anyway
        (:func:`~flexpatch.infer.within.run_within`); the choice is reported."""
        budget, share = budgets
        choice = self.plan_window(shape, share, patch_size, overlap, batch_size, stitch_device)
        result, ran = run_within(
            run,
            shape,
            choice,
            self.divisor,
            self.device,
            fixed_window=patch_size is not None,
            log=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True),
        )
        fixed = (
            ", at most the training patch (fixed-size model)"
            if self.fixed_size and patch_size is None
            else ""
        )
        aside = f" ({format_bytes(budget - share)} set aside for the rest)" if share != budget else ""
        self._report(
            f"memory {format_bytes(budget)}: {ran.describe()}{fixed}; predicted peak "
            f"{format_bytes(choice.predicted)}, measured {format_bytes(choice.measured or 0)} "
            f"for image {format_shape(shape)}",
            aside,
        )
        return result


def load_model(
    model_dir: str | Path, device: str = "auto", checkpoint: str = "best", precision: str = "float32"
) -> LoadedModel:
    """Rebuild a trained model from its folder (model.json, plan.json, config.json, weights).
    ``precision``: the forward pass's type, ``float32``, ``bfloat16`` or ``auto`` (bfloat16 where
    the device runs it natively; :mod:`flexpatch.infer.precision`)."""
    model_dir = Path(model_dir)
    method = read_method(model_dir)
    if method["method"] != "sliding-window":
        raise FlexPatchError(f"{model_dir}: a {method['method']} model folder, not a sliding-window model")
    spec = ModelSpec.from_json(load_json(model_dir / "model.json"))
    plan = Plan.from_json(load_json(model_dir / "plan.json"))
    config = load_json(model_dir / "config.json")
    if checkpoint not in CHECKPOINTS:
        raise FlexPatchError(f"unknown checkpoint {checkpoint!r}; choose one of {', '.join(CHECKPOINTS)}")
    if plan.regions and spec.out_channels != len(plan.regions):
        # e.g. a cascade's stage folder: trained with softmax on the label values of a region dataset
        raise FlexPatchError(
            f"{model_dir / 'model.json'}: {spec.out_channels} outputs, but plan.json declares "
            f"{len(plan.regions)} regions (one sigmoid output each)"
        )
    dev = resolve_device(device)
    net = build(spec)
    if "window" not in method:
        method.update(legacy_window(model_dir, config, plan.ndim, tuple(net.divisor)))
    path = model_dir / CHECKPOINTS[checkpoint]
    state = load_checkpoint(path, map_location="cpu")
    try:
        net.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FlexPatchError(f"{path}: weights do not fit {model_dir / 'model.json'} ({reason})") from None
    net.to(dev).eval()
    lm = LoadedModel(net, spec, plan, config, dev, model_dir, method)
    lm.precision = resolve_precision(precision, dev)
    return lm


def _loaded(model: LoadedModel | str | Path, device: str, precision: str | None) -> LoadedModel:
    """A model folder loaded (or a loaded model), in ``precision`` when given (None: its own)."""
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    if precision is None:
        return lm
    return dataclasses.replace(lm, precision=resolve_precision(precision, lm.device))


def predict_files(
    model: LoadedModel | str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    patch_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 4,
    device: str = "auto",
    stitch_device: str | None = None,
    save_probabilities: bool = False,
    progress: bool = True,
    memory: str | int | None = None,
    tta: str = "auto",
    postprocess: bool = True,
    precision: str | None = None,
) -> Written:
    """Segment image files into ``CASE.nii.gz`` label maps on each input's grid.

    Probabilities go to ``out_dir/probabilities/CASE.nii.gz`` (classes last; a region model's
    sigmoids, regions last); the label maps carry the plan's label names in their header
    (:func:`~flexpatch.infer.runner.run_prediction`), a region model's written back as nnU-Net
    does (:meth:`LoadedModel.labels`).

    The window, the input files' existence and the output folder are checked before any
    case runs; each output is written atomically, so a failure never leaves a partial file.
    ``memory`` (``"2GB"``, ``"auto"``, bytes) plans the window and window batch per case
    within that budget on the device (:meth:`LoadedModel.plan_window`). ``tta``: test-time
    mirroring, ``auto`` (when trained with mirroring, as nnU-Net), ``mirror`` or ``none``.
    ``postprocess``: apply the model's post-processing (``postprocessing.json``: the classes cut
    to their largest connected component, decided on validation when training ended).
    ``precision``: the forward pass's type (:func:`load_model`); None: the model's own.
    """
    lm = _loaded(model, device, precision)
    mirrored = lm.mirrors(tta)  # a refused --tta fails before any case runs
    if memory is not None:
        memory = parse_budget(memory, lm.device)
    window = lm.window(patch_size)
    cases = cases_for(inputs, lm.plan.in_channels, out_dir)
    chosen = window if memory is None or patch_size is not None else None
    if memory is not None:
        check_floors(lm, cases, memory, chosen, overlap, save_probabilities)

    def segment(volume: Volume) -> Prediction:
        labels, probs = lm.segment(
            volume, chosen, overlap, blend, batch_size, stitch_device,
            memory=memory, tta=tta, probabilities=save_probabilities,
        )  # fmt: skip
        return Prediction(labels, probs)

    return run_prediction(
        cases,
        out_dir,
        lm.plan.ndim,
        segment,
        label_names=lm.label_names,
        save_probabilities=save_probabilities,
        progress=progress,
        describe=f"predict {chosen or 'within the memory budget'}{' mirrored' * mirrored}"
        f"{' bfloat16' * (lm.precision == torch.bfloat16)}",
        largest_component=read_postprocessing(lm.model_dir) if postprocess else (),
    )
