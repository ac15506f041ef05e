"""Start a training run from another model's weights (the ViT token-size paper: pretrain on large
lesions, fine-tune on small).

Every tensor of the new network whose name and shape match one in the source model
folder is copied; the rest keep their fresh initialisation and are listed with the
reason. A UNETR source with another token size or input size is first converted by
:func:`flexpatch.models.unetr.resize_tokens` (FlexiViT's resize), so a model pretrained
at token 16 starts a fine-tune at token 8. Loaded parameters may be frozen or given a
smaller learning rate. What was loaded is saved as ``transfer.json`` in the new model
folder, where a resumed run reads it back to rebuild the same optimiser groups.

The source may also be weights from elsewhere: a plain ``state_dict`` file (``.pt``/``.pth``
holding tensors by name, possibly under ``model``, ``state_dict`` or ``network`` as
checkpoint writers keep it, DataParallel's ``module.`` prefix dropped), or a MONAI bundle
folder, whose network weights are ``models/model.pt``. MONAI's networks (dynunet, segresnet,
basicunet, swinunetr) are registered as MONAI builds them, so their tensor names match.
Every source is read with ``torch.load(weights_only=True)``
(:func:`~flexpatch.checkpoint.load_checkpoint`): a file naming code is refused, never unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexpatch.checkpoint import BEST, load_checkpoint
from flexpatch.data.io import load_json, save_json
from flexpatch.errors import FlexPatchError
from flexpatch.models import ModelSpec, build
from flexpatch.runtime import console

TRANSFER = "transfer.json"
BUNDLE_WEIGHTS = Path("models") / "model.pt"  # a MONAI bundle's network weights
_WRAPPERS = ("model", "state_dict", "network")  # where checkpoint writers keep the state_dict
KINDS = ("model folder", "weights file", "MONAI bundle")


@dataclass(frozen=True)
class TransferReport:
    """What :func:`load_matching` did.

    Attributes:
        source: the source model folder.
        loaded: parameter and buffer names copied from it.
        skipped: ``(name, reason)`` of the new network's tensors left as initialised.
        unused: source tensors with no counterpart.
        resized: ``(old, new)`` token sizes when a UNETR source was resized; else None.
        kind: what the source is (:data:`KINDS`).
    """

    source: str
    loaded: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    unused: tuple[str, ...]
    resized: tuple[list[int], list[int]] | None = None
    kind: str = "model folder"

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "loaded": list(self.loaded),
            "skipped": [list(s) for s in self.skipped],
            "unused": list(self.unused),
            "resized": None if self.resized is None else list(self.resized),
            "kind": self.kind,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TransferReport:
        resized = d.get("resized")
        return cls(
            str(d["source"]),
            tuple(d["loaded"]),
            tuple((str(a), str(b)) for a, b in d["skipped"]),
            tuple(d["unused"]),
            None if resized is None else (list(resized[0]), list(resized[1])),
            str(d.get("kind", "model folder")),  # transfer.json written before other sources
        )

    def describe(self) -> str:
        resized = f" (UNETR tokens resized {self.resized[0]} -> {self.resized[1]})" if self.resized else ""
        kind = "" if self.kind == "model folder" else f" ({self.kind})"
        text = f"init from {self.source}{kind}{resized}: loaded {len(self.loaded)} tensors"
        text += f", skipped {len(self.skipped)}"
        if self.skipped:
            text += ": " + "; ".join(f"{name} ({why})" for name, why in self.skipped[:8])
            text += f"; and {len(self.skipped) - 8} more" if len(self.skipped) > 8 else ""
        if self.unused:  # a bundle's extra heads or another naming: worth seeing at once
            text += f"; {len(self.unused)} source tensors unused"
        return text


def _source_kind(source: Path) -> tuple[str, Path]:
    """Which kind of source ``source`` is (:data:`KINDS`), and the file holding its weights."""
    if source.is_file():
        return "weights file", source
    if (source / "model.json").is_file():
        return "model folder", source / BEST
    if (source / BUNDLE_WEIGHTS).is_file():
        return "MONAI bundle", source / BUNDLE_WEIGHTS
    if (source / "models" / "model.ts").is_file():
        raise FlexPatchError(
            f"{source}: a MONAI bundle with TorchScript weights only (models/model.ts), which is code; "
            "save its state_dict as models/model.pt to initialise from it"
        )
    if not source.exists():
        raise FlexPatchError(
            f"{source}: not found (a model folder, MONAI bundle or weights file to initialise from)"
        )
    raise FlexPatchError(
        f"{source}: not a model folder (no model.json), a MONAI bundle (no {BUNDLE_WEIGHTS}) "
        "or a weights file to initialise from"
    )


def plain_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors by name in a weights file: a bare state_dict or one kept under ``model``,
    ``state_dict`` or ``network``; DataParallel's ``module.`` prefix dropped."""
    state: dict[str, Any] = load_checkpoint(path, map_location="cpu")  # weights only: no code runs
    for key in _WRAPPERS:
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise FlexPatchError(f"{path}: holds no tensors by name (not a state_dict of network weights)")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def _source_state(
    source: Path, target: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], set[str], Any, str]:
    """The source's weights (token-resized to ``target`` if both are UNETR model folders), the
    names new at the resized token size, the resize and the kind of source."""
    kind, weights = _source_kind(source)
    if kind != "model folder":
        return plain_state(weights), set(), None, kind
    state, fresh, change = _folder_state(source, target)
    return state, fresh, change, kind


