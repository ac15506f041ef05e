"""Export (TorchScript, ONNX) and import of outside weights (``--init-from`` a state_dict or MONAI bundle).

References: flexpatch's own sliding window run with the loaded model's network (the exported
module must give the same blended logits at its window), the source tensors (loaded ones equal
bit for bit), and torch's safe loading (a file naming code is refused before it runs).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_cli
from flexpatch.data.io import read_image
from flexpatch.errors import FlexPatchError
from flexpatch.export import export_model, sidecar_path
from flexpatch.infer.predictor import LoadedModel, load_model
from flexpatch.infer.sliding_window import sliding_window
from flexpatch.models import create_model
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import train
from flexpatch.train.transfer import TRANSFER, load_matching

torch.set_num_threads(1)

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}
# init_std > 0: the heads predict size-dependent weights from the start, so baking matters
HYPER = {**TINY, "hyper": {"hidden": 4, "layers": 1, "init_std": 0.01}}


def tiny_train(dataset: Path, out: Path, patch: str, kwargs: dict) -> LoadedModel:
    config = TrainConfig(model_kwargs=kwargs, patch=patch, steps=2, batch=2, val_every=2, workers=0)
    train(dataset, out, config, device="cpu", progress=False)
    return load_model(out, device="cpu")


@pytest.fixture(scope="module")
def plain3d(tiny_abdomen: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return tiny_train(tiny_abdomen, tmp_path_factory.mktemp("plain3d"), "16", TINY)


@pytest.fixture(scope="module")
def hyper3d(tiny_abdomen: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return tiny_train(tiny_abdomen, tmp_path_factory.mktemp("hyper3d"), "uniform:16-32", HYPER)


@pytest.fixture(scope="module")
def plain2d(tiny_cells: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return tiny_train(tiny_cells, tmp_path_factory.mktemp("plain2d"), "32", TINY)


def prepared(model: LoadedModel, dataset: Path) -> torch.Tensor:
    """A test case as the network sees it: resampled and normalised, ``(1, C, *spatial)``."""
    image = read_image(sorted((dataset / "imagesTs").iterdir())[0], ndim=model.plan.ndim)
    return model.prepare(image)[0]


def blended(net, model: LoadedModel, image: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:
    return sliding_window(net, image, window, overlap=0.5, divisor=model.divisor)


@pytest.mark.parametrize(
    ("name", "dataset", "window"),
    [("plain3d", "tiny_abdomen", (16, 16, 16)), ("hyper3d", "tiny_abdomen", (16, 16, 16)),
     ("plain2d", "tiny_cells", (32, 32))],
)  # fmt: skip
def test_torchscript_gives_flexpatchs_sliding_window(
    name: str, dataset: str, window: tuple[int, ...], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model: LoadedModel = request.getfixturevalue(name)
    image = prepared(model, request.getfixturevalue(dataset))
    assert all(s > w for s, w in zip(image.shape[2:], window))  # several windows, all full size
    done = export_model(model.model_dir, tmp_path / "net.pt", window)
    exported = torch.jit.load(str(done.path))
    reference = blended(model.net, model, image, window)
    assert torch.allclose(blended(exported, model, image, window), reference, atol=1e-5, rtol=0)
    if name == "hyper3d":  # the window's weights were baked in: the base weights give another answer
        assert not torch.allclose(blended(model.net.target, model, image, window), reference, atol=1e-3)


def test_exported_torchscript_refuses_other_windows(hyper3d: LoadedModel, tmp_path: Path) -> None:
    exported = torch.jit.load(str(export_model(hyper3d, tmp_path / "net.pt", (16, 16, 16)).path))
    assert exported(torch.zeros(2, 1, 16, 16, 16)).shape == (2, 7, 16, 16, 16)
    with pytest.raises((RuntimeError, torch.jit.Error), match="exported for that window only"):
        exported(torch.zeros(1, 1, 32, 32, 32))


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")
def test_onnx_gives_flexpatchs_sliding_window(
    hyper3d: LoadedModel, tiny_abdomen: Path, tmp_path: Path
) -> None:
    import onnxruntime

    window = (16, 16, 16)
    done = export_model(hyper3d.model_dir, tmp_path / "net.onnx", window, format="onnx")
    session = onnxruntime.InferenceSession(str(done.path), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])

    image = prepared(hyper3d, tiny_abdomen)
    reference = blended(hyper3d.net, hyper3d, image, window)
    ours = blended(run, hyper3d, image, window)  # batches of 4 and a last smaller one: batch axis free
    assert torch.allclose(ours, reference, atol=1e-3, rtol=0)  # ONNX Runtime's kernels round otherwise
    assert (ours.argmax(1) == reference.argmax(1)).float().mean() > 0.999


def test_sidecar_says_how_to_run_it(hyper3d: LoadedModel, tmp_path: Path) -> None:
    done = export_model(hyper3d, tmp_path / "net.pt", (16,))
    assert done.window == (16, 16, 16) and done.info_path == tmp_path / "net.pt.json"
    info = json.loads(done.info_path.read_text())
    assert info["window"] == [16, 16, 16] and info["hypernetwork_baked_at"] == [16, 16, 16]
    assert info["input"]["shape"] == ["N", 1, 16, 16, 16] and info["input"]["context"] == "none"
    assert info["output"] == {"name": "logits", "shape": ["N", 7, 16, 16, 16], "activation": "softmax"}
    assert info["classes"] == 7 and info["label_names"]["1"] == "liver"
    assert info["spacing"] == list(hyper3d.plan.target_spacing)
    assert info["normalisation"][0]["scheme"] == hyper3d.plan.normalization[0]


def test_cli_refuses_to_overwrite_unless_asked(plain3d: LoadedModel, tmp_path: Path) -> None:
    out = tmp_path / "net.pt"
    export_model(plain3d, out, (16, 16, 16))
    before = out.read_bytes()
    again = run_cli("export", plain3d.model_dir, "--window", "16", "--out", out)
    assert_one_line_error(again, str(out), "already exists", "--overwrite")
    assert out.read_bytes() == before
    replaced = run_cli("export", plain3d.model_dir, "--window", "16,16,16", "--out", out, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert "exported torchscript for window 16x16x16" in replaced.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt", "net.pt.json"]  # no temporary left


def test_bad_window_and_format_are_one_line(plain3d: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(FlexPatchError, match=r"not divisible by \(4, 4, 4\)"):
        export_model(plain3d, tmp_path / "a.pt", (15, 15, 15))
    with pytest.raises(FlexPatchError, match="unknown export format 'tf'; choose one of torchscript, onnx"):
        export_model(plain3d, tmp_path / "a.pt", (16, 16, 16), format="tf")
    assert list(tmp_path.iterdir()) == []


def test_onnx_without_the_package_is_one_line_and_leaves_nothing(
    plain3d: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # ``import onnx`` now fails as if not installed
    with pytest.raises(FlexPatchError, match=r"needs the onnx package: pip install 'flexpatch\[onnx\]'"):
        export_model(plain3d, tmp_path / "net.onnx", (16, 16, 16), format="onnx")
    assert list(tmp_path.iterdir()) == []  # neither the file, its JSON nor a temporary


# --- import: --init-from a plain state_dict or a MONAI bundle --------------------------------


def make(name: str, out_channels: int, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, 3, 1, out_channels, **kwargs)


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "module."])
def test_plain_state_dict_loads_where_shapes_match(wrap: str, tmp_path: Path) -> None:
    source = make("unet", 3, seed=1, **TINY).state_dict()
    saved = {
        "bare": source,
        "state_dict": {"state_dict": source, "epoch": 3},  # as Lightning and many scripts keep it
        "module.": {f"module.{k}": v for k, v in source.items()},  # DataParallel's names
    }[wrap]
    torch.save(saved, tmp_path / "weights.pth")
    net = make("unet", 7, seed=2, **TINY)
    report = load_matching(net, tmp_path / "weights.pth")
    assert report.kind == "weights file" and [n for n, _ in report.skipped] == ["head.weight", "head.bias"]
    for name in report.loaded:
        assert torch.equal(net.state_dict()[name], source[name]), name
    line = report.describe()
    assert "\n" not in line and "(weights file): loaded" in line and "skipped 2: head.weight" in line


def test_monai_bundle_weights_load(tmp_path: Path) -> None:
    """A bundle's ``models/model.pt``, saved from MONAI's own class: flexpatch's segresnet is
    MONAI's, so every tensor matches by name."""
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    options = {"init_filters": 8, "blocks_down": (1, 1), "blocks_up": (1,)}
    monai_net = SegResNet(3, options["init_filters"], 1, 2, blocks_down=(1, 1), blocks_up=(1,))
    (tmp_path / "bundle" / "models").mkdir(parents=True)
    (tmp_path / "bundle" / "configs").mkdir()
    torch.save(monai_net.state_dict(), tmp_path / "bundle" / "models" / "model.pt")
    net = make("segresnet", 2, seed=1, **options)
    report = load_matching(net, tmp_path / "bundle")
    assert report.kind == "MONAI bundle" and not report.skipped and not report.unused
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), monai_net.eval()(x))


