"""Spatial transforms: warp, label warping, upsampling, composition, affine fields."""

import math

import pytest
import torch

from tutorial_utils import transform as T


def test_warp_zero_displacement_is_identity():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 8, 10)
    assert torch.allclose(T.warp(image, torch.zeros(2, 2, 8, 10)), image, atol=1e-6)


def test_warp_integer_shift_convention():
    torch.manual_seed(0)
    moving = torch.rand(1, 1, 12, 15)
    dy, dx = 2, -3
    shift = T.translation_displacement(torch.tensor([[float(dy), float(dx)]]), (12, 15))
    warped = T.warp(moving, shift)
    # warped[y, x] = moving[y + dy, x + dx] wherever that lies inside the image
    assert torch.allclose(warped[0, 0, 0:10, 3:15], moving[0, 0, 2:12, 0:12], atol=1e-6)


def test_warp_half_pixel_shift_is_linear_interpolation():
    moving = torch.arange(6.0).view(1, 1, 1, 6).expand(1, 1, 4, 6).contiguous()
    shift = T.translation_displacement(torch.tensor([[0.0, 0.5]]), (4, 6))
    warped = T.warp(moving, shift)
    assert torch.allclose(warped[0, 0, :, :5], torch.arange(5.0) + 0.5)


def test_warp_affine_against_closed_form():
    """A linear image I(y, x) = a*y + b*x + c warped by an affine field, checked pointwise."""
    H, W = 20, 24
    ys, xs = torch.meshgrid(torch.arange(H).double(), torch.arange(W).double(), indexing="ij")
    image = (0.3 * ys - 0.2 * xs + 1.0)[None, None]
    angle = math.radians(5)
    matrix = torch.tensor([[[math.cos(angle), -math.sin(angle), 0.7],
                            [math.sin(angle), math.cos(angle), -0.4]]], dtype=torch.float64)
    field = T.affine_displacement(matrix, (H, W))
    cy, cx = (H - 1) / 2, (W - 1) / 2
    my = matrix[0, 0, 0] * (ys - cy) + matrix[0, 0, 1] * (xs - cx) + matrix[0, 0, 2] + cy
    mx = matrix[0, 1, 0] * (ys - cy) + matrix[0, 1, 1] * (xs - cx) + matrix[0, 1, 2] + cx
    assert torch.allclose(field[0, 0], my - ys) and torch.allclose(field[0, 1], mx - xs)
    warped = T.warp(image, field, padding_mode="zeros")
    inside = (my >= 0) & (my <= H - 1) & (mx >= 0) & (mx <= W - 1)
    expected = 0.3 * my - 0.2 * mx + 1.0
    assert torch.allclose(warped[0, 0][inside], expected[inside], atol=1e-9)


def test_warp_labels_nearest_and_bilinear_on_integer_shift():
    labels = torch.zeros(1, 10, 12, dtype=torch.long)
    labels[0, 2:5, 3:7] = 1
    labels[0, 6:9, 1:4] = 2
    shift = T.translation_displacement(torch.tensor([[1.0, 2.0]]), (10, 12))
    for mode in ("nearest", "bilinear"):
        warped = T.warp_labels(labels, shift, 3, mode=mode)
        assert warped.dtype == torch.long and warped.shape == labels.shape
        assert torch.equal(warped[0, 1:4, 1:5], torch.ones(3, 4, dtype=torch.long))
        assert torch.equal(warped[0, 5:8, 0:2], torch.full((3, 2), 2))
        assert int((warped == 1).sum()) == 12


def test_upsample_constant_field_scales_values():
    low = torch.ones(1, 2, 4, 5) * torch.tensor([1.5, -2.0]).view(1, 2, 1, 1)
    for mode in ("bilinear", "bicubic", "nearest"):
        high = T.upsample_displacement(low, (16, 20), mode=mode)
        assert high.shape == (1, 2, 16, 20)
        assert torch.allclose(high[:, 0], torch.full((1, 16, 20), 6.0), atol=1e-5)
        assert torch.allclose(high[:, 1], torch.full((1, 16, 20), -8.0), atol=1e-5)


def test_compose_translations_and_warps():
    torch.manual_seed(0)
    a = T.translation_displacement(torch.tensor([[1.0, -2.0]]), (16, 16))
    b = T.translation_displacement(torch.tensor([[0.5, 3.0]]), (16, 16))
    assert torch.allclose(T.compose_displacements(a, b), a + b)
    # a smooth field: warping twice equals warping once with the composition (inside the image)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    image = (torch.sin(ys / 5) * torch.cos(xs / 7))[None, None]
    first = 1.5 * torch.stack([torch.sin(xs / 9), torch.cos(ys / 8)])[None]
    second = torch.stack([torch.cos(xs / 11), 0.8 * torch.sin(ys / 6)])[None]
    twice = T.warp(T.warp(image, first), second)
    once = T.warp(image, T.compose_displacements(first, second))
    assert (twice - once)[..., 4:-4, 4:-4].abs().max() < 0.02


@pytest.mark.parametrize("bad", [
    lambda: T.warp(torch.rand(1, 1, 8, 8), torch.zeros(1, 3, 8, 8)),
    lambda: T.warp(torch.rand(1, 1, 8, 8), torch.zeros(1, 2, 4, 4)),
    lambda: T.warp(torch.rand(8, 8), torch.zeros(1, 2, 8, 8)),
    lambda: T.warp(torch.rand(2, 1, 8, 8), torch.zeros(3, 2, 8, 8)),
    lambda: T.warp(torch.rand(1, 1, 8, 8), torch.zeros(1, 2, 8, 8), mode="cubic"),
    lambda: T.warp(torch.ones(1, 1, 8, 8, dtype=torch.long), torch.zeros(1, 2, 8, 8)),
    lambda: T.warp_labels(torch.zeros(1, 8, 8), torch.zeros(1, 2, 8, 8), 2),
    lambda: T.warp_labels(torch.full((1, 8, 8), 5), torch.zeros(1, 2, 8, 8), 3),
    lambda: T.upsample_displacement(torch.zeros(1, 2, 4, 4), (0, 8)),
    lambda: T.affine_displacement(torch.eye(3), (8, 8)),
])
def test_bad_input_raises_value_error(bad):
    with pytest.raises(ValueError):
        bad()
