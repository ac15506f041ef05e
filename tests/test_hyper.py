"""The patch-size hypernetwork: weights vary with size, gradients flow, bake == HN, spec round trip."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from flexpatch import FlexPatchError
from flexpatch.infer.sliding_window import sliding_window
from flexpatch.models import HyperConfig, ModelSpec, PatchSizeHypernet, build, create_model, model_divisor

TINY_UNET = {"channels": 4, "levels": 2, "convs_per_level": 2}
# Tiny settings of models that are not ours: "ANY registered model".
TINY = {
    "unet": TINY_UNET,
    "segresnet": {"init_filters": 8, "blocks_down": [1, 1]},
    "dynunet": {"strides": [1, 2, 2], "filters": [4, 8, 8]},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _hyper(name: str = "unet", ndim: int = 2, **hyper) -> PatchSizeHypernet:
    torch.manual_seed(0)
    return create_model(name, ndim, 1, 3, **TINY[name], hyper={"hidden": 8, **hyper})


def _x(ndim: int, size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 1, *(size,) * ndim, generator=torch.Generator().manual_seed(1))


def _step(net: nn.Module, x: torch.Tensor) -> None:
    """One Adam step on a loss that moves every weight (also in eval mode)."""
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("ndim", [2, 3])
def test_residual_start_is_exactly_the_wrapped_model(ndim: int) -> None:
    net = _hyper(ndim=ndim, subset="all")
    x = _x(ndim, 8)
    plain = build(net.target.spec)
    plain.load_state_dict(net.target.state_dict())
    torch.testing.assert_close(net(x), plain(x), rtol=0, atol=0)
    assert len(net.predicted_names) == len(list(plain.parameters()))


@pytest.mark.parametrize("ndim", [2, 3])
def test_predicted_weights_change_with_the_patch_size(ndim: int) -> None:
    net = _hyper(ndim=ndim, init_std=0.1)
    small, large = net.weights_for((8,) * ndim), net.weights_for((16,) * (ndim - 1) + (8,))
    assert small.keys() == large.keys() == set(net.predicted_names)
    for name in net.predicted_names:
        assert small[name].shape == net.target.get_parameter(name).shape
        assert not torch.allclose(small[name], large[name]), name
    x8 = _x(ndim, 8, 1)
    # The same window run with the weights of another size gives other logits.
    assert not torch.allclose(net(x8), net.bake((16,) * ndim)(x8))


def test_gradients_reach_the_trunk_and_heads() -> None:
    net = _hyper(subset="all")
    x = _x(2, 8)
    net(x).square().mean().backward()
    trunk = [p.grad for p in net.trunk.parameters()]
    heads = [p.grad for p in net.heads.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in trunk + heads)
    assert all(g.abs().sum() > 0 for g in heads)
    # Zero heads give the trunk no gradient at step 0 (as LoRA's zero B): after one step it has one.
    assert all(g.abs().sum() == 0 for g in trunk)
    assert all(p.grad is None for p in net.target.parameters())  # W0 is frozen
    _step(net, x)
    net(x).square().mean().backward()
    assert all(p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all() for p in net.trunk.parameters())


def test_nonzero_head_init_gives_the_trunk_a_gradient_at_once() -> None:
    net = _hyper(subset="all", init_std=0.01)
    net(_x(2, 8)).square().mean().backward()
    weights = [p for p in net.trunk.parameters() if p.ndim == 2]
    assert all(p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all() for p in weights)


def test_norm_and_last_predicts_norms_and_output_layer_and_shares_the_rest() -> None:
    net = _hyper(subset="norm+last", init_std=0.01)
    target = net.target
    norms = {
        f"{m}.{p}"
        for m, mod in target.named_modules()
        if isinstance(mod, nn.InstanceNorm2d)
        for p in ("weight", "bias")
    }
    assert set(net.predicted_names) == norms | {"head.weight", "head.bias"}
    net(_x(2, 8)).square().mean().backward()
    shared = [(n, p) for n, p in target.named_parameters() if n not in net.predicted_names]
    assert shared and all(p.requires_grad for _, p in shared)
    for name, p in [*shared, *net.trunk.named_parameters(), *net.heads.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all(), name


def test_subset_by_names_and_auto() -> None:
    net = _hyper(subset=["encoder.0", "head.bias"])
    assert net.predicted_names[-1] == "head.bias"
    assert all(n.startswith("encoder.0.") for n in net.predicted_names[:-1]) and len(net.predicted_names) > 1
    assert _hyper(subset="auto").predicted_names == _hyper(subset="all").predicted_names
    with pytest.raises(FlexPatchError, match=r"subset \['encoder.9'\] matches no parameter of UNet"):
        _hyper(subset=["encoder.9"])


def test_auto_subset_keeps_large_models_small(monkeypatch: pytest.MonkeyPatch) -> None:
    from flexpatch.models import hyper

    monkeypatch.setattr(hyper, "AUTO_ALL_LIMIT", 100)
    assert _hyper(subset="auto").predicted_names == _hyper(subset="norm+last").predicted_names


@pytest.mark.parametrize(("name", "ndim"), [("unet", 2), ("unet", 3), ("segresnet", 2), ("dynunet", 3)])
def test_baked_model_equals_the_hypernetwork_at_that_size(name: str, ndim: int) -> None:
    net = _hyper(name, ndim, init_std=0.05)
    size = (8, 16, 8)[:ndim]
    x = torch.randn(2, 1, *size, generator=torch.Generator().manual_seed(2))
    baked = net.bake(size)
    assert type(baked) is type(net.target) and baked.spec == net.target.spec and baked.divisor == net.divisor
    assert not any(isinstance(m, PatchSizeHypernet) for m in baked.modules())
    assert all(p.requires_grad for p in baked.parameters())
    net.eval(), baked.eval()
    with torch.no_grad():
        expected = net(x)
        torch.testing.assert_close(baked(x), expected, rtol=0, atol=1e-6)
        # saved like any model: its spec rebuilds the base network, its state dict loads into it
        clone = build(ModelSpec.from_json(json.loads(json.dumps(baked.spec.to_json()))))
        clone.load_state_dict(baked.state_dict())
        torch.testing.assert_close(clone.eval()(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
def test_sliding_window_gives_the_window_size_implicitly(ndim: int) -> None:
    net = _hyper(ndim=ndim, init_std=0.05).eval()
    image = torch.randn(1, 1, *(12, 20, 16)[:ndim], generator=torch.Generator().manual_seed(3))
    patch = (8,) * ndim
    hn = sliding_window(net, image, patch, divisor=net.divisor, batch_size=3)
    baked = sliding_window(net.bake(patch).eval(), image, patch, divisor=net.divisor, batch_size=3)
    torch.testing.assert_close(hn, baked, rtol=0, atol=1e-6)
    other = sliding_window(net.bake((16,) * ndim).eval(), image, patch, divisor=net.divisor, batch_size=3)
    assert not torch.allclose(hn, other, atol=1e-4)


def test_eval_cache_is_reused_and_invalidated() -> None:
    net = _hyper(init_std=0.05)
    calls = []
    net.trunk.register_forward_hook(lambda *_: calls.append(1))
    x, x16 = _x(2, 8), _x(2, 16)
    net.eval()
    with torch.inference_mode():
        first = net(x)
        net(x), net(x), net(x16), net(x)
    assert len(calls) == 2  # one prediction per size
    with torch.no_grad():  # inference tensors from the cache are fine outside inference mode
        torch.testing.assert_close(net(x), first, rtol=0, atol=0)
    assert len(calls) == 2
    net(x)  # grad enabled: never cached (the weights must carry the graph)
    assert len(calls) == 3
    _step(net, x)  # optimiser step while in eval mode: only the version counters notice
    with torch.no_grad():
        after = net(x)
    assert len(calls) == 5 and not torch.allclose(after, first)
    torch.testing.assert_close(after, net.bake((8, 8)).eval()(x), rtol=0, atol=1e-6)
    net.train()
    assert not net._cache
    net.eval()
    before = len(calls)
    with torch.no_grad():
        net(x)
    assert len(calls) == before + 1


def test_state_dict_load_invalidates_the_cache() -> None:
    net, other = _hyper(init_std=0.05).eval(), _hyper(init_std=0.05)
    with torch.no_grad():
        for p in other.trunk.parameters():
            p.add_(0.5)
    x = _x(2, 8)
    with torch.no_grad():
        net(x)
        net.load_state_dict(other.state_dict())
        torch.testing.assert_close(net(x), other.eval()(x), rtol=0, atol=0)


def test_registry_spec_round_trip() -> None:
    net = create_model("unet", 2, 1, 3, **TINY_UNET, hyper={"hidden": 6, "layers": 2, "subset": ["head"]})
    assert isinstance(net, PatchSizeHypernet) and net.divisor == (4, 4)
    assert net.spec.kwargs["hyper"] == {
        "hidden": 6,
        "layers": 2,
        "subset": ["head"],
        "size_scale": 256.0,
        "mode": "residual",
        "init_std": 0.0,
    }
    assert net.target.spec.kwargs == {**TINY_UNET}
    with torch.no_grad():
        for p in net.heads.parameters():
            p.normal_()
    clone = build(ModelSpec.from_json(json.loads(json.dumps(net.spec.to_json()))))
    assert isinstance(clone, PatchSizeHypernet) and clone.spec == net.spec
    clone.load_state_dict(net.state_dict())
    x = _x(2, 8)
    torch.testing.assert_close(clone(x), net(x), rtol=0, atol=0)
    assert model_divisor("unet", 2, **TINY_UNET, hyper=True) == (4, 4)
    default = create_model("unet", 2, **TINY_UNET, hyper=True)
    assert default.spec.kwargs["hyper"] == HyperConfig().to_json()
    assert len(default.trunk) == 6 and default.trunk[-2].out_features == 50  # 3 layers of 50
    plain = create_model("unet", 2, **TINY_UNET, hyper=False)
    assert not isinstance(plain, PatchSizeHypernet) and "hyper" not in plain.spec.kwargs


def test_absolute_mode_follows_the_authors() -> None:
    net = _hyper(mode="absolute", size_scale=1.0)
    w = net.weights_for((8, 16))
    assert all(v.abs().max() <= 5.0 for v in w.values())
    assert all(not p.requires_grad for p in net.target.parameters())  # unused: W is predicted whole
    std = torch.cat([h.weight.flatten() for h in net.heads.values()]).std()
    assert 0.02 < std < 0.03
    x = _x(2, 8)
    torch.testing.assert_close(net.bake((8, 8))(x), net(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("hyper", "match"),
    [
        ({"hidden": 0}, "hidden must be a positive integer"),
        ({"size_scale": -1}, "size_scale must be a positive"),
        ({"mode": "tanh"}, "mode 'tanh' unknown"),
        ({"subset": "norms"}, "subset 'norms' unknown"),
        ({"subset": []}, "non-empty list"),
        ({"depth": 3}, r"settings \['depth'\] unknown"),
        ("yes", "hyper must be true or an object"),
    ],
)
def test_bad_hyper_settings(hyper: object, match: str) -> None:
    with pytest.raises(FlexPatchError, match=match):
        create_model("unet", 2, **TINY_UNET, hyper=hyper)


def test_bad_inputs() -> None:
    net = _hyper()
    with pytest.raises(FlexPatchError, match=r"input \(1, 1, 8, 8, 8\) must be .* 2 spatial axes"):
        net(torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(FlexPatchError, match=r"patch size \(8, 0\) must have 2 positive sides"):
        net.bake((8, 0))
    with pytest.raises(FlexPatchError, match="ndim 2 or 3"):
        PatchSizeHypernet(nn.Conv2d(1, 1, 3))
    assert PatchSizeHypernet(nn.Conv2d(1, 1, 3), ndim=2)(torch.randn(1, 1, 5, 5)).shape == (1, 1, 3, 3)
