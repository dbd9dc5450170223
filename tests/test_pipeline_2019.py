"""``DEFAULTS_2019`` and the 2019 loss against an independent transcription of the 2019 slides' code.

The reference below is written from the slides (Learn2Reg 2019, "Discrete Deep Learning
Registration", correlation layer and regularisation) and the facts of the Kaggle kernel
(softmax of -10 x cost, expected displacement, bicubic x4 upsampling scaled by 4; one-hot
labels bilinearly downsampled, the moving ones unfolded, squared difference summed over the
labels, mean over the pixels). It uses only torch and F, never the package's implementation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from blob_data import blob_dataset
from label_loops import loss_loops
from torch import nn

from tutorial_utils.pipeline_2019 import (
    TRAIN_DEFAULTS_2019,
    loss_2019,
    train_features_2019,
    train_features_settings_2019,
)
from tutorial_utils.registration import DEFAULTS, DEFAULTS_2019, register_images

pytestmark = pytest.mark.usefixtures("single_thread")

STRIDE = 4
TOL = dict(rtol=1e-10, atol=1e-10)

# --------------------------------------------------------------------------- the transcription


def slides_correlation(feat_fixed, feat_mov, disp_range):
    """The slides' correlation layer: [1, C, H, W] x 2 -> [1, D*D, H, W] (zero padding of the unfold)."""
    disp_hw = (disp_range - 1) // 2
    B, C, H, W = feat_fixed.size()
    feat_mov_unfold = F.unfold(feat_mov.transpose(1, 0), (disp_range, disp_range), padding=disp_hw)
    ssd_distance = ((feat_fixed.view(C, 1, -1) - feat_mov_unfold) ** 2).sum(0).view(1, disp_range ** 2, H, W)
    return ssd_distance


def slides_regularise(ssd_distance, disp_range):
    """The slides' ``minconv = Sequential(pad1, avg1, avg1, max1)`` and ``meanfield = Sequential(pad2,
    avg1, avg1, avg1)`` (pad1 = ReplicationPad2d(5), pad2 = ReplicationPad2d(6), avg1 = AvgPool2d(5,
    stride=1), max1 = MaxPool2d(3, stride=1)), written with F."""
    _, _, H, W = ssd_distance.shape

    def minconv(x):
        x = F.pad(x, (5, 5, 5, 5), mode="replicate")
        x = F.avg_pool2d(x, 5, stride=1)
        x = F.avg_pool2d(x, 5, stride=1)
        return F.max_pool2d(x, 3, stride=1)

    def meanfield(x):
        x = F.pad(x, (6, 6, 6, 6), mode="replicate")
        for _ in range(3):
            x = F.avg_pool2d(x, 5, stride=1)
        return x

    ssd_minconv = -minconv(-ssd_distance.permute(0, 2, 3, 1).reshape(1, -1, disp_range, disp_range))
    cost = meanfield(ssd_minconv.permute(0, 2, 3, 1).reshape(1, -1, H, W))
    return cost


def slides_displacement(cost, disp_range):
    """softmax(-10 x cost) over the displacements and the expected (dy, dx), in feature pixels."""
    disp_hw = (disp_range - 1) // 2
    soft_cost = F.softmax(-10 * cost, dim=1)  # [1, D*D, H, W]
    displacement = torch.zeros(1, 2, *cost.shape[-2:], dtype=cost.dtype)
    for k in range(disp_range ** 2):  # channel k of the unfold is the offset (k // D - r, k % D - r)
        dy, dx = k // disp_range - disp_hw, k % disp_range - disp_hw
        displacement[0, 0] += soft_cost[0, k] * dy
        displacement[0, 1] += soft_cost[0, k] * dx
    return soft_cost, displacement


def slides_pipeline(feat_fixed, feat_mov, disp_range):
    """All intermediate results of the 2019 pipeline for one pair of feature maps [1, C, h, w]."""
    ssd = slides_correlation(feat_fixed, feat_mov, disp_range)
    cost = slides_regularise(ssd, disp_range)
    soft_cost, low = slides_displacement(cost, disp_range)
    full = F.interpolate(low, scale_factor=4, mode="bicubic", align_corners=False) * 4
    return {"cost_volume": ssd, "cost_regularised": cost, "probabilities": soft_cost, "displacement_low": low,
            "displacement": full}


