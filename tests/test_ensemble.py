"""Ensembles within a memory budget (each model planned in turn, the running sum set aside) and
their post-processing (the members' decision only when they all decided the same)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_cli
from flexpatch.data.io import read_image
from flexpatch.evaluate.postprocess import POSTPROCESSING, keep_largest
from flexpatch.infer.ensemble import predict_ensemble
from flexpatch.infer.predictor import LoadedModel, load_model
from flexpatch.plan.budget import resident_bytes
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import train

torch.set_num_threads(1)

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}


@pytest.fixture(scope="module")
def members(tiny_abdomen: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    """Two tiny 3D models (two training steps, seeds 0 and 1) and a test image."""
    root = tmp_path_factory.mktemp("ensemble")
    dirs = [root / "a", root / "b"]
    for seed, model in enumerate(dirs):
        config = TrainConfig(
            model_kwargs=TINY, patch="16", steps=2, batch=2, val_every=2, workers=0, seed=seed
        )
        train(tiny_abdomen, model, config, device="cpu", progress=False)
    return dirs, sorted((tiny_abdomen / "imagesTs").iterdir())[0]


def _case(image: Path) -> str:
    return image.name.removesuffix("_0000.nii.gz")


def test_each_member_is_planned_within_the_budget_less_the_running_sum(
    members, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the process holds is measured by tracemalloc (numpy's arrays, exactly) instead of the
    resident size (allocator noise): the second member's share is the first's less the sum."""
    dirs, image = members
    run = dict(device="cpu", save_probabilities=True, progress=False, tta="none", postprocess=False)
    predict_ensemble(dirs, [image], tmp_path / "warm", memory=2 * 10**9, **run)  # imports: traced too
    tracemalloc.start()
    traced = lambda: 10**8 + tracemalloc.get_traced_memory()[0]  # noqa: E731
    monkeypatch.setattr("flexpatch.infer.predictor.resident_bytes", traced)
    monkeypatch.setattr("flexpatch.infer.floor.resident_bytes", traced)  # the floor from the headers
    shares, choices = [], []
    budget_of, run_of = LoadedModel._cpu_budget, LoadedModel._streamed

    def spy_budget(self, *args, **kwargs):
        shares.append(budget_of(self, *args, **kwargs))
        return shares[-1]

    def spy_run(self, net, image, props, choice, **kwargs):
        choices.append(choice)
        return run_of(self, net, image, props, choice, **kwargs)

    monkeypatch.setattr(LoadedModel, "_cpu_budget", spy_budget)
    monkeypatch.setattr(LoadedModel, "_streamed", spy_run)
    try:
        predict_ensemble(dirs, [image], tmp_path, memory=2 * 10**8, **run)
    finally:
        tracemalloc.stop()
    models = [load_model(d, device="cpu") for d in dirs]
    volume = read_image(image, ndim=3)
    running_sum = models[0].plan.out_channels * volume.data[0].size * 4  # float32 per class and voxel
    assert len(shares) == 2, shares
    # the sum, and nothing large besides (the first member's calibration leaves ~0.1 MB of objects)
    assert running_sum <= shares[0] - shares[1] <= running_sum + 256 * 1024
    # the mean of the members at the windows and batches planned for them
    by_hand = np.mean(
        [
            m.segment(volume, c.window, batch_size=c.batch, probabilities=True)[1]
            for m, c in zip(models, choices)
        ],
        axis=0,
    )
    written = nib.load(tmp_path / "probabilities" / f"{_case(image)}.nii.gz")
    np.testing.assert_allclose(np.moveaxis(np.asarray(written.dataobj), -1, 0), by_hand, atol=1e-6)
    labels = np.asarray(nib.load(tmp_path / f"{_case(image)}.nii.gz").dataobj)
    np.testing.assert_array_equal(labels, models[0].labels(by_hand))


def test_cli_ensemble_within_a_budget(members, tmp_path: Path) -> None:
    dirs, image = members
    budget = f"{(resident_bytes() + 300 * 10**6) // 10**6}MB"  # this process's, and the CLI's imports
    done = run_cli("predict", *dirs, image, "--out", tmp_path / "pred", "--memory", budget, "--device", "cpu",
                   "--tta", "none", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["segmentations"] == [str(tmp_path / "pred" / f"{_case(image)}.nii.gz")]
    said = [line for line in done.stderr.splitlines() if line.startswith("memory ")]
    assert len(said) == 2, done.stderr  # one choice per member
    done = run_cli("predict", *dirs, image, "--out", tmp_path / "no", "--memory", "1kB", "--device", "cpu")
    assert_one_line_error(done, "memory budget 1.00 kB")
    assert not (tmp_path / "no").exists() or not any((tmp_path / "no").iterdir())


def _decide(model: Path, kept: list[int]) -> None:
    (model / POSTPROCESSING).write_text(json.dumps({"largest_component": kept}))


def test_post_processing_only_when_every_member_decided_the_same(
    members, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dirs, image = members
    case = _case(image)
    run = dict(device="cpu", progress=False, tta="none")
    raw = np.asarray(
        nib.load(predict_ensemble(dirs, [image], tmp_path / "raw", postprocess=False, **run)[0]).dataobj
    )
    # the class whose largest component cutting changes the most, so that the test sees the cut
    changed = {c: int((keep_largest(raw, [c]) != raw).sum()) for c in map(int, np.unique(raw)) if c > 0}
    c = max(changed, key=changed.get)
    assert changed[c] > 0, "the tiny models' predictions are single objects: nothing to cut"
    capsys.readouterr()
    _decide(dirs[0], [c])
    _decide(dirs[1], [c])
    agreed = predict_ensemble(dirs, [image], tmp_path / "same", **run)[0]
    np.testing.assert_array_equal(np.asarray(nib.load(agreed).dataobj), keep_largest(raw, [c]))
    assert "post-processing" not in capsys.readouterr().err
    _decide(dirs[1], [])
    differ = predict_ensemble(dirs, [image], tmp_path / "differ", **run)[0]
    np.testing.assert_array_equal(np.asarray(nib.load(differ).dataobj), raw)
    err = capsys.readouterr().err.strip().splitlines()
    said = "post-processing: none applied, the members decided differently (largest component of:"
    assert err == [f"{said} a {c}; b none)"]
    assert agreed.name == differ.name == f"{case}.nii.gz"


def test_an_ensemble_in_bfloat16_is_the_mean_of_its_members_in_bfloat16(members, tmp_path: Path) -> None:
    """``precision`` reaches every sliding-window member: the ensemble's probabilities are the mean of
    each member's own bfloat16 probabilities (and not the float32 ones)."""
    dirs, image = members
    run = dict(device="cpu", save_probabilities=True, progress=False, tta="none", postprocess=False)
    predict_ensemble(dirs, [image], tmp_path / "half", precision="bfloat16", **run)
    volume = read_image(image, ndim=3)
    own = [load_model(d, device="cpu", precision="bfloat16").probabilities(volume, tta="none") for d in dirs]
    full = [load_model(d, device="cpu").probabilities(volume, tta="none") for d in dirs]
    mean = np.moveaxis(
        np.asarray(nib.load(tmp_path / "half" / "probabilities" / f"{_case(image)}.nii.gz").dataobj), -1, 0
    )
    np.testing.assert_allclose(mean, (own[0] + own[1]) / 2, atol=1e-6)
    assert float(np.abs(mean - (full[0] + full[1]) / 2).max()) > 1e-4  # bfloat16 did run
