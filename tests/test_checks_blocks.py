"""The building blocks (and their 3D versions in ``tutorial_utils.three_d``) check their inputs
with the shared rules of ``tutorial_utils.checks``.

Every test names the message it expects, so it fails if the check it covers is removed.
"""

import math
import re

import numpy as np
import pytest
import torch

from tutorial_utils import correlation as C
from tutorial_utils import features as Fe
from tutorial_utils import metrics as M
from tutorial_utils import regularisation as R
from tutorial_utils import transform as T
from tutorial_utils.models import DisplacementUNet, FeatureCNN
from tutorial_utils.offsets import displacement_offsets
from tutorial_utils.three_d import correlation as C3
from tutorial_utils.three_d import features as Fe3
from tutorial_utils.three_d import metrics as M3
from tutorial_utils.three_d import regularisation as R3
from tutorial_utils.three_d import sparse as S3
from tutorial_utils.three_d import transform as T3

OTHER = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("meta")
"""Another device than the CPU: a GPU where there is one, else "meta" (exists on every machine)."""


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _with(tensor, value, index=0):
    """A copy of ``tensor`` with one value replaced (NaN, inf...)."""
    out = tensor.clone()
    out.view(-1)[index] = value
    return out


# --------------------------------------------------------------------------- regularisation

COST2 = _rand(1, 9, 4, 5)  # D = 3
COST3 = _rand(1, 27, 2, 3, 3)  # D = 3, 3D

REGULARISERS = {
    "regularise": lambda c: R.regularise(c, 3),
    "mean_field": lambda c: R.mean_field(c),
    "min_convolution": lambda c: R.min_convolution(c, 3),
    "min_convolution_exact": lambda c: R.min_convolution_exact(c, 3),
    "soft_displacement": lambda c: R.soft_displacement(c, 3),
    "normalise_cost": lambda c: R.normalise_cost(c),
    "check_cost_volume": lambda c: R.check_cost_volume(c, 3),
}
REGULARISERS3D = {
    "regularise3d": lambda c: R3.regularise3d(c, 3),
    "mean_field3d": lambda c: R3.mean_field3d(c),
    "min_convolution3d": lambda c: R3.min_convolution3d(c, 3),
    "min_convolution3d_exact": lambda c: R3.min_convolution3d_exact(c, 3),
    "soft_displacement3d": lambda c: R3.soft_displacement3d(c, 3),
    "soft_displacement_sparse": lambda c: R3.soft_displacement_sparse(c, R3.displacement_offsets3d(3)),
    "min_convolution_sparse": lambda c: R3.min_convolution_sparse(c, R3.displacement_offsets3d(3)),
    "check_cost_volume3d": lambda c: R3.check_cost_volume3d(c, 3),
}


@pytest.mark.parametrize("value, kind", [(math.nan, "NaN"), (math.inf, "inf"), (-math.inf, "inf")])
@pytest.mark.parametrize("name", list(REGULARISERS) + list(REGULARISERS3D))
def test_a_nan_or_inf_cost_is_refused(name, value, kind):
    function, cost = (REGULARISERS[name], COST2) if name in REGULARISERS else (REGULARISERS3D[name], COST3)
    function(cost)  # fine without
    with pytest.raises(ValueError, match=f"cost must be finite, but 1 of its {cost.numel()} values are {kind}"):
        function(_with(cost, value, index=7))


@pytest.mark.parametrize("name", list(REGULARISERS) + list(REGULARISERS3D))
def test_an_integer_cost_is_refused(name):
    """mean_field of an integer cost volume used to return truncated integer averages."""
    function, cost = (REGULARISERS[name], COST2) if name in REGULARISERS else (REGULARISERS3D[name], COST3)
    with pytest.raises(ValueError, match=r"cost must be floating point \(e.g. .float\(\)\), got a torch.int64"):
        function((cost * 10).long())


def test_normalise_cost_keeps_the_best_displacement_of_negative_costs():
    """Dot-product costs are negative; dividing by their (negative) mean flipped the arg-min."""
    cost = -_rand(2, 9, 3, 4, seed=1) * 5 + 1  # values in (-4, 1], mean < 0
    assert (cost.mean(dim=(1, 2, 3)) < 0).all()
    normalised = R.normalise_cost(cost)
    assert torch.equal(normalised.argmin(dim=1), cost.argmin(dim=1))
    scale = cost.abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(normalised, cost / (scale + 1e-8), rtol=1e-12, atol=0)
    assert torch.equal(R.normalise_cost(-cost).argmin(dim=1), (-cost).argmin(dim=1))  # mixed signs too