def slides_loss(feat_fixed, feat_mov, labels_fixed, labels_moving, num_labels, disp_range):
    """The 2019 weakly supervised loss, the label warp as a plain loop over the displacements."""
    disp_hw = (disp_range - 1) // 2
    soft_cost = F.softmax(-10 * slides_regularise(slides_correlation(feat_fixed, feat_mov, disp_range), disp_range),
                          dim=1)
    h, w = feat_fixed.shape[-2:]

    def onehot_low(labels):
        onehot = F.one_hot(labels, num_labels).permute(0, 3, 1, 2).to(feat_fixed.dtype)
        return F.interpolate(onehot, scale_factor=0.25, mode="bilinear", align_corners=False)

    fixed, moving = onehot_low(labels_fixed), onehot_low(labels_moving)
    padded = F.pad(moving, (disp_hw,) * 4)  # zeros outside the image
    warped = torch.zeros_like(fixed)
    for k in range(disp_range ** 2):
        dy, dx = k // disp_range - disp_hw, k % disp_range - disp_hw
        shifted = padded[..., disp_hw + dy:disp_hw + dy + h, disp_hw + dx:disp_hw + dx + w]  # moving[y+dy, x+dx]
        warped = warped + soft_cost[:, k:k + 1] * shifted
    return ((warped - fixed) ** 2).sum(1).mean()


# --------------------------------------------------------------------------- inputs


class Unshuffle(nn.Module):
    """Identity-like features: the first C of the 16 pixels of every 4 x 4 block, as C channels
    at 1/4 resolution (``shuffle`` below builds an image whose features are given maps)."""

    def __init__(self, channels, scale=None):
        super().__init__()
        self.channels = channels
        self.scale = None if scale is None else nn.Parameter(torch.as_tensor(scale, dtype=torch.float64))

    def forward(self, image):
        feat = F.pixel_unshuffle(image, STRIDE)[:, :self.channels]
        return feat if self.scale is None else feat * self.scale.view(1, -1, 1, 1)


def shuffle(feat):
    """Images [B, 1, 4h, 4w] with ``Unshuffle(C)(image) == feat`` ([B, C, h, w]); the other pixels random."""
    B, C, h, w = feat.shape
    blocks = torch.rand(B, STRIDE * STRIDE, h, w, dtype=feat.dtype, generator=torch.Generator().manual_seed(99))
    blocks[:, :C] = feat
    return F.pixel_shuffle(blocks, STRIDE)


def random_pair(seed, channels=2, size=(12, 16), amplitude=3.0):
    """Feature maps [1, C, h, w] in [0, amplitude): the moving ones are the fixed ones shifted plus noise."""
    g = torch.Generator().manual_seed(seed)
    feat_fixed = amplitude * torch.rand(1, channels, *size, generator=g, dtype=torch.float64)
    noise = 0.3 * amplitude * torch.rand(1, channels, *size, generator=g, dtype=torch.float64)
    return feat_fixed, torch.roll(feat_fixed, (1, -2), (2, 3)) + noise


def test_the_transcription_follows_the_slides_layout():
    """The reference itself: channel k of the slides' layer is sum_c (f[y, x] - m[y + dy, x + dx])^2,
    (dy, dx) = (k // D - r, k % D - r), with m = 0 outside; softmax weights sum to 1."""
    feat_fixed, feat_mov = random_pair(0)
    D, r = 5, 2
    ssd = slides_correlation(feat_fixed, feat_mov, D)
    H, W = feat_fixed.shape[-2:]
    for k, y, x in [(0, 0, 0), (7, 5, 3), (24, 11, 15), (12, 6, 9), (3, 1, 14)]:
        dy, dx = k // D - r, k % D - r
        inside = 0 <= y + dy < H and 0 <= x + dx < W
        m = feat_mov[0, :, y + dy, x + dx] if inside else torch.zeros(2, dtype=torch.float64)
        assert torch.isclose(ssd[0, k, y, x], ((feat_fixed[0, :, y, x] - m) ** 2).sum())
    probabilities, _ = slides_displacement(slides_regularise(ssd, D), D)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(1, H, W, dtype=torch.float64))


# --------------------------------------------------------------------------- register_images


def test_defaults_2019_is_complete():
    """Every setting that shapes the result, with the 2019 values."""
    assert DEFAULTS_2019.as_dict() == {"disp_range": 9, "min_kernel": 3, "avg_kernel": 5, "min_order": "last", "meanfield_kernel": 5,
                             "meanfield_iterations": 1, "meanfield_passes": 3, "alpha": 10.0, "normalise": False,
                             "border": "zeros", "upsample_mode": "bicubic", "prealign": "none",
                             "refine_range": None}


