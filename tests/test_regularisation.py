"""Regularisation: min-convolution (exact and approximate), mean field, soft arg-min."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tutorial_utils import regularisation as R
from tutorial_utils.offsets import displacement_offsets


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
    offsets = displacement_offsets(5)
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


def sliding_loops(grid, kernel, reduce, pad):
    """Replicate-pad a 2D list of lists by ``pad`` (indices clamped), then slide a ``kernel``
    window with stride 1 (``reduce`` = min or mean) over it: plain Python, for any kernel."""
    n, m = len(grid), len(grid[0])
    padded = [[grid[min(max(i - pad, 0), n - 1)][min(max(j - pad, 0), m - 1)] for j in range(m + 2 * pad)]
              for i in range(n + 2 * pad)]
    size = len(padded) - kernel + 1, len(padded[0]) - kernel + 1
    return [[reduce([padded[i + a][j + b] for a in range(kernel) for b in range(kernel)]) for j in range(size[1])]
            for i in range(size[0])]


def mean(values):
    return sum(values) / len(values)


def regularise_loops(cost, D, iterations):
    """The 2019 regulariser, loop by loop. Min-convolution of every pixel's D x D grid: replicate
    padding 5, a 3 x 3 minimum, two 5 x 5 means (each shrinks the padded grid back by 2, 4, 4).
    Mean field of every displacement's h x w map: replicate padding 6, three 5 x 5 means."""
    B, K, h, w = cost.shape
    values = cost.tolist()  # [B][K][h][w]
    for _ in range(iterations):
        for b, y, x in itertools.product(range(B), range(h), range(w)):
            grid = [[values[b][i * D + j][y][x] for j in range(D)] for i in range(D)]
            grid = sliding_loops(grid, 3, min, pad=5)
            grid = sliding_loops(grid, 5, mean, pad=0)
            grid = sliding_loops(grid, 5, mean, pad=0)
            for i, j in itertools.product(range(D), range(D)):
                values[b][i * D + j][y][x] = grid[i][j]
        for b, k in itertools.product(range(B), range(K)):
            image = sliding_loops(values[b][k], 5, mean, pad=6)
            image = sliding_loops(image, 5, mean, pad=0)
            values[b][k] = sliding_loops(image, 5, mean, pad=0)
    return torch.tensor(values, dtype=cost.dtype)


def test_regularise_iterations_match_loops():
    torch.manual_seed(0)
    cost = torch.rand(1, 9, 4, 5, dtype=torch.float64)
    assert torch.equal(R.regularise(cost, 3, meanfield_iterations=0), cost)
    for iterations in (1, 2):
        expected = regularise_loops(cost, 3, iterations)
        assert torch.allclose(R.regularise(cost, 3, meanfield_iterations=iterations), expected, atol=1e-12)
    # the second round really differs from the first (the test would notice a missing round)
    assert not torch.allclose(regularise_loops(cost, 3, 1), regularise_loops(cost, 3, 2), atol=1e-6)


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
    offsets = displacement_offsets(D, dtype=torch.float64)
    true = torch.tensor([1.3, -0.6], dtype=torch.float64)
    cost = 0.05 * ((offsets - true) ** 2).sum(1).view(1, D * D, 1, 1)
    _, displacement = R.soft_displacement(cost, D, alpha=10.0)
    assert torch.allclose(displacement.view(2), true, atol=0.05)
    argmin = offsets[cost.view(-1).argmin()]
    assert (displacement.view(2) - true).norm() < (argmin - true).norm()


