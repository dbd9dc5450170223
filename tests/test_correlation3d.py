"""The 3D correlation layers (tutorial_utils.three_d.correlation: correlation3d,
argmin_displacement3d; tutorial_utils.three_d.sparse: the sparse pdd_net variant) against
independent references: brute-force loops, closed forms, gradcheck."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tutorial_utils.three_d.correlation import argmin_displacement3d, correlation3d
from tutorial_utils.three_d.sparse import control_points3d, displacement_cube, sparse_correlation3d

pytestmark = pytest.mark.usefixtures("single_thread")


def brute_force(fixed: np.ndarray, moving: np.ndarray, disp_range: int, metric: str,
                border: str = "zeros") -> np.ndarray:
    """The 3D cost volume by loops over offsets and voxels (NumPy, float64)."""
    B, C, Z, Y, X = fixed.shape
    r = (disp_range - 1) // 2
    out = np.zeros((B, disp_range**3, Z, Y, X))
    for b, i, j, k, z, y, x in itertools.product(range(B), *[range(disp_range)] * 3, range(Z), range(Y), range(X)):
        zz, yy, xx = z + i - r, y + j - r, x + k - r
        if border == "replicate":
            zz, yy, xx = min(max(zz, 0), Z - 1), min(max(yy, 0), Y - 1), min(max(xx, 0), X - 1)
        inside = 0 <= zz < Z and 0 <= yy < Y and 0 <= xx < X
        m = moving[b, :, zz, yy, xx] if inside else np.zeros(C)
        f = fixed[b, :, z, y, x]
        out[b, (i * disp_range + j) * disp_range + k, z, y, x] = ((f - m) ** 2).sum() if metric == "ssd" else -(f * m).sum()
    return out


def _features(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


# (B, C, Z, Y, X, D): several slices, D larger than the volume along some axes, D = 1, a
# width that the 2D layer pads to whole tiles (37), B = 2
SHAPES = [(1, 2, 3, 4, 5, 3), (2, 1, 2, 3, 4, 5), (1, 2, 2, 2, 3, 7), (1, 3, 4, 3, 3, 1), (1, 1, 2, 2, 37, 3)]


@pytest.mark.parametrize("metric", ["ssd", "dot"])
@pytest.mark.parametrize("B,C,Z,Y,X,D", SHAPES)
def test_matches_brute_force_loops(metric, B, C, Z, Y, X, D):
    f, m = _features((B, C, Z, Y, X))
    out = correlation3d(f, m, D, metric=metric)
    assert out.shape == (B, D**3, Z, Y, X) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), brute_force(f.numpy(), m.numpy(), D, metric), rtol=1e-10, atol=1e-10)


def test_border_values_closed_form():
    """fixed = moving = 1: SSD 0 where the offset stays inside the volume, C outside (zero padding)."""
    C, Z, Y, X, D, r = 2, 3, 4, 5, 5, 2
    ones = torch.ones(1, C, Z, Y, X, dtype=torch.float64)
    out = correlation3d(ones, ones.clone(), D)
    for i, j, k in itertools.product(range(D), repeat=3):
        zz = torch.arange(Z)[:, None, None] + i - r
        yy = torch.arange(Y)[None, :, None] + j - r
        xx = torch.arange(X)[None, None, :] + k - r
        inside = (zz >= 0) & (zz < Z) & (yy >= 0) & (yy < Y) & (xx >= 0) & (xx < X)
        expected = torch.where(inside, 0.0, float(C)).double()
        torch.testing.assert_close(out[0, (i * D + j) * D + k], expected, rtol=0, atol=1e-12)


def test_channel_order_recovers_a_known_shift():
    """moving[z + sz, y + sy, x + sx] = fixed[z, y, x]: the cheapest channel away from the border
    is k = ((sz + r) * D + sy + r) * D + sx + r, and the arg-min reads out (sz, sy, sx)."""
    D, r, shift = 5, 2, (1, -2, 1)
    fixed = torch.rand(1, 3, 8, 9, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    moving = torch.roll(fixed, shifts=shift, dims=(2, 3, 4))
    cost = correlation3d(fixed, moving, D)
    inner = (slice(None), slice(None), slice(r, -r), slice(r, -r), slice(r, -r))
    best = cost.argmin(dim=1)[inner[:1] + inner[2:]]
    k = ((shift[0] + r) * D + shift[1] + r) * D + shift[2] + r
    assert (best == k).all()
    displacement = argmin_displacement3d(cost, D)[inner]  # [1, 3, ...]
    for axis, s in enumerate(shift):
        assert (displacement[:, axis] == s).all()


@pytest.mark.parametrize("metric", ["ssd", "dot"])
def test_gradcheck(metric):
    f, m = _features((2, 2, 2, 3, 4), seed=1)
    f.requires_grad_(True)
    m.requires_grad_(True)
    # fast mode (random projections of the Jacobian): one backward pass instead of one per output;
    # the full Jacobian is compared with plain autograd in the next test
    assert torch.autograd.gradcheck(lambda a, b: correlation3d(a, b, 3, metric=metric), (f, m), fast_mode=True)


def test_gradients_match_plain_autograd_on_a_larger_problem():
    """Against autograd through a plain loop over the D^3 shifted copies (an independent path)."""
    f, m = _features((1, 3, 4, 5, 20), seed=4)
    D, r = 5, 2
    grad_cost = torch.randn(1, D**3, 4, 5, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def plain(a, b):
        padded = F.pad(b, (r,) * 6)
        return torch.stack([((a - padded[:, :, i:i + 4, j:j + 5, k:k + 20]) ** 2).sum(1)
                            for i, j, k in itertools.product(range(D), repeat=3)], dim=1)

    grads = []
    for layer in (plain, lambda a, b: correlation3d(a, b, D)):
        a, b = f.clone().requires_grad_(True), m.clone().requires_grad_(True)
        layer(a, b).backward(grad_cost)
        grads.append((a.grad, b.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-10)


def test_float32_and_memory_stay_lean():
    from benchmarks.timing import peak_memory_bytes

    f, m = (t.float().sigmoid() for t in _features((1, 8, 8, 12, 16), seed=6))
    D = 7
    out = correlation3d(f, m, D)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), correlation3d(f.double(), m.double(), D), rtol=1e-5, atol=2e-5)
    cost_bytes = D**3 * 8 * 12 * 16 * 4
    peak = peak_memory_bytes(lambda: correlation3d(f, m, D), torch.device("cpu"))
    assert cost_bytes <= peak < 1.6 * cost_bytes  # the output plus a slab and a few feature copies


def test_argmin_displacement3d_order():
    D = 3
    cost = torch.ones(1, D**3, 1, 1, 2)
    cost[0, (2 * D + 0) * D + 1, 0, 0, 0] = 0  # (dz, dy, dx) = (1, -1, 0)
    cost[0, (0 * D + 2) * D + 2, 0, 0, 1] = 0  # (-1, 1, 1)
    out = argmin_displacement3d(cost, D)
    assert out.shape == (1, 3, 1, 1, 2)
    assert out[0, :, 0, 0, 0].tolist() == [1, -1, 0] and out[0, :, 0, 0, 1].tolist() == [-1, 1, 1]


@pytest.mark.parametrize("call, message", [
    (lambda: correlation3d(torch.rand(1, 2, 3, 4), torch.rand(1, 2, 3, 4), 3), "5 dimensions"),
    (lambda: correlation3d(torch.rand(1, 2, 3, 4, 5), torch.rand(1, 2, 3, 4, 6), 3), "same shape"),
    (lambda: correlation3d(torch.rand(1, 2, 3, 4, 5), torch.rand(1, 2, 3, 4, 5), 4), "odd"),
    (lambda: correlation3d(torch.rand(1, 2, 3, 4, 5), torch.rand(1, 2, 3, 4, 5).double(), 3), "dtype"),
    (lambda: correlation3d(torch.rand(1, 2, 3, 4, 5), torch.rand(1, 2, 3, 4, 5), 3, metric="ncc"), "metric"),
    (lambda: argmin_displacement3d(torch.rand(1, 26, 2, 2, 2), 3), r"D\*\*3=27"),
    (lambda: sparse_correlation3d(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 1, 4, 4, 4), 3,
                                  offsets=torch.tensor([[0, 0, 2]])), "within"),
    (lambda: sparse_correlation3d(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 1, 4, 4, 4), 3, grid_step=0), "grid_step"),
    (lambda: sparse_correlation3d(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 1, 4, 4, 4), 3, border="wrap"), "border"),
])
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------- sparse sampling


def test_control_points_and_displacement_cube():
    points, grid_shape = control_points3d((5, 6, 1), 2)
    # axis of 5: 0, 2, 4; axis of 6: first = (5 % 2) // 2 = 0 -> 0, 2, 4; axis of 1: 0
    assert grid_shape == (3, 3, 1)
    assert points.tolist() == [[z, y, 0] for z in (0, 2, 4) for y in (0, 2, 4)]
    _, shape = control_points3d((8, 7, 9), 3)  # 8: first 0 -> 0, 3, 6; 7: first 0 -> 0, 3, 6; 9: first 1 -> 1, 4, 7
    assert shape == (3, 3, 3) and control_points3d((8, 7, 9), 3)[0][0].tolist() == [0, 0, 1]
    cube = displacement_cube(9, 2)
    assert cube.shape == (125, 3) and cube[0].tolist() == [-4, -4, -4] and cube[1].tolist() == [-4, -4, -2]
    assert displacement_cube(7, 2).unique().tolist() == [-2, 0, 2]  # r = 3: steps of 2 that fit
    full = displacement_cube(3, 1)
    assert full.tolist() == [[i - 1, j - 1, k - 1] for i, j, k in itertools.product(range(3), repeat=3)]


@pytest.mark.parametrize("metric", ["ssd", "dot"])
@pytest.mark.parametrize("grid_step,disp_step", [(1, 1), (2, 2), (3, 1)])
def test_sparse_equals_dense_at_the_sampled_points(metric, grid_step, disp_step):
    f, m = _features((2, 3, 5, 7, 8), seed=7)
    D = 5
    dense = correlation3d(f, m, D, metric=metric)
    sparse = sparse_correlation3d(f, m, D, grid_step=grid_step, disp_step=disp_step, metric=metric)
    K, P = sparse.offsets.shape[0], sparse.points.shape[0]
    assert sparse.cost.shape == (2, K, P) and P == int(np.prod(sparse.grid_shape))
    r = (D - 1) // 2
    channels = ((sparse.offsets[:, 0] + r) * D + sparse.offsets[:, 1] + r) * D + sparse.offsets[:, 2] + r
    z, y, x = sparse.points.T
    expected = dense[:, channels][:, :, z, y, x]  # [B, K, P]
    torch.testing.assert_close(sparse.cost, expected, rtol=1e-10, atol=1e-10)


def test_sparse_random_offsets_replicate_border_and_gradient():
    f, m = _features((1, 2, 4, 3, 5), seed=8)
    D = 5
    offsets = torch.tensor([[0, 0, 0], [2, -1, 1], [-2, 2, -2], [1, 1, 0]])
    sparse = sparse_correlation3d(f, m, D, grid_step=1, offsets=offsets, border="replicate")
    assert torch.equal(sparse.offsets, offsets)
    expected = brute_force(f.numpy(), m.numpy(), D, "ssd", border="replicate")  # [1, D^3, Z, Y, X]
    channels = ((offsets[:, 0] + 2) * D + offsets[:, 1] + 2) * D + offsets[:, 2] + 2
    np.testing.assert_allclose(sparse.cost.numpy(), expected[:, channels.numpy()].reshape(1, 4, -1), atol=1e-10)
    a, b = f.clone().requires_grad_(True), m.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: sparse_correlation3d(a, b, 3, grid_step=2, disp_step=1).cost, (a, b),
                                    fast_mode=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("metric", ["ssd", "dot"])
def test_cuda_matches_the_loops_and_the_cpu(metric):
    f, m = _features((1, 3, 4, 5, 6), seed=11)
    D = 3
    grad_cost = torch.randn(1, D**3, 4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    results = {}
    for device in ("cpu", "cuda"):
        a = f.detach().clone().to(device).requires_grad_(True)
        b = m.detach().clone().to(device).requires_grad_(True)
        cost = correlation3d(a, b, D, metric=metric)
        assert cost.device.type == device
        cost.backward(grad_cost.to(device))
        sparse = sparse_correlation3d(a.detach(), b.detach(), D, grid_step=2, disp_step=1, metric=metric).cost
        results[device] = [t.detach().cpu() for t in (cost, a.grad, b.grad, sparse)]
    np.testing.assert_allclose(results["cuda"][0].numpy(), brute_force(f.numpy(), m.numpy(), D, metric), atol=1e-10)
    for on_cpu, on_gpu in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(on_gpu, on_cpu)