def test_normalise_cost_of_non_negative_costs_is_the_division_by_the_mean():
    cost = _rand(2, 4, 2, 3, seed=2)
    values = cost.tolist()
    for b in range(2):  # by hand: the plain mean of the 24 values of each pair
        flat = [v for k in values[b] for row in k for v in row]
        mean = sum(flat) / len(flat)
        expected = torch.tensor(values[b], dtype=torch.float64) / (mean + 1e-8)
        torch.testing.assert_close(R.normalise_cost(cost)[b], expected, rtol=1e-12, atol=0)
    # bit for bit the former formula (stored notebook numbers depend on it), float32 too
    for c in (cost, cost.float()):
        assert torch.equal(R.normalise_cost(c), c / (c.mean(dim=(1, 2, 3), keepdim=True) + 1e-8))


def test_normalise_cost_of_zeros_is_finite_and_eps_must_be_positive():
    assert torch.equal(R.normalise_cost(torch.zeros(1, 9, 2, 2)), torch.zeros(1, 9, 2, 2))
    with pytest.raises(ValueError, match="eps must be > 0"):
        R.normalise_cost(COST2, eps=0.0)
    with pytest.raises(ValueError, match=r"cost must be \[B, K, h, w\]"):
        R.normalise_cost(COST3)


@pytest.mark.parametrize("call", [
    lambda D: C.correlation(_rand(1, 2, 5, 5), _rand(1, 2, 5, 5, seed=1), D),
    lambda D: C.correlation_unfold(_rand(1, 2, 5, 5), _rand(1, 2, 5, 5, seed=1), D),
    lambda D: C3.correlation3d(_rand(1, 2, 3, 4, 4), _rand(1, 2, 3, 4, 4, seed=1), D),
    lambda D: C.argmin_displacement(_rand(1, 9, 2, 2), D),
    lambda D: R.min_convolution(COST2, D),
    lambda D: R.regularise(COST2, D),
    lambda D: R.soft_displacement(COST2, D)[1],
    lambda D: displacement_offsets(D),
    lambda D: R3.displacement_offsets3d(D),
    lambda D: R3.regularise3d(COST3, D),
    lambda D: S3.displacement_cube(D),
])
def test_numpy_integers_are_accepted_and_bools_and_floats_refused(call):
    torch.testing.assert_close(call(np.int64(3)), call(3), rtol=0, atol=0)
    for bad in (True, 3.0, "3"):
        with pytest.raises(TypeError, match="disp_range must be an integer"):
            call(bad)
    with pytest.raises(ValueError, match=r"disp_range must be an odd integer >= 1 \(a centred window\), got 4"):
        call(np.int64(4))


