"""tutorial_utils.three_d.regularisation: min-convolution (exact and approximate), mean field,
soft arg-min, and their sparse (pdd_net) counterparts, against brute-force loops, the pooling
recipe and 2D."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from tutorial_utils import regularisation as R2
from tutorial_utils.three_d import regularisation as R

pytestmark = pytest.mark.usefixtures("single_thread")


def _offsets(D):
    r = (D - 1) // 2
    return [(i - r, j - r, k - r) for i, j, k in itertools.product(range(D), repeat=3)]


def brute_force_min_convolution(cost, offsets, lam):
    """Python loops over voxels and displacement pairs: min_k' cost[k'] + lam |o_k - o_k'|^2."""
    B, K = cost.shape[:2]
    flat = cost.reshape(B, K, -1)
    out = torch.empty_like(flat)
    for b, n in itertools.product(range(B), range(flat.shape[2])):
        for k, o in enumerate(offsets):
            out[b, k, n] = min(float(flat[b, kk, n]) + lam * sum((p - q) ** 2 for p, q in zip(o, oo))
                               for kk, oo in enumerate(offsets))
    return out.view_as(cost)


def pooling_recipe(cost, D, min_kernel=3, avg_kernel=3, avg_passes=2):
    """pdd_net's recipe with torch's own pools on [voxels, 1, D, D, D] (replication pad, min, averages)."""
    B, K, d, h, w = cost.shape
    p = ((min_kernel - 1) + avg_passes * (avg_kernel - 1)) // 2
    x = cost.permute(0, 2, 3, 4, 1).reshape(-1, 1, D, D, D)
    x = -F.max_pool3d(-F.pad(x, (p,) * 6, mode="replicate"), min_kernel, stride=1)
    for _ in range(avg_passes):
        x = F.avg_pool3d(x, avg_kernel, stride=1)
    return x.reshape(B, d, h, w, K).permute(0, 4, 1, 2, 3)


def test_offsets_order():
    offsets = R.displacement_offsets3d(3)
    assert offsets.shape == (27, 3)
    assert offsets.tolist() == [list(o) for o in _offsets(3)]