def _folder_state(model_dir: Path, target: torch.nn.Module) -> tuple[dict[str, torch.Tensor], set[str], Any]:
    """A model folder's weights, token-resized to ``target`` if both are UNETRs."""
    spec = ModelSpec.from_json(load_json(model_dir / "model.json"), source=model_dir / "model.json")
    state = load_checkpoint(model_dir / BEST, map_location="cpu")["model"]
    tspec = getattr(target, "spec", None)
    if spec.name != "unetr" or tspec is None or tspec.name != "unetr" or "hyper" in spec.kwargs:
        return state, set(), None
    from flexpatch.models.unetr import resize_tokens

    source = build(spec)
    source.load_state_dict(state)
    if (source.token_size, source.img_size) == (target.token_size, target.img_size):
        return state, set(), None
    resized = resize_tokens(source, target.token_size, target.img_size)
    change = (
        (list(source.token_size), list(target.token_size)) if source.token_size != target.token_size else None
    )
    return resized.state_dict(), set(resized.fresh_parameters), change


def load_matching(net: torch.nn.Module, model_dir: str | Path) -> TransferReport:
    """Copy every tensor of ``model_dir``'s weights that matches ``net`` by name and shape: a model
    folder's best checkpoint, a MONAI bundle's ``models/model.pt`` or a weights file."""
    model_dir = Path(model_dir)
    source, fresh, change, kind = _source_state(model_dir, net)
    state = net.state_dict()
    loaded, skipped = [], []
    for name, value in state.items():
        if name in fresh:
            skipped.append((name, "new at the resized token size"))
        elif name not in source:
            skipped.append((name, "not in the source"))
        elif source[name].shape != value.shape:
            skipped.append(
                (name, f"shape {tuple(source[name].shape)} in the source, {tuple(value.shape)} here")
            )
        else:
            state[name] = source[name]
            loaded.append(name)
    if not loaded:
        # the first names of each side: another naming (a wrapper's prefix) shows at once
        ours, theirs = ", ".join(list(state)[:2]), ", ".join(list(source)[:2])
        raise FlexPatchError(
            f"{model_dir}: no tensor matches the new network by name and shape "
            f"(the source has {theirs}, ...; the network {ours}, ...)"
        )
    net.load_state_dict(state)
    unused = tuple(k for k in source if k not in state)
    return TransferReport(str(model_dir), tuple(loaded), tuple(skipped), unused, change, kind)


def initialise(
    net: torch.nn.Module, config: Any, out_dir: Path, resume: bool, write: bool = True
) -> frozenset[str]:
    """Apply ``config.init_from`` to ``net``; return the names of the loaded parameters.

    A fresh run loads the weights and writes ``transfer.json`` (unless not ``write``: a process
    other than torchrun's main one); a resumed run reads that file (the checkpoint restores the
    weights). Loaded parameters are frozen when ``config.freeze_loaded``.
    """
    if not config.init_from:
        return frozenset()
    if resume and (out_dir / TRANSFER).is_file():
        report = TransferReport.from_json(load_json(out_dir / TRANSFER))
    else:
        report = load_matching(net, config.init_from)
        if write:
            save_json(out_dir / TRANSFER, report.to_json())
            console.print(report.describe(), soft_wrap=True, highlight=False, markup=False)
    params = {name for name, _ in net.named_parameters()}
    loaded = frozenset(n for n in report.loaded if n in params)
    if config.freeze_loaded:
        for name, p in net.named_parameters():
            if name in loaded:
                p.requires_grad_(False)
    return loaded


def param_groups(
    net: torch.nn.Module, lr: float, loaded: frozenset[str], scale: float
) -> list[dict[str, Any]]:
    """Optimiser groups: loaded parameters at ``lr * scale``, the others at ``lr``.

    Without loaded parameters, one group of all of them, as before transfer existed (so
    older checkpoints resume); with them, frozen parameters are left out.
    """
    if not loaded:
        return [{"params": list(net.parameters()), "lr": lr}]
    fresh = [p for n, p in net.named_parameters() if p.requires_grad and n not in loaded]
    reused = [p for n, p in net.named_parameters() if p.requires_grad and n in loaded]
    if not fresh and not reused:
        raise FlexPatchError("every parameter is frozen: nothing left to train (drop --freeze-loaded)")
    groups = [{"params": fresh, "lr": lr}] if fresh else []
    return groups + ([{"params": reused, "lr": lr * scale}] if reused else [])
