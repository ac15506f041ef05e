"""Cross-validation as nnU-Net: splits_final.json, train --fold K|all, validation predictions per fold,
and ensembles of folds (or model folders) that average the probabilities."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import run_cli
from flexpatch.data.io import read_image
from flexpatch.errors import FlexPatchError
from flexpatch.infer.ensemble import expand_models, predict_ensemble
from flexpatch.infer.predictor import load_model
from flexpatch.train.config import TrainConfig
from flexpatch.train.folds import SPLITS_FILE, ensure_splits, fold_cases, kfold, split_for
from flexpatch.train.loop import split_cases, train

torch.set_num_threads(1)

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}
IDS = [f"case_{i:03d}" for i in range(11)]


def tiny_config(fold: int | str | None) -> TrainConfig:
    return TrainConfig(model_kwargs=TINY, patch="16", steps=2, batch=2, val_every=2, workers=0, fold=fold)


def test_kfold_is_nnunets_seeded_split() -> None:
    splits = kfold(list(reversed(IDS)), 5)  # the ids are sorted first
    assert splits == kfold(IDS, 5)  # deterministic
    order = np.arange(len(IDS))
    np.random.RandomState(12345).shuffle(order)  # sklearn's KFold(shuffle=True, random_state=12345)
    cuts = np.cumsum([0, 3, 2, 2, 2, 2])  # 11 cases: the first fold one larger
    for k, split in enumerate(splits):
        assert split["val"] == [IDS[i] for i in sorted(order[cuts[k] : cuts[k + 1]])]
        assert split["train"] == [c for c in IDS if c not in split["val"]]
    assert sorted(c for s in splits for c in s["val"]) == IDS
    with pytest.raises(FlexPatchError, match="cannot make 5 folds"):
        kfold(IDS[:4], 5)


def test_splits_file_is_written_once_and_a_users_is_honoured(tmp_path: Path) -> None:
    path = ensure_splits(tmp_path, IDS)
    assert path == tmp_path / SPLITS_FILE and json.loads(path.read_text()) == kfold(IDS)
    edited = [{"train": IDS[2:], "val": IDS[:2]}, {"train": IDS[:2], "val": IDS[2:]}]
    path.write_text(json.dumps(edited))
    ensure_splits(tmp_path, IDS)
    assert json.loads(path.read_text()) == edited  # never overwritten
    cases = [tmp_path / f"{c}.npz" for c in IDS]
    assert fold_cases(cases, tmp_path, 0) == (cases[2:], cases[:2])
    assert fold_cases(cases, tmp_path, "all") == (cases, cases)
    with pytest.raises(FlexPatchError, match="holds 2 folds, not 5"):
        ensure_splits(tmp_path, IDS, 5)
    with pytest.raises(FlexPatchError, match="not fold 2"):
        fold_cases(cases, tmp_path, 2)
    # without a fold, the val_fraction split of before, unchanged
    assert split_for(cases, tmp_path, tiny_config(None)) == split_cases(cases, 0.2, 0)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{not json", "invalid JSON"),
        ('{"train": []}', "non-empty list"),
        ('[{"train": ["case_000"]}]', "fold 0 needs 'train' and 'val'"),
        ('[{"train": ["case_000"], "val": ["nope"]}]', "lacks: nope"),
    ],
)
def test_a_malformed_splits_file_is_one_line(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / SPLITS_FILE).write_text(text)
    with pytest.raises(FlexPatchError, match=needle) as e:
        ensure_splits(tmp_path, IDS)
    assert str(tmp_path / SPLITS_FILE) in str(e.value) and "\n" not in str(e.value)


def test_old_configs_load_without_a_fold() -> None:
    old = {k: v for k, v in tiny_config(None).to_json().items() if k != "fold"}
    assert TrainConfig.from_json(old).fold is None
    assert tiny_config("all").fold == "all"
    with pytest.raises(FlexPatchError, match="fold must be"):
        tiny_config("1")


@pytest.fixture(scope="module")
def folds(tiny_abdomen: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the 3D phantom (its splits file is written here, not in the shared fixture) and a
    2-fold cross-validation of 2 steps per fold in PARENT/fold_0, PARENT/fold_1."""
    data = tmp_path_factory.mktemp("cv") / "data"
    shutil.copytree(tiny_abdomen, data, ignore=shutil.ignore_patterns(".flexpatch_cache"))
    ids = [p.name.removesuffix(".nii.gz") for p in (data / "labelsTr").iterdir()]
    ensure_splits(data, ids, 2)
    parent = data.parent / "models"
    for k in (0, 1):
        train(data, parent / f"fold_{k}", tiny_config(k), device="cpu", progress=False)
    return data, parent


