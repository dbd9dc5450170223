"""Instance optimisation: test-time refinement of a displacement on one pair.

The independent reference is a known smooth displacement: the fixed image is the moving
image warped with it, and the refinement must come closer to it than its start.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tutorial_utils.instance import instance_optimise
from tutorial_utils.models import FeatureCNN
from tutorial_utils.transform import warp


def _smooth_image(B, H, W, seed):
    """Blurred noise: structure at a scale of ~8 pixels, values in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(B, 1, H // 8, W // 8, generator=generator)
    return F.interpolate(noise, size=(H, W), mode="bicubic", align_corners=False).clamp(0, 1)


def _known_field(B, H, W):
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    field = torch.stack([2.0 * torch.sin(2 * torch.pi * xs / W), 1.5 * torch.cos(2 * torch.pi * ys / H)])
    return field[None].expand(B, -1, -1, -1).contiguous()  # [B, 2, H, W], up to 2 pixels


def _endpoint_error(a, b, margin=8):
    inner = (slice(None), slice(None), slice(margin, -margin), slice(margin, -margin))
    return (a - b)[inner].square().sum(1).sqrt().mean().item()


@pytest.mark.parametrize("features", ["intensity", "mind"])
def test_recovers_a_known_smooth_displacement(features):
    H, W = 64, 96
    moving = _smooth_image(2, H, W, 0)
    truth = _known_field(2, H, W)
    fixed = warp(moving, truth)  # warp(moving, truth) == fixed: truth is the answer
    start = torch.zeros_like(truth)
    refined, history = instance_optimise(fixed, moving, start, features, iterations=60, lr=0.2,
                                         diffusion_weight=0.05, return_history=True)
    assert refined.shape == (2, 2, H, W)
    assert len(history) == 61
    assert history[-1] < 0.7 * history[0]  # its own objective
    before, after = _endpoint_error(start, truth), _endpoint_error(refined, truth)
    assert after < 0.5 * before, (before, after)


def test_improves_a_perturbed_start():
    H, W = 64, 96
    moving = _smooth_image(1, H, W, 1)
    truth = _known_field(1, H, W)
    fixed = warp(moving, truth)
    start = truth + torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)  # one pixel off everywhere
    refined = instance_optimise(fixed, moving, start, "intensity", iterations=40, lr=0.1)
    assert _endpoint_error(refined, truth) < 0.5 * _endpoint_error(start, truth)


def test_no_gradient_reaches_the_model_and_its_mode_is_restored():
    torch.manual_seed(0)
    model = FeatureCNN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm running stats included
    fixed, moving = _smooth_image(2, 32, 48, 2), _smooth_image(2, 32, 48, 3)
    with torch.no_grad():  # works inside no_grad
        out = instance_optimise(fixed, moving, torch.zeros(2, 2, 32, 48), model, iterations=3)
    assert out.shape == (2, 2, 32, 48) and not out.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_zero_iterations_return_the_start_on_the_grid():
    # a field that is constant on 4 x 4 blocks... after pooling and bilinear upsampling a
    # constant (or affine) field comes back exactly
    H, W = 32, 48
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                            indexing="ij")
    affine = torch.stack([0.05 * xs + 1.0, -0.03 * ys + 0.02 * xs])[None]  # [1, 2, H, W]
    image = _smooth_image(1, H, W, 4).double()
    out = instance_optimise(image, image, affine, "intensity", iterations=0, smooth=0)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert torch.allclose(out[inner], affine[inner], atol=1e-9)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("kwargs, match", [
    (dict(displacement=torch.zeros(1, 2, 16, 16)), "displacement"),
    (dict(grid_stride=5), "grid_stride"),
    (dict(grid_stride=0), "grid_stride"),
    (dict(iterations=-1), "iterations"),
    (dict(lr=0.0), "lr"),
    (dict(diffusion_weight=-1.0), "diffusion_weight"),
    (dict(image_moving=torch.rand(1, 1, 32, 32)), "differ in shape"),
    (dict(features="sift"), "features"),
])
def test_bad_input_raises_value_error(kwargs, match):
    arguments = dict(image_fixed=torch.rand(1, 1, 32, 48), image_moving=torch.rand(1, 1, 32, 48),
                     displacement=torch.zeros(1, 2, 32, 48), iterations=1)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        instance_optimise(**arguments)
