"""A sliding-window model folder's JSON files, checked by type before anything is built or loaded.

``model.json`` (the network), ``plan.json`` (the preprocessing) and ``config.json`` (the training
run) are read by different code at different moments; a value of the wrong type in one of them,
or a model name this flexpatch does not know, used to surface as a TypeError deep inside or, worse,
not at all (a config naming an unknown model predicted with exit 0). The method registry runs
:func:`check_sliding_window_folder` whenever it opens such a folder (:func:`flexpatch.methods.read_method`),
so ``predict``, ``sweep``, a cascade's stages and ``--init-from`` all refuse a bad folder in one line
naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flexpatch.data.io import load_json
from flexpatch.errors import FlexPatchError
from flexpatch.schema import check_fields

# plan.json of the versions with one normalisation for all channels: a name and one (lo, hi)
_OLDER_PLAN = {"normalization": str, "ct_window": tuple[float, float] | None}


def check_sliding_window_folder(model_dir: str | Path) -> None:
    """Refuse a folder whose ``model.json``, ``plan.json``, ``config.json`` or ``method.json``
    holds a value of the wrong type or names an unregistered model (one line naming the file).

    A file that is absent is left to the loader, which refuses it as missing when it needs it:
    the method registry also opens folders only to learn their method.
    """
    model_dir = Path(model_dir)
    spec, plan, config = (model_dir / name for name in ("model.json", "plan.json", "config.json"))
    name = check_model_json(spec) if spec.is_file() else None
    if plan.is_file():
        _check_plan(plan)
    if config.is_file():
        _check_config(config, name)
    method = model_dir / "method.json"
    if method.is_file():  # read_method checked the common keys; this method adds two
        info = load_json(method)
        fixed, largest = info.get("fixed_size", False), info.get("largest")
        if not isinstance(fixed, bool):
            raise FlexPatchError(f"{method}: field 'fixed_size' must be true or false, got {fixed!r}")
        if largest is not None and not (
            isinstance(largest, list) and largest and all(type(v) is int and v > 0 for v in largest)
        ):
            raise FlexPatchError(
                f"{method}: field 'largest' must be a list of positive integers, got {largest!r}"
            )


def check_model_json(path: Path) -> str:
    """A ``model.json``'s fields by type and its model name against the registry; returns the name."""
    from flexpatch.models import ModelSpec

    spec = ModelSpec.from_json(load_json(path), source=path)
    _check_registered(path, spec.name)
    return spec.name


def _check_registered(path: Path, name: str, field: str = "name") -> None:
    from flexpatch.models import list_models

    if name not in list_models():
        known = ", ".join(list_models())
        raise FlexPatchError(f"{path}: {field} {name!r} is not a registered model (known: {known})")


def _check_plan(path: Path) -> None:
    from flexpatch.data.preprocess import Plan

    data = load_json(path)
    check_fields(Plan, data, path, older=_OLDER_PLAN)
    try:
        Plan.from_json(data)  # the values: positive spacings, known normalisations, ...
    except FlexPatchError as e:
        raise FlexPatchError(f"{path}: {_without_prefix(str(e), 'plan: ')}") from None


def _check_config(path: Path, model: str | None) -> None:
    """Types only: predicting needs none of the training settings' values, so an older version's
    limits on them must not make its folders unusable; the model must be the one built."""
    from flexpatch.train.config import TrainConfig

    data: dict[str, Any] = check_fields(TrainConfig, load_json(path), path)
    named = data.get("model", model)
    if named is None:
        return
    _check_registered(path, named, "model")
    if model is not None and named != model:
        raise FlexPatchError(
            f"{path}: model {named!r}, but {path.parent / 'model.json'} builds {model!r}; "
            "the folder mixes two runs"
        )


def _without_prefix(text: str, prefix: str) -> str:
    return text[len(prefix) :] if text.startswith(prefix) else text