@pytest.mark.parametrize("call, error, message", [
    (lambda: R.min_convolution(COST2, 3, min_kernel=4), ValueError, "min_kernel must be an odd integer"),
    (lambda: R.min_convolution(COST2, 3, avg_kernel=2.0), TypeError, "avg_kernel must be an integer"),
    (lambda: R.min_convolution(COST2, 3, avg_passes=-1), ValueError, "avg_passes must be an integer >= 0"),
    (lambda: R.min_convolution(COST2, 3, min_order="middle"), ValueError, "min_order must be one of"),
    (lambda: R.min_convolution(COST2[0], 3), ValueError, r"cost must be \[B, D\*D, h, w\]"),
    (lambda: R.min_convolution(COST2, 5), ValueError, r"expected disp_range\*\*2 = 25"),
    (lambda: R.min_convolution(COST2.numpy(), 3), TypeError, "cost must be a torch.Tensor"),
    (lambda: R.min_convolution_exact(COST2, 3, lam=-1.0), ValueError, "lam must be >= 0"),
    (lambda: R.min_convolution_exact(COST2, 3, chunk=0), ValueError, "chunk must be an integer >= 1"),
    (lambda: R.mean_field(COST2, kernel=2), ValueError, "kernel must be an odd integer"),
    (lambda: R.mean_field(COST2, passes=-1), ValueError, "passes must be an integer >= 0"),
    (lambda: R.mean_field(COST3), ValueError, r"cost must be a cost volume \[B, K, h, w\] for mean_field"),
    (lambda: R.regularise(COST2, 3, meanfield_kernel=4), ValueError, "meanfield_kernel must be an odd"),
    (lambda: R.regularise(COST2, 3, meanfield_passes=-1), ValueError, "meanfield_passes must be an integer"),
    (lambda: R.regularise(COST2, 3, meanfield_iterations=1.5), TypeError, "meanfield_iterations must be an integer"),
    (lambda: R.regularise(COST2, 3, min_order="x"), ValueError, "min_order must be one of"),
    (lambda: R.soft_displacement(COST2, 3, alpha=0), ValueError, "alpha must be > 0"),
    (lambda: R.soft_displacement(COST2, 3, alpha=math.nan), ValueError, "alpha must be a finite number"),
    (lambda: R3.min_convolution3d(COST3, 3, avg_kernel=2), ValueError, "avg_kernel must be an odd integer"),
    (lambda: R3.min_convolution3d(COST2, 3), ValueError, r"cost must be a 3D cost volume \[B, D\*\*3, d, h, w\]"),
    (lambda: R3.mean_field3d(COST3, passes=-2), ValueError, "passes must be an integer >= 0"),
    (lambda: R3.regularise3d(COST3, 3, meanfield_iterations=-1), ValueError, "meanfield_iterations must be"),
    (lambda: R3.soft_displacement3d(COST3, 3, alpha=-1.0), ValueError, "alpha must be > 0"),
    (lambda: R3.soft_displacement_sparse(COST3, R3.displacement_offsets3d(3)[:5]), ValueError,
     r"offsets must be \[K, n\] with K = cost.shape\[1\] = 27"),
    (lambda: R3.soft_displacement_sparse(COST3, _with(R3.displacement_offsets3d(3), math.nan)), ValueError,
     "offsets must be finite"),
    (lambda: R3.min_convolution_sparse(COST3[:, :, 0, 0, 0], R3.displacement_offsets3d(3), chunk=0), ValueError,
     "chunk must be an integer >= 1"),
])
def test_regularisation_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------- correlation

PAIRS = {
    "correlation": (C.correlation, (1, 2, 5, 6)),
    "correlation_unfold": (C.correlation_unfold, (1, 2, 5, 6)),
    "correlation3d": (C3.correlation3d, (1, 2, 3, 4, 5)),
    "sparse_correlation3d": (lambda f, m, D: S3.sparse_correlation3d(f, m, D).cost, (1, 2, 3, 4, 5)),
}


@pytest.mark.parametrize("name", PAIRS)
def test_feature_pairs_must_agree(name):
    layer, shape = PAIRS[name]
    fixed, moving = _rand(*shape), _rand(*shape, seed=1)
    layer(fixed, moving, 3)
    with pytest.raises(ValueError, match="feat_fixed and feat_moving must have the same shape"):
        layer(fixed, moving[..., :-1], 3)
    with pytest.raises(ValueError, match="feat_fixed and feat_moving must have the same dtype"):
        layer(fixed, moving.float(), 3)
    with pytest.raises(ValueError, match=re.escape(f"feat_fixed is on cpu but feat_moving is on {OTHER}")):
        layer(fixed, moving.to(OTHER), 3)
    with pytest.raises(ValueError, match="feat_moving must be finite, but 1 of its .* values are NaN"):
        layer(fixed, _with(moving, math.nan, 3), 3)
    with pytest.raises(ValueError, match="feat_fixed must be finite, but 1 of its .* values are inf"):
        layer(_with(fixed, math.inf), moving, 3)
    with pytest.raises(ValueError, match="feat_fixed must be floating point"):
        layer(fixed.long(), moving.long(), 3)
    with pytest.raises(TypeError, match="feat_moving must be a torch.Tensor"):
        layer(fixed, moving.numpy(), 3)
    with pytest.raises(ValueError, match=f"feat_fixed must be .*{len(shape)} dimensions"):
        layer(fixed[0], moving[0], 3)
    with pytest.raises(ValueError, match="feat_fixed is empty"):
        layer(fixed[:0], moving[:0], 3)


