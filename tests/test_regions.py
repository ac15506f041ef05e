"""nnU-Net's region-based labels: reading dataset.json, the sigmoid loss, the write-back rule, and a
tiny region model trained and applied end to end (3D and 2D)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flexpatch.data.dataset import load_dataset
from flexpatch.data.preprocess import Plan
from flexpatch.data.regions import region_masks, to_labels, write_back, written_names, written_truth
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.sweep import run_sweep
from flexpatch.infer.predictor import load_model, predict_files
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import train
from flexpatch.train.loss import segmentation_loss

torch.set_num_threads(1)

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}
ABDOMEN_REGIONS = {"background": 0, "organs": [1, 2, 3, 4, 5], "kidneys": [4, 5], "lesion": 6}
ABDOMEN_ORDER = [1, 4, 6]
REGIONS = (("organs", (1, 2, 3, 4, 5)), ("kidneys", (4, 5)), ("lesion", (6,)))


def as_regions(source: Path, dest: Path, labels: dict, order: list[int] | None, **changes: object) -> Path:
    """A copy of a phantom dataset whose dataset.json declares regions over its label values."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".flexpatch_cache"))
    meta = json.loads((dest / "dataset.json").read_text())
    meta.pop("mirrored_pairs", None)
    meta.update(labels=labels, regions_class_order=order, **changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    (dest / "dataset.json").write_text(json.dumps(meta))
    return dest


@pytest.fixture(scope="module")
def abdomen_regions(tiny_abdomen: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return as_regions(tiny_abdomen, tmp_path_factory.mktemp("regions") / "ds", ABDOMEN_REGIONS, ABDOMEN_ORDER)


# ----------------------------------------------------------------------------- dataset.json


def test_region_labels_are_read(abdomen_regions: Path) -> None:
    ds = load_dataset(abdomen_regions)
    assert ds.regions == REGIONS
    assert ds.regions_class_order == (1, 4, 6)
    # the values the files hold, so that load_case's check and the samplers work on them
    assert ds.labels == {"background": 0, **{f"label_{v}": v for v in range(1, 7)}}
    assert (ds.out_channels, ds.num_classes, ds.ignore_label) == (3, 7, None)
    saved = ds.to_json()
    assert saved["regions"] == [["organs", [1, 2, 3, 4, 5]], ["kidneys", [4, 5]], ["lesion", [6]]]
    assert saved["regions_class_order"] == [1, 4, 6]


def test_plain_dataset_has_no_regions(tiny_abdomen: Path) -> None:
    ds = load_dataset(tiny_abdomen)
    assert ds.regions == () and ds.regions_class_order == ()
    assert ds.out_channels == ds.num_classes == 7
    assert "regions" not in ds.to_json()


def test_ignore_label_of_a_region_dataset(tiny_abdomen: Path, tmp_path: Path) -> None:
    labels = {**ABDOMEN_REGIONS, "ignore": 7}
    ds = load_dataset(as_regions(tiny_abdomen, tmp_path / "ds", labels, ABDOMEN_ORDER))
    assert ds.ignore_label == 7 and ds.labels["ignore"] == 7
    assert ds.num_classes == 7 and ds.out_channels == 3


@pytest.mark.parametrize(
    ("labels", "order", "changes", "needles"),
    [
        ({"background": 0, "tumour": [1, 2]}, None, {}, ("tumour", "regions_class_order")),
        (ABDOMEN_REGIONS, [1, 4], {}, ("regions_class_order", "2 values for 3 regions")),
        (ABDOMEN_REGIONS, "1,4,6", {}, ("regions_class_order",)),
        (ABDOMEN_REGIONS, [1, 0, 6], {}, ("regions_class_order",)),
        ({"background": 0, "organs": [], "lesion": 6}, [1, 6], {}, ("organs",)),
        ({"background": 0, "organs": [0, 1], "lesion": 6}, [1, 6], {}, ("organs",)),
        ({"background": 0, "organs": [1, True], "lesion": 6}, [1, 6], {}, ("organs",)),
        ({"organs": [1, 2], "lesion": 6}, [1, 6], {}, ("background",)),
        ({"background": 0}, [], {}, ("no region",)),
        ({**ABDOMEN_REGIONS, "ignore": 5}, ABDOMEN_ORDER, {}, ("ignore",)),
        (ABDOMEN_REGIONS, ABDOMEN_ORDER, {"mirrored_pairs": [["a", "b"]]}, ("mirrored_pairs",)),
    ],
    ids=[
        "list-without-order", "order-too-short", "order-not-a-list", "order-zero", "empty-region",
        "region-with-background", "bool-value", "no-background", "no-region", "ignore-inside",
        "mirrored-pairs",
    ],
)  # fmt: skip
def test_bad_region_declarations_are_refused_in_one_line(
    tiny_abdomen: Path, tmp_path: Path, labels: dict, order: object, changes: dict, needles: tuple[str, ...]
) -> None:
    root = as_regions(tiny_abdomen, tmp_path / "ds", labels, order, **changes)  # type: ignore[arg-type]
    with pytest.raises(FlexPatchError) as err:
        load_dataset(root)
    msg = str(err.value)
    assert "\n" not in msg and "dataset.json" in msg
    for needle in needles:
        assert needle in msg


def test_plan_keeps_regions_and_older_plans_load(tmp_path: Path) -> None:
    base = {
        "ndim": 3, "in_channels": 1, "num_classes": 7, "labels": {"background": 0, "label_1": 1},
        "target_spacing": [1.0, 1.0, 1.0], "normalization": ["zscore"], "ct_window": [None],
        "median_shape": [8, 8, 8],
    }  # fmt: skip
    old = Plan.from_json(base)  # a plan.json written before regions
    assert old.regions == () and old.out_channels == 7
    assert old.to_json() == base  # unchanged: its digest names the same cache folder
    plan = Plan.from_json(
        {**base, "regions": [["organs", [1, 2]], ["lesion", [6]]], "regions_class_order": [1, 6]}
    )
    assert plan.regions == (("organs", (1, 2)), ("lesion", (6,))) and plan.out_channels == 2
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    assert plan.digest() != old.digest()
    with pytest.raises(FlexPatchError, match="regions_class_order"):
        Plan.from_json({**base, "regions": [["organs", [1, 2]]], "regions_class_order": [1, 6]})


# ----------------------------------------------------------------------------- loss


def _reference(logits: torch.Tensor, label: torch.Tensor, care: torch.Tensor, batch: bool) -> torch.Tensor:
    """Sigmoid Dice + BCE by hand (numpy's isin for the masks), ignored voxels left out."""
    values = [v for _, v in REGIONS]
    target = torch.from_numpy(np.stack([np.isin(label[:, 0].numpy(), v) for v in values], 1)).float()
    p, t = torch.sigmoid(logits) * care, target * care
    dims = (0, 2, 3, 4) if batch else (2, 3, 4)
    dice = 1 - (2 * (p * t).sum(dims) + 1e-5) / (p.sum(dims) + t.sum(dims) + 1e-5)
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * care).sum()
    return dice.mean() + bce / (care.sum() * len(values))


@pytest.mark.parametrize("batch_dice", [False, True])
def test_region_loss_equals_the_reference(batch_dice: bool) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6, generator=g)
    label = torch.randint(0, 7, (2, 1, 4, 5, 6), generator=g)
    values = [v for _, v in REGIONS]
    got = segmentation_loss(batch_dice, regions=values)(logits, label)
    torch.testing.assert_close(got, _reference(logits, label, torch.ones_like(label).float(), batch_dice))
    # and MONAI's own sigmoid Dice + torch's BCE module, as the plain definition
    from monai.losses import DiceLoss

    target = torch.cat([sum(label == v for v in vs) > 0 for vs in values], 1).float()
    monai = DiceLoss(sigmoid=True, batch=batch_dice)(logits, target) + torch.nn.BCEWithLogitsLoss()(
        logits, target
    )
    torch.testing.assert_close(got, monai)