@pytest.mark.parametrize("disp_range", [5, 9])
@pytest.mark.parametrize("seed", [0, 1])
def test_register_images_with_defaults_2019_is_the_slides_pipeline(disp_range, seed):
    feat_fixed, feat_mov = random_pair(seed)
    image_fixed, image_moving = shuffle(feat_fixed), shuffle(feat_mov)
    displacement, details = register_images(image_fixed, image_moving, Unshuffle(2), DEFAULTS_2019,
                                            disp_range=disp_range, return_details=True)
    reference = slides_pipeline(feat_fixed, feat_mov, disp_range)
    torch.testing.assert_close(details.feat_fixed, feat_fixed, rtol=0, atol=0)
    torch.testing.assert_close(details.feat_moving, feat_mov, rtol=0, atol=0)
    for name in ("cost_volume", "cost_regularised", "probabilities", "displacement_low"):
        torch.testing.assert_close(getattr(details, name), reference[name], **TOL, msg=name)
    assert displacement.dtype == torch.float64 and displacement.shape == (1, 2, 48, 64)
    torch.testing.assert_close(displacement, reference["displacement"], **TOL)
    # not a trivial agreement: peaked probabilities, a field that moves
    assert reference["probabilities"].max() > 10 / disp_range ** 2  # ten times the uniform one
    assert reference["displacement_low"].abs().max() > 0.5


def test_a_batch_is_registered_pair_by_pair():
    pairs = [random_pair(seed) for seed in (2, 3)]
    images_fixed = torch.cat([shuffle(f) for f, _ in pairs])
    images_moving = torch.cat([shuffle(m) for _, m in pairs])
    displacement = register_images(images_fixed, images_moving, Unshuffle(2), DEFAULTS_2019, chunk_size=1)
    for b, (feat_fixed, feat_mov) in enumerate(pairs):
        torch.testing.assert_close(displacement[b:b + 1], slides_pipeline(feat_fixed, feat_mov, 9)["displacement"],
                                   **TOL)


@pytest.mark.parametrize("key", ["min_order", "avg_kernel", "meanfield_iterations", "alpha", "normalise", "border",
                                 "upsample_mode"])
def test_each_2019_setting_matters(key):
    """Swapping any one entry for this project's value moves the result away from the slides'
    (so the comparison above can fail)."""
    feat_fixed, feat_mov = random_pair(4)
    reference = slides_pipeline(feat_fixed, feat_mov, 9)["displacement"]
    settings = DEFAULTS_2019.replace(**{key: getattr(DEFAULTS, key)})
    displacement = register_images(shuffle(feat_fixed), shuffle(feat_mov), Unshuffle(2), settings)
    assert (displacement - reference).abs().max() > 1e-3, key


def test_the_project_defaults_differ_from_2019():
    feat_fixed, feat_mov = random_pair(5)
    reference = slides_pipeline(feat_fixed, feat_mov, 9)["displacement"]
    ours = register_images(shuffle(feat_fixed), shuffle(feat_mov), Unshuffle(2), prealign="none",
                           refine_range=None)
    assert (ours - reference).abs().max() > 0.05
    assert not torch.allclose(register_images(shuffle(feat_fixed), shuffle(feat_mov), Unshuffle(2)), reference)


# --------------------------------------------------------------------------- the 2019 loss


def test_train_defaults_2019_reuse_the_registration_settings():
    assert {key: TRAIN_DEFAULTS_2019[key] for key in DEFAULTS_2019.as_dict()} == DEFAULTS_2019.as_dict()
    assert TRAIN_DEFAULTS_2019["disp_range"] == 9 and TRAIN_DEFAULTS_2019["label_downsampling"] == "bilinear"
    assert (TRAIN_DEFAULTS_2019["lr"], TRAIN_DEFAULTS_2019["accumulate"], TRAIN_DEFAULTS_2019["num_pairs"]) == \
        (2.5e-4, 4, 50)
    like = train_features_settings_2019()
    assert {key: like[key] for key in ("alpha", "border", "prealign")} == {"alpha": 10.0, "border": "zeros",
                                                                          "prealign": "none"}