@pytest.mark.parametrize("call, error, message", [
    (lambda: C.correlation(_rand(1, 1, 4, 4), _rand(1, 1, 4, 4), 3, metric="ncc"), ValueError,
     "metric must be one of 'ssd', 'dot'"),
    (lambda: C3.correlation3d(_rand(1, 1, 2, 2, 2), _rand(1, 1, 2, 2, 2), 3, metric="ncc"), ValueError,
     "metric must be one of"),
    (lambda: C.argmin_displacement(_rand(1, 8, 2, 2), 3), ValueError, r"cost_volume must be \[B, D\*D=9, H, W\]"),
    (lambda: C.argmin_displacement(_with(_rand(1, 9, 2, 2), math.nan), 3), ValueError, "cost_volume must be finite"),
    (lambda: C3.argmin_displacement3d(_with(COST3, math.nan), 3), ValueError, "cost_volume must be finite"),
    (lambda: C3.argmin_displacement3d(COST2, 3), ValueError, r"cost_volume must be \[B, D\*\*3=27, d, h, w\]"),
    (lambda: S3.control_points3d((4, 4, 4), 0), ValueError, "grid_step must be an integer >= 1"),
    (lambda: S3.control_points3d((4, 4, 4), 2.0), TypeError, "grid_step must be an integer"),
    (lambda: S3.displacement_cube(5, disp_step=0), ValueError, "disp_step must be an integer >= 1"),
    (lambda: S3.sparse_correlation3d(_rand(1, 1, 4, 4, 4), _rand(1, 1, 4, 4, 4), 3, border="wrap"), ValueError,
     "border must be one of 'zeros', 'replicate'"),
    (lambda: S3.sparse_correlation3d(_rand(1, 1, 4, 4, 4), _rand(1, 1, 4, 4, 4), 3, offsets=torch.zeros(2, 2)),
     ValueError, r"offsets must be an integer tensor \[K, 3\]"),
    (lambda: S3.sparse_correlation3d(_rand(1, 1, 4, 4, 4), _rand(1, 1, 4, 4, 4), 3, offsets=torch.zeros(2)),
     ValueError, r"offsets must be \[K, 3\]"),
    (lambda: S3.sparse_correlation3d(_rand(1, 1, 4, 4, 4), _rand(1, 1, 4, 4, 4), 3,
                                    offsets=torch.tensor([[0.0, math.nan, 0.0]])), ValueError, "offsets must be finite"),
])
def test_correlation_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------- transform


@pytest.mark.parametrize("warp, ndim", [(T.warp, 2), (T3.warp3d, 3)])
def test_warp_refuses_a_displacement_on_another_device_or_of_another_size(warp, ndim):
    spatial = (4, 5) if ndim == 2 else (3, 4, 5)
    moving, displacement = _rand(1, 1, *spatial), torch.zeros(1, ndim, *spatial, dtype=torch.float64)
    warp(moving, displacement)
    with pytest.raises(ValueError, match=re.escape(f"moving is on cpu but displacement is on {OTHER}")):
        warp(moving, displacement.to(OTHER))
    with pytest.raises(ValueError, match=re.escape(f"moving is on {OTHER} but displacement is on cpu")):
        warp(moving.to(OTHER), displacement)
    with pytest.raises(ValueError, match="but moving is .*: upsample the displacement first"):
        warp(moving, displacement[..., :-1])
    with pytest.raises(ValueError, match="displacement must be finite, but 1 of its .* values are NaN"):
        warp(moving, _with(displacement, math.nan))
    with pytest.raises(ValueError, match="moving must be finite"):
        warp(_with(moving, math.inf), displacement)
    with pytest.raises(ValueError, match="displacement batch 2 does not match moving batch 3"):
        warp(moving.expand(3, *moving.shape[1:]), displacement.expand(2, *displacement.shape[1:]))
    with pytest.raises(ValueError, match="displacement must be floating point"):
        warp(moving, displacement.long())
    with pytest.raises(ValueError, match=f"displacement must be \\[B, {ndim}, "):
        warp(moving, displacement[:, :1])
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        warp(moving, displacement, padding_mode="wrap")