@pytest.mark.parametrize("lam", [0.0, 0.4, 3.0])
def test_exact_min_convolution_matches_brute_force(lam):
    cost = torch.rand(2, 27, 2, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = R.min_convolution3d_exact(cost, 3, lam, chunk=3)
    torch.testing.assert_close(got, brute_force_min_convolution(cost, _offsets(3), lam))


def test_exact_min_convolution_properties():
    cost = torch.rand(1, 125, 2, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(R.min_convolution3d_exact(cost, 5, 0.0), cost.amin(1, keepdim=True).expand_as(cost))
    assert torch.allclose(R.min_convolution3d_exact(cost, 5, 1e6), cost)
    assert (R.min_convolution3d_exact(cost, 5, 0.5) <= cost + 1e-12).all()


def test_min_convolution_without_averaging_is_the_exact_cube_minimum():
    """avg_passes=0: the min over displacements within (min_kernel-1)/2 per axis, the window
    clipped to the cube (replication padding), by loops."""
    D, half = 5, 1
    cost = torch.rand(1, D**3, 2, 2, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = R.min_convolution3d(cost, D, min_kernel=3, avg_passes=0)
    grid = cost.view(D, D, D, -1)
    expected = torch.empty_like(grid)
    for i, j, k in itertools.product(range(D), repeat=3):
        window = grid[max(i - half, 0):i + half + 1, max(j - half, 0):j + half + 1, max(k - half, 0):k + half + 1]
        expected[i, j, k] = window.reshape(-1, grid.shape[-1]).amin(0)
    torch.testing.assert_close(out.view(D, D, D, -1), expected)
    # the documented bound against the exact parabola envelope: exact_lam <= minpool + 3 lam
    for lam in (0.1, 1.0):
        assert (R.min_convolution3d_exact(cost, D, lam) <= out + 3 * lam + 1e-12).all()


@pytest.mark.parametrize("min_kernel,avg_kernel,avg_passes", [(3, 3, 2), (3, 3, 1), (1, 3, 2), (5, 3, 0)])
def test_min_convolution_matches_pooling_recipe(min_kernel, avg_kernel, avg_passes, monkeypatch):
    cost = torch.rand(2, 125, 3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = pooling_recipe(cost, 5, min_kernel, avg_kernel, avg_passes)
    torch.testing.assert_close(R.min_convolution3d(cost, 5, min_kernel, avg_kernel, avg_passes), expected)
    monkeypatch.setattr(R, "_CHUNK_VALUES", 3000)  # several blocks of voxels, a partial last one
    torch.testing.assert_close(R.min_convolution3d(cost, 5, min_kernel, avg_kernel, avg_passes), expected)


def test_min_convolution_reduces_to_2d_for_costs_constant_in_dz():
    cost2d = torch.rand(1, 25, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    cost3d = cost2d.view(1, 1, 25, 3, 4).expand(1, 5, 25, 3, 4).reshape(1, 125, 1, 3, 4)
    out3d = R.min_convolution3d(cost3d, 5, 3, 3, 2).view(1, 5, 25, 3, 4)
    out2d = R2.min_convolution(cost2d, 5, 3, 3, 2)
    for i in range(5):
        torch.testing.assert_close(out3d[:, i], out2d)


def test_min_convolution_equivariance_gradient_and_closeness_to_exact():
    g = torch.Generator().manual_seed(5)
    cost = torch.rand(1, 27, 2, 2, 2, dtype=torch.float64, generator=g)
    torch.testing.assert_close(R.min_convolution3d(3 * cost + 2, 3), 3 * R.min_convolution3d(cost, 3) + 2)
    assert torch.autograd.gradcheck(lambda c: R.min_convolution3d(c, 3), (cost.requires_grad_(True),))
    cost = torch.rand(1, 343, 3, 3, 2, dtype=torch.float64, generator=g)
    approx = R.min_convolution3d(cost, 7)
    best = min((R.min_convolution3d_exact(cost, 7, lam) - approx).abs().mean().item() for lam in (0.02, 0.05, 0.1, 0.2))
    assert best < 0.5 * (cost - approx).abs().mean().item()


def test_mean_field_against_a_direct_average(monkeypatch):
    cost = torch.full((1, 4, 3, 4, 5), 2.5, dtype=torch.float64)
    torch.testing.assert_close(R.mean_field3d(cost), cost)
    cost = torch.rand(2, 6, 5, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    out = R.mean_field3d(cost, kernel=3, passes=1)
    assert out.shape == cost.shape
    torch.testing.assert_close(out[:, :, 2, 3, 4], cost[:, :, 1:4, 2:5, 3:6].mean(dim=(2, 3, 4)))  # interior voxel
    padded = F.pad(cost, (2,) * 6, mode="replicate")
    expected = F.avg_pool3d(F.avg_pool3d(padded, 3, stride=1), 3, stride=1)  # two passes, borders replicated
    torch.testing.assert_close(R.mean_field3d(cost, 3, 2), expected)
    monkeypatch.setattr(R, "_CHUNK_VALUES", 2000)  # blocks of channels
    torch.testing.assert_close(R.mean_field3d(cost, 3, 2), expected)
    # a cost constant along z is averaged like the 2D mean field
    flat = torch.rand(1, 3, 4, 5, dtype=torch.float64)
    out3d = R.mean_field3d(flat[:, :, None].expand(1, 3, 4, 4, 5).contiguous(), 3, 2)
    torch.testing.assert_close(out3d[:, :, 1], R2.mean_field(flat, kernel=3, passes=2))


def test_regularise3d_composes():
    cost = torch.rand(1, 27, 3, 3, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(R.regularise3d(cost, 3, meanfield_iterations=0), cost)
    one = R.regularise3d(cost, 3, meanfield_iterations=1)
    torch.testing.assert_close(one, R.mean_field3d(R.min_convolution3d(cost, 3)))


def test_soft_displacement3d_single_minimum_gives_its_offset(monkeypatch):
    D = 5
    cost = torch.ones(1, D**3, 2, 3, 4)
    k = (4 * D + 1) * D + 2  # (dz, dy, dx) = (2, -1, 0)
    cost[:, k] = 0.0
    for chunk in (R._CHUNK_VALUES, 500):  # one block, several blocks
        monkeypatch.setattr(R, "_CHUNK_VALUES", chunk)
        probabilities, displacement = R.soft_displacement3d(cost, D, alpha=1000.0)
        assert probabilities.shape == cost.shape and displacement.shape == (1, 3, 2, 3, 4)
        torch.testing.assert_close(probabilities.sum(1), torch.ones(1, 2, 3, 4))
        for axis, value in enumerate((2.0, -1.0, 0.0)):
            torch.testing.assert_close(displacement[:, axis], torch.full((1, 2, 3, 4), value))


def test_soft_displacement3d_is_sub_voxel_and_differentiable():
    D = 7
    offsets = R.displacement_offsets3d(D, dtype=torch.float64)
    true = torch.tensor([0.4, -1.3, 0.8], dtype=torch.float64)
    cost = (0.05 * ((offsets - true) ** 2).sum(1)).view(1, D**3, 1, 1, 1)
    _, displacement = R.soft_displacement3d(cost, D, alpha=10.0)
    assert torch.allclose(displacement.view(3), true, atol=0.05)
    small = torch.rand(1, 27, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: R.soft_displacement3d(c, 3, 2.0)[1], (small,))


def test_sparse_min_convolution_and_soft_argmin():
    g = torch.Generator().manual_seed(8)
    offsets = torch.tensor([[0, 0, 0], [2, 0, -2], [-2, 2, 0], [0, -2, 2], [2, 2, 2]], dtype=torch.float64)
    cost = torch.rand(2, 5, 3, 2, dtype=torch.float64, generator=g)  # [B, K, P] with P as 3 x 2
    expected = brute_force_min_convolution(cost, offsets.tolist(), 0.3)
    torch.testing.assert_close(R.min_convolution_sparse(cost, offsets, 0.3, chunk=2), expected)
    # on the full cube it is the exact 3D min-convolution
    cube = torch.rand(1, 27, 2, 2, 2, dtype=torch.float64, generator=g)
    torch.testing.assert_close(R.min_convolution_sparse(cube, R.displacement_offsets3d(3, dtype=torch.float64), 0.7),
                               R.min_convolution3d_exact(cube, 3, 0.7))
    peaked = torch.ones(1, 5, 4)
    peaked[0, 3] = 0.0
    probabilities, displacement = R.soft_displacement_sparse(peaked, offsets.float(), alpha=1000.0)
    assert probabilities.shape == (1, 5, 4) and displacement.shape == (1, 3, 4)
    torch.testing.assert_close(displacement[0].T, offsets[3].float().expand(4, 3))


@pytest.mark.parametrize("call, message", [
    (lambda: R.min_convolution3d(torch.rand(1, 26, 2, 2, 2), 3), "disp_range\\*\\*3"),
    (lambda: R.min_convolution3d(torch.rand(1, 27, 2, 2), 3), r"\[B, D\*\*3, d, h, w\]"),
    (lambda: R.min_convolution3d(torch.rand(1, 27, 2, 2, 2), 4), "odd"),
    (lambda: R.min_convolution3d(torch.rand(1, 27, 2, 2, 2), 3, avg_passes=-1), "avg_passes"),
    (lambda: R.mean_field3d(torch.rand(1, 27, 2, 2), 3), "mean_field3d"),
    (lambda: R.mean_field3d(torch.rand(1, 27, 2, 2, 2), 2), "kernel"),
    (lambda: R.soft_displacement3d(torch.rand(1, 27, 2, 2, 2), 3, alpha=0.0), "alpha"),
    (lambda: R.min_convolution3d_exact(torch.rand(1, 27, 2, 2, 2), 3, lam=-1.0), "lam"),
    (lambda: R.min_convolution_sparse(torch.rand(1, 4, 3), torch.zeros(5, 3)), "offsets"),
    (lambda: R.soft_displacement_sparse(torch.rand(1, 4, 3), torch.zeros(4, 3), alpha=-1.0), "alpha"),
])
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()