def test_unsafe_or_unusable_sources_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"weight": Payload()}, tmp_path / "evil.pt")
    net = make("unet", 3, seed=0, **TINY)
    with pytest.raises(FlexPatchError, match="refused: it names code"):
        load_matching(net, tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "numbers.pt")
    with pytest.raises(FlexPatchError, match="holds no tensors by name"):
        load_matching(net, tmp_path / "numbers.pt")
    (tmp_path / "ts" / "models").mkdir(parents=True)
    (tmp_path / "ts" / "models" / "model.ts").write_bytes(b"")
    with pytest.raises(FlexPatchError, match="TorchScript weights only"):
        load_matching(net, tmp_path / "ts")
    torch.save({"other.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(FlexPatchError, match="the source has other.weight, ...; the network"):
        load_matching(net, tmp_path / "other.pt")


def test_train_init_from_a_state_dict_file(tiny_abdomen: Path, tmp_path: Path) -> None:
    source = make("unet", 3, seed=1, **TINY).state_dict()
    torch.save(source, tmp_path / "weights.pt")
    config = TrainConfig(
        model_kwargs=TINY, patch="16", steps=1, batch=2, val_every=1, workers=0,
        init_from=str(tmp_path / "weights.pt"), freeze_loaded=True,
    )  # fmt: skip
    train(tiny_abdomen, tmp_path / "run", config, device="cpu", progress=False)
    transfer = json.loads((tmp_path / "run" / TRANSFER).read_text())
    assert transfer["kind"] == "weights file" and len(transfer["loaded"]) == len(source) - 2
    trained = load_model(tmp_path / "run", device="cpu").net.state_dict()
    frozen = next(n for n in transfer["loaded"] if n.endswith("weight"))
    assert np.array_equal(trained[frozen].numpy(), source[frozen].numpy())  # frozen: kept as loaded


def test_sidecar_path_never_takes_another_files_name() -> None:
    assert sidecar_path("a/seg.onnx") == Path("a/seg.onnx.json")
