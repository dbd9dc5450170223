"""Overlap (Dice) and smoothness (Jacobian) measures."""

import math

import pytest
import torch

from tutorial_utils import metrics as M


def affine_field(matrix, H, W):
    """Independent reference: u(p) = A p + t - p, written out by hand."""
    ys, xs = torch.meshgrid(torch.arange(H).double(), torch.arange(W).double(), indexing="ij")
    (a, b, t0), (c, d, t1) = matrix
    return torch.stack([a * ys + b * xs + t0 - ys, c * ys + d * xs + t1 - xs])[None]


def pixel_counts(a, b, num_labels):
    """Brute force, one pixel at a time: the pixels of every label in a, in b, and in both."""
    size_a, size_b, shared = [0] * num_labels, [0] * num_labels, [0] * num_labels
    for x, y in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist()):
        size_a[x] += 1
        size_b[y] += 1
        if x == y:
            shared[x] += 1
    return size_a, size_b, shared


def dice_reference(a, b, num_labels, present_in):
    """Brute force (:func:`pixel_counts`) per label.

    "both": NaN unless the label is in both maps; "either": NaN only if it is in neither (0 if in one)."""
    size_a, size_b, shared = pixel_counts(a, b, num_labels)
    out = []
    for v in range(num_labels):
        scored = (size_a[v] and size_b[v]) if present_in == "both" else (size_a[v] or size_b[v])
        out.append(2 * shared[v] / (size_a[v] + size_b[v]) if scored else math.nan)
    return out


def registration_dice_reference(fixed, moving, warped, num_labels, present_in):
    """Brute force: Dice of fixed and warped, scored on the labels of fixed and moving ("both")."""
    if present_in == "either":
        return dice_reference(fixed, warped, num_labels, "either")
    in_fixed, in_moving = set(fixed.reshape(-1).tolist()), set(moving.reshape(-1).tolist())
    size_f, size_w, shared = pixel_counts(fixed, warped, num_labels)
    return [2 * shared[v] / (size_f[v] + size_w[v]) if v in in_fixed and v in in_moving else math.nan
            for v in range(num_labels)]


def mean_reference(per_label):
    scored = [v for v in per_label[1:] if not math.isnan(v)]
    return sum(scored) / len(scored) if scored else math.nan


def same(got: torch.Tensor, expected: list) -> bool:
    return torch.allclose(got, torch.tensor(expected, dtype=torch.float64), equal_nan=True, rtol=0, atol=1e-12)


def test_dice_of_known_shapes():
    a = torch.zeros(10, 10, dtype=torch.long)
    b = torch.zeros(10, 10, dtype=torch.long)
    a[0:4, 0:5] = 1  # 20 pixels
    b[2:6, 0:5] = 1  # 20 pixels, 10 shared
    a[8:10, 8:10] = 2  # only in a
    both, either = M.dice(a, b, 4), M.dice(a, b, 4, present_in="either")
    assert torch.allclose(M.dice(a, b, 4, "both"), both, equal_nan=True)  # the default is the primary score
    assert both[1].item() == either[1].item() == pytest.approx(0.5)
    assert math.isnan(both[2].item()) and either[2].item() == 0.0  # in one map only
    assert math.isnan(both[3].item()) and math.isnan(either[3].item())  # in neither map
    assert M.mean_dice(a, b, 4) == pytest.approx(0.5)  # organ 1 only
    assert M.mean_dice(a, b, 4, present_in="either") == pytest.approx(0.25)  # (0.5 + 0) / 2
    assert M.mean_dice(a, a, 4) == pytest.approx(1.0)


@pytest.mark.parametrize("present_in", ["both", "either"])
@pytest.mark.parametrize("shape", [(7, 9), (2, 5, 6), (3, 2, 4, 5)])
def test_dice_matches_a_pixel_loop(shape, present_in):
    generator = torch.Generator().manual_seed(len(shape))
    a = torch.randint(0, 5, shape, generator=generator)
    b = torch.randint(0, 4, shape, generator=generator)
    b[b == 3] = 2  # label 3 only in a, label 4 only in a, label 5 in neither map
    expected = dice_reference(a, b, 6, present_in)
    got = M.dice(a, b, 6, present_in=present_in)
    assert got.dtype == torch.float64 and got.shape == (6,)
    assert same(got, expected)
    assert not math.isnan(expected[1]) and math.isnan(expected[5])
    assert (math.isnan(got[3]) and math.isnan(got[4])) if present_in == "both" else (got[3] == 0 and got[4] == 0)
    assert M.mean_dice(a, b, 6, present_in=present_in) == pytest.approx(mean_reference(expected))
    assert math.isnan(M.mean_dice(torch.zeros_like(a), torch.zeros_like(b), 6, present_in))  # background only


