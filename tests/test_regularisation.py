"""Regularisation: min-convolution (exact and approximate), mean field, soft arg-min."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from tutorial_utils import regularisation as R


def brute_force_min_convolution(cost, disp_range, lam):
    """Independent reference: plain Python loops over pixels and displacement pairs."""
    B, K, h, w = cost.shape
    r = (disp_range - 1) // 2
    offsets = [(i - r, j - r) for i in range(disp_range) for j in range(disp_range)]
    out = torch.empty_like(cost)
    for b, y, x in itertools.product(range(B), range(h), range(w)):
        for k, (dy, dx) in enumerate(offsets):
            out[b, k, y, x] = min(
                float(cost[b, kk, y, x]) + lam * ((dy - ey) ** 2 + (dx - ex) ** 2)
                for kk, (ey, ex) in enumerate(offsets)
            )
    return out


def two_thousand_nineteen_minconv(cost, disp_range):
    """The slides' nn.Sequential recipe, rewritten with min first as the text describes."""
    B, K, h, w = cost.shape
    grid = cost.permute(0, 2, 3, 1).reshape(-1, 1, disp_range, disp_range)
    grid = torch.nn.ReplicationPad2d(5)(grid)
    grid = -torch.nn.MaxPool2d(3, stride=1)(-grid)
    grid = torch.nn.AvgPool2d(5, stride=1)(torch.nn.AvgPool2d(5, stride=1)(grid))
    return grid.reshape(B, h, w, K).permute(0, 3, 1, 2)


def test_offsets_order():
    offsets = R.displacement_offsets(5)
    assert offsets.shape == (25, 2)
    for i, j in itertools.product(range(5), range(5)):
        assert offsets[i * 5 + j].tolist() == [i - 2, j - 2]


@pytest.mark.parametrize("lam", [0.0, 0.3, 2.0])
def test_exact_min_convolution_matches_brute_force(lam):
    torch.manual_seed(0)
    cost = torch.rand(2, 25, 3, 2, dtype=torch.float64)
    expected = brute_force_min_convolution(cost, 5, lam)
    got = R.min_convolution_exact(cost, 5, lam, chunk=5)
    assert torch.allclose(got, expected)


def test_exact_min_convolution_properties():
    torch.manual_seed(1)
    cost = torch.rand(1, 49, 4, 4, dtype=torch.float64)
    # lam = 0: every displacement gets the global minimum
    assert torch.allclose(R.min_convolution_exact(cost, 7, 0.0), cost.amin(1, keepdim=True).expand_as(cost))
    # huge lam: nothing changes (each parabola only touches its own root)
    assert torch.allclose(R.min_convolution_exact(cost, 7, 1e6), cost)
    # lower envelope: never above the cost
    assert (R.min_convolution_exact(cost, 7, 0.5) <= cost + 1e-12).all()


def test_min_convolution_matches_2019_recipe_and_keeps_shape():
    torch.manual_seed(0)
    cost = torch.rand(2, 81, 5, 6)
    out = R.min_convolution(cost, 9)
    assert out.shape == cost.shape
    assert torch.allclose(out, two_thousand_nineteen_minconv(cost, 9), atol=1e-6)


def test_min_convolution_single_pixel_by_hand():
    # one pixel, D = 3, min_kernel 3, no averaging: every displacement takes the minimum of its
    # 3 x 3 neighbourhood in the displacement grid [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    cost = torch.arange(9.0).view(1, 9, 1, 1)
    out = R.min_convolution(cost, 3, min_kernel=3, avg_kernel=1, avg_passes=0)
    assert out.view(3, 3).tolist() == [[0, 0, 1], [0, 0, 1], [3, 3, 4]]
    # only the min kernel 1 and averaging 3 x 3 once on the replicate-padded 3x3 grid
    out = R.min_convolution(cost, 3, min_kernel=1, avg_kernel=3, avg_passes=1)
    padded = F.pad(cost.view(1, 1, 3, 3), (1, 1, 1, 1), mode="replicate")[0, 0]
    expected = torch.tensor([[padded[i:i + 3, j:j + 3].mean() for j in range(3)] for i in range(3)])
    assert torch.allclose(out.view(3, 3), expected)


def test_min_convolution_equivariance_and_gradient():
    torch.manual_seed(0)
    cost = torch.rand(1, 25, 3, 3, dtype=torch.float64)
    assert torch.allclose(R.min_convolution(3 * cost + 2, 5), 3 * R.min_convolution(cost, 5) + 2)
    cost.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: R.min_convolution(c, 5), (cost,))


