"""Transfer (``--init-from``): matching weights load, the rest are listed, freezing and lr scaling work.

References: the source model's own tensors (loaded ones must equal them bit for bit,
frozen ones must still equal them after training), and the token resize of
:func:`flexpatch.models.unetr.resize_tokens` for UNETR sources.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flexpatch.checkpoint import BEST, LAST, load_checkpoint
from flexpatch.cli import app
from flexpatch.errors import FlexPatchError
from flexpatch.models import create_model
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import make_optimizer, train
from flexpatch.train.transfer import TRANSFER, load_matching

torch.set_num_threads(1)

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}
UNETR = {"img_size": 32, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4, "num_layers": 2, "feature_size": 8}


def save_model_dir(folder: Path, net: torch.nn.Module) -> Path:
    """A model folder as ``train`` writes it, as far as ``--init-from`` reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(json.dumps(net.spec.to_json()))
    torch.save({"model": net.state_dict(), "step": 0}, folder / BEST)
    return folder


def make(name: str, out_channels: int, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, 3, 1, out_channels, **kwargs)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 3-class tiny U-Net model folder (the phantom has 7 classes: its head cannot load)."""
    net = make("unet", 3, seed=1, **TINY)
    return save_model_dir(tmp_path_factory.mktemp("source"), net), net.state_dict()


def test_matching_tensors_load_and_the_rest_are_listed(source) -> None:
    folder, state = source
    net = make("unet", 7, seed=2, **TINY)
    report = load_matching(net, folder)
    assert [name for name, _ in report.skipped] == ["head.weight", "head.bias"]
    assert "shape (3, 4, 3, 3, 3) in the source, (7, 4, 3, 3, 3) here" in dict(report.skipped)["head.weight"]
    assert len(report.loaded) == len(state) - 2 and report.unused == ()  # the head is named in both
    for name in report.loaded:
        assert torch.equal(net.state_dict()[name], state[name]), name
    assert "skipped 2: head.weight (shape" in report.describe()


def test_nothing_matching_or_no_model_folder_is_an_error(source, tmp_path: Path) -> None:
    folder, _ = source
    with pytest.raises(FlexPatchError, match="no tensor matches"):
        load_matching(make("unet", 7, seed=0, channels=8, levels=2, convs_per_level=2), folder)
    with pytest.raises(FlexPatchError, match="not a model folder"):
        load_matching(make("unet", 7, seed=0, **TINY), tmp_path)


def test_unetr_source_at_another_token_size_is_resized(tmp_path: Path) -> None:
    src = make("unetr", 3, seed=1, token_size=16, **UNETR)
    folder = save_model_dir(tmp_path / "src", src)
    net = make("unetr", 3, seed=2, token_size=8, **UNETR)
    report = load_matching(net, folder)
    assert report.resized == ([16, 16, 16], [8, 8, 8])
    reasons = dict(report.skipped)
    assert reasons and set(reasons.values()) == {"new at the resized token size"}
    block = "vit.blocks.1.attn.qkv.weight"  # the transformer carries over unchanged
    assert block in report.loaded and torch.equal(net.state_dict()[block], src.state_dict()[block])
    # the patch embedding is FlexiViT-resized, not copied: an 8^3 kernel from a 16^3 one
    assert net.state_dict()["vit.patch_embedding.patch_embeddings.weight"].shape[2:] == (8, 8, 8)


def test_loaded_parameters_get_their_own_rate_and_frozen_ones_none() -> None:
    net = make("unet", 3, seed=0, **TINY)
    loaded = frozenset(n for n, _ in net.named_parameters() if not n.startswith("head"))
    config = TrainConfig(lr=1e-3, init_from="x", loaded_lr_scale=0.1)
    opt, sched = make_optimizer(net, config, loaded)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, pytest.approx(1e-4)]
    assert [len(g["params"]) for g in opt.param_groups] == [2, len(loaded)]
    for name, p in net.named_parameters():
        p.requires_grad_(name not in loaded)
    opt, _ = make_optimizer(net, config.replace(freeze_loaded=True), loaded)
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 2
    net.head.requires_grad_(False)
    with pytest.raises(FlexPatchError, match="nothing left to train"):
        make_optimizer(net, config, loaded)


def test_transfer_options_are_validated() -> None:
    with pytest.raises(FlexPatchError, match="need init_from"):
        TrainConfig(freeze_loaded=True)
    with pytest.raises(FlexPatchError, match="loaded_lr_scale must be > 0"):
        TrainConfig(init_from="x", loaded_lr_scale=0.0)


def test_cli_train_from_a_plan_with_init_from_and_freezing(
    source, tiny_abdomen: Path, tmp_path: Path
) -> None:
    folder, state = source
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps({"model": "unet", "model_kwargs": TINY, "train": {"patch": [16, 16, 16], "batch": 2}})
    )
    out = tmp_path / "model"
    args = ["train", tiny_abdomen, "--out", out, "--plan", plan, "--init-from", folder, "--freeze-loaded"]
    args += ["--steps", 2, "--val-every", 2, "--workers", 0, "--device", "cpu", "--json"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{result.stderr}\n{result.exception!r}"
    summary = json.loads(result.stdout)
    assert summary["init_from"]["loaded"] == len(state) - 2
    assert [name for name, _ in summary["init_from"]["skipped"]] == ["head.weight", "head.bias"]
    config = json.loads((out / "config.json").read_text())
    assert config["patch"] == "16,16,16" and config["batch"] == 2 and config["model_kwargs"] == TINY
    assert config["init_from"] == str(folder) and config["freeze_loaded"] is True
    trained = load_checkpoint(out / LAST)["model"]
    frozen = [n for n in state if not n.startswith("head")]
    assert all(torch.equal(trained[n], state[n]) for n in frozen)  # frozen: still the source's
    fresh = make("unet", 7, seed=0, **TINY).state_dict()  # the run's own seeded start for the head
    assert not torch.equal(trained["head.weight"], fresh["head.weight"])  # the head did train
    assert json.loads((out / TRANSFER).read_text())["source"] == str(folder)


def test_resume_rebuilds_the_scaled_groups(source, tiny_abdomen: Path, tmp_path: Path) -> None:
    folder, _ = source
    config = TrainConfig(
        model="unet", model_kwargs=TINY, patch="16", steps=2, batch=1, val_every=2, workers=0,
        init_from=str(folder), loaded_lr_scale=0.1,
    )  # fmt: skip
    train(tiny_abdomen, tmp_path, config, device="cpu", progress=False, stop_after=1)
    saved = json.loads((tmp_path / TRANSFER).read_text())
    (tmp_path / TRANSFER).write_text(json.dumps({**saved, "marker": 1}))
    result = train(tiny_abdomen, tmp_path, config, resume=True, device="cpu", progress=False)
    assert result.steps == 2
    assert json.loads((tmp_path / TRANSFER).read_text())["marker"] == 1  # read back, not loaded again
    groups = load_checkpoint(tmp_path / LAST)["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