def test_mean_dice_counts_only_organs_present_in_both():
    a = torch.tensor([[1, 1, 2, 2], [3, 3, 0, 0]])
    b = torch.tensor([[1, 0, 2, 2], [0, 0, 4, 4]])
    # organ 1: 2*1/(2+1) = 2/3; organ 2: 1; organ 3 only in a, organ 4 only in b
    assert M.mean_dice(a, b, 5) == pytest.approx((2 / 3 + 1) / 2)
    assert M.mean_dice(a, b, 5, "either") == pytest.approx((2 / 3 + 1 + 0 + 0) / 4)
    only_a = torch.tensor([[1, 0]])
    assert math.isnan(M.mean_dice(only_a, torch.zeros_like(only_a), 2))  # no organ in both: nothing to score
    assert M.mean_dice(only_a, torch.zeros_like(only_a), 2, "either") == 0.0


@pytest.mark.parametrize("present_in", ["both", "either"])
def test_registration_dice_matches_a_pixel_loop(present_in):
    generator = torch.Generator().manual_seed(3)
    fixed = torch.randint(0, 4, (2, 6, 7), generator=generator)  # labels 0..3
    moving = torch.randint(0, 6, (2, 6, 7), generator=generator)
    moving[moving == 3] = 0  # label 3 only in fixed, labels 4 and 5 only in moving
    warped = moving.roll(1, dims=-1)
    warped[warped == 2] = 1  # the warp loses organ 2 (in fixed and moving): 0 under both conventions
    expected = registration_dice_reference(fixed, moving, warped, 7, present_in)
    got = M.registration_dice(fixed, moving, warped, 7, present_in=present_in)
    assert got.shape == (7,) and got.dtype == torch.float64
    assert same(got, expected)
    assert got[2].item() == 0.0  # lost by the warp: scored 0, not left out
    if present_in == "both":
        assert torch.isnan(got[3:]).all()  # in one slice only, or in none
    else:
        assert got[3].item() == got[4].item() == got[5].item() == 0.0 and math.isnan(got[6])
    assert same(M.registration_dice(fixed, moving, moving, 7, present_in), dice_reference(fixed, moving, 7, present_in))
    reference_mean = [v for v in expected[1:] if not math.isnan(v)]
    mean = M.mean_dice(fixed, warped, 7, present_in, labels_moving=moving)
    assert math.isclose(mean, sum(reference_mean) / len(reference_mean), rel_tol=1e-12)


def test_dice_ceiling_of_hand_made_maps():
    a = torch.tensor([[1, 2, 3, 0]])
    b = torch.tensor([[0, 2, 3, 4]])
    assert M.dice_ceiling(a, b, 6) == pytest.approx(2 / 4)  # organs 2 and 3 of 1, 2, 3, 4; 5 in neither
    assert M.dice_ceiling(a, a, 6) == 1.0
    assert M.dice_ceiling(torch.tensor([[1, 0]]), torch.tensor([[0, 2]]), 3) == 0.0
    assert math.isnan(M.dice_ceiling(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), 3))
    # the ceiling is reached when the shared organs overlap perfectly: 1 for organ 1, 0 for 2 and 3
    fixed = torch.tensor([[1, 1, 2, 0]])
    best = torch.tensor([[1, 1, 0, 3]])
    assert M.mean_dice(fixed, best, 4, "either") == pytest.approx(M.dice_ceiling(fixed, best, 4)) == pytest.approx(1 / 3)


@pytest.mark.parametrize("call", [
    lambda a: M.dice(a, a, 3, present_in="bad"),
    lambda a: M.mean_dice(a, a, 3, present_in="Both"),
    lambda a: M.registration_dice(a, a, a, 3, present_in=None),
])
def test_present_in_is_checked(call):
    with pytest.raises(ValueError, match=r"present_in must be one of 'both', 'either'; got"):
        call(torch.zeros(2, 2, dtype=torch.long))


def test_registration_dice_names_its_arguments():
    a = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels_fixed and labels_warped must have the same shape"):
        M.registration_dice(a, a, a[:1], 3)
    with pytest.raises(ValueError, match=r"labels_moving must hold values 0\.\.2"):
        M.registration_dice(a, a + 3, a, 3)


