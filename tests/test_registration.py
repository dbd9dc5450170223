"""The composed pipeline: known shifts and affine maps are recovered, options behave, bad input fails."""

import math

import pytest
import torch
import torch.nn.functional as F

from tutorial_utils import metrics as M
from tutorial_utils import prealign as P
from tutorial_utils import registration as G
from tutorial_utils import transform as T
from tutorial_utils.models import FeatureCNN


def blob_image(H=64, W=80, seed=0, inside=True):
    """A smooth textured ellipse on a dark background: an abdomen in miniature."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    body = (((ys - H / 2) / (0.33 * H)) ** 2 + ((xs - W / 2) / (0.4 * W)) ** 2 < 1).float()
    texture = F.interpolate(torch.rand(1, 1, H // 8, W // 8, generator=g), size=(H, W), mode="bicubic",
                            align_corners=False)[0, 0]
    image = body * (0.3 + 0.6 * texture.clamp(0, 1))
    if not inside:
        return image[None, None]
    return F.avg_pool2d(F.pad(image[None, None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def shifted(image, dy, dx):
    """moving with moving[y, x] = image[y - dy, x - dx]: registering it back needs (dy, dx)."""
    H, W = image.shape[-2:]
    return T.warp(image, T.translation_displacement(torch.tensor([[-float(dy), -float(dx)]]), (H, W)))


@pytest.mark.parametrize("features", ["intensity", "mind"])
def test_recovers_a_translation_within_the_search_range(features):
    fixed = blob_image()
    moving = shifted(fixed, 6, -8)
    disp = G.register_images(fixed, moving, features, prealign="none")
    assert disp.shape == (1, 2, 64, 80) and disp.dtype == torch.float32
    inner = disp[0, :, 20:44, 24:56].mean(dim=(1, 2))
    # measured errors (dy, dx): intensity (0.16, 0.30), mind (0.09, 0.35) px: tolerance ~2x the worst
    assert torch.allclose(inner, torch.tensor([6.0, -8.0]), atol=0.7), inner
    error_before = (moving - fixed).abs()[..., 16:48, 16:64].mean()
    error_after = (T.warp(moving, disp) - fixed).abs()[..., 16:48, 16:64].mean()
    assert error_after < 0.5 * error_before


def test_the_2019_defaults_run_and_recover_a_translation():
    fixed = blob_image()
    moving = shifted(fixed, -5, 4)
    # MIND: the 2019 pipeline does not normalise the costs, and the SSD of raw intensities is
    # too small for alpha = 10 (measured: intensity features recover only (-1.8, 0.6) of (-5, 4))
    disp = G.register_images(fixed, moving, "mind", G.DEFAULTS_2019)
    inner = disp[0, :, 20:44, 24:56].mean(dim=(1, 2))
    # measured errors (dy, dx): (0.41, 0.44) px: tolerance ~2x
    assert torch.allclose(inner, torch.tensor([-5.0, 4.0]), atol=0.9), inner


# measured errors (dy, dx) in px: com (0.15, 0.01), moments (0.05, 0.15), affine (0.24, 0.44);
# tolerances ~2x the worst component
@pytest.mark.parametrize("prealign, tolerance", [("com", 0.3), ("moments", 0.3), ("affine", 0.9)])
def test_prealignment_recovers_shifts_beyond_the_search_range(prealign, tolerance):
    fixed = blob_image(96, 128)
    moving = shifted(fixed, 12, -30)  # D = 9 reaches only +-16 pixels
    none = G.register_images(fixed, moving, "intensity", prealign="none", refine_range=None)
    aligned = G.register_images(fixed, moving, "intensity", prealign=prealign)
    target = torch.tensor([12.0, -30.0])
    inner = (slice(None), slice(36, 60), slice(44, 84))
    assert torch.allclose(aligned[0][inner].mean(dim=(1, 2)), target, atol=tolerance)
    assert (none[0][inner].mean(dim=(1, 2)) - target).abs().max() > 8


def test_moments_affine_inverts_a_known_affine():
    fixed = blob_image(96, 128, inside=False)
    angle, scale = math.radians(12), 1.1
    B = torch.tensor([[[scale * math.cos(angle), -scale * math.sin(angle), 3.0],
                       [scale * math.sin(angle), scale * math.cos(angle), -5.0]]])
    moving = T.warp(fixed, T.affine_displacement(B, (96, 128)), padding_mode="zeros")  # moving[p] = fixed[Bp]
    A = P.moments_affine(fixed, moving)  # warped[p] = moving[Ap] = fixed[BAp]: A should invert B
    B3 = torch.cat([B[0], torch.tensor([[0.0, 0.0, 1.0]])])
    A3 = torch.cat([A[0], torch.tensor([[0.0, 0.0, 1.0]])])
    assert torch.allclose(B3 @ A3, torch.eye(3), atol=0.05), B3 @ A3
    refined = P.refine_affine(fixed, moving, A, iterations=30)
    R3 = torch.cat([refined[0], torch.tensor([[0.0, 0.0, 1.0]])])
    assert torch.allclose(B3 @ R3, torch.eye(3), atol=0.06)


def test_details_shapes_and_consistency():
    fixed = torch.cat([blob_image(seed=0), blob_image(seed=1)])
    moving = torch.cat([shifted(fixed[:1], 3, 2), shifted(fixed[1:], -2, 5)])
    disp, details = G.register_images(fixed, moving, "mind", disp_range=7, refine_range=None,
                                      prealign="none", return_details=True)
    assert disp.shape == (2, 2, 64, 80)
    assert details.cost_volume.shape == details.probabilities.shape == (2, 49, 16, 20)
    assert details.displacement_low.shape == (2, 2, 16, 20)
    assert details.stride == 4 and details.disp_range == 7
    assert torch.allclose(details.probabilities.sum(1), torch.ones(2, 16, 20), atol=1e-5)
    assert torch.allclose(details.cost_volume.mean(dim=(1, 2, 3)), torch.ones(2), atol=1e-4)  # normalised
    # the soft arg-min: sum_k p_k (dy_k, dx_k) with k = i * 7 + j <-> (i - 3, j - 3), pixel by pixel
    expected_low = torch.zeros(2, 2, 16, 20, dtype=torch.float64)
    p = details.probabilities.double()
    for k in range(49):
        expected_low[:, 0] += p[:, k] * (k // 7 - 3)
        expected_low[:, 1] += p[:, k] * (k % 7 - 3)
    assert torch.allclose(details.displacement_low.double(), expected_low, atol=1e-5)
    # upsampled x4 (bilinear, feature pixel centres at 4i + 1.5) and scaled by 4, in pixel loops
    expected = 4 * bilinear_half_pixel_loops(expected_low, 64, 80)
    assert torch.allclose(disp.double(), expected, atol=1e-4)
    assert disp.abs().max() > 1  # a real shift, not a field that is zero anyway


def bilinear_half_pixel_loops(field, H, W):
    """Bilinear interpolation of [B, C, h, w] to [B, C, H, W], pixel by pixel: image pixel y samples
    the low grid at s = (y + 0.5) * h / H - 0.5, clamped to [0, h - 1] (the nearest edge value beyond)."""
    B, C, h, w = field.shape
    out = torch.zeros(B, C, H, W, dtype=torch.float64)
    for y in range(H):
        sy = min(max((y + 0.5) * h / H - 0.5, 0.0), h - 1.0)
        y0 = int(math.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for x in range(W):
            sx = min(max((x + 0.5) * w / W - 0.5, 0.0), w - 1.0)
            x0 = int(math.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, :, y, x] = ((1 - fy) * (1 - fx) * field[:, :, y0, x0] + (1 - fy) * fx * field[:, :, y0, x1]
                               + fy * (1 - fx) * field[:, :, y1, x0] + fy * fx * field[:, :, y1, x1])
    return out


def test_chunking_does_not_change_the_result():
    fixed = torch.cat([blob_image(seed=s) for s in range(3)])
    moving = torch.cat([shifted(fixed[i:i + 1], i, -i) for i in range(3)])
    whole = G.register_images(fixed, moving, "intensity", chunk_size=16)
    chunked = G.register_images(fixed, moving, "intensity", chunk_size=2)
    assert torch.allclose(whole, chunked, atol=1e-4)


def test_feature_module_plugs_in_and_gradients_reach_it():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2, padding=1), torch.nn.Sigmoid(),
                              torch.nn.Conv2d(4, 4, 3, stride=2, padding=1), torch.nn.Sigmoid())
    fixed = blob_image()
    disp = G.register_images(fixed, shifted(fixed, 2, 2), net, prealign="none")
    assert disp.shape == (1, 2, 64, 80)
    disp.abs().sum().backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0


def test_replicate_border_only_changes_the_border():
    torch.manual_seed(0)
    a, b = torch.rand(1, 3, 12, 14), torch.rand(1, 3, 12, 14)
    zeros = G.cost_volume(a, b, 5, normalise=False, border="zeros")
    replicate = G.cost_volume(a, b, 5, normalise=False, border="replicate")
    assert torch.allclose(zeros[..., 2:-2, 2:-2], replicate[..., 2:-2, 2:-2], atol=1e-5)
    assert not torch.allclose(zeros, replicate)


def test_identical_images_give_a_near_identity_without_folding():
    fixed = blob_image(128, 160)
    disp = G.register_images(fixed, fixed.clone(), "mind")
    # inside the object: near zero. (In the flat air around it every displacement costs the same,
    # and the soft arg-min drifts towards the cheap side, away from the object, by a few pixels.)
    inside = fixed[0, 0] > 0.1
    assert disp[0][:, inside].abs().mean() < 0.25 and disp[0][:, inside].abs().max() < 1.0
    assert M.folding_fraction(disp).item() == 0.0


@pytest.mark.parametrize("bad, match", [
    (lambda f, m: G.register_images(f[0], m[0]), "image_fixed"),
    (lambda f, m: G.register_images(f, m[..., :60, :]), "image_moving.*differ in shape"),
    (lambda f, m: G.register_images(f[..., :62, :], m[..., :62, :]), "divisible by 4"),
    (lambda f, m: G.register_images(f, m, "sift"), "features"),
    (lambda f, m: G.register_images(f, m, torch.nn.Identity()), "feature module"),
    (lambda f, m: G.register_images(f, m, disp_range=8), "disp_range"),
    (lambda f, m: G.register_images(f, m, refine_range=4), "refine_range"),
    (lambda f, m: G.register_images(f, m, alpha=0.0), "alpha"),
    (lambda f, m: G.register_images(f, m, prealign="rigid"), "prealign"),
    (lambda f, m: G.register_images(f, m, border="reflect"), "border"),
    (lambda f, m: G.register_images(f, m, min_kernel=2), "min_kernel"),
    (lambda f, m: G.register_images(f, m, meanfield_iterations=-1), "meanfield_iterations"),
    (lambda f, m: G.register_images((f * 255).byte(), (m * 255).byte()), "image_fixed.*floating point"),
])
def test_bad_input_raises_value_error(bad, match):
    fixed = blob_image()
    with pytest.raises(ValueError, match=match):
        bad(fixed, fixed.clone())


def test_a_feature_model_on_another_device_gets_a_clear_error():
    model = FeatureCNN().to("meta")  # stands in for a model on the GPU while the images are on the CPU
    image = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match="the feature model is on meta but the images are on cpu"):
        G.register_images(image, image, model)


# --------------------------------------------------------------------------- the settings object


def test_settings_are_checked_when_made_and_replaced_by_name():
    assert G.DEFAULTS == G.RegistrationSettings() and G.DEFAULTS_2019 != G.DEFAULTS
    changed = G.DEFAULTS.replace(alpha=30, disp_range=7)
    assert (changed.alpha, changed.disp_range, changed.min_kernel) == (30.0, 7, G.DEFAULTS.min_kernel)
    assert isinstance(changed.alpha, float) and G.DEFAULTS.alpha == 100.0  # a copy; the original stays
    assert changed.regularisation() == {key: getattr(changed, key) for key in G.REGULARISATION_KEYS}
    with pytest.raises(TypeError, match="unknown registration setting.*alpah"):
        G.DEFAULTS.replace(alpah=30)
    with pytest.raises(ValueError, match="refine_range must be an odd integer"):
        G.DEFAULTS.replace(refine_range=0)  # None means "no second search"; 0 is not a size
    with pytest.raises(ValueError, match="upsample_mode must be one of"):
        G.RegistrationSettings(upsample_mode="nearest")
    with pytest.raises(TypeError, match="settings must be a RegistrationSettings.*write disp_range=7"):
        G.register_images(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16), "intensity", 7)
    with pytest.raises(TypeError, match="settings must be a RegistrationSettings"):
        G.register_images(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16), "intensity", G.DEFAULTS.as_dict())


def test_keyword_changes_equal_a_replaced_settings_object():
    fixed, moving = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3)).split(1)
    by_keyword = G.register_images(fixed, moving, "intensity", G.DEFAULTS_2019, alpha=30.0, disp_range=5)
    by_object = G.register_images(fixed, moving, "intensity", G.DEFAULTS_2019.replace(alpha=30.0, disp_range=5))
    assert torch.equal(by_keyword, by_object)
    assert not torch.equal(by_keyword, G.register_images(fixed, moving, "intensity", G.DEFAULTS_2019))


def test_register_argmin_is_the_winner_of_each_pixel_without_regularisation():
    g = torch.Generator().manual_seed(5)
    fixed = F.interpolate(torch.rand(1, 1, 16, 20, generator=g), size=(64, 80), mode="bicubic").clamp(0, 1)
    moving = shifted(fixed, 8, -4)  # whole feature pixels: (2, -1) at 1/4 resolution
    disp = G.register_argmin(fixed, moving, "intensity", G.DEFAULTS.replace(prealign="none"))
    assert disp.shape == (1, 2, 64, 80)
    inner = disp[0, :, 24:40, 28:52]
    assert torch.equal(inner, torch.tensor([8.0, -4.0])[:, None, None].expand_as(inner))
    # the reference, by brute force: each feature pixel's cheapest of the 9 x 9 shifts, by loops
    feat_f = G.extract_features(fixed, "intensity")[0, 0].double()
    feat_m = F.pad(G.extract_features(moving, "intensity"), (4, 4, 4, 4), mode="replicate")[0, 0].double()
    low, tie = torch.zeros(2, 16, 20), torch.zeros(1, 1, 16, 20)
    for y in range(16):
        for x in range(20):
            costs = {(dy, dx): float((feat_m[y + 4 + dy, x + 4 + dx] - feat_f[y, x]) ** 2)
                     for dy in range(-4, 5) for dx in range(-4, 5)}
            ranked = sorted(costs.values())
            tie[0, 0, y, x] = float(ranked[1] - ranked[0] < 1e-9)  # replicated borders: equal costs
            low[:, y, x] = torch.tensor(min(costs, key=costs.get), dtype=torch.float32)
    expected = T.upsample_displacement(low[None], (64, 80))
    clear = F.interpolate(tie, size=(64, 80), mode="bilinear", align_corners=False)[0, 0] == 0  # no tie nearby
    assert clear.float().mean() > 0.5
    assert torch.allclose(disp[..., clear], expected[..., clear], atol=1e-4)
