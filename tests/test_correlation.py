"""tutorial_utils.correlation against independent references: brute-force loops, closed forms,
torch.autograd.gradcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tutorial_utils.correlation import argmin_displacement, correlation, correlation_unfold

LAYERS = {
    "unfold-ssd": lambda f, m, d: correlation_unfold(f, m, d),
    "fast-ssd": lambda f, m, d: correlation(f, m, d, metric="ssd"),
    "fast-dot": lambda f, m, d: correlation(f, m, d, metric="dot"),
}
METRIC_OF = {"unfold-ssd": "ssd", "fast-ssd": "ssd", "fast-dot": "dot"}

# (B, C, H, W, D): square and not, one tile and several (W = 40, 64), a width with no good tile
# divisor (37: padded to whole tiles), D larger than the image, D = 1, D > 25 (wider tiles)
SHAPES = [
    (1, 3, 5, 6, 3),
    (2, 2, 4, 7, 5),
    (1, 2, 3, 4, 9),
    (2, 3, 6, 5, 1),
    (1, 3, 9, 40, 7),
    (1, 4, 6, 37, 5),
    (1, 2, 5, 64, 21),
    (1, 2, 4, 70, 29),
]


def brute_force(fixed: np.ndarray, moving: np.ndarray, disp_range: int, metric: str) -> np.ndarray:
    """The cost volume by loops over offsets and pixels (NumPy, float64), zero outside the image."""
    B, C, H, W = fixed.shape
    r = (disp_range - 1) // 2
    out = np.zeros((B, disp_range * disp_range, H, W))
    for b in range(B):
        for i in range(disp_range):
            for j in range(disp_range):
                dy, dx = i - r, j - r
                for y in range(H):
                    for x in range(W):
                        yy, xx = y + dy, x + dx
                        inside = 0 <= yy < H and 0 <= xx < W
                        m = moving[b, :, yy, xx] if inside else np.zeros(C)
                        f = fixed[b, :, y, x]
                        out[b, i * disp_range + j, y, x] = ((f - m) ** 2).sum() if metric == "ssd" else -(f * m).sum()
    return out


def _features(shape, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    f = torch.randn(B, C, H, W, generator=g, dtype=dtype).to(device)
    m = torch.randn(B, C, H, W, generator=g, dtype=dtype).to(device)
    return f, m


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("B,C,H,W,D", SHAPES)
def test_matches_brute_force_loops(layer, B, C, H, W, D):
    f, m = _features((B, C, H, W))
    expected = brute_force(f.numpy(), m.numpy(), D, METRIC_OF[layer])
    out = LAYERS[layer](f, m, D)
    assert out.shape == (B, D * D, H, W)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_border_values_closed_form(layer):
    """fixed = 1, moving = 1 everywhere: SSD is 0 where the offset stays inside, C outside; the
    negative dot product is -C inside and 0 outside."""
    B, C, H, W, D = 1, 3, 4, 6, 5
    r = (D - 1) // 2
    ones = torch.ones(B, C, H, W, dtype=torch.float64)
    out = LAYERS[layer](ones, ones.clone(), D)
    for i in range(D):
        for j in range(D):
            dy, dx = i - r, j - r
            for y in range(H):
                for x in range(W):
                    inside = 0 <= y + dy < H and 0 <= x + dx < W
                    if METRIC_OF[layer] == "ssd":
                        want = 0.0 if inside else float(C)
                    else:
                        want = -float(C) if inside else 0.0
                    assert out[0, i * D + j, y, x].item() == pytest.approx(want, abs=1e-12), (i, j, y, x)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_channel_order_recovers_a_known_shift(layer):
    """moving = fixed shifted by (sy, sx), i.e. moving[y + sy, x + sx] = fixed[y, x]: the
    cheapest channel away from the border is k = (sy + r) * D + (sx + r)."""
    D, r, (sy, sx) = 7, 3, (2, -1)
    g = torch.Generator().manual_seed(3)
    fixed = torch.rand(1, 4, 16, 18, generator=g, dtype=torch.float64)
    moving = torch.roll(fixed, shifts=(sy, sx), dims=(2, 3))
    cost = LAYERS[layer](fixed, moving, D)
    if METRIC_OF[layer] == "dot":  # the dot product is not minimal at the match for unnormalised features
        fixed = fixed / fixed.norm(dim=1, keepdim=True)
        moving = torch.roll(fixed, shifts=(sy, sx), dims=(2, 3))
        cost = LAYERS[layer](fixed, moving, D)
    best = cost.argmin(dim=1)[0, r:-r, r:-r]
    assert (best == (sy + r) * D + (sx + r)).all()
    displacement = argmin_displacement(cost, D)[0, :, r:-r, r:-r]  # [2, h, w]
    assert (displacement[0] == sy).all() and (displacement[1] == sx).all()


@pytest.mark.parametrize("metric", ["ssd", "dot"])
@pytest.mark.parametrize("B,C,H,W,D", [(2, 2, 4, 5, 3), (1, 2, 3, 37, 3), (1, 1, 3, 40, 5)])
def test_gradcheck_fast(metric, B, C, H, W, D):
    f, m = _features((B, C, H, W), seed=1)
    f.requires_grad_(True)
    m.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: correlation(a, b, D, metric=metric), (f, m))


def test_gradcheck_unfold():
    f, m = _features((2, 2, 4, 5), seed=2)
    f.requires_grad_(True)
    m.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: correlation_unfold(a, b, 3), (f, m))


def test_fast_gradients_match_unfold_on_a_larger_problem():
    """Several tiles, segments overlapping by more than a tile (2r = 20 > T = 16)."""
    f, m = _features((2, 5, 7, 64), seed=4)
    grad_cost = torch.randn(2, 21 * 21, 7, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grads = []
    for layer in (correlation_unfold, correlation):
        a, b = f.clone().requires_grad_(True), m.clone().requires_grad_(True)
        layer(a, b, 21).backward(grad_cost)
        grads.append((a.grad, b.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-10)


def test_dot_gradient_closed_form():
    """d/d fixed of sum_k cost_k = -sum over offsets of moving (zero outside), for the dot metric."""
    f, m = _features((1, 2, 5, 6), seed=6)
    f.requires_grad_(True)
    correlation(f, m, 3, metric="dot").sum().backward()
    padded = torch.nn.functional.pad(m, (1, 1, 1, 1))
    expected = -sum(padded[..., i:i + 5, j:j + 6] for i in range(3) for j in range(3))
    torch.testing.assert_close(f.grad, expected)


def test_gradient_to_one_input_only():
    f, m = _features((1, 3, 6, 7), seed=7)
    m.requires_grad_(True)
    correlation(f, m, 5).sum().backward()
    a, b = f.clone(), m.detach().clone().requires_grad_(True)
    correlation_unfold(a, b, 5).sum().backward()
    torch.testing.assert_close(m.grad, b.grad)


def test_float32_agrees_with_float64():
    f, m = _features((1, 24, 20, 64), dtype=torch.float32, seed=8)
    f, m = f.sigmoid(), m.sigmoid()  # features in (0, 1) like the CNN's
    out = correlation(f, m, 9)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), correlation_unfold(f.double(), m.double(), 9), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(correlation(f, m, 9, metric="dot").double(),
                               correlation(f.double(), m.double(), 9, metric="dot"), rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs():
    f, m = _features((1, 3, 8, 6), seed=9)
    f_t, m_t = f.transpose(2, 3).contiguous().transpose(2, 3), m.to(memory_format=torch.channels_last)
    assert not f_t.is_contiguous()
    torch.testing.assert_close(correlation(f_t, m_t, 5), correlation_unfold(f, m, 5))
    torch.testing.assert_close(correlation_unfold(f_t, m_t, 5), correlation_unfold(f, m, 5))


def test_fast_version_never_builds_the_unfolded_tensor():
    """Peak memory of the forward pass stays far below the [C, D*D, H*W] tensor of the unfold layer."""
    from benchmarks.timing import peak_memory_bytes

    f, m = _features((1, 24, 40, 32), dtype=torch.float32)
    D = 21
    unfolded = 24 * D * D * 40 * 32 * 4
    cost_volume = D * D * 40 * 32 * 4
    peak_fast = peak_memory_bytes(lambda: correlation(f, m, D), torch.device("cpu"))
    peak_unfold = peak_memory_bytes(lambda: correlation_unfold(f, m, D), torch.device("cpu"))
    assert peak_unfold >= unfolded
    assert cost_volume <= peak_fast < 2 * cost_volume


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("metric", ["ssd", "dot"])
def test_cuda_matches_cpu(metric):
    f, m = _features((2, 4, 9, 40), seed=10)
    grad_cost = torch.randn(2, 49, 9, 40, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        a = f.detach().clone().to(device).requires_grad_(True)
        b = m.detach().clone().to(device).requires_grad_(True)
        out = correlation(a, b, 7, metric=metric)
        assert out.device.type == device
        out.backward(grad_cost.to(device))
        results.append([t.detach().cpu() for t in (out, a.grad, b.grad)])
    for cpu, gpu in zip(*results):
        torch.testing.assert_close(cpu, gpu)
    a = f.float().cuda().requires_grad_(True)
    torch.testing.assert_close(correlation(a, m.float().cuda(), 7, metric=metric).cpu().double(),
                               results[0][0], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("layer", [correlation_unfold, correlation])
@pytest.mark.parametrize("disp_range", [4, 0, -3, 2.0, True, "9", None])
def test_bad_disp_range(layer, disp_range):
    f, m = _features((1, 2, 5, 5))
    with pytest.raises((TypeError, ValueError), match="disp_range must be an"):
        layer(f, m, disp_range)


def test_numpy_integer_disp_range_is_fine():
    f, m = _features((1, 2, 5, 5))
    assert correlation(f, m, np.int64(3)).shape == (1, 9, 5, 5)


@pytest.mark.parametrize("layer", [correlation_unfold, correlation])
def test_bad_shapes_devices_dtypes(layer):
    f, m = _features((1, 2, 5, 5))
    with pytest.raises(ValueError, match="same shape"):
        layer(f, m[:, :, :4], 3)
    with pytest.raises(ValueError, match="4 dimensions"):
        layer(f[0], m[0], 3)
    with pytest.raises(ValueError, match="4 dimensions"):
        layer(f[None], m[None], 3)
    with pytest.raises(ValueError, match="feat_moving is on meta"):
        layer(f, m.to("meta"), 3)
    with pytest.raises(ValueError, match="same dtype"):
        layer(f, m.float(), 3)
    with pytest.raises(ValueError, match="floating point"):
        layer(f.long(), m.long(), 3)
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer(f.numpy(), m, 3)


def test_bad_metric():
    f, m = _features((1, 2, 5, 5))
    with pytest.raises(ValueError, match="metric must be one of"):
        correlation(f, m, 3, metric="ncc")


def test_argmin_displacement_bad_input():
    with pytest.raises(ValueError, match=r"D\*D=9"):
        argmin_displacement(torch.zeros(1, 8, 4, 4), 3)
    with pytest.raises(ValueError, match="disp_range"):
        argmin_displacement(torch.zeros(1, 16, 4, 4), 4)
