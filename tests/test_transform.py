"""Spatial transforms: warp, label warping, upsampling, composition, affine fields."""

import itertools
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


def ramp_field(h, w):
    """dy = 0.5 i + 0.25 j - 1, dx = -0.3 i + 0.2 j + 0.5 on the low grid (float64)."""
    i = torch.arange(h, dtype=torch.float64).view(h, 1)
    j = torch.arange(w, dtype=torch.float64).view(1, w)
    return torch.stack([(0.5 * i + 0.25 * j - 1).expand(h, w), (-0.3 * i + 0.2 * j + 0.5).expand(h, w)])[None]


def source_coordinates(n_low, n_high):
    """align_corners=False: high pixel y sits at s = (y + 0.5) * n_low / n_high - 0.5 on the low grid."""
    return (torch.arange(n_high, dtype=torch.float64) + 0.5) * n_low / n_high - 0.5


def test_upsample_linear_ramp_bilinear_closed_form():
    """Bilinear interpolation reproduces a linear function exactly; beyond the outermost low
    pixel centres it holds the edge value (s clamped to [0, n - 1]); values scale by H/h, W/w."""
    h, w, H, W = 5, 6, 20, 18  # scales 4 and 3: dy and dx are scaled differently
    high = T.upsample_displacement(ramp_field(h, w), (H, W))
    sy = source_coordinates(h, H).clamp(0, h - 1).view(H, 1)
    sx = source_coordinates(w, W).clamp(0, w - 1).view(1, W)
    assert high.shape == (1, 2, H, W) and high.dtype == torch.float64
    assert torch.allclose(high[0, 0], 4 * (0.5 * sy + 0.25 * sx - 1), atol=1e-12)
    assert torch.allclose(high[0, 1], 3 * (-0.3 * sy + 0.2 * sx + 0.5), atol=1e-12)


def keys_cubic(t, a=-0.75):
    """The cubic convolution kernel (Keys; PyTorch's bicubic uses a = -0.75)."""
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def bicubic_loops(field, H, W):
    """Bicubic [B, C, h, w] -> [B, C, H, W], pixel by pixel: 4 x 4 taps around the unclamped
    source coordinate, tap indices clamped to the grid (replicated border)."""
    B, C, h, w = field.shape
    out = torch.zeros(B, C, H, W, dtype=torch.float64)
    sy, sx = source_coordinates(h, H).tolist(), source_coordinates(w, W).tolist()
    for y, x in itertools.product(range(H), range(W)):
        y0, x0 = math.floor(sy[y]), math.floor(sx[x])
        for a, b in itertools.product(range(y0 - 1, y0 + 3), range(x0 - 1, x0 + 3)):
            weight = keys_cubic(sy[y] - a) * keys_cubic(sx[x] - b)
            out[:, :, y, x] += weight * field[:, :, min(max(a, 0), h - 1), min(max(b, 0), w - 1)]
    return out


def test_upsample_linear_ramp_bicubic_and_nearest():
    h, w, H, W = 5, 6, 20, 18
    low = ramp_field(h, w)
    scale = torch.tensor([4.0, 3.0], dtype=torch.float64).view(1, 2, 1, 1)
    bicubic = T.upsample_displacement(low, (H, W), mode="bicubic")
    assert torch.allclose(bicubic, scale * bicubic_loops(low, H, W), atol=1e-12)
    # a = -0.75 does not reproduce a ramp exactly, even inside: measured up to 0.03 low pixels
    sy, sx = source_coordinates(h, H).view(H, 1), source_coordinates(w, W).view(1, W)
    linear = 0.5 * sy + 0.25 * sx - 1
    inside = (sy >= 1) & (sy <= h - 2) & (sx >= 1) & (sx <= w - 2)
    assert (bicubic[0, 0] / 4 - linear)[inside].abs().max() < 0.05
    # nearest: high pixel y takes low pixel floor(y * h / H)
    nearest = T.upsample_displacement(low, (H, W), mode="nearest")
    iy = (torch.arange(H) * h // H).tolist()
    ix = (torch.arange(W) * w // W).tolist()
    assert torch.equal(nearest, scale * low[:, :, iy][:, :, :, ix])


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


@pytest.mark.parametrize("bad, match", [
    (lambda: T.warp(torch.rand(1, 1, 8, 8), torch.zeros(1, 3, 8, 8)), "displacement"),
    (lambda: T.warp(torch.rand(1, 1, 8, 8), torch.zeros(1, 2, 4, 4)), "upsample"),
    (lambda: T.warp(torch.rand(8, 8), torch.zeros(1, 2, 8, 8)), "moving"),
    (lambda: T.warp(torch.rand(2, 1, 8, 8), torch.zeros(3, 2, 8, 8)), "batch"),
    (lambda: T.warp(torch.rand(1, 1, 8, 8), torch.zeros(1, 2, 8, 8), mode="cubic"), "mode"),
    (lambda: T.warp(torch.ones(1, 1, 8, 8, dtype=torch.long), torch.zeros(1, 2, 8, 8)), "moving.*floating point"),
    (lambda: T.warp_labels(torch.zeros(1, 8, 8), torch.zeros(1, 2, 8, 8), 2), "labels.*integers"),
    (lambda: T.warp_labels(torch.full((1, 8, 8), 5), torch.zeros(1, 2, 8, 8), 3), "labels.*values"),
    (lambda: T.upsample_displacement(torch.zeros(1, 2, 4, 4), (0, 8)), "size"),
    (lambda: T.affine_displacement(torch.eye(3), (8, 8)), "matrix"),
])
def test_bad_input_raises_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()
