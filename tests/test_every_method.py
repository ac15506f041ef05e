"""One test for every registered method, in 2D and 3D: train a few steps, stop, resume, then predict
through the registry's entry point and load the folder as the method's own model.

A method added to :mod:`flexpatch.methods` without a case here fails this test: every method must
train, resume and predict the same way.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from flexpatch.cascade.config import CascadeConfig
from flexpatch.cascade.train import train_cascade
from flexpatch.data.io import read_image
from flexpatch.methods import get_method, list_methods, method_of, read_method
from flexpatch.patchwork.config import PatchworkConfig
from flexpatch.patchwork.train import train_patchwork
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import train

torch.set_num_threads(1)

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}  # divisor 4


def sliding_window(data: Path, out: Path) -> None:
    config = TrainConfig(model_kwargs=TINY, patch="16", steps=2, batch=1, val_every=2, workers=0)
    train(data, out, config, device="cpu", progress=False, stop_after=1)
    assert train(data, out, device="cpu", progress=False, resume=True).steps == 2


def segment_then_segment(data: Path, out: Path) -> None:
    config = CascadeConfig.of(
        input_size=16, steps=1, batch=2, jitter=2, val_every=1, min_side=1, model_kwargs=TINY
    )
    train_cascade(data, out, config, device="cpu", progress=False, stop_after=1)  # the rough stage only
    assert train_cascade(data, out, device="cpu", progress=False, resume=True)["steps"] == 2


def patchwork(data: Path, out: Path) -> None:
    ndim = len(read_image(next((data / "imagesTr").iterdir())).spatial_shape)
    scheme = {"depth": 2, "matrix": [8] * ndim, "fov_rel": [0.8] * ndim}
    config = PatchworkConfig(
        scheme=scheme, block_options=TINY, rounds=1, num_patches=2, batch_size=2, workers=0
    )
    train_patchwork(data, out, config, device="cpu", progress=False)
    # a finished run goes on for one more round
    assert (
        train_patchwork(data, out, device="cpu", progress=False, resume=True, changes={"rounds": 2})["rounds"]
        == 2
    )


TRAIN = {
    "sliding-window": sliding_window,
    "segment-then-segment": segment_then_segment,
    "patchwork": patchwork,
}


def test_every_registered_method_has_a_case_here() -> None:
    assert sorted(TRAIN) == sorted(list_methods())


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", list_methods())
def test_train_resume_predict_load(
    name: str, ndim: int, tiny_cells: Path, tiny_abdomen: Path, tmp_path: Path
) -> None:
    data, model = (tiny_cells if ndim == 2 else tiny_abdomen), tmp_path / "model"
    TRAIN[name](data, model)
    assert method_of(model).name == name and read_method(model)["format"] == 1
    method = get_method(name)
    pred = tmp_path / "pred"
    written = method.predict_files()(
        model, [data / "imagesTs"], pred, device="cpu", save_probabilities=True, progress=False
    )
    assert len(written) == 2
    for path in written:
        source = read_image(data / "imagesTs" / path.name.replace(".nii.gz", "_0000.nii.gz"), ndim)
        image = nib.load(str(path))
        labels = np.asarray(image.dataobj)
        assert labels.shape[:ndim] == source.spatial_shape and np.issubdtype(labels.dtype, np.integer)
        assert (pred / "probabilities" / path.name).is_file()
    assert method.load(model, "cpu") is not None
