"""Checkpoints: the weights ``train`` writes and ``predict`` reads (below both: predict needs no train code).

Checkpoints are read with ``torch.load(weights_only=True)``: a model folder may come from a stranger,
and full unpickling would run whatever code the file names. Only tensors, plain containers and
NumPy arrays and scalars (the RNG states and the patchwork's hard-mining pool hold them) are let
through; a file naming anything else is refused before any of it is built.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexpatch.data.io import atomic_path
from flexpatch.errors import FlexPatchError

LAST = "model_last.pt"
BEST = "model_best.pt"

# NumPy's array and scalar reconstruction: they build data from bytes and call nothing else.
# NumPy 2 pickles name them under numpy._core, NumPy 1 under numpy.core: allow both spellings.
_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
_NUMPY_DATA: list[Any] = [np.ndarray, np.dtype]
for _name in ("_reconstruct", "scalar"):
    _fn = getattr(_multiarray, _name)
    _NUMPY_DATA += [(_fn, f"numpy._core.multiarray.{_name}"), (_fn, f"numpy.core.multiarray.{_name}")]
# Their dtype classes (e.g. numpy.dtypes.UInt32DType) are named by pickles of some NumPy versions.
_NUMPY_DATA += [type(np.dtype(t)) for t in "?bBhHiIlLqQefdgFDG"]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save through a temporary file, so a crash never leaves a truncated checkpoint.

    A failed write (disk full, I/O error) is one line naming ``path``; the temporary file is
    removed and the checkpoint ``path`` held before, if any, stays as it was (still resumable).
    """
    kept = "; its previous version is kept" if path.is_file() else ""
    try:
        # through a Python file: a failed write then reaches torch as an OSError with its cause,
        # where torch's own file writer says only "PytorchStreamWriter failed writing file"
        with atomic_path(path) as tmp, tmp.open("wb") as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:  # torch's writer may wrap a failed write's OSError
        cause = _os_error(e)
        if cause is None:
            raise
        raise FlexPatchError(f"{path}: cannot write ({cause.strerror or cause}){kept}") from None


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError an exception was raised while handling (torch's C++ writer keeps only that link)."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, refusing (one line, naming the file) anything but data."""
    if not path.is_file():
        raise FlexPatchError(f"{path}: checkpoint not found")
    try:
        # a pickle of another protocol than torch's gets a warning that would break the one-line error
        with torch.serialization.safe_globals(_NUMPY_DATA), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights-only unpickling stops at the first global it does not allow: name it
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        if named:
            raise FlexPatchError(
                f"{path}: refused: it names code ({named.group(1)}), not only weights and data; "
                "only open model folders you trust"
            ) from None
        raise FlexPatchError(f"{path}: unreadable checkpoint (not a torch checkpoint of weights)") from None
    except Exception as e:
        raise FlexPatchError(f"{path}: unreadable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict):
        kind = type(state).__name__
        raise FlexPatchError(f"{path}: not a flexpatch checkpoint (holds a {kind}, not a dict)")
    return state