def test_mean_over_organs_skips_background_and_absent_labels():
    per_label = torch.tensor([[0.9, 0.5, float("nan"), 0.0, 1.0],    # organs 1, 3, 4 scored
                              [0.7, float("nan"), float("nan"), float("nan"), float("nan")],  # no organ at all
                              [float("nan"), 0.25, 0.75, float("nan"), float("nan")]], dtype=torch.float64)
    expected = [(0.5 + 0.0 + 1.0) / 3, float("nan"), (0.25 + 0.75) / 2]  # by hand
    means = M.mean_over_organs(per_label)
    assert means.shape == (3,) and means.dtype == torch.float64
    for got, want in zip(means.tolist(), expected):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)
    assert float(M.mean_over_organs(per_label[0])) == pytest.approx(expected[0])  # one pair: [L] -> []
    empty = torch.zeros(4, 4, dtype=torch.long)
    assert math.isnan(M.mean_dice(empty, empty, 3))  # nothing to score: NaN, not 0 or 1


@pytest.mark.parametrize("matrix", [
    ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    ((1.2, 0.1, 3.0), (-0.3, 0.9, -1.0)),
    ((math.cos(0.3), -math.sin(0.3), 2.0), (math.sin(0.3), math.cos(0.3), 5.0)),
    ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0)),  # a reflection: determinant -1, everything folds
])
def test_jacobian_of_affine_is_its_determinant(matrix):
    field = affine_field(matrix, 9, 11)
    det = (matrix[0][0] * matrix[1][1] - matrix[0][1] * matrix[1][0])
    jac = M.jacobian_determinant(field)
    assert jac.shape == (1, 9, 11)
    assert torch.allclose(jac, torch.full_like(jac, det))
    assert M.folding_fraction(field).item() == (1.0 if det <= 0 else 0.0)


def test_jacobian_of_a_quadratic_field_against_finite_differences():
    ys, xs = torch.meshgrid(torch.arange(12).double(), torch.arange(10).double(), indexing="ij")
    field = torch.stack([0.01 * xs**2, 0.02 * ys * xs])[None]
    # analytic: d(dy)/dy = 0, d(dy)/dx = 0.02 x, d(dx)/dy = 0.02 x, d(dx)/dx = 0.02 y
    expected = (1 + 0) * (1 + 0.02 * ys) - (0.02 * xs) * (0.02 * xs)
    jac = M.jacobian_determinant(field)
    assert torch.allclose(jac[0, 1:-1, 1:-1], expected[1:-1, 1:-1])


def test_folding_fraction_counts_folded_pixels():
    field = torch.zeros(2, 2, 8, 8, dtype=torch.float64)
    # second field: compress columns 3..5 so strongly that the map reverses there
    field[1, 1, :, 4] = -3.0
    jac = M.jacobian_determinant(field)
    folded = (jac[1] <= 0).double().mean()
    assert folded > 0
    assert torch.allclose(M.folding_fraction(field), torch.stack([torch.tensor(0.0, dtype=torch.float64), folded]))


@pytest.mark.parametrize("matrix", [
    ((1.1, 0.0, 0.0), (0.0, 1.1, 0.0)),  # uniform scaling
    ((math.cos(0.4), -math.sin(0.4), 1.0), (math.sin(0.4), math.cos(0.4), -2.0)),  # rigid
    ((1.3, 0.4, 0.0), (-0.2, 0.7, 3.0)),  # any affine map: constant determinant
])
def test_log_jacobian_std_of_an_affine_map_is_zero(matrix):
    assert M.log_jacobian_std(affine_field(matrix, 8, 9)).item() == pytest.approx(0.0, abs=1e-12)


def two_region_field(H, W, top_rows, slope_top, slope_bottom):
    """dy = 0, dx = a(y) * x with a = slope_top in the first ``top_rows`` rows, slope_bottom below.

    d(dy)/dx = 0, so det J = 1 + d(dx)/dx = 1 + a(y) exactly at every pixel (the field is
    linear along x, where the differences are taken), whatever happens between the rows."""
    ys, xs = torch.meshgrid(torch.arange(H).double(), torch.arange(W).double(), indexing="ij")
    slope = torch.where(ys < top_rows, torch.tensor(slope_top, dtype=torch.float64),
                        torch.tensor(slope_bottom, dtype=torch.float64))
    return torch.stack([torch.zeros_like(xs), slope * xs])[None]


def two_value_std(n1, v1, n2, v2):
    """Sample standard deviation (n - 1) of n1 copies of v1 and n2 copies of v2, in closed form."""
    n = n1 + n2
    return math.sqrt(n1 * n2 * (v1 - v2) ** 2 / (n * (n - 1)))