@pytest.mark.parametrize("call, error, message", [
    (lambda: T.warp_labels(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 2, 4, 4).to(OTHER), 2),
     ValueError, re.escape(f"labels is on cpu but displacement is on {OTHER}")),
    (lambda: T.warp_labels(torch.zeros(1, 4, 4), torch.zeros(1, 2, 4, 4), 2), ValueError,
     "labels must hold integers"),
    (lambda: T.warp_labels(torch.full((1, 4, 4), 2), torch.zeros(1, 2, 4, 4), 2), ValueError,
     "labels must hold values 0..1, got values from 2 to 2"),
    (lambda: T.warp_labels(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 2, 4, 4), 2, "cubic"),
     ValueError, "mode must be one of 'bilinear', 'nearest'"),
    (lambda: T3.warp_labels3d(torch.zeros(1, 2, 4, 4, dtype=torch.long), torch.zeros(1, 3, 2, 4, 4), 2, "cubic"),
     ValueError, "mode must be one of 'trilinear'"),
    (lambda: T3.warp_labels3d(torch.zeros(1, 2, 4, 4, dtype=torch.long),
                             _with(torch.zeros(1, 3, 2, 4, 4), math.nan), 2), ValueError, "displacement must be finite"),
    (lambda: T.upsample_displacement(_with(torch.zeros(1, 2, 2, 2), math.nan), (4, 4)), ValueError,
     "displacement must be finite"),
    (lambda: T.upsample_displacement(torch.zeros(1, 2, 2, 2), (4, 4, 4)), ValueError,
     r"size must be two positive integers \(H, W\)"),
    (lambda: T.upsample_displacement(torch.zeros(1, 2, 2, 2), (4, 0)), ValueError, "size must be an integer >= 1"),
    (lambda: T3.upsample_displacement3d(torch.zeros(1, 3, 2, 2, 2), (4, 4, 4.5)), TypeError, "size must be an integer"),
    (lambda: T.compose_displacements(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 5)), ValueError,
     "first and second must have the same size"),
    (lambda: T.compose_displacements(torch.zeros(1, 2, 4, 4), _with(torch.zeros(1, 2, 4, 4), math.inf)), ValueError,
     "second must be finite"),
    (lambda: T.compose_displacements(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4).to(OTHER)), ValueError,
     re.escape(f"first is on cpu but second is on {OTHER}")),
    (lambda: T.affine_displacement(_with(torch.eye(2, 3), math.nan), (4, 4)), ValueError, "matrix must be finite"),
    (lambda: T.affine_displacement(torch.eye(2, 3)[None, None], (4, 4)), ValueError, r"matrix must be \[B, 2, 3\]"),
    (lambda: T.translation_displacement(torch.zeros(1, 3), (4, 4)), ValueError, r"shift must be \[B, 2\] \(dy, dx\)"),
    (lambda: T.identity_grid(0, 4), ValueError, "height must be an integer >= 1"),
    (lambda: T3.identity_grid3d(2, 2, 2.5), TypeError, "width must be an integer"),
    (lambda: T3.interpolate_control_field3d(_with(torch.zeros(1, 3, 2, 2, 2), math.nan), (4, 4, 4), 2), ValueError,
     "field must be finite"),
    (lambda: T3.interpolate_control_field3d(torch.zeros(1, 3, 2, 2, 2), (4, 4, 4), 0), ValueError,
     "grid_step must be an integer >= 1"),
])
def test_transform_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------- features

FEATURES = {
    "intensity_features": (Fe.intensity_features, (1, 1, 16, 24)),
    "mind_ssc": (Fe.mind_ssc, (1, 1, 16, 24)),
    "mind_features": (Fe.mind_features, (1, 1, 16, 24)),
    "intensity_features3d": (Fe3.intensity_features3d, (1, 1, 4, 6, 8)),
    "mind_ssc3d": (Fe3.mind_ssc3d, (1, 1, 4, 6, 8)),
    "mind_features3d": (Fe3.mind_features3d, (1, 1, 4, 6, 8)),
}


@pytest.mark.parametrize("value", [0.0, 0.37, 200.0])
@pytest.mark.parametrize("name", FEATURES)
def test_constant_images_give_finite_features(name, value):
    function, shape = FEATURES[name]
    for dtype in (torch.float32, torch.float64):
        out = function(torch.full(shape, value, dtype=dtype))
        assert torch.isfinite(out).all(), (name, value, dtype)
        expected = value if name.startswith("intensity") else 1.0  # no structure: every patch alike
        assert torch.allclose(out, torch.full_like(out, expected))


