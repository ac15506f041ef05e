"""Patchwork end to end: a tiny patchwork trains and predicts through the CLI in 2D and 3D."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import run_cli
from flexpatch.cli import app
from flexpatch.data.io import read_image, read_label_names
from flexpatch.errors import FlexPatchError
from flexpatch.patchwork.config import PatchworkConfig
from flexpatch.patchwork.files import CONFIG
from flexpatch.patchwork.rounds import RoundJob, RoundSource, label_table, load_state

torch.set_num_threads(1)

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}  # divisor 4


def invoke(*args: object) -> dict:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{args}: {result.stderr}\n{result.exception!r}"
    return json.loads(result.stdout)


def _options(tmp: Path, **extra: object) -> Path:
    path = tmp / "options.json"
    path.write_text(json.dumps({"block_options": TINY, "workers": 0, **extra}))
    return path


@pytest.mark.parametrize("fixture", ["tiny_cells", "tiny_abdomen"])
def test_tiny_patchwork_trains_and_predicts_through_the_cli(fixture, request, tmp_path):
    ds = request.getfixturevalue(fixture)
    ndim = 2 if fixture == "tiny_cells" else 3
    opts = _options(tmp_path, dphi=0.2, hard_mining=1.0, flip=[1] * ndim)
    model = tmp_path / "model"
    summary = invoke(
        "train", ds, "--out", model, "--patchwork", "--depth", 2, "--matrix", 8, "--fov-rel", 0.8,
        "--rounds", 2, "--num-patches", 3, "--batch", 4, "--patchwork-options", opts,
        "--options", json.dumps({"channels": 6}), "--device", "cpu", "--json",
    )  # fmt: skip
    assert summary["rounds"] == 2 and np.isfinite(summary["last_loss"])
    meta = json.loads((model / CONFIG).read_text())
    assert meta["scheme"]["depth"] == 2 and meta["config"]["hard_mining"] == 1.0
    assert meta["config"]["block_options"] == {**TINY, "channels": 6}  # --options over the file, by key
    log = json.loads((model / "log.json").read_text())
    assert log[1]["patches"] > log[0]["patches"]  # hard mining kept half of round 0 beside the new ones
    pred = tmp_path / "pred"
    out = invoke("predict", model, ds / "imagesTs", "--out", pred, "--lazy", 0.5, "--device", "cpu", "--json")
    assert len(out["segmentations"]) == 2
    first = Path(out["segmentations"][0])
    image = read_image(ds / "imagesTs" / first.name.replace(".nii.gz", "_0000.nii.gz"), ndim)
    seg = nib.load(first)
    assert seg.shape[:ndim] == image.spatial_shape
    np.testing.assert_allclose(
        seg.affine,
        nib.load(ds / "imagesTs" / first.name.replace(".nii.gz", "_0000.nii.gz")).affine,
        atol=1e-5,
    )
    names = read_label_names(first)
    assert names and all(isinstance(v, str) for v in names.values())
    stats = out["stats"][first.name.replace(".nii.gz", "")]
    assert len(stats["patches"]) == 2
    probs = invoke("predict", model, ds / "imagesTs", "--out", tmp_path / "prob", "--out-type", "uint8",
                   "--probabilities", "--device", "cpu", "--json")  # fmt: skip
    arr = np.asarray(nib.load(probs["segmentations"][0]).dataobj)
    assert arr.dtype == np.uint8 and arr.shape[-1] == len(meta["label_values"])
    # --probabilities: the stitched softmax over background and the labels, on the same grid
    # (where the cos windows barely cover a border voxel, DNP's epsilon keeps the sum below one)
    soft = nib.load(tmp_path / "prob" / "probabilities" / Path(probs["segmentations"][0]).name)
    assert soft.shape[:-1] == arr.shape[:-1] and soft.shape[-1] == len(meta["label_values"]) + 1
    np.testing.assert_allclose(np.asarray(soft.dataobj).sum(-1), 1.0, atol=1e-2)
    np.testing.assert_allclose(soft.affine, seg.affine, atol=1e-6)


def test_rounds_are_the_same_with_and_without_a_worker_process(tiny_abdomen):
    from flexpatch.data.dataset import load_dataset

    ds = load_dataset(tiny_abdomen)
    config = PatchworkConfig(scheme={"depth": 2, "matrix": [[8, 8, 8]], "fov_rel": [0.8] * 3}, num_patches=2,
                             ratio=0.5, dphi=0.1)  # fmt: skip
    values, ignore = label_table(ds, config)
    scheme = config.scheme_obj(3)
    states = [load_state(c, 3, scheme, config, values, ignore) for c in ds.training[:2]]
    job = RoundJob(states, scheme, config)
    inline = RoundSource(job, 0)
    a = inline.get(3)
    inline.close()
    forked = RoundSource(job, 2)
    b = forked.get(3)
    forked.close()
    assert set(a) == {"x0", "y0", "x1", "y1", "rel1"}
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bad_patchwork_input_is_one_line_and_exit_2(tiny_abdomen, tmp_path):
    cmd = ["train", tiny_abdomen, "--out", tmp_path / "m", "--patchwork", "--matrix", "13", "--device", "cpu"]
    r = run_cli(*cmd, timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "13" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"no_such_option": 1}))
    r = run_cli(*cmd[:-4], "--patchwork-options", bad, timeout=120)
    assert r.returncode == 2 and "no_such_option" in r.stderr
    r = run_cli(*cmd[:-4], "--matrix", 8, timeout=120)
    assert r.returncode == 2 and "bottleneck" in r.stderr and "Traceback" not in r.stderr


def test_many_labels_train_with_candidate_sampling_and_decode_an_atlas(tiny_abdomen, tmp_path):
    """The label embedding path: E channels are stitched, classes assigned by maximal response."""
    from flexpatch.patchwork.apply import ApplyOptions
    from flexpatch.patchwork.predict import load_patchwork, predict_patchwork_files, segment_volume
    from flexpatch.patchwork.train import train_patchwork

    config = PatchworkConfig(
        scheme={"depth": 2, "matrix": [[8, 8, 8]], "fov_rel": [0.8] * 3}, block_options=TINY, rounds=2,
        num_patches=2, batch_size=4, embedding_dim=3, num_sampled=2, workers=0,
    )  # fmt: skip
    train_patchwork(tiny_abdomen, tmp_path / "m", config, device="cpu", progress=False)
    model = load_patchwork(tmp_path / "m", "cpu")
    assert model.net.num_outputs == 3 and model.embedding is not None
    image = read_image(next((tiny_abdomen / "imagesTs").iterdir()), 3)
    atlas, affine, _ = segment_volume(model, image, ApplyOptions())
    assert atlas.shape == image.spatial_shape
    assert set(np.unique(atlas)) <= {0, *model.meta["label_values"]}
    np.testing.assert_allclose(affine, image.affine, atol=1e-5)
    # embedding responses are no probabilities: refused before any case, in one line
    with pytest.raises(FlexPatchError, match="leave out --probabilities"):
        predict_patchwork_files(tmp_path / "m", [image.path], tmp_path / "p", save_probabilities=True)
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


def test_dont_care_label_is_left_out_of_the_loss(tiny_cells, tmp_path):
    """A label named 'ignore' (nnU-Net's convention) becomes -1: no loss, no output channel."""
    import shutil

    from flexpatch.data.dataset import load_dataset
    from flexpatch.data.io import read_label, write_image

    ds_dir = tmp_path / "ds"
    shutil.copytree(tiny_cells, ds_dir)
    meta = json.loads((ds_dir / "dataset.json").read_text())
    meta["labels"]["ignore"] = 2
    (ds_dir / "dataset.json").write_text(json.dumps(meta))
    for path in sorted((ds_dir / "labelsTr").iterdir()):
        lab = read_label(path, 2)
        data = lab.data.copy()
        data[:8] = 2  # a band nobody annotated
        write_image(path, data, lab.affine)
    ds = load_dataset(ds_dir)
    config = PatchworkConfig(scheme={"depth": 1, "matrix": [[8, 8]]})
    values, ignore = label_table(ds, config)
    assert values == [1] and ignore == 2
    state = load_state(ds.training[0], 2, config.scheme_obj(2), config, values, ignore)
    assert int((state.label == -1).sum()) == 8 * 64
    logits = torch.randn(1, 2, 64, 64)
    from flexpatch.patchwork.losses import patch_loss

    target = state.label[None]
    base, _ = patch_loss(logits, target)
    changed = logits.clone()
    changed[:, :, :8] = 50 * torch.randn(1, 2, 8, 64)  # anything inside the don't-care band
    again, _ = patch_loss(changed, target)
    assert torch.allclose(base, again)


def test_oblique_anisotropic_image_keeps_its_world_grid(tmp_path):
    """world system on an oblique, anisotropic scan: the output lies on the input grid, fully covered."""
    from flexpatch.patchwork.apply import ApplyOptions, apply_image
    from flexpatch.patchwork.scheme import Scheme

    a = np.eye(4)
    c, s = np.cos(0.5), np.sin(0.5)
    a[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([1.0, 1.2, 3.0])
    image = np.random.default_rng(0).random((1, 30, 28, 12)).astype(np.float32)

    class Identity:
        num_outputs, depth = 1, 2

        def forward_level(self, level, x, parent_out=None, rel=None):
            return x[:, :1]

    scheme = Scheme(
        ndim=3, depth=2, matrix=(8, 8, 8), fov_rel=0.7, system="world", destvox_mm=(0.6, 0.6, 1.5)
    )
    out = apply_image(
        Identity(), image, a, scheme, ApplyOptions(window="constant", batch_size=256), lambda x: x
    )
    assert out.values.shape == (1, 30, 28, 12)
    assert float((out.values != 0).float().mean()) > 0.99
    # (patch voxels finer than the image: no voxel is missed by the rotated nearest-neighbour scatter)
    # every stitched value is an image value from within one voxel (nearest-neighbour crops)
    from scipy import ndimage

    lo = ndimage.minimum_filter(image[0], 3) - 1e-5
    hi = ndimage.maximum_filter(image[0], 3) + 1e-5
    v = out.values[0].numpy()
    inside = v != 0
    assert np.all((v[inside] >= lo[inside]) & (v[inside] <= hi[inside]))


def test_worker_processes_do_not_hang_after_the_parent_used_openmp(tmp_path, tiny_abdomen):
    """Regression: a forked cropping worker entering the parent's OpenMP pool hung in libgomp."""
    script = tmp_path / "run.py"
    script.write_text(
        "import torch\n"
        "from flexpatch.patchwork.train import PatchworkConfig, train_patchwork\n"
        "torch.set_num_threads(2)\n"
        "x = torch.randn(48, 48, 48, 48)\n"
        "(x @ x).sum()  # the parent's OpenMP pool is running before the workers fork\n"
        f"cfg = PatchworkConfig(scheme={{'depth': 2, 'matrix': [[8, 8, 8]]}}, block_options={TINY!r},\n"
        "                     rounds=3, num_patches=2, batch_size=4, workers=2)\n"
        f"train_patchwork({str(tiny_abdomen)!r}, {str(tmp_path / 'm')!r}, cfg, device='cpu',\n"
        "                progress=False)\n"
        "print('done')\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("patch", ["8,8,8", "uniform:8-32"])
def test_core_training_refuses_a_one_voxel_bottleneck(tiny_abdomen, tmp_path, patch):
    """unet (divisor 8) at 8^3 has one voxel at the bottleneck: a one-line error, exit 2, no traceback."""
    args = ("train", tiny_abdomen, "--out", tmp_path / "m", "--patch", patch, "--steps", 2, "--device", "cpu")
    r = run_cli(*args, timeout=120)
    assert r.returncode == 2 and "bottleneck" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_patchwork_trains_with_bf16_autocast_and_predicts_on_cuda(tiny_abdomen, tmp_path):
    """The CUDA path: bf16 autocast in training, parent crops on the GPU, the same atlas as the CPU."""
    from flexpatch.patchwork.apply import ApplyOptions
    from flexpatch.patchwork.predict import load_patchwork, segment_volume
    from flexpatch.patchwork.train import train_patchwork

    config = PatchworkConfig(scheme={"depth": 2, "matrix": [[8, 8, 8]]}, block_options=TINY, rounds=2,
                             num_patches=2, batch_size=4, workers=1)  # fmt: skip
    train_patchwork(tiny_abdomen, tmp_path / "m", config, device="cuda", progress=False)
    image = read_image(next((tiny_abdomen / "imagesTs").iterdir()), 3)
    gpu, _, _ = segment_volume(load_patchwork(tmp_path / "m", "cuda"), image, ApplyOptions())
    cpu, _, _ = segment_volume(load_patchwork(tmp_path / "m", "cpu"), image, ApplyOptions())
    assert gpu.shape == image.spatial_shape
    assert (gpu == cpu).mean() > 0.99  # TF32 / cuDNN may flip a few voxels at class boundaries


def _weights(model: Path) -> dict[str, torch.Tensor]:
    return torch.load(model / "patchwork.pt", map_location="cpu", weights_only=False)["net"]


@pytest.mark.parametrize("fixture,mining", [("tiny_cells", 1.0), ("tiny_abdomen", 0.0)])
def test_resume_continues_exactly_where_the_run_stopped(fixture, mining, request, tmp_path):
    """2 rounds, then --resume --rounds 4: the weights and log of 4 rounds in one go (hard mining too)."""
    ds = request.getfixturevalue(fixture)
    opts = _options(tmp_path, hard_mining=mining, save_every=1, dphi=0.2)
    common = ("--patchwork", "--depth", 2, "--matrix", 8, "--fov-rel", 0.8, "--num-patches", 3, "--batch", 4,
              "--patchwork-options", opts, "--device", "cpu", "--json")  # fmt: skip
    whole, part = tmp_path / "whole", tmp_path / "part"
    invoke("train", ds, "--out", whole, "--rounds", 4, *common)
    invoke("train", ds, "--out", part, "--rounds", 2, *common)
    summary = invoke("train", ds, "--out", part, "--resume", "--rounds", 4, "--device", "cpu", "--json")
    assert summary["rounds"] == 4
    a, b = _weights(whole), _weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [json.loads((m / "log.json").read_text()) for m in (whole, part)]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    assert [r["patches"] for r in logs[0]] == [r["patches"] for r in logs[1]]
    # the step count and the skipped-step counter go on from the saved run, not from zero
    saved = [torch.load(m / "resume.pt", map_location="cpu", weights_only=False) for m in (whole, part)]
    assert saved[0]["steps"] == saved[1]["steps"] > 0
    assert saved[0]["divergence"] == saved[1]["divergence"]


def _tiny_2d() -> PatchworkConfig:
    """One round of a two-level 2D patchwork: seconds to train."""
    scheme = {"depth": 2, "matrix": [8, 8], "fov_rel": [0.8, 0.8]}
    return PatchworkConfig(
        scheme=scheme, block_options=TINY, rounds=1, num_patches=2, batch_size=2, workers=0
    )


def test_resume_refuses_a_changed_config_and_a_missing_checkpoint(tiny_cells, tmp_path):
    from flexpatch.errors import FlexPatchError
    from flexpatch.patchwork.train import train_patchwork

    model = tmp_path / "model"
    config = _tiny_2d()
    with pytest.raises(FlexPatchError, match="resume.pt: nothing to resume from"):
        train_patchwork(tiny_cells, model, config, device="cpu", progress=False, resume=True)
    train_patchwork(tiny_cells, model, config, device="cpu", progress=False)
    changed = PatchworkConfig(**{**config.__dict__, "lr": 0.01, "rounds": 2})
    with pytest.raises(FlexPatchError, match=r"different lr \(saved lr=0.001\)"):
        train_patchwork(tiny_cells, model, changed, device="cpu", progress=False, resume=True)
    done = train_patchwork(tiny_cells, model, config, device="cpu", progress=False, resume=True)
    assert done["rounds"] == 1  # nothing left to do: the saved model is written again, unchanged


def test_a_model_folder_this_version_cannot_read_is_one_line_and_exit_2(tiny_cells, tmp_path):
    from flexpatch.patchwork.train import train_patchwork

    model = tmp_path / "model"
    config = _tiny_2d()
    train_patchwork(tiny_cells, model, config, device="cpu", progress=False)
    meta = json.loads((model / CONFIG).read_text())
    meta["scheme"]["from_a_later_version"] = 1
    (model / CONFIG).write_text(json.dumps(meta))
    r = run_cli("predict", model, tiny_cells / "imagesTs", "--out", tmp_path / "pred", "--device", "cpu",
                timeout=120)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(model / CONFIG) in r.stderr and "from_a_later_version" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "pred").exists()
