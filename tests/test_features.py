"""Hand-crafted features: intensities and MIND-SSC."""

import itertools

import pytest
import torch

from tutorial_utils import features as Fe


def smooth_image(H=32, W=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, H // 8, W // 8, generator=g)
    image = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False)
    return (image - image.min()) / (image.max() - image.min())


def mind_reference(image, radius, dilation):
    """Independent reference with explicit loops over pixels (replicated borders)."""
    img = image[0, 0].double()
    H, W = img.shape

    def at(y, x):
        return img[min(max(y, 0), H - 1), min(max(x, 0), W - 1)]

    d = dilation
    pairs = [((-d, 0), (0, -d)), ((-d, 0), (0, d)), ((0, -d), (d, 0)), ((0, d), (d, 0))]
    dist = torch.zeros(4, H, W, dtype=torch.float64)
    for c, (a, b) in enumerate(pairs):
        for y, x in itertools.product(range(H), range(W)):
            total = 0.0
            for py, px in itertools.product(range(-radius, radius + 1), repeat=2):
                yy = min(max(y + py, 0), H - 1)
                xx = min(max(x + px, 0), W - 1)
                total += float(at(yy + a[0], xx + a[1]) - at(yy + b[0], xx + b[1])) ** 2
            dist[c, y, x] = total / (2 * radius + 1) ** 2
    dist = dist - dist.min(0).values
    var = dist.mean(0)
    mean_var = var.mean()
    var = var.clamp(min=float(mean_var) * 1e-3, max=float(mean_var) * 1e3) + 1e-12
    return torch.exp(-dist / var)


def test_ssc_pairs():
    pairs = Fe.ssc_pairs(2)
    assert len(pairs) == 4
    for a, b in pairs:
        assert (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 == 8


def test_mind_matches_loop_reference():
    image = smooth_image(12, 14)
    got = Fe.mind_ssc(image.double(), radius=1, dilation=2)
    assert got.shape == (1, 4, 12, 14)
    assert torch.allclose(got[0], mind_reference(image, 1, 2), atol=1e-10)


@pytest.mark.parametrize("scale,shift", [(0.5, 0.0), (0.25, 0.6), (-1.0, 1.0), (3.0, -0.2)])
def test_mind_invariant_to_intensity_scaling(scale, shift):
    image = smooth_image().double()
    reference = Fe.mind_ssc(image, dilation=(1, 2))
    assert torch.allclose(Fe.mind_ssc(scale * image + shift, dilation=(1, 2)), reference, atol=1e-9)
    # intensities are not: that is the point of the descriptor
    assert not torch.allclose(Fe.intensity_features(scale * image + shift), Fe.intensity_features(image))


def test_mind_range_and_constant_image():
    mind = Fe.mind_ssc(smooth_image())
    assert (mind > 0).all() and (mind <= 1).all()
    assert torch.allclose(Fe.mind_ssc(torch.full((1, 1, 8, 8), 0.3)), torch.ones(1, 4, 8, 8))


def test_feature_shapes_and_pooling():
    image = smooth_image(32, 40)
    feat = Fe.intensity_features(image)
    assert feat.shape == (1, 1, 8, 10)
    assert torch.allclose(feat[0, 0, 1, 2], image[0, 0, 4:8, 8:12].mean())
    assert Fe.mind_features(image).shape == (1, 16, 8, 10)
    assert Fe.mind_features(image, dilation=2, downsample=1).shape == (1, 4, 8, 10)


def block_mean_loops(maps, k):
    """Mean of every k x k block of [C, H, W], pixel by pixel."""
    C, H, W = maps.shape
    out = torch.zeros(C, H // k, W // k, dtype=torch.float64)
    for c, y, x in itertools.product(range(C), range(H), range(W)):
        out[c, y // k, x // k] += float(maps[c, y, x]) / k**2
    return out


def test_mind_features_match_loops():
    """Half resolution (2 x 2 means), MIND-SSC of each dilation (the loop reference), stacked,
    then 2 x 2 means again down to 1/4."""
    image = smooth_image(16, 24).double()
    half = block_mean_loops(image[0], 2)[None]  # [1, 1, 8, 12]
    mind = torch.cat([mind_reference(half, 1, d) for d in (1, 3)])  # [8, 8, 12]
    expected = block_mean_loops(mind, 2)  # [8, 4, 6]
    got = Fe.mind_features(image, dilation=(1, 3))
    assert got.shape == (1, 8, 4, 6)
    assert torch.allclose(got[0], expected, atol=1e-10)


@pytest.mark.parametrize("bad, match", [
    (lambda: Fe.intensity_features(torch.rand(1, 1, 30, 40)), "divisible by stride"),
    (lambda: Fe.intensity_features(torch.rand(1, 2, 32, 40)), r"image.*\[B, 1, H, W\]"),
    (lambda: Fe.mind_ssc(torch.rand(32, 40)), r"image.*\[B, 1, H, W\]"),
    (lambda: Fe.mind_ssc(torch.ones(1, 1, 8, 8, dtype=torch.uint8)), "floating point"),
    (lambda: Fe.mind_ssc(torch.rand(1, 1, 8, 8), radius=-1), "radius"),
    (lambda: Fe.mind_ssc(torch.rand(1, 1, 8, 8), dilation=0), "dilation"),
    (lambda: Fe.mind_ssc(torch.rand(1, 1, 8, 8), dilation=()), "dilation"),
    (lambda: Fe.mind_features(torch.rand(1, 1, 8, 8), downsample=3), "downsample"),
])
def test_bad_input_raises_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()