def test_region_loss_leaves_out_the_ignore_label() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 5, 6, generator=g, requires_grad=True)
    label = torch.randint(0, 8, (2, 1, 4, 5, 6), generator=g)  # 7: ignore
    loss = segmentation_loss(False, ignore=7, regions=[v for _, v in REGIONS])(logits, label)
    torch.testing.assert_close(loss, _reference(logits, label, (label != 7).float(), False))
    loss.backward()
    ignored = (label == 7).expand_as(logits)
    assert ignored.any() and torch.all(logits.grad[ignored] == 0) and logits.grad[~ignored].abs().sum() > 0


# ----------------------------------------------------------------------------- write-back


def test_write_back_follows_the_order_on_a_hand_computed_fixture() -> None:
    # three overlapping regions on a 2x4 image; later regions overwrite earlier ones
    probs = np.array(
        [
            [[0.9, 0.9, 0.9, 0.2], [0.9, 0.9, 0.5, 0.1]],  # organs
            [[0.1, 0.8, 0.8, 0.9], [0.2, 0.6, 0.9, 0.3]],  # kidneys
            [[0.1, 0.1, 0.7, 0.1], [0.6, 0.2, 0.1, 0.1]],  # lesion
        ]
    )  # fmt: skip
    expected = np.array([[1, 4, 6, 4], [6, 4, 4, 0]])  # 0.5 is not above the threshold
    np.testing.assert_array_equal(write_back(probs, [1, 4, 6]), expected)
    np.testing.assert_array_equal(to_labels(probs, [1, 4, 6]), expected)
    # order matters: organs written last cover the kidneys and the lesion where they are on
    np.testing.assert_array_equal(write_back(probs[::-1], [6, 4, 1]), [[1, 1, 1, 4], [1, 1, 4, 0]])
    np.testing.assert_array_equal(to_labels(probs), probs.argmax(0))  # softmax models: argmax


