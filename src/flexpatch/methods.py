"""The method registry: which training method wrote a model folder, and how to open it.

Every model folder holds ``method.json``: the method's name, the folder format and the default
inference window. ``predict``, ``sweep`` and ``plan`` look the method up here instead of sniffing
files, and a folder written by a newer or foreign method is refused in one line. Folders written
before ``method.json`` existed are recognised by the file that marks each method's complete folder.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexpatch.errors import FlexPatchError

METHOD_FILE = "method.json"
FOLD_PREFIX = "fold_"  # a cross-validation fold's model folder: PARENT/fold_K (nnU-Net's layout)
FORMAT = 1  # the model-folder format this version writes and reads


@dataclass(frozen=True)
class Method:
    """A training method's entry: how to recognise, load and apply its model folders.

    Attributes:
        name: the name written into ``method.json``.
        summary: what the method does, for ``flexpatch methods`` and messages.
        marker: the file only a complete folder of this method holds (for folders without
            ``method.json``).
        loader: ``"module:function"`` taking ``(model_dir, device)`` and returning the loaded model.
        predictor: ``"module:function"`` writing segmentations of image files (see the CLI).
        checker: ``"module:function"`` taking ``model_dir``: refuses a folder whose files hold
            values of the wrong type, in one line, before the loader builds anything.
    """

    name: str
    summary: str
    marker: str
    loader: str
    predictor: str
    checker: str | None = None

    def load(self, model_dir: str | Path, device: str = "auto") -> Any:
        return _resolve(self.loader)(model_dir, device)

    def predict_files(self) -> Callable[..., Any]:
        return _resolve(self.predictor)


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method to the registry (a name registered twice is an error)."""
    if method.name in _METHODS:
        raise FlexPatchError(f"method {method.name!r} is registered already")
    _METHODS[method.name] = method
    return method


def list_methods() -> list[str]:
    return list(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise FlexPatchError(f"unknown method {name!r}; this flexpatch knows {', '.join(_METHODS)}")
    return _METHODS[name]


def write_method(model_dir: Path, name: str, window: tuple[int, ...] | None = None, **extra: Any) -> None:
    """Write ``method.json``: the method, the format and the default window (None: whole image)."""
    from flexpatch.data.io import save_json

    get_method(name)
    info = {"method": name, "format": FORMAT, "window": list(window) if window else None, **extra}
    save_json(model_dir / METHOD_FILE, info)


def read_method(model_dir: str | Path) -> dict[str, Any]:
    """A model folder's ``method.json`` checked by type; for an older folder, what its marker implies.

    Returns:
        ``{"method": name, "format": int, "window": list | None, ...}``; ``window`` is absent for
        folders written before ``method.json`` (each method then derives it from its config).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FlexPatchError(f"{model_dir}: model folder not found")
    path = model_dir / METHOD_FILE
    info = _read_info(path) if path.is_file() else {"method": _legacy_method(model_dir), "format": 0}
    checker = get_method_for(path, info["method"]).checker
    if checker:  # the method's own files, older folders included
        _resolve(checker)(model_dir)
    return info


def _read_info(path: Path) -> dict[str, Any]:
    """``method.json``, checked by type."""
    from flexpatch.data.io import load_json

    info = load_json(path)
    if not isinstance(info, dict) or not isinstance(info.get("method"), str):
        raise FlexPatchError(f"{path}: needs a JSON object with a string 'method'")
    fmt, window = info.get("format"), info.get("window")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt > FORMAT:
        raise FlexPatchError(f"{path}: folder format {fmt!r}; this flexpatch reads up to {FORMAT}, update it")
    if window is not None and not (
        isinstance(window, list) and window and all(isinstance(w, int) and w > 0 for w in window)
    ):
        raise FlexPatchError(f"{path}: 'window' must be null or a list of positive integers, got {window!r}")
    return info


def fold_folders(parent: Path) -> list[Path]:
    """The model folders ``fold_0``, ``fold_1``, ... under ``parent`` (numerically ordered);
    ``fold_all`` only when there is no numbered fold (as nnU-Net, an ensemble is of the
    cross-validation folds)."""
    found = [p for p in parent.glob(f"{FOLD_PREFIX}*") if (p / METHOD_FILE).is_file()]
    numbered = sorted((p for p in found if p.name[len(FOLD_PREFIX) :].isdigit()), key=_fold_number)
    return numbered or [p for p in found if p.name == f"{FOLD_PREFIX}all"]


def _fold_number(path: Path) -> int:
    return int(path.name[len(FOLD_PREFIX) :])


def method_of(model_dir: str | Path) -> Method:
    """The method that wrote ``model_dir``."""
    return get_method(read_method(model_dir)["method"])


def get_method_for(path: Path, name: str) -> Method:
    """:func:`get_method`, with the file that named the method in the message."""
    try:
        return get_method(name)
    except FlexPatchError as e:
        raise FlexPatchError(f"{path}: {e}") from None


def _legacy_method(model_dir: Path) -> str:
    """A folder written before ``method.json``: the method whose marker it holds."""
    for method in _METHODS.values():
        if (model_dir / method.marker).is_file():
            return method.name
    markers = ", ".join(m.marker for m in _METHODS.values())
    raise FlexPatchError(f"{model_dir}: not a flexpatch model folder (no {METHOD_FILE}, {markers})")


def _resolve(target: str) -> Callable[..., Any]:
    """Import ``module:function`` on first use: methods' modules are heavy, ``--help`` must stay fast."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


# Checked in this order for folders without method.json: a cascade or patchwork folder may also
# hold a model.json of its own, a plain folder holds only that.
register_method(
    Method(
        "patchwork",
        "deep neural patchwork: nested patches from coarse to fine, small matrices at every level",
        "patchwork.json",
        "flexpatch.patchwork.predict:load_patchwork",
        "flexpatch.patchwork.predict:predict_patchwork_files",
    )
)
register_method(
    Method(
        "segment-then-segment",
        "a rough network on the downscaled image finds crops for a fine network",
        "cascade.json",
        "flexpatch.cascade.infer:load_cascade",
        "flexpatch.cascade.infer:predict_cascade_files",
    )
)
register_method(
    Method(
        "sliding-window",
        "one network at any window: fixed, random or growing patch sizes, or a patch-size hypernetwork",
        "model.json",
        "flexpatch.infer.predictor:load_model",
        "flexpatch.infer.predictor:predict_files",
        "flexpatch.model_folder:check_sliding_window_folder",
    )
)


def legacy_window(model_dir: Path, config: dict[str, Any], ndim: int, divisor: tuple[int, ...]) -> dict:
    """For a sliding-window folder written before method.json: the default window, whether the
    patch size was fixed and the largest patch, from its config."""
    from flexpatch.axes import per_axis
    from flexpatch.sampling.sizes import FixedSize, parse_patch_spec

    try:
        spec = parse_patch_spec(config["patch"], ndim, divisor, batch=config["batch"], steps=config["steps"])
        val = config.get("val_patch")
    except (KeyError, TypeError) as e:
        raise FlexPatchError(f"{model_dir / 'config.json'}: unreadable training settings ({e})") from None
    window = per_axis(val, ndim, "val_patch") if val else spec.max_size()
    largest = list(spec.max_size())
    return {"window": list(window), "fixed_size": isinstance(spec, FixedSize), "largest": largest}