def test_each_fold_validates_on_its_split_and_predicts_it(folds: tuple[Path, Path]) -> None:
    data, parent = folds
    splits = json.loads((data / SPLITS_FILE).read_text())
    for k in (0, 1):
        config = json.loads((parent / f"fold_{k}" / "config.json").read_text())
        assert config["fold"] == k
        written = sorted(p.name for p in (parent / f"fold_{k}" / "validation").glob("*.nii.gz"))
        assert written == sorted(f"{c}.nii.gz" for c in splits[k]["val"])


def test_the_ensemble_averages_the_folds_probabilities(folds: tuple[Path, Path], tmp_path: Path) -> None:
    data, parent = folds
    assert expand_models([parent]) == [parent / "fold_0", parent / "fold_1"]
    image = sorted((data / "imagesTs").iterdir())[0]
    window = (24, 24, 24)  # any window, not the trained one
    predict_ensemble([parent], [image], tmp_path, window, save_probabilities=True, progress=False,
                     device="cpu", tta="none", postprocess=False)  # fmt: skip
    models = [load_model(parent / f"fold_{k}", device="cpu") for k in (0, 1)]
    volume = read_image(image, ndim=3)
    by_hand = np.mean([m.segment(volume, window, probabilities=True)[1] for m in models], axis=0)
    case = image.name.removesuffix("_0000.nii.gz")
    written = np.moveaxis(np.asarray(nib.load(tmp_path / "probabilities" / f"{case}.nii.gz").dataobj), -1, 0)
    np.testing.assert_allclose(written, by_hand, atol=1e-6)
    labels = np.asarray(nib.load(tmp_path / f"{case}.nii.gz").dataobj)
    assert np.array_equal(labels, models[0].labels(by_hand))


def test_cli_trains_a_fold_and_predicts_an_ensemble(folds: tuple[Path, Path], tmp_path: Path) -> None:
    data, parent = folds
    options = json.dumps(TINY)
    flags = ["--patch", "16", "--steps", "2", "--batch", "2", "--val-every", "2", "--workers", "0"]
    done = run_cli("train", data, "--out", tmp_path / "cv", "--fold", "all", "--options", options,
                   *flags, "--device", "cpu")  # fmt: skip
    assert done.returncode == 0, done.stderr
    fold_all = tmp_path / "cv" / "fold_all"
    assert json.loads((fold_all / "config.json").read_text())["fold"] == "all"
    image = sorted((data / "imagesTs").iterdir())[0]
    done = run_cli("predict", parent / "fold_0", fold_all, image, "--out", tmp_path / "pred", "--tta", "none")
    assert done.returncode == 0, done.stderr
    assert "ensemble of 2" in done.stdout
    kept = (data / SPLITS_FILE).read_text()
    (data / SPLITS_FILE).write_text("[]")
    done = run_cli("train", data, "--out", tmp_path / "bad", "--fold", "0", "--options", options, *flags)
    (data / SPLITS_FILE).write_text(kept)  # the module's other tests read it
    assert done.returncode == 2
    assert f"{data / SPLITS_FILE}: needs a non-empty list" in done.stderr


def test_2d_folds_ensemble(tiny_cells: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_cells, data, ignore=shutil.ignore_patterns(".flexpatch_cache"))
    ids = [p.name.removesuffix(".nii.gz") for p in (data / "labelsTr").iterdir()]
    ensure_splits(data, ids, 2)
    for k in (0, 1):
        config = dataclasses.replace(tiny_config(k), patch="32")
        train(data, tmp_path / "models" / f"fold_{k}", config, device="cpu", progress=False)
    image = sorted((data / "imagesTs").iterdir())[0]
    written = predict_ensemble([tmp_path / "models"], [image], tmp_path / "pred", progress=False,
                               device="cpu", tta="none", postprocess=False)  # fmt: skip
    models = [load_model(tmp_path / "models" / f"fold_{k}", device="cpu") for k in (0, 1)]
    volume = read_image(image, ndim=2)
    by_hand = np.mean([m.segment(volume, probabilities=True)[1] for m in models], axis=0)
    assert np.array_equal(read_image(written[0], ndim=2).data[0], models[0].labels(by_hand))


