"""The guarded optimiser step: a non-finite gradient is skipped, a finite one is the plain step."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from flexpatch.checkpoint import LAST, load_checkpoint
from flexpatch.errors import FlexPatchError
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import train
from flexpatch.train.step import Divergence, advance, guarded_step


def _net_and_opt(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Conv2d(3, 2, 1))
    return net, torch.optim.AdamW(net.parameters(), lr=1e-2)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_a_finite_step_is_the_plain_zero_backward_clip_step(clip: float | None) -> None:
    x = torch.randn(2, 1, 8, 8)
    net, opt = _net_and_opt()
    ref, ref_opt = _net_and_opt()
    for _ in range(3):
        assert guarded_step(net(x).square().mean(), opt, net.parameters(), clip)
        ref_opt.zero_grad(set_to_none=True)
        ref(x).square().mean().backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        ref_opt.step()
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_leaves_weights_and_optimiser_untouched(bad: float) -> None:
    net, opt = _net_and_opt()
    before = [p.detach().clone() for p in net.parameters()]
    loss = net(torch.randn(1, 1, 8, 8)).mean() * bad
    assert not guarded_step(loss, opt, net.parameters(), 12.0)
    assert all(p.grad is None for p in net.parameters())
    assert not opt.state  # AdamW's moments were never touched
    for a, b in zip(net.parameters(), before, strict=True):
        assert torch.equal(a, b)


def test_a_skipped_first_step_advances_the_schedule_without_pytorchs_warning() -> None:
    net, opt = _net_and_opt()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
    x = torch.randn(1, 1, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        advance(sched, guarded_step(net(x).mean() * float("nan"), opt, net.parameters(), None))
        advance(sched, guarded_step(net(x).mean(), opt, net.parameters(), None))
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    assert sched.last_epoch == 2 and opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)


def test_a_schedule_stepped_before_any_optimiser_step_still_warns_when_nothing_was_skipped() -> None:
    net, opt = _net_and_opt()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    with pytest.warns(UserWarning, match="lr_scheduler"):
        advance(sched, True)  # a caller's bug (no step taken yet) is not hidden


def test_divergence_counts_runs_and_names_the_folder() -> None:
    d = Divergence(limit=3)
    for step, stepped in enumerate([False, False, True, False, False], start=1):
        d.update(stepped, step, "model/")
    assert (d.run, d.total) == (2, 4)
    with pytest.raises(FlexPatchError, match=r"^model/: training diverged.*3 steps in a row \(up to step 6"):
        d.update(False, 6, "model/")


@pytest.fixture
def nan_config(monkeypatch: pytest.MonkeyPatch) -> TrainConfig:
    """A tiny run whose loss is always NaN: every step is skipped."""
    import flexpatch.train.loop
    from flexpatch.train.loss import segmentation_loss

    def nan_loss(*args: object, **kwargs: object):  # the trainer's loss, times NaN
        loss = segmentation_loss(*args, **kwargs)  # type: ignore[arg-type]
        return lambda logits, target: loss(logits, target) * float("nan")

    monkeypatch.setattr(flexpatch.train.loop, "segmentation_loss", nan_loss)
    return TrainConfig(
        model="unet",
        model_kwargs={"channels": 4, "levels": 2, "convs_per_level": 2},
        patch="16",
        steps=40,
        batch=1,
        val_every=1000,
        workers=0,
    )


def test_training_whose_loss_is_always_nan_stops_with_a_one_line_error(
    tiny_abdomen: Path, tmp_path: Path, nan_config: TrainConfig
) -> None:
    config = nan_config
    with pytest.raises(FlexPatchError, match="training diverged") as err:
        train(tiny_abdomen, tmp_path / "m", config, device="cpu", progress=False)
    assert "\n" not in str(err.value) and str(tmp_path / "m") in str(err.value)
    log = [json.loads(line) for line in (tmp_path / "m" / "log.jsonl").read_text().splitlines()]
    assert len(log) == Divergence().limit - 1 and all(r["skipped"] for r in log)


def test_a_resumed_run_keeps_counting_its_skipped_steps(
    tiny_abdomen: Path, tmp_path: Path, nan_config: TrainConfig
) -> None:
    """12 skipped steps, a stop, then a resume: the run diverges at step 20, as it would have unbroken."""
    config = nan_config
    train(tiny_abdomen, tmp_path / "m", config, device="cpu", progress=False, stop_after=12)
    assert load_checkpoint(tmp_path / "m" / LAST)["divergence"] == {"limit": 20, "run": 12, "total": 12}
    with pytest.raises(FlexPatchError, match=r"20 steps in a row \(up to step 20\)"):
        train(tiny_abdomen, tmp_path / "m", None, resume=True, device="cpu", progress=False)


def test_an_all_air_batch_under_bfloat16_is_skipped_not_applied() -> None:
    """The full patchwork benchmark's diverged run, replayed: seed 01's U-Net on two constant patches
    (32^3 there; 16^3 overflows alike at an eighth of the cost) gives every InstanceNorm zero
    variance, and under bfloat16 the gradient norm overflows."""
    from monai.losses import DiceCELoss

    from flexpatch.models import create_model

    torch.manual_seed(0)
    net = create_model("unet", 3, 1, 7)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in net.parameters()]
    air = torch.zeros(2, 1, 16, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)(net(air), air.long())
    assert torch.isfinite(loss)  # the loss looks fine: only the gradient overflows
    assert not guarded_step(loss, opt, net.parameters(), 12.0)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), before, strict=True))