def test_min_convolution_approximates_exact():
    """The approximation is closer to the exact envelope (best lambda) than the raw cost is."""
    torch.manual_seed(0)
    cost = torch.rand(1, 81, 8, 8, dtype=torch.float64)
    approx = R.min_convolution(cost, 9)
    errors = {lam: (R.min_convolution_exact(cost, 9, lam) - approx).abs().mean().item()
              for lam in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)}
    best = min(errors.values())
    assert best < 0.5 * (cost - approx).abs().mean().item()


def test_mean_field_constant_and_average():
    cost = torch.full((1, 9, 6, 7), 3.0)
    assert torch.allclose(R.mean_field(cost), cost)
    # one pass of 3 x 3 in the interior is the plain neighbourhood mean
    torch.manual_seed(0)
    cost = torch.rand(1, 4, 6, 7, dtype=torch.float64)
    out = R.mean_field(cost, kernel=3, passes=1)
    assert out.shape == cost.shape
    assert torch.allclose(out[0, :, 2, 3], cost[0, :, 1:4, 2:5].mean(dim=(1, 2)))


def test_regularise_iterations():
    torch.manual_seed(0)
    cost = torch.rand(1, 9, 6, 6)
    assert torch.equal(R.regularise(cost, 3, meanfield_iterations=0), cost)
    one = R.regularise(cost, 3, meanfield_iterations=1)
    assert torch.allclose(one, R.mean_field(R.min_convolution(cost, 3)))
    two = R.regularise(cost, 3, meanfield_iterations=2)
    assert torch.allclose(two, R.mean_field(R.min_convolution(one, 3)))


def test_soft_displacement_peaked_cost_gives_its_offset():
    D, r = 5, 2
    cost = torch.ones(1, D * D, 2, 3)
    k = 3 * D + 1  # (dy, dx) = (1, -1)
    cost[:, k] = 0.0
    probabilities, displacement = R.soft_displacement(cost, D, alpha=1000.0)
    assert probabilities.shape == (1, D * D, 2, 3) and displacement.shape == (1, 2, 2, 3)
    assert torch.allclose(probabilities.sum(1), torch.ones(1, 2, 3))
    assert torch.allclose(displacement[0, 0], torch.full((2, 3), 3.0 - r))
    assert torch.allclose(displacement[0, 1], torch.full((2, 3), 1.0 - r))


def test_soft_displacement_is_sub_pixel():
    """A parabola centred between the grid points: the soft arg-min lands near the true minimum."""
    D = 9
    offsets = R.displacement_offsets(D, dtype=torch.float64)
    true = torch.tensor([1.3, -0.6], dtype=torch.float64)
    cost = 0.05 * ((offsets - true) ** 2).sum(1).view(1, D * D, 1, 1)
    _, displacement = R.soft_displacement(cost, D, alpha=10.0)
    assert torch.allclose(displacement.view(2), true, atol=0.05)
    argmin = offsets[cost.view(-1).argmin()]
    assert (displacement.view(2) - true).norm() < (argmin - true).norm()


@pytest.mark.parametrize("bad", [
    lambda: R.min_convolution(torch.rand(1, 80, 3, 3), 9),
    lambda: R.min_convolution(torch.rand(81, 3, 3), 9),
    lambda: R.min_convolution(torch.rand(1, 81, 3, 3), 8),
    lambda: R.min_convolution(torch.rand(1, 81, 3, 3), 9, min_kernel=4),
    lambda: R.min_convolution(torch.rand(1, 81, 3, 3), 9, padding=0),
    lambda: R.min_convolution_exact(torch.rand(1, 81, 3, 3), 9, lam=-1.0),
    lambda: R.mean_field(torch.rand(1, 81, 3, 3), kernel=2),
    lambda: R.mean_field(torch.rand(1, 81, 3, 3), padding=2),
    lambda: R.soft_displacement(torch.rand(1, 81, 3, 3), 9, alpha=0.0),
    lambda: R.soft_displacement(torch.rand(1, 81, 3, 3), 7),
    lambda: R.regularise(torch.rand(1, 81, 3, 3), 9, meanfield_iterations=-1),
    lambda: R.min_convolution(torch.ones(1, 81, 3, 3, dtype=torch.long), 9),
])
def test_bad_input_raises_value_error(bad):
    with pytest.raises(ValueError):
        bad()