def soft_argmin_by_hand(costs, D, alpha):
    """The softmax definition written out: p_k = exp(-alpha c_k) / sum_j exp(-alpha c_j),
    displacement = sum_k p_k (i - r, j - r) for k = i * D + j."""
    r = (D - 1) // 2
    weights = [math.exp(-alpha * c) for c in costs]
    total = sum(weights)
    dy = sum(wk * (k // D - r) for k, wk in enumerate(weights)) / total
    dx = sum(wk * (k % D - r) for k, wk in enumerate(weights)) / total
    return dy, dx


@pytest.mark.parametrize("D", [3, 5, 9])
def test_soft_displacement_minimum_in_the_window_corner(D):
    """Cost 0 at the corner (dy, dx) = (r, -r), 1 elsewhere. The other offsets sum to -(r, -r),
    so the expectation is (r, -r) * (1 - e) / (1 + (D*D - 1) e) with e = exp(-alpha):
    the full corner offset for large alpha, pulled towards the centre for moderate alpha."""
    r, K = (D - 1) // 2, D * D
    k = (D - 1) * D + 0  # row i = D - 1 (dy = r), column j = 0 (dx = -r)
    cost = torch.ones(1, K, 1, 2, dtype=torch.float64)
    cost[:, k] = 0.0
    for alpha in (1000.0, 50.0, 3.0, 0.5):
        e = math.exp(-alpha)
        factor = (1 - e) / (1 + (K - 1) * e)
        _, displacement = R.soft_displacement(cost, D, alpha=alpha)
        expected = torch.tensor([r * factor, -r * factor], dtype=torch.float64).view(1, 2, 1, 1).expand(1, 2, 1, 2)
        assert torch.allclose(displacement, expected, atol=1e-12, rtol=0), (alpha, displacement.flatten())
        assert soft_argmin_by_hand(cost[0, :, 0, 0].tolist(), D, alpha) == pytest.approx((r * factor, -r * factor))
    _, sharp = R.soft_displacement(cost, D, alpha=1000.0)
    assert torch.allclose(sharp[0, :, 0, 0], torch.tensor([float(r), -float(r)], dtype=torch.float64))
    _, moderate = R.soft_displacement(cost, D, alpha=3.0)
    assert (moderate[0, 0].abs() < r - 0.05).all()  # clearly short of the corner


def test_soft_displacement_of_a_minimum_beyond_the_window_edge():
    """A parabola whose minimum (dx = r + 0.4) lies outside the D x D window: the soft arg-min
    cannot reach beyond the last offset r and is biased inwards, by the amount the softmax
    definition gives (computed by hand); the same parabola inside the window is not cut off."""
    D, alpha = 5, 4.0
    r = (D - 1) // 2
    offsets = [(k // D - r, k % D - r) for k in range(D * D)]
    for true_dy, true_dx in ((0.3, r + 0.4), (-r, r), (0.3, 0.4)):
        costs = [0.5 * ((dy - true_dy) ** 2 + (dx - true_dx) ** 2) for dy, dx in offsets]
        cost = torch.tensor(costs, dtype=torch.float64).view(1, D * D, 1, 1)
        _, displacement = R.soft_displacement(cost, D, alpha=alpha)
        dy, dx = soft_argmin_by_hand(costs, D, alpha)
        assert displacement.view(2).tolist() == pytest.approx([dy, dx], abs=1e-12)
        if abs(true_dx) >= r:
            assert r - 0.35 < abs(dx) < min(abs(true_dx), r)  # at the edge: biased inwards, never beyond r
        else:
            assert dx == pytest.approx(true_dx, abs=0.05)


@pytest.mark.parametrize("bad, match", [
    (lambda: R.min_convolution(torch.rand(1, 80, 3, 3), 9), r"disp_range\*\*2"),
    (lambda: R.min_convolution(torch.rand(81, 3, 3), 9), r"cost.*\[B, D\*D, h, w\]"),
    (lambda: R.min_convolution(torch.rand(1, 81, 3, 3), 8), "disp_range"),
    (lambda: R.min_convolution(torch.rand(1, 81, 3, 3), 9, min_kernel=4), "min_kernel"),
    (lambda: R.min_convolution(torch.rand(1, 81, 3, 3), 9, padding=0), "padding"),
    (lambda: R.min_convolution_exact(torch.rand(1, 81, 3, 3), 9, lam=-1.0), "lam"),
    (lambda: R.mean_field(torch.rand(1, 81, 3, 3), kernel=2), "kernel"),
    (lambda: R.mean_field(torch.rand(1, 81, 3, 3), padding=2), "padding"),
    (lambda: R.soft_displacement(torch.rand(1, 81, 3, 3), 9, alpha=0.0), "alpha"),
    (lambda: R.soft_displacement(torch.rand(1, 81, 3, 3), 7), r"disp_range\*\*2"),
    (lambda: R.regularise(torch.rand(1, 81, 3, 3), 9, meanfield_iterations=-1), "meanfield_iterations"),
    (lambda: R.min_convolution(torch.ones(1, 81, 3, 3, dtype=torch.long), 9), "cost.*floating point"),
])
def test_bad_input_raises_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()