def _fold_dataset(source: Path, folder: Path) -> tuple[Path, list[dict]]:
    """A copy of a phantom with a 2-fold splits_final.json of its own."""
    data = folder / "data"
    shutil.copytree(source, data, ignore=shutil.ignore_patterns(".flexpatch_cache"))
    ids = [p.name.removesuffix(".nii.gz") for p in (data / "labelsTr").iterdir()]
    return data, json.loads(ensure_splits(data, ids, 2).read_text())


def _validation_cases(folder: Path) -> list[str]:
    return sorted(p.name.removesuffix(".nii.gz") for p in (folder / "validation").glob("*.nii.gz"))


def test_cli_trains_a_cascade_fold_on_its_split(tiny_cells: Path, tmp_path: Path) -> None:
    """2D: ``train --cascade sts --fold 1`` trains into OUT/fold_1 on the fold's training cases,
    validates on its validation cases and predicts them with the cascade (its boxes file too)."""
    data, splits = _fold_dataset(tiny_cells, tmp_path)
    done = run_cli(
        "train", data, "--out", tmp_path / "cv", "--cascade", "sts", "--fold", 1, "--input-size", 16,
        "--steps", 2, "--batch", 2, "--device", "cpu", "--options", json.dumps(TINY),
        "--cascade-options", '{"fine_steps": 1, "min_side": 3}',
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    fold = tmp_path / "cv" / "fold_1"
    assert json.loads((fold / "cascade.json").read_text())["config"]["train"]["fold"] == 1
    train_ids, val_ids = splits[1]["train"], splits[1]["val"]
    assert f"on {len(train_ids)} cases (val {len(val_ids)})" in done.stdout + done.stderr
    assert _validation_cases(fold) == sorted(val_ids)
    assert (fold / "validation" / "boxes.json").is_file()  # written by the cascade's predictor


def test_3d_cascade_folds_and_their_ensemble(tiny_abdomen: Path, tmp_path: Path) -> None:
    """3D, Python API: each fold's split (not the val_fraction one) and its validation predictions;
    the folds' ensemble writes the mean of the cascades' fused probabilities, and its labels."""
    from flexpatch.cascade.config import CascadeConfig
    from flexpatch.cascade.infer import load_cascade
    from flexpatch.cascade.train import train_cascade

    data, splits = _fold_dataset(tiny_abdomen, tmp_path)
    for k in (0, 1):
        config = CascadeConfig.of(input_size=16, steps=2, batch=2, model_kwargs=TINY, fold=k, fine_steps=1)
        train_cascade(data, tmp_path / "models" / f"fold_{k}", config, device="cpu", progress=False)
        assert _validation_cases(tmp_path / "models" / f"fold_{k}") == sorted(splits[k]["val"])
    image = sorted((data / "imagesTs").iterdir())[0]
    predict_ensemble([tmp_path / "models"], [image], tmp_path / "pred", save_probabilities=True,
                     progress=False, device="cpu", tta="none", postprocess=False)  # fmt: skip
    cascades = [load_cascade(tmp_path / "models" / f"fold_{k}", device="cpu") for k in (0, 1)]
    volume = read_image(image, ndim=3)
    by_hand = np.mean([c.predict(volume, batch_size=4).probabilities for c in cascades], axis=0)
    case = image.name.removesuffix("_0000.nii.gz")
    written = np.moveaxis(
        np.asarray(nib.load(tmp_path / "pred" / "probabilities" / f"{case}.nii.gz").dataobj), -1, 0
    )
    np.testing.assert_allclose(written, by_hand, atol=1e-6)
    labels = np.asarray(nib.load(tmp_path / "pred" / f"{case}.nii.gz").dataobj)
    assert np.array_equal(labels, cascades[0].rough.labels(by_hand))
    with pytest.raises(FlexPatchError, match="no window"):
        predict_ensemble([tmp_path / "models"], [image], tmp_path / "p2", (16, 16, 16), device="cpu")


def test_cli_trains_a_patchwork_fold_on_its_split(tiny_cells: Path, tmp_path: Path) -> None:
    """2D: ``train --patchwork --fold 0``: OUT/fold_0, the fold's validation cases scored and
    predicted by the patchwork (the others trained on)."""
    data, splits = _fold_dataset(tiny_cells, tmp_path)
    done = run_cli(
        "train", data, "--out", tmp_path / "cv", "--patchwork", "--fold", 0, "--depth", 2, "--matrix", 8,
        "--rounds", 1, "--num-patches", 2, "--batch", 2, "--options", json.dumps(TINY), "--device", "cpu",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    fold = tmp_path / "cv" / "fold_0"
    assert json.loads((fold / "patchwork.json").read_text())["config"]["fold"] == 0
    assert _validation_cases(fold) == sorted(splits[0]["val"])


def test_cli_predicts_with_an_ensemble_of_patchwork_folds(tiny_cells: Path, tmp_path: Path) -> None:
    """2D: ``predict CV_PARENT IMAGES`` averages the patchwork folds' stitched probabilities on their
    output grid (each fold's own probabilities averaged by hand) and writes the labels of the mean;
    a patchwork beside a sliding-window model is refused in one line."""
    from flexpatch.patchwork.predict import predict_patchwork_files

    data, _ = _fold_dataset(tiny_cells, tmp_path)
    for k in (0, 1):
        done = run_cli(
            "train", data, "--out", tmp_path / "cv", "--patchwork", "--fold", k, "--depth", 2, "--matrix", 8,
            "--rounds", 1, "--num-patches", 2, "--batch", 2, "--options", json.dumps(TINY), "--device", "cpu",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    images = tiny_cells / "imagesTs"
    done = run_cli("predict", tmp_path / "cv", images, "--out", tmp_path / "ens", "--probabilities",
                   "--device", "cpu", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["models"]) == 2
    singles = [
        predict_patchwork_files(
            tmp_path / "cv" / f"fold_{k}",
            [images],
            tmp_path / f"one{k}",
            device="cpu",
            progress=False,
            save_probabilities=True,
        )  # fmt: skip
        for k in (0, 1)
    ]
    for path in singles[0]:
        name = path.name.replace(".png", ".nii.gz")
        probs = [np.asarray(nib.load(tmp_path / f"one{k}" / "probabilities" / name).dataobj) for k in (0, 1)]
        mean = np.asarray(nib.load(tmp_path / "ens" / "probabilities" / name).dataobj)
        np.testing.assert_allclose(mean, (probs[0] + probs[1]) / 2, atol=1e-6)
        labels = read_image(next((tmp_path / "ens").glob(path.name.split(".")[0] + ".*"))).data[0]
        np.testing.assert_array_equal(labels, np.moveaxis(mean, -1, 0).argmax(0).reshape(labels.shape))
    model = tmp_path / "plain"
    train(data, model, TrainConfig(model_kwargs=TINY, patch="16", steps=1, batch=1, workers=0), device="cpu",
          progress=False)  # fmt: skip
    mixed = run_cli("predict", tmp_path / "cv" / "fold_0", model, images, "--out", tmp_path / "mixed")
    assert mixed.returncode == 2 and mixed.stderr.strip().count("\n") == 0, mixed.stderr
    assert "averaged only with patchworks" in mixed.stderr and not (tmp_path / "mixed").exists()


def test_a_3d_patchwork_fold_through_the_api(tiny_abdomen: Path, tmp_path: Path) -> None:
    """3D, Python API: fold 1 trains on its split and predicts its validation cases; a fold that is
    neither a number nor "all" is refused."""
    from flexpatch.patchwork.config import PatchworkConfig
    from flexpatch.patchwork.train import train_patchwork

    data, splits = _fold_dataset(tiny_abdomen, tmp_path)
    scheme = {"depth": 2, "matrix": [8, 8, 8]}
    config = PatchworkConfig(scheme=scheme, block_options=TINY, rounds=1, num_patches=2, batch_size=2, fold=1)
    train_patchwork(data, tmp_path / "fold_1", config, device="cpu", progress=False)
    assert _validation_cases(tmp_path / "fold_1") == sorted(splits[1]["val"])
    with pytest.raises(FlexPatchError, match="fold must be"):
        PatchworkConfig(scheme=scheme, fold="last").check()


def test_a_3d_ensemble_of_patchworks_through_the_api(tiny_abdomen: Path, tmp_path: Path) -> None:
    """3D, Python API: two folds' mean probabilities, against each member's own; a member of
    another scheme is refused in one line naming its folder."""
    from flexpatch.patchwork.config import PatchworkConfig
    from flexpatch.patchwork.predict import load_patchworks, predict_patchwork_files
    from flexpatch.patchwork.train import train_patchwork

    data, _ = _fold_dataset(tiny_abdomen, tmp_path)
    scheme = {"depth": 2, "matrix": [8, 8, 8]}
    for k in (0, 1):
        config = PatchworkConfig(
            scheme=scheme, block_options=TINY, rounds=1, num_patches=2, batch_size=2, fold=k
        )
        train_patchwork(data, tmp_path / f"fold_{k}", config, device="cpu", progress=False)
    folds = [tmp_path / "fold_0", tmp_path / "fold_1"]
    image = sorted((tiny_abdomen / "imagesTs").iterdir())[:1]
    (ens,) = predict_patchwork_files(folds, image, tmp_path / "ens", device="cpu", progress=False,
                                     save_probabilities=True)  # fmt: skip
    mean = np.asarray(nib.load(tmp_path / "ens" / "probabilities" / ens.name).dataobj)
    own = []
    for k, fold in enumerate(folds):
        (one,) = predict_patchwork_files(fold, image, tmp_path / f"one{k}", device="cpu", progress=False,
                                         save_probabilities=True)  # fmt: skip
        own.append(np.asarray(nib.load(tmp_path / f"one{k}" / "probabilities" / one.name).dataobj))
    members = load_patchworks(folds, device="cpu")
    np.testing.assert_allclose(mean, (own[0] + own[1]) / 2, atol=1e-6)
    labels = np.asarray(nib.load(ens).dataobj)
    values = np.array([0, *members[0].meta["label_values"]])
    np.testing.assert_array_equal(labels, values[mean.argmax(-1)])
    other = PatchworkConfig(scheme={"depth": 2, "matrix": [16, 16, 16]}, block_options=TINY, rounds=1,
                            num_patches=2, batch_size=2)  # fmt: skip
    train_patchwork(data, tmp_path / "other", other, device="cpu", progress=False)
    with pytest.raises(FlexPatchError, match=r"other/patchwork.json: scheme, labels, channels or activation"):
        load_patchworks([folds[0], tmp_path / "other"], device="cpu")
    with pytest.raises(FlexPatchError, match="a patchwork writes on an output grid of its own"):
        predict_ensemble(folds, image, tmp_path / "no", device="cpu")


def test_evaluate_a_parent_of_folds_scores_every_fold_s_validation(
    folds: tuple[Path, Path], tmp_path: Path
) -> None:
    """nnU-Net's cross-validation result: ``evaluate MODELS LABELS`` scores fold_0/validation and
    fold_1/validation together, each case as its own fold scored it; a case two folds predicted is
    one line."""
    from flexpatch.evaluate.metrics import evaluate_folders

    data, parent = folds
    labels = data / "labelsTr"
    together = evaluate_folders(parent, labels, hd95=False, progress=False)
    apart = [
        evaluate_folders(
            parent / f"fold_{k}" / "validation", labels, hd95=False, progress=False, partial=True
        )
        for k in (0, 1)
    ]
    cases = sorted(p.name.removesuffix(".nii.gz") for p in labels.iterdir())
    assert sorted(together.cases) == cases  # every training case, once
    key = lambda row: (row["case"], row["class"])  # noqa: E731
    by_fold = sorted((row for report in apart for row in report.per_case), key=key)
    np.testing.assert_equal(sorted(together.per_case, key=key), by_fold)  # NaN (absent class) equal
    copy = tmp_path / "models"
    shutil.copytree(parent, copy)
    twice = next((copy / "fold_0" / "validation").glob("*.nii.gz"))
    shutil.copy(twice, copy / "fold_1" / "validation" / twice.name)
    with pytest.raises(FlexPatchError, match="is also predicted by"):
        evaluate_folders(copy, labels, hd95=False, progress=False)