def test_log_jacobian_std_of_two_regions_with_known_determinants():
    H, W = 6, 7
    # 2 rows with det 1.5, 4 rows with det 0.8
    field = two_region_field(H, W, 2, 0.5, -0.2)
    assert torch.allclose(M.jacobian_determinant(field)[0, :2], torch.full((2, W), 1.5, dtype=torch.float64))
    expected = two_value_std(2 * W, math.log(1.5), 4 * W, math.log(0.8))
    assert M.log_jacobian_std(field).item() == pytest.approx(expected, rel=1e-12)
    # folded rows (det 1 - 1.5 = -0.5) count as log(eps)
    folded = two_region_field(H, W, 3, 0.0, -1.5)
    for eps in (1e-3, 0.1):
        expected = two_value_std(3 * W, 0.0, 3 * W, math.log(eps))
        assert M.log_jacobian_std(folded, eps=eps).item() == pytest.approx(expected, rel=1e-12)
    # one value per field of a batch
    both = M.log_jacobian_std(torch.cat([field, torch.zeros_like(field)]))
    assert both.shape == (2,) and both[1].item() == 0.0


@pytest.mark.parametrize("bad, match", [
    (lambda: M.jacobian_determinant(torch.zeros(1, 3, 8, 8)), "displacement"),
    (lambda: M.jacobian_determinant(torch.zeros(2, 8, 8)), "displacement"),
    (lambda: M.jacobian_determinant(torch.zeros(1, 2, 1, 8)), "displacement.*at least 2"),
    (lambda: M.folding_fraction(torch.zeros(1, 2, 8, 8, dtype=torch.long)), "displacement.*floating point"),
    (lambda: M.log_jacobian_std(torch.zeros(1, 2, 8, 8), eps=0.0), "eps"),
    (lambda: M.dice(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long), 2), "same shape"),
])
def test_bad_input_raises_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


# --------------------------------------------------------------------------- centroid distance


def centroid_distance_loops(a, b, num_labels):
    """Brute force: walk over every pixel, sum the coordinates of each label, divide, compare."""
    out = []
    for label in range(num_labels):
        centres = []
        for labels in (a, b):
            n = sy = sx = 0.0
            for y in range(labels.shape[0]):
                for x in range(labels.shape[1]):
                    if int(labels[y, x]) == label:
                        n, sy, sx = n + 1, sy + y, sx + x
            centres.append((sy / n, sx / n) if n else None)
        if None in centres:
            out.append(float("nan"))
        else:
            (ya, xa), (yb, xb) = centres
            out.append(math.hypot(ya - yb, xa - xb))
    return torch.tensor(out, dtype=torch.float64)


def test_centroid_distance_matches_loops():
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 3, (2, 7, 9), generator=generator)
    b = torch.randint(0, 3, (2, 7, 9), generator=generator)
    a[1][a[1] == 2] = 0  # label 2 missing in the second pair's first map
    b[0][b[0] == 3] = 0
    a[0, 0, 0] = 3  # label 3 only in the first map: NaN
    d = M.centroid_distance(a, b, 5)
    assert d.shape == (2, 5) and d.dtype == torch.float64
    for i in range(2):
        expected = centroid_distance_loops(a[i], b[i], 5)
        assert torch.allclose(d[i], expected, equal_nan=True)
        assert torch.allclose(M.centroid_distance(a[i], b[i], 5), expected, equal_nan=True)  # [H, W] -> [L]
    assert torch.isnan(d[1, 2]) and torch.isnan(d[0, 3]) and torch.isnan(d[:, 4]).all()


def test_centroid_distance_of_a_shifted_square():
    a = torch.zeros(10, 12, dtype=torch.long)
    a[2:5, 3:6] = 1
    b = torch.roll(a, shifts=(3, 4), dims=(0, 1))  # the square moved by (3, 4): 5 pixels
    assert M.centroid_distance(a, b, 2)[1].item() == pytest.approx(5.0)
    assert M.centroid_distance(a, a, 2).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("bad, match", [
    (lambda: M.centroid_distance(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long), 2),
     "same shape"),
    (lambda: M.centroid_distance(torch.zeros(3, 3), torch.zeros(3, 3), 2), "integer"),
    (lambda: M.centroid_distance(torch.full((3, 3), 2), torch.zeros(3, 3, dtype=torch.long), 2), "values 0..1"),
    (lambda: M.centroid_distance(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), 2),
     "label map"),
])
def test_centroid_distance_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()