@pytest.mark.parametrize("name", FEATURES)
def test_images_with_nan_are_refused(name):
    function, shape = FEATURES[name]
    argument = "image" if len(shape) == 4 else "volume"
    with pytest.raises(ValueError, match=f"{argument} must be finite, but 1 of its .* values are NaN"):
        function(_with(_rand(*shape), math.nan, 5))
    with pytest.raises(ValueError, match=f"{argument} must be floating point"):
        function(torch.zeros(shape, dtype=torch.uint8))
    with pytest.raises(ValueError, match=f"{argument} must be \\[B, 1, "):
        function(_rand(*shape)[0])


@pytest.mark.parametrize("call, error, message", [
    (lambda: Fe.intensity_features(_rand(1, 1, 30, 40)), ValueError, "image: H and W must be divisible by stride=4"),
    (lambda: Fe.intensity_features(_rand(1, 1, 32, 40), stride=0), ValueError, "stride must be an integer >= 1"),
    (lambda: Fe.mind_features(_rand(1, 1, 32, 40), stride=4.0), TypeError, "stride must be an integer"),
    (lambda: Fe3.intensity_features3d(_rand(1, 1, 5, 8, 8)), ValueError,
     "volume: Z, Y and X must be divisible by stride=2"),
    (lambda: Fe.mind_ssc(_rand(1, 1, 8, 8), radius=-1), ValueError, "radius must be an integer >= 0"),
    (lambda: Fe.mind_ssc(_rand(1, 1, 8, 8), dilation=(1, 0)), ValueError, "dilation must be an integer >= 1"),
    (lambda: Fe.mind_ssc(_rand(1, 1, 8, 8), dilation=2.0), TypeError, "dilation must be an integer"),
    (lambda: Fe.mind_ssc(_rand(1, 1, 8, 8), eps=0.0), ValueError, "eps must be > 0"),
    (lambda: Fe3.mind_ssc3d(_rand(1, 1, 4, 4, 4), eps=-1.0), ValueError, "eps must be > 0"),
    (lambda: Fe3.mind_ssc3d(_rand(1, 1, 4, 4, 4), dilation=()), ValueError, "dilation must name at least one"),
    (lambda: Fe.mind_features(_rand(1, 1, 8, 8), downsample=3), ValueError, "downsample must be a positive integer"),
    (lambda: Fe3.ssc_pairs3d(0), ValueError, "dilation must be an integer >= 1"),
])
def test_feature_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_numpy_integer_arguments_of_the_features_are_fine():
    image = _rand(1, 1, 16, 24)
    assert torch.equal(Fe.mind_features(image, stride=np.int64(4), dilation=(np.int64(2),)),
                       Fe.mind_features(image, stride=4, dilation=2))


# --------------------------------------------------------------------------- metrics

LABELS = torch.tensor([[0, 1, 2], [2, 1, 0]])


@pytest.mark.parametrize("function", [M.dice, M.mean_dice, M.dice_ceiling, M.centroid_distance])
def test_label_maps_are_checked(function):
    function(LABELS, LABELS.flip(0), 3)
    with pytest.raises(ValueError, match=r"labels_a must hold integers \(e.g. .long\(\)\), got a torch.float32"):
        function(LABELS.float(), LABELS, 3)
    with pytest.raises(ValueError, match="labels_b must hold integers"):
        function(LABELS, LABELS.double(), 3)
    with pytest.raises(ValueError, match=r"labels_a and labels_b must have the same shape, got \[2, 3\] and \[2, 2\]"):
        function(LABELS, LABELS[:, :2], 3)
    with pytest.raises(ValueError, match="labels_b must hold values 0..2, got values from 0 to 3"):
        function(LABELS, LABELS + (LABELS == 2), 3)
    with pytest.raises(ValueError, match="labels_a must hold values 0..1, got values from -1 to 2"):
        function(LABELS - (LABELS == 0).long() * 1, LABELS.clamp(max=1), 2)
    with pytest.raises(ValueError, match="num_labels must be an integer >= 1"):
        function(LABELS, LABELS, 0)
    with pytest.raises(TypeError, match="num_labels must be an integer"):
        function(LABELS, LABELS, 3.0)
    with pytest.raises(TypeError, match="labels_a must be a torch.Tensor"):
        function(LABELS.numpy(), LABELS, 3)
    with pytest.raises(ValueError, match=re.escape(f"labels_a is on cpu but labels_b is on {OTHER}")):
        function(LABELS, LABELS.to(OTHER), 3)


