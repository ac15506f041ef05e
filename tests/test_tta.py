"""Test-time mirroring: the mean of the flipped predictions computed by hand, in 2D and 3D; its
refusal where labels differ by side; the CLI flag."""

from __future__ import annotations

import itertools

import pytest
import torch

from flexpatch.errors import FlexPatchError
from flexpatch.infer.sliding_window import sliding_window
from flexpatch.infer.tta import Mirrored, flip_sets, mirroring_for


class _Lopsided(torch.nn.Module):
    """A network that is not mirror-symmetric, so mirroring changes its output."""

    divisor = 1

    def __init__(self, ndim: int) -> None:
        super().__init__()
        conv = torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d
        torch.manual_seed(0)
        self.conv = conv(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(0, 1, x.shape[-1])
        return self.conv(x) * ramp


@pytest.mark.parametrize("ndim", [2, 3])
def test_mirroring_is_the_mean_of_the_flipped_predictions(ndim: int) -> None:
    net = _Lopsided(ndim)
    x = torch.randn(2, 1, *(6, 7, 5)[:ndim])
    by_hand = []
    for r in range(ndim + 1):
        for axes in itertools.combinations(range(ndim), r):
            dims = [2 + a for a in axes]
            by_hand.append(net(x.flip(dims)).flip(dims) if dims else net(x))
    want = torch.stack(by_hand).mean(0)
    with torch.no_grad():
        got = Mirrored(net, ndim)(x)
        assert len(by_hand) == 2**ndim and torch.allclose(got, want, atol=1e-6)
        assert not torch.allclose(got, net(x), atol=1e-3)
        # through the sliding window, with one window covering the image, the same
        whole = sliding_window(Mirrored(net, ndim), x[:1], (8,) * ndim, blend="constant")
        assert torch.allclose(whole, want[:1], atol=1e-5)


def test_flip_sets_and_the_auto_rule() -> None:
    assert flip_sets(2) == [(), (0,), (1,), (0, 1)]
    assert len(flip_sets(3)) == 8 and flip_sets(3, axes=(1,)) == [(), (1,)]
    assert mirroring_for("auto", True, [], "m") and not mirroring_for("auto", False, [], "m")
    assert mirroring_for("mirror", False, [], "m") and not mirroring_for("none", True, [], "m")
    assert not mirroring_for("auto", True, [["left", "right"]], "m")
    with pytest.raises(FlexPatchError, match="would swap left and right"):
        mirroring_for("mirror", True, [["left", "right"]], "model")
    with pytest.raises(FlexPatchError, match="unknown test-time augmentation 'flip'"):
        mirroring_for("flip", True, [], "m")