def labels_pair(seed, num_labels=4, size=(48, 64)):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_labels, (2, 1, size[0] // 8, size[1] // 8), generator=g)
    labels = F.interpolate(coarse.double(), size=size, mode="nearest").long()[:, 0]  # blocks of 8 x 8,
    labels = torch.roll(labels, (3, 5), (1, 2))  # their edges off the 4 x 4 grid of the features
    return labels[:1], labels[1:]


@pytest.mark.parametrize("disp_range", [5, 9])
def test_loss_2019_is_the_slides_loss_with_its_gradient(disp_range):
    feat_fixed, feat_mov = random_pair(6, channels=3)
    image_fixed, image_moving = shuffle(feat_fixed), shuffle(feat_mov)
    labels_fixed, labels_moving = labels_pair(7)
    scale = [1.5, 0.7, 1.1]
    model, reference_model = Unshuffle(3, scale), Unshuffle(3, scale)
    loss = loss_2019(model, image_fixed, image_moving, labels_fixed, labels_moving, 4, disp_range)
    reference = slides_loss(reference_model(image_fixed), reference_model(image_moving), labels_fixed,
                            labels_moving, 4, disp_range)
    torch.testing.assert_close(loss, reference, **TOL)
    loss.backward()
    reference.backward()
    assert reference_model.scale.grad.abs().max() > 1e-6
    torch.testing.assert_close(model.scale.grad, reference_model.scale.grad, **TOL)


@pytest.mark.parametrize("change", [{"min_order": "first"}, {"normalise": True}, {"border": "replicate"},
                                    {"label_downsampling": "area"}, {"alpha": 100.0}])
def test_loss_2019_settings_matter(change):
    feat_fixed, feat_mov = random_pair(8)
    labels_fixed, labels_moving = labels_pair(9)
    args = (shuffle(feat_fixed), shuffle(feat_mov), labels_fixed, labels_moving, 4)
    reference = slides_loss(feat_fixed, feat_mov, labels_fixed, labels_moving, 4, 9)
    torch.testing.assert_close(loss_2019(Unshuffle(2), *args), reference, **TOL)
    assert (loss_2019(Unshuffle(2), *args, settings=change) - reference).abs() > 1e-6


def test_loss_2019_refuses_settings_it_cannot_follow():
    feat_fixed, feat_mov = random_pair(8)
    labels_fixed, labels_moving = labels_pair(9)
    args = (Unshuffle(2), shuffle(feat_fixed), shuffle(feat_mov), labels_fixed, labels_moving, 4)
    with pytest.raises(ValueError, match="prealign"):
        loss_2019(*args, settings={"prealign": "affine"})
    with pytest.raises(ValueError, match="unknown"):
        loss_2019(*args, settings={"images_per_step": 4})
    with pytest.raises(ValueError, match="min_order"):
        loss_2019(*args, settings={"min_order": "middle"})


def test_train_features_2019_reads_its_settings():
    dataset = blob_dataset(num_labels=3, size=(32, 48))
    _, history = train_features_2019(dataset, num_pairs=2, progress=False, device="cpu")
    assert history.settings["lr"] == 2.5e-4 and history.settings["accumulate"] == 4
    assert {key: history.settings[key] for key in DEFAULTS_2019.as_dict()} == DEFAULTS_2019.as_dict()
    _, history = train_features_2019(dataset, progress=False, device="cpu", settings={"num_pairs": 1, "lr": 1e-3})
    assert len(history) == 1 and history.settings["lr"] == 1e-3


# --------------------------------------------------------------------------- the 2019 loop on any dataset


def test_the_2019_loop_runs():
    dataset = blob_dataset(num_labels=3, size=(32, 48))
    model, history = train_features_2019(dataset, num_pairs=3, progress=False, device="cpu")
    assert len(history) == 3 and not model.training
    loss = loss_2019(model.train(), dataset.images[:1], dataset.images[1:2], dataset.labels[:1],
                     dataset.labels[1:2], dataset.num_labels)
    assert loss.dim() == 0 and loss.requires_grad


class _ZeroFeatures(torch.nn.Module):
    """Features that are 0 everywhere: every cost is 0 (the zero padding too), so the softmax is uniform."""

    def forward(self, image):
        return torch.zeros(image.shape[0], 3, image.shape[2] // 4, image.shape[3] // 4)


@pytest.mark.parametrize("D", [3, 5])
def test_loss_2019_with_uniform_probabilities_matches_loops(D):
    """Labels constant on 4 x 4 blocks (so bilinear downsampling is exact), zero features:
    p = 1 / D^2 for every displacement, and loss_2019 is the loop loss of those probabilities."""
    generator = torch.Generator().manual_seed(D)
    h, w, L = 4, 5, 3
    blocks = torch.randint(0, L, (2, 1, h, w), generator=generator)
    fixed, moving = (b.repeat_interleave(4, 1).repeat_interleave(4, 2) for b in blocks)  # [1, 16, 20]
    uniform = torch.full((1, D * D, h, w), 1.0 / D**2, dtype=torch.float64)
    expected = loss_loops(uniform, fixed, moving, L)
    images = torch.rand(2, 1, 4 * h, 4 * w, generator=generator)
    loss = loss_2019(_ZeroFeatures(), images[:1], images[1:], fixed, moving, L, disp_range=D)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() > 0.1  # the labels differ: the check is not 0 == 0