def test_dice_accepts_numpy_integers_and_small_integer_types():
    assert torch.equal(M.dice(LABELS.to(torch.uint8), LABELS.flip(0).int(), np.int64(3)),
                       M.dice(LABELS, LABELS.flip(0), 3))
    with pytest.raises(ValueError, match=r"labels_a must be an integer label map \[H, W\] or \[B, H, W\]"):
        M.centroid_distance(LABELS[0], LABELS[0], 3)


JACOBIANS = {
    "jacobian_determinant": (M.jacobian_determinant, 2),
    "folding_fraction": (M.folding_fraction, 2),
    "log_jacobian_std": (M.log_jacobian_std, 2),
    "jacobian_determinant3d": (M3.jacobian_determinant3d, 3),
    "folding_fraction3d": (M3.folding_fraction3d, 3),
}


@pytest.mark.parametrize("name", JACOBIANS)
def test_jacobian_functions_check_the_displacement(name):
    function, ndim = JACOBIANS[name]
    spatial = (3, 4) if ndim == 2 else (3, 4, 5)
    field = torch.zeros(1, ndim, *spatial, dtype=torch.float64)
    function(field)
    layout = "[B, 2, H, W]" if ndim == 2 else "[B, 3, Z, Y, X]"
    with pytest.raises(ValueError, match=re.escape(f"displacement must be {layout}")):
        function(field[:, :1])
    with pytest.raises(ValueError, match=re.escape(f"displacement must be {layout}")):
        function(field[0])
    with pytest.raises(ValueError, match="displacement must be finite, but 1 of its .* values are NaN"):
        function(_with(field, math.nan, 4))
    with pytest.raises(ValueError, match="displacement must be floating point"):
        function(field.long())
    with pytest.raises(ValueError, match="displacement needs at least 2 .* along each axis"):
        function(field[..., :1])
    with pytest.raises(TypeError, match="displacement must be a torch.Tensor"):
        function(field.numpy())


def test_log_jacobian_std_eps_must_be_positive():
    with pytest.raises(ValueError, match="eps must be > 0"):
        M.log_jacobian_std(torch.zeros(1, 2, 3, 3), eps=0.0)


# --------------------------------------------------------------------------- models


def test_feature_cnn_checks_its_input():
    net = FeatureCNN().eval()
    net(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="image must be finite"):
        net(_with(torch.rand(1, 1, 8, 8), math.nan))
    with pytest.raises(ValueError, match="image must be floating point"):
        net(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=re.escape(f"image is on {OTHER} but must be on cpu")):
        net(torch.rand(1, 1, 8, 8).to(OTHER))
    with pytest.raises(ValueError, match=r"image must be FeatureCNN's input \[B, 2, H, W\]"):
        FeatureCNN(in_channels=2)(torch.rand(1, 1, 8, 8))
    with pytest.raises(TypeError, match="hidden must be an integer"):
        FeatureCNN(hidden=3.5)


def test_displacement_unet_checks_its_inputs():
    model = DisplacementUNet(channels=(4, 4), flow_level=1)
    image = torch.rand(1, 1, 8, 8)
    assert model(image, image).shape == (1, 2, 8, 8)
    with pytest.raises(ValueError, match="image_moving must be finite"):
        model(image, _with(image, math.inf))
    with pytest.raises(ValueError, match="image_fixed must be floating point"):
        model(image.long(), image.long())
    with pytest.raises(ValueError, match=re.escape(f"image_fixed is on cpu but image_moving is on {OTHER}")):
        model(image, image.to(OTHER))
    with pytest.raises(ValueError, match=re.escape(f"image_fixed is on {OTHER} but must be on cpu")):
        model(image.to(OTHER), image.to(OTHER))
    with pytest.raises(ValueError, match="flow_level must be an integer <= 2"):
        DisplacementUNet(channels=(4, 4), flow_level=3)
    with pytest.raises(TypeError, match="flow_level must be an integer"):
        DisplacementUNet(channels=(4, 4), flow_level=1.0)