def test_written_truth_and_names() -> None:
    label = np.array([[0, 1, 2, 3], [4, 5, 6, 0]])
    np.testing.assert_array_equal(region_masks(label, REGIONS)[1], [[0, 0, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(written_truth(label, REGIONS, [1, 4, 6]), [[0, 1, 1, 1], [4, 4, 6, 0]])
    assert written_names(REGIONS, [1, 4, 6]) == {0: "background", 1: "organs", 4: "kidneys", 6: "lesion"}


# ----------------------------------------------------------------------------- end to end


def _config(patch: str) -> TrainConfig:
    return TrainConfig(model_kwargs=TINY, patch=patch, steps=2, batch=2, val_every=2, workers=0)


def test_region_model_trains_and_predicts_3d(abdomen_regions: Path, tmp_path: Path) -> None:
    train(abdomen_regions, tmp_path / "m", _config("16"), device="cpu", progress=False)
    model = load_model(tmp_path / "m", device="cpu")
    assert model.plan.regions == REGIONS and model.plan.regions_class_order == (1, 4, 6)
    assert model.spec.out_channels == 3
    log = [json.loads(line) for line in (tmp_path / "m" / "log.jsonl").read_text().splitlines()]
    assert set(log[-1]["val_dice"]) == {"organs", "kidneys", "lesion"}
    kept = json.loads((tmp_path / "m" / "postprocessing.json").read_text())["largest_component"]
    assert set(kept) <= {1, 4, 6}

    image = abdomen_regions / "imagesTs" / "phantom_test_000_0000.nii.gz"
    [pred] = predict_files(model, [image], tmp_path / "out", save_probabilities=True, progress=False)
    seg = np.asarray(nib.load(str(pred)).dataobj)
    assert set(np.unique(seg).tolist()) <= {0, 1, 4, 6}
    probs = np.asarray(nib.load(str(tmp_path / "out" / "probabilities" / "phantom_test_000.nii.gz")).dataobj)
    assert probs.shape == (*seg.shape, 3) and probs.min() >= 0 and probs.max() <= 1
    np.testing.assert_array_equal(seg, write_back(np.moveaxis(probs, -1, 0), [1, 4, 6]))

    rows = run_sweep(model, load_dataset(abdomen_regions).test[:1], [(16, 16, 16)], progress=False)
    assert [r["class"] for r in rows] == ["organs", "kidneys", "lesion"]
    assert all(0.0 <= r["dice"] <= 1.0 or np.isnan(r["dice"]) for r in rows)

    # a folder whose network is not one output per region (a cascade's softmax stage) is refused
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    (tmp_path / "m" / "model.json").write_text(json.dumps({**spec, "out_channels": 7}))
    with pytest.raises(FlexPatchError, match="3 regions"):
        load_model(tmp_path / "m", device="cpu")


def test_region_model_trains_and_predicts_2d(tiny_cells: Path, tmp_path: Path) -> None:
    labels = {"background": 0, "nucleus": [1]}
    root = as_regions(tiny_cells, tmp_path / "ds", labels, [1])
    train(root, tmp_path / "m", _config("32"), device="cpu", progress=False)
    model = load_model(tmp_path / "m", device="cpu")
    assert model.spec.out_channels == 1 and model.plan.ndim == 2
    image = root / "imagesTs" / "phantom_test_000_0000.nii.gz"
    [pred] = predict_files(model, [image], tmp_path / "out", progress=False)
    seg = np.asarray(nib.load(str(pred)).dataobj)
    assert seg.shape == (64, 64, 1) and set(np.unique(seg).tolist()) <= {0, 1}


def test_cascade_and_patchwork_refuse_region_datasets(abdomen_regions: Path, tmp_path: Path) -> None:
    from flexpatch.cascade.config import CascadeConfig
    from flexpatch.cascade.train import train_cascade
    from flexpatch.patchwork.config import PatchworkConfig
    from flexpatch.patchwork.train import check_training_inputs

    with pytest.raises(FlexPatchError, match="region-based labels train with the core trainer, not segment"):
        train_cascade(abdomen_regions, tmp_path / "sts", CascadeConfig.of(input_size=16), progress=False)
    with pytest.raises(
        FlexPatchError, match="region-based labels train with the core trainer, not the patchwork"
    ):
        check_training_inputs(abdomen_regions, tmp_path / "pw", PatchworkConfig())
    assert not (tmp_path / "sts").exists()
