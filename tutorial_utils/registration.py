"""Discrete registration of image pairs: features -> cost volume -> regularisation -> warp.

Taught in ``notebooks/03_regularisation.ipynb``; composes the building blocks
:mod:`~tutorial_utils.features`, :mod:`~tutorial_utils.correlation`,
:mod:`~tutorial_utils.regularisation` and :mod:`~tutorial_utils.transform`. Nothing here is
trained; a trained feature CNN (next notebook) plugs in through ``features=``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import correlation as _correlation_module
from .checks import (
    check_choice,
    check_finite,
    check_image,
    check_int,
    check_number,
    check_odd,
    check_same,
    check_tensor,
    check_volume,
)
from .features import intensity_features, intensity_features3d, mind_features, mind_features3d
from .regularisation import (
    mean_field3d,
    min_convolution3d,
    min_convolution_sparse,
    normalise_cost,
    regularise,
    regularise3d,
    soft_displacement,
    soft_displacement3d,
    soft_displacement_sparse,
)
from .transform import (
    affine_displacement,
    compose_displacements,
    interpolate_control_field3d,
    translation_displacement,
    upsample_displacement,
    upsample_displacement3d,
    warp,
)

__all__ = [
    "FEATURE_STRIDE",
    "DEFAULTS",
    "DEFAULTS_2019",
    "PREALIGN_MODES",
    "RegistrationDetails",
    "centre_of_mass_shift",
    "cost_volume",
    "extract_features",
    "moments_affine",
    "prealign_displacement",
    "refine_affine",
    "register_images",
    "DEFAULTS_3D",
    "DEFAULTS_SPARSE_3D",
    "RegistrationDetails3d",
    "cost_volume3d",
    "extract_features3d",
    "register_volumes",
    "register_volumes_sparse",
]

FEATURE_STRIDE = 4
"""Feature maps are at 1/4 of the image resolution (like the 2019 CNN)."""

PREALIGN_MODES = ("none", "com", "moments", "affine")
"""How :func:`register_images` starts (before the discrete search of +-2(D-1) pixels):

* ``none``: from the identity, for pairs that are already roughly aligned (the 2019 data);
* ``com``: a translation that matches the intensity centres of mass;
* ``moments``: the affine map (rotation, isotropic scale, translation) that matches the
  intensity centres of mass and the principal axes of the two images (closed form, instant);
* ``affine``: ``moments``, then refined by gradient descent on the mean squared intensity
  difference of the images at 1/4 resolution (a full affine: 6 parameters per pair).
"""

DEFAULTS_2019: dict = {
    "min_kernel": 3, "avg_kernel": 5, "min_order": "last", "meanfield_kernel": 5, "meanfield_iterations": 1,
    "meanfield_passes": 3, "alpha": 10.0, "normalise": False, "border": "zeros", "upsample_mode": "bicubic",
    "prealign": "none", "refine_range": None,
}
"""The complete pipeline of the 2019 tutorial: ``register_images(fixed, moving, features, **DEFAULTS_2019)``.

Every keyword of :func:`register_images` that shapes the result, as the 2019 slides' code
and kernel had it (``disp_range`` is not listed: the default D = 9 is the 2019 value):

* ``border="zeros"``: the correlation layer ``F.unfold(feat_moving, (D, D), padding=r)``
  pads the moving features with zeros (no replication padding before it);
* ``normalise=False``: the raw SSD summed over the feature channels (not divided by its mean);
* ``min_kernel=3``, ``avg_kernel=5``, ``min_order="last"``: the slides' ``minconv =
  Sequential(ReplicationPad2d(5), AvgPool2d(5), AvgPool2d(5), MaxPool2d(3))`` applied as
  ``-minconv(-cost)`` over each pixel's D x D displacements: replication padding 5, two 5 x 5
  average poolings, then a 3 x 3 min-pooling (the slides' order; this project's order is
  min-pooling first);
* ``meanfield_kernel=5``, ``meanfield_passes=3``, ``meanfield_iterations=1``: the slides'
  ``meanfield = Sequential(ReplicationPad2d(6), AvgPool2d(5), AvgPool2d(5), AvgPool2d(5))``
  over the spatial dimensions, applied once after the min-convolution;
* ``alpha=10.0``: probabilities ``softmax(-10 * cost)`` over the D*D displacements, whose
  expectation is the displacement at 1/4 resolution;
* ``upsample_mode="bicubic"``: that field upsampled x4 bicubically (``align_corners=False``,
  PyTorch's default) and multiplied by 4;
* ``prealign="none"``, ``refine_range=None``: no pre-alignment and no second stage.

The cost volume comes from the fast :func:`~tutorial_utils.correlation.correlation`, which
has the values of the slides' unfold layer (up to float rounding).
"""

DEFAULTS: dict = {
    "min_kernel": 3, "avg_kernel": 3, "min_order": "first", "meanfield_kernel": 5, "meanfield_iterations": 2,
    "meanfield_passes": 3, "alpha": 100.0, "normalise": True, "border": "replicate", "upsample_mode": "bilinear",
    "prealign": "affine", "refine_range": 5,
}
"""The defaults of :func:`register_images`, chosen on training pairs in notebook 03 (the same
keys as :data:`DEFAULTS_2019`)."""

Features = Union[str, nn.Module, Callable[[torch.Tensor], torch.Tensor]]


def _correlation(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, disp_range: int) -> torch.Tensor:
    """The fast ``correlation`` when the package has it, else the 2019 ``correlation_unfold``."""
    fast = getattr(_correlation_module, "correlation", None)
    if fast is not None:
        return fast(feat_fixed, feat_moving, disp_range)
    return _correlation_module.correlation_unfold(feat_fixed, feat_moving, disp_range)


@dataclass
class RegistrationDetails:
    """Intermediate results of :func:`register_images` (``return_details=True``).

    Shapes: B pairs, D = disp_range, feature maps h x w = H/stride x W/stride.
    """

    feat_fixed: torch.Tensor  # [B, C, h, w]
    feat_moving: torch.Tensor  # [B, C, h, w], of the pre-aligned moving image
    cost_volume: torch.Tensor  # [B, D*D, h, w], data cost (normalised when normalise=True)
    cost_regularised: torch.Tensor  # [B, D*D, h, w]
    probabilities: torch.Tensor  # [B, D*D, h, w], softmax(-alpha * cost_regularised)
    displacement_low: torch.Tensor  # [B, 2, h, w], (dy, dx) in feature pixels (after pre-alignment)
    prealign: torch.Tensor  # [B, 2, H, W], the pre-alignment in image pixels (zeros for "none")
    stride: int
    disp_range: int
    extra: dict = field(default_factory=dict)


def _check_pair(check: Callable, fixed: tuple[str, object], moving: tuple[str, object], multiple_of: int) -> None:
    """Check a fixed and a moving image (``check_image``) or volume (``check_volume``), given as (name, tensor).

    Both floating point (integer images get a hint to convert them), on one device, of one
    shape, spatial sizes divisible by ``multiple_of``, and finite: one NaN or inf pixel would
    otherwise spread through the pre-alignment into a NaN sampling grid (which can crash the
    process in grid_sample's backward pass) or into every cost.
    """
    for name, image in (fixed, moving):
        if isinstance(image, torch.Tensor) and not (image.is_floating_point() or image.is_complex()):
            raise ValueError(f"{name} must be floating point with intensities in [0, 1], got {image.dtype}: "
                             f"convert it first, e.g. {name}.float() / 255 for uint8 images")
        check(name, image, finite=False)
    (name_f, image_f), (name_m, image_m) = fixed, moving
    check_same(name_f, image_f, name_m, image_m, device=True)  # before the NaN check: it reads the values
    if image_f.shape != image_m.shape:
        raise ValueError(f"{name_f} {list(image_f.shape)} and {name_m} {list(image_m.shape)} differ in shape: "
                         f"register pairs of the same size (crop or pad one of them)")
    spatial = tuple(image_f.shape[2:])
    if any(n % multiple_of for n in spatial):
        raise ValueError(f"the sizes {list(spatial)} of {name_f} and {name_m} must be divisible by {multiple_of} "
                         f"(the features are at 1/{multiple_of} resolution); crop or pad them")
    check_finite(name_f, image_f)
    check_finite(name_m, image_m)


def _check_images(image_fixed: torch.Tensor, image_moving: torch.Tensor, multiple_of: int = FEATURE_STRIDE) -> None:
    """Images [B, 1, H, W]: floating point, finite, same shape and device, H and W divisible by ``multiple_of``."""
    _check_pair(check_image, ("image_fixed", image_fixed), ("image_moving", image_moving), multiple_of)


def extract_features(image: torch.Tensor, features: Features = "mind") -> torch.Tensor:
    """Feature maps [B, C, H/4, W/4] of images [B, 1, H, W].

    ``features``: "intensity" (average-pooled intensities, C = 1), "mind" (MIND-SSC of the
    half-resolution image at dilations 2, 4, 6, 8, average-pooled, C = 16; see
    :func:`~tutorial_utils.features.mind_features`), or any ``nn.Module`` / callable that maps the
    images to feature maps at 1/4 resolution (e.g. the feature CNN).
    """
    if isinstance(features, str):
        if features == "intensity":
            return intensity_features(image, FEATURE_STRIDE)
        if features == "mind":
            return mind_features(image, FEATURE_STRIDE)
        raise ValueError(f"features must be 'intensity', 'mind' or an nn.Module, got {features!r}")
    if not callable(features):
        raise ValueError(f"features must be 'intensity', 'mind' or an nn.Module, got {type(features).__name__}")
    if isinstance(features, nn.Module):
        weight = next(iter(features.parameters()), None)
        if weight is not None and weight.device != image.device:
            raise ValueError(f"the feature model is on {weight.device} but the images are on {image.device}: "
                             f"move one of them, e.g. images.to({str(weight.device)!r}) or model.to({str(image.device)!r})")
    feat = features(image)
    expected = (image.shape[0], image.shape[-2] // FEATURE_STRIDE, image.shape[-1] // FEATURE_STRIDE)
    if not isinstance(feat, torch.Tensor) or feat.dim() != 4 or (feat.shape[0], *feat.shape[-2:]) != expected:
        raise ValueError(
            f"the feature module must map [B, 1, H, W] to [B, C, H/4, W/4] = [{expected[0]}, C, {expected[1]}, "
            f"{expected[2]}], got {getattr(feat, 'shape', type(feat).__name__)}"
        )
    return feat


def cost_volume(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, disp_range: int,
                normalise: bool = True, border: str = "replicate") -> torch.Tensor:
    """SSD cost volume [B, D*D, h, w], divided by its mean per pair when ``normalise``.

    ``border="replicate"``: the moving features continue beyond the image with their edge
    values (both maps are replication-padded by r before the correlation, which is then
    cropped). ``"zeros"``: the correlation layer's own zero padding, as in 2019; features
    that are not 0 outside the body (MIND is 1 in flat air) then make every border pixel
    prefer displacements that stay inside, which pulls the field inwards and folds it.
    """
    if border == "replicate":
        r = (disp_range - 1) // 2
        h, w = feat_fixed.shape[-2:]
        padded = [F.pad(f, (r,) * 4, mode="replicate") for f in (feat_fixed, feat_moving)]
        cost = _correlation(*padded, disp_range)[..., r:r + h, r:r + w]
    elif border == "zeros":
        cost = _correlation(feat_fixed, feat_moving, disp_range)
    else:
        raise ValueError(f"border must be 'replicate' or 'zeros', got {border!r}")
    return normalise_cost(cost) if normalise else cost


_NO_MASS = 1e-8
"""An image whose clamped intensities sum to no more than this is empty: no centre of mass, no axes."""


def centre_of_mass_shift(image_fixed: torch.Tensor, image_moving: torch.Tensor) -> torch.Tensor:
    """Translation [B, 2] (dy, dx) that moves the moving image's intensity centre of mass onto the fixed one's.

    ``warp(image_moving, translation_displacement(shift, (H, W)))`` has (about) the centre
    of mass of ``image_fixed``. A pair in which either image has no mass (all zero or
    negative: an empty slice) has no centre of mass to match: its shift is 0.
    """
    _check_images(image_fixed, image_moving, multiple_of=1)
    H, W = image_fixed.shape[-2:]
    ys = torch.arange(H, device=image_fixed.device, dtype=image_fixed.dtype)
    xs = torch.arange(W, device=image_fixed.device, dtype=image_fixed.dtype)

    def com(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, 1, H, W] -> [B, 2], [B] bool
        mass = image[:, 0].clamp_min(0)
        total = mass.sum(dim=(1, 2))
        cy = (mass.sum(dim=2) * ys).sum(dim=1) / total.clamp_min(_NO_MASS)
        cx = (mass.sum(dim=1) * xs).sum(dim=1) / total.clamp_min(_NO_MASS)
        return torch.stack([cy, cx], dim=1), total > _NO_MASS

    (centre_moving, has_moving), (centre_fixed, has_fixed) = com(image_moving), com(image_fixed)
    shift = centre_moving - centre_fixed
    return torch.where((has_moving & has_fixed)[:, None], shift, torch.zeros_like(shift))


def _register_level(feat_fixed, feat_moving, disp_range, reg, alpha, normalise, border):
    cost = cost_volume(feat_fixed, feat_moving, disp_range, normalise, border)
    cost_reg = regularise(cost, disp_range, **reg)
    probabilities, displacement_low = soft_displacement(cost_reg, disp_range, alpha)
    return cost, cost_reg, probabilities, displacement_low


def _intensity_moments(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre of mass [B, 2] and covariance [B, 2, 2] (y, x) of the intensities of [B, 1, H, W]."""
    H, W = image.shape[-2:]
    ys = torch.arange(H, device=image.device, dtype=image.dtype)
    xs = torch.arange(W, device=image.device, dtype=image.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([grid_y, grid_x]).reshape(2, -1)  # [2, H*W]
    mass = image[:, 0].clamp_min(0).reshape(image.shape[0], -1)  # [B, H*W]
    total = mass.sum(1, keepdim=True).clamp_min(1e-8)
    mean = mass @ points.T / total  # [B, 2]
    centred = points[None] - mean[:, :, None]  # [B, 2, H*W]
    cov = torch.einsum("bin,bjn,bn->bij", centred, centred, mass) / total[:, :, None]
    return mean, cov


def moments_affine(image_fixed: torch.Tensor, image_moving: torch.Tensor) -> torch.Tensor:
    """Affine matrices [B, 2, 3] that match centres of mass and principal axes (closed form).

    In the convention of :func:`~tutorial_utils.transform.affine_displacement` (pixel units,
    rotation about the image centre): a rotation taking the fixed principal axes onto the
    moving ones (the smallest of the sign-equivalent choices), an isotropic scale
    ``(det C_moving / det C_fixed)^(1/4)`` and the translation between the centres of mass.

    What an image does not define stays the identity: no rotation when either image has no
    principal axes (a constant square, a disc: equal eigenvalues), no scale when either has
    no area (a point, a line: det C = 0), the identity matrix when either image is empty.
    """
    _check_images(image_fixed, image_moving, multiple_of=1)
    B, _, H, W = image_fixed.shape
    mean_f, cov_f = _intensity_moments(image_fixed)
    mean_m, cov_m = _intensity_moments(image_moving)
    eig_f, axes_f = torch.linalg.eigh(cov_f)  # ascending eigenvalues, axes as columns
    eig_m, axes_m = torch.linalg.eigh(cov_m)
    best_angle, best_rot = None, None
    for signs in ((1.0, 1.0), (1.0, -1.0), (-1.0, 1.0), (-1.0, -1.0)):
        rot = (axes_m * torch.tensor(signs, device=image_fixed.device, dtype=image_fixed.dtype)) @ axes_f.transpose(1, 2)
        angle = torch.atan2(rot[:, 1, 0], rot[:, 0, 0]).abs()
        angle = torch.where(torch.linalg.det(rot) > 0, angle, torch.full_like(angle, float("inf")))
        if best_angle is None:
            best_angle, best_rot = angle, rot
        else:
            better = angle < best_angle
            best_angle = torch.where(better, angle, best_angle)
            best_rot = torch.where(better[:, None, None], rot, best_rot)
    scale = (eig_m.clamp_min(1e-8) / eig_f.clamp_min(1e-8)).prod(1).pow(0.25)  # [B]
    identity = torch.eye(2, 3, device=image_fixed.device, dtype=image_fixed.dtype)  # [2, 3]
    no_axes = _isotropic(eig_f) | _isotropic(eig_m)  # [B]
    best_rot = torch.where(no_axes[:, None, None], identity[:, :2], best_rot)
    scale = torch.where((eig_f[:, 0] <= 1e-4 * eig_f[:, 1]) | (eig_m[:, 0] <= 1e-4 * eig_m[:, 1]),
                        torch.ones_like(scale), scale)
    A = best_rot * scale[:, None, None]
    centre = torch.tensor([(H - 1) / 2, (W - 1) / 2], device=image_fixed.device, dtype=image_fixed.dtype)
    t = mean_m - centre - torch.einsum("bij,bj->bi", A, mean_f - centre)
    matrix = torch.cat([A, t[:, :, None]], dim=2)  # [B, 2, 3]
    empty = (_mass(image_fixed) <= _NO_MASS) | (_mass(image_moving) <= _NO_MASS)  # [B]
    return torch.where(empty[:, None, None], identity, matrix)


def _mass(image: torch.Tensor) -> torch.Tensor:
    """Total intensity [B] of [B, 1, H, W] (negative values count as 0, as in the moments)."""
    return image[:, 0].clamp_min(0).flatten(1).sum(1)


def _isotropic(eigenvalues: torch.Tensor) -> torch.Tensor:
    """[B] bool: the two (ascending) eigenvalues [B, 2] are equal up to rounding: no principal axes."""
    return eigenvalues[:, 1] - eigenvalues[:, 0] <= 1e-4 * eigenvalues[:, 1].abs()


def refine_affine(
    image_fixed: torch.Tensor,
    image_moving: torch.Tensor,
    matrix: torch.Tensor,
    iterations: int = 60,
    lr: float = 0.01,
    scale: int = 4,
) -> torch.Tensor:
    """Refine affine matrices [B, 2, 3] by Adam on the mean squared intensity difference.

    The images are average-pooled by ``scale`` and slightly blurred (a wide capture range,
    fast); the translation is optimised in units of half the image size so that one learning
    rate fits all six parameters. Returns the refined matrices [B, 2, 3] (pixel units).
    Images without structure (empty, constant) give no gradient: their matrices stay as given.
    """
    _check_images(image_fixed, image_moving, multiple_of=1)
    B, _, H, W = image_fixed.shape
    check_tensor("matrix", matrix, dims=3, layout="[B, 2, 3]", floating=True, device=image_fixed.device)
    if tuple(matrix.shape) != (B, 2, 3):
        raise ValueError(f"matrix must be [B, 2, 3] = [{B}, 2, 3] (one affine map per pair), "
                         f"got {list(matrix.shape)}")
    check_finite("matrix", matrix)
    iterations = check_int("iterations", iterations, minimum=0)
    lr = check_number("lr", lr, 0, strict_minimum=True)
    scale = check_int("scale", scale, minimum=1, maximum=min(H, W))

    def smooth(image):
        small = F.avg_pool2d(image, scale)
        return F.avg_pool2d(F.pad(small, (1, 1, 1, 1), mode="replicate"), 3, stride=1)

    fixed, moving = smooth(image_fixed).detach(), smooth(image_moving).detach()
    h, w = fixed.shape[-2:]
    half = max(h, w) / 2
    # a fixed pixel p (full resolution) = scale * q + (scale - 1) / 2 for q at low resolution: the
    # image centres coincide, so A is the same and the translation scales by 1/scale
    params = torch.cat([matrix[:, :, :2], matrix[:, :, 2:] / (scale * half)], dim=2).detach().clone()
    with torch.enable_grad():
        params.requires_grad_(True)
        optimiser = torch.optim.Adam([params], lr=lr)
        for _ in range(iterations):
            optimiser.zero_grad()
            low = torch.cat([params[:, :, :2], params[:, :, 2:] * half], dim=2)
            field_ = affine_displacement(low, (h, w))
            loss = ((warp(moving, field_) - fixed) ** 2).mean(dim=(1, 2, 3)).sum()
            if not bool(torch.isfinite(loss)):  # a NaN grid would reach grid_sample's backward pass
                raise ValueError(f"refine_affine: the mean squared difference became {float(loss.detach())}; the "
                                 f"intensities must be of a moderate range such as [0, 1]")
            loss.backward()
            optimiser.step()
    params = params.detach()
    return torch.cat([params[:, :, :2], params[:, :, 2:] * (half * scale)], dim=2)


def prealign_displacement(image_fixed: torch.Tensor, image_moving: torch.Tensor, prealign: str | None = "affine",
                          iterations: int = 60) -> torch.Tensor:
    """The pre-alignment [B, 2, H, W] (image pixels) that :func:`register_images` starts from.

    See :data:`PREALIGN_MODES`; ``iterations``: gradient steps of ``"affine"``.
    """
    _check_images(image_fixed, image_moving, multiple_of=1)
    prealign = check_choice("prealign", prealign, (*PREALIGN_MODES, None)) or "none"
    iterations = check_int("iterations", iterations, minimum=0)
    B, _, H, W = image_fixed.shape
    if prealign == "none":
        return torch.zeros(B, 2, H, W, device=image_fixed.device, dtype=image_fixed.dtype)
    if prealign == "com":
        return translation_displacement(centre_of_mass_shift(image_fixed, image_moving), (H, W))
    matrix = moments_affine(image_fixed, image_moving)
    if prealign == "affine":
        matrix = refine_affine(image_fixed, image_moving, matrix, iterations=iterations)
    return affine_displacement(matrix, (H, W))


def register_images(
    image_fixed: torch.Tensor,
    image_moving: torch.Tensor,
    features: Features = "mind",
    disp_range: int = 9,
    *,
    min_kernel: int = DEFAULTS["min_kernel"],
    avg_kernel: int = DEFAULTS["avg_kernel"],
    min_order: str = DEFAULTS["min_order"],
    meanfield_kernel: int = DEFAULTS["meanfield_kernel"],
    meanfield_iterations: int = DEFAULTS["meanfield_iterations"],
    meanfield_passes: int = DEFAULTS["meanfield_passes"],
    alpha: float = DEFAULTS["alpha"],
    prealign: str | None = DEFAULTS["prealign"],
    refine_range: int | None = DEFAULTS["refine_range"],
    normalise: bool = DEFAULTS["normalise"],
    border: str = DEFAULTS["border"],
    upsample_mode: str = DEFAULTS["upsample_mode"],
    chunk_size: int = 16,
    return_details: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, RegistrationDetails]:
    """Register ``image_moving`` to ``image_fixed`` with discrete optimisation (the 2019 pipeline).

    1. pre-alignment (``prealign``, see :data:`PREALIGN_MODES`);
    2. features at 1/4 resolution (``features``: "intensity", "mind" or an ``nn.Module``);
    3. SSD cost volume over D x D displacements (``border``: how the moving features continue
       beyond the image), divided by its mean (``normalise``) so that one ``alpha`` serves
       every feature type;
    4. :func:`~tutorial_utils.regularisation.regularise`: min-convolution (min-pool
       ``min_kernel``, two ``avg_kernel`` average pools; ``min_order="last"``: the averages
       first, as in the 2019 slides' code) and mean field (``meanfield_passes`` average pools
       of ``meanfield_kernel``), ``meanfield_iterations`` times;
    5. soft arg-min of ``softmax(-alpha * cost)``, upsampled x4 to the image
       (``upsample_mode``: "bilinear" or "bicubic") and scaled by 4;
    6. with ``refine_range`` (an odd D', or None): the moving image is warped with the
       result, its features recomputed, and steps 3-5 run once more with D' displacements;
       the two fields are composed.

    The defaults (:data:`DEFAULTS`) were chosen on training pairs in notebook 03;
    ``**DEFAULTS_2019`` gives the complete 2019 pipeline (see :data:`DEFAULTS_2019`).

    Args:
        image_fixed, image_moving: [B, 1, H, W] float in [0, 1] (float32 or float64), finite,
            on one device; H, W divisible by 4. Integer images are refused rather than guessed
            at: convert uint8 slices with ``.float() / 255``.
        features: see :func:`extract_features`.
        disp_range: D, odd (+-(D-1)/2 feature pixels = +-2(D-1) image pixels).
        chunk_size: pairs processed at once (bounds memory; results do not depend on it).
        return_details: also return a :class:`RegistrationDetails` (of the first stage).

    Returns:
        displacement [B, 2, H, W], (dy, dx) in image pixels, such that
        ``warp(image_moving, displacement)`` is aligned with ``image_fixed``; with
        ``return_details`` the tuple ``(displacement, details)``.
    """
    _check_images(image_fixed, image_moving)  # first, before any computation (a NaN pixel can crash the process)
    disp_range = check_odd("disp_range", disp_range)
    refine_range = None if refine_range is None or refine_range == 0 else check_odd("refine_range", refine_range)
    check_odd("min_kernel", min_kernel)
    check_odd("avg_kernel", avg_kernel)
    check_odd("meanfield_kernel", meanfield_kernel)
    check_int("meanfield_iterations", meanfield_iterations, minimum=0)
    check_int("meanfield_passes", meanfield_passes, minimum=0)
    alpha = check_number("alpha", alpha, 0, strict_minimum=True)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    check_choice("prealign", prealign, (*PREALIGN_MODES, None))
    check_choice("border", border, ("replicate", "zeros"))
    reg = dict(min_kernel=min_kernel, avg_kernel=avg_kernel, meanfield_kernel=meanfield_kernel,
               meanfield_iterations=meanfield_iterations, meanfield_passes=meanfield_passes, min_order=min_order)
    options = dict(alpha=alpha, prealign=prealign, refine_range=refine_range, normalise=normalise,
                   border=border, upsample_mode=upsample_mode, chunk_size=chunk_size)
    B, _, H, W = image_fixed.shape
    if B > chunk_size:
        parts = [register_images(image_fixed[s:s + chunk_size], image_moving[s:s + chunk_size], features,
                                 disp_range, return_details=return_details, **reg, **options)
                 for s in range(0, B, chunk_size)]
        if not return_details:
            return torch.cat(parts)
        names = ("feat_fixed", "feat_moving", "cost_volume", "cost_regularised", "probabilities",
                 "displacement_low", "prealign")
        details = RegistrationDetails(**{name: torch.cat([getattr(p[1], name) for p in parts]) for name in names},
                                      stride=FEATURE_STRIDE, disp_range=disp_range)
        return torch.cat([p[0] for p in parts]), details

    pre = prealign_displacement(image_fixed, image_moving, prealign)  # [B, 2, H, W]
    moving = warp(image_moving, pre) if prealign not in (None, "none") else image_moving
    feat_fixed = extract_features(image_fixed, features)  # [B, C, h, w]
    feat_moving = extract_features(moving, features)  # [B, C, h, w]
    cost, cost_reg, probabilities, displacement_low = _register_level(
        feat_fixed, feat_moving, disp_range, reg, alpha, normalise, border)
    displacement = upsample_displacement(displacement_low, (H, W), mode=upsample_mode)  # [B, 2, H, W]
    if prealign not in (None, "none"):
        displacement = compose_displacements(pre, displacement)
    if refine_range:
        feat_refined = extract_features(warp(image_moving, displacement), features)  # [B, C, h, w]
        *_, refined_low = _register_level(feat_fixed, feat_refined, refine_range, reg, alpha, normalise, border)
        refined = upsample_displacement(refined_low, (H, W), mode=upsample_mode)
        displacement = compose_displacements(displacement, refined)
    if not return_details:
        return displacement
    details = RegistrationDetails(feat_fixed, feat_moving, cost, cost_reg, probabilities, displacement_low,
                                  pre, FEATURE_STRIDE, disp_range)
    return displacement, details


# --------------------------------------------------------------------------- 3D (notebook 05)
#
# Volumes [B, 1, Z, Y, X] float in [0, 1]; displacement [B, 3, Z, Y, X] (dz, dy, dx) in voxels,
# ``warp3d(volume_moving, displacement)`` aligned with ``volume_fixed``. The same pipeline as
# register_images, one dimension up: features at 1/stride, a D x D x D cost volume,
# min-convolution over the displacement cube and mean field over the volume, soft arg-min,
# trilinear upsampling. ``register_volumes_sparse`` is the pdd_net variant: costs only at
# control points and for a sampled displacement cube.

DEFAULTS_3D: dict = {
    "disp_range": 7, "stride": 2, "min_kernel": 3, "avg_kernel": 3, "avg_passes": 2, "meanfield_kernel": 3,
    "meanfield_passes": 3, "meanfield_iterations": 1, "alpha": 100.0,
}
"""Defaults of :func:`register_volumes`, chosen on the phantom pair ``make_phantom_volume(2, seed=1)``
(mean Dice and folding; seed 0 is kept for reporting)."""

DEFAULTS_SPARSE_3D: dict = {
    "disp_range": 7, "stride": 2, "grid_step": 2, "disp_step": 1, "min_kernel": 3, "avg_kernel": 3,
    "avg_passes": 1, "meanfield_kernel": 3, "meanfield_passes": 1, "meanfield_iterations": 1, "alpha": 100.0,
    "lam": 0.5,
}
"""Defaults of :func:`register_volumes_sparse`, chosen like :data:`DEFAULTS_3D`; ``lam`` is only
used for displacement sets that are not a cube. On the phantom volumes (4.8 mm voxels, features
at 9.6 mm) sampling the displacements every 2 feature voxels (``disp_step=2``) lost more
accuracy than it saved time; it pays off where D must be large (a 256^3 CT)."""


@dataclass
class RegistrationDetails3d:
    """Intermediate results of :func:`register_volumes` / :func:`register_volumes_sparse`.

    Dense: ``cost_volume`` [B, D**3, d, h, w], ``offsets`` [D**3, 3]. Sparse: the costs
    [B, K, gz, gy, gx] on the control grid (``points`` [P, 3]), ``offsets`` [K, 3].
    """

    feat_fixed: torch.Tensor  # [B, C, d, h, w]
    feat_moving: torch.Tensor  # [B, C, d, h, w]
    cost_volume: torch.Tensor  # data cost (normalised when normalise=True)
    cost_regularised: torch.Tensor
    probabilities: torch.Tensor  # softmax(-alpha * cost_regularised) over dim 1
    displacement_low: torch.Tensor  # [B, 3, d, h, w] (dz, dy, dx) in feature voxels
    offsets: torch.Tensor  # [K, 3] (dz, dy, dx) in feature voxels
    stride: int
    disp_range: int
    points: torch.Tensor | None = None  # [P, 3] control points (sparse only)


def _check_volumes(volume_fixed: torch.Tensor, volume_moving: torch.Tensor, stride: int) -> int:
    """Volumes [B, 1, Z, Y, X]: floating point, finite, same shape and device, sizes divisible by ``stride``.

    Returns ``stride`` as an int."""
    stride = check_int("stride", stride, minimum=1)
    _check_pair(check_volume, ("volume_fixed", volume_fixed), ("volume_moving", volume_moving), stride)
    return stride


def extract_features3d(volume: torch.Tensor, features: Features = "mind", stride: int = 2) -> torch.Tensor:
    """Feature volumes [B, C, Z/s, Y/s, X/s] of volumes [B, 1, Z, Y, X].

    ``features``: "intensity" (average-pooled intensities, C = 1), "mind" (3D MIND-SSC at
    dilations 1 and 2 voxels, average-pooled, C = 24; see
    :func:`~tutorial_utils.features.mind_features3d`), or any ``nn.Module`` / callable that
    maps the volumes to features at 1/stride.
    """
    if isinstance(features, str):
        if features == "intensity":
            return intensity_features3d(volume, stride)
        if features == "mind":
            return mind_features3d(volume, stride)
        raise ValueError(f"features must be 'intensity', 'mind' or a callable, got {features!r}")
    if not callable(features):
        raise ValueError(f"features must be 'intensity', 'mind' or a callable, got {type(features).__name__}")
    feat = features(volume)
    expected = (volume.shape[0], *(n // stride for n in volume.shape[-3:]))
    if not isinstance(feat, torch.Tensor) or feat.dim() != 5 or (feat.shape[0], *feat.shape[-3:]) != expected:
        raise ValueError(f"the feature callable must map [B, 1, Z, Y, X] to [B, C, Z/{stride}, Y/{stride}, X/{stride}]"
                         f" = [{expected[0]}, C, {expected[1]}, {expected[2]}, {expected[3]}], got "
                         f"{getattr(feat, 'shape', type(feat).__name__)}")
    return feat


def _pad_replicate3d(feat: torch.Tensor, r: int) -> torch.Tensor:
    return F.pad(feat, (r,) * 6, mode="replicate") if r > 0 else feat


def cost_volume3d(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, disp_range: int,
                  normalise: bool = True, border: str = "replicate") -> torch.Tensor:
    """SSD cost volume [B, D**3, d, h, w], divided by its mean per pair when ``normalise``.

    ``border``: "replicate" (both feature volumes replication-padded by r, correlated and
    cropped: the moving features continue beyond the volume with their edge values) or
    "zeros" (the layer's own zero padding). See :func:`cost_volume`.
    """
    if border == "replicate":
        r = (disp_range - 1) // 2
        d, h, w = feat_fixed.shape[-3:]
        cost = _correlation_module.correlation3d(_pad_replicate3d(feat_fixed, r), _pad_replicate3d(feat_moving, r),
                                                 disp_range)[..., r:r + d, r:r + h, r:r + w]
    elif border == "zeros":
        cost = _correlation_module.correlation3d(feat_fixed, feat_moving, disp_range)
    else:
        raise ValueError(f"border must be 'replicate' or 'zeros', got {border!r}")
    return normalise_cost(cost.flatten(3)).view_as(cost) if normalise else cost


def _check_common3d(disp_range: int, alpha: float, meanfield_iterations: int) -> tuple[int, float, int]:
    """The hyper-parameters both 3D registrations share, as (int, float, int)."""
    return (check_odd("disp_range", disp_range), check_number("alpha", alpha, 0, strict_minimum=True),
            check_int("meanfield_iterations", meanfield_iterations, minimum=0))


def register_volumes(
    volume_fixed: torch.Tensor,
    volume_moving: torch.Tensor,
    features: Features = "mind",
    disp_range: int = DEFAULTS_3D["disp_range"],
    stride: int = DEFAULTS_3D["stride"],
    *,
    min_kernel: int = DEFAULTS_3D["min_kernel"],
    avg_kernel: int = DEFAULTS_3D["avg_kernel"],
    avg_passes: int = DEFAULTS_3D["avg_passes"],
    meanfield_kernel: int = DEFAULTS_3D["meanfield_kernel"],
    meanfield_passes: int = DEFAULTS_3D["meanfield_passes"],
    meanfield_iterations: int = DEFAULTS_3D["meanfield_iterations"],
    alpha: float = DEFAULTS_3D["alpha"],
    normalise: bool = True,
    border: str = "replicate",
    return_details: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, RegistrationDetails3d]:
    """Register ``volume_moving`` to ``volume_fixed`` with dense discrete optimisation in 3D.

    1. features at 1/``stride`` (``features``: "intensity", "mind" or a callable);
    2. SSD cost volume over D x D x D displacements (:func:`cost_volume3d`), normalised;
    3. :func:`~tutorial_utils.regularisation.regularise3d`: min-convolution over the
       displacement cube, mean field over the volume, ``meanfield_iterations`` times;
    4. soft arg-min of ``softmax(-alpha * cost)``, trilinearly upsampled to the volume and
       multiplied by ``stride``.

    Args:
        volume_fixed, volume_moving: [B, 1, Z, Y, X] float in [0, 1]; Z, Y, X divisible by stride.
        disp_range: D, odd: +-(D-1)/2 feature voxels = +-stride*(D-1)/2 voxels.
        stride: the feature volumes' downsampling factor (2 or 4).

    Returns:
        displacement [B, 3, Z, Y, X] (dz, dy, dx) in voxels, such that
        ``warp3d(volume_moving, displacement)`` is aligned with ``volume_fixed``; with
        ``return_details`` the tuple ``(displacement, RegistrationDetails3d)``.
    """
    stride = _check_volumes(volume_fixed, volume_moving, stride)
    disp_range, alpha, meanfield_iterations = _check_common3d(disp_range, alpha, meanfield_iterations)
    feat_fixed = extract_features3d(volume_fixed, features, stride)  # [B, C, d, h, w]
    feat_moving = extract_features3d(volume_moving, features, stride)
    cost = cost_volume3d(feat_fixed, feat_moving, disp_range, normalise, border)  # [B, D**3, d, h, w]
    cost_reg = regularise3d(cost, disp_range, min_kernel, avg_kernel, avg_passes, meanfield_kernel,
                            meanfield_passes, meanfield_iterations)
    probabilities, displacement_low = soft_displacement3d(cost_reg, disp_range, alpha)  # [B, 3, d, h, w]
    displacement = upsample_displacement3d(displacement_low, volume_fixed.shape[-3:])
    if not return_details:
        return displacement
    offsets = _correlation_module._displacement_offsets3d(disp_range, cost.device, cost.dtype)
    return displacement, RegistrationDetails3d(feat_fixed, feat_moving, cost, cost_reg, probabilities,
                                               displacement_low, offsets, stride, disp_range)


def register_volumes_sparse(
    volume_fixed: torch.Tensor,
    volume_moving: torch.Tensor,
    features: Features = "mind",
    disp_range: int = DEFAULTS_SPARSE_3D["disp_range"],
    stride: int = DEFAULTS_SPARSE_3D["stride"],
    grid_step: int = DEFAULTS_SPARSE_3D["grid_step"],
    disp_step: int = DEFAULTS_SPARSE_3D["disp_step"],
    offsets: torch.Tensor | None = None,
    *,
    min_kernel: int = DEFAULTS_SPARSE_3D["min_kernel"],
    avg_kernel: int = DEFAULTS_SPARSE_3D["avg_kernel"],
    avg_passes: int = DEFAULTS_SPARSE_3D["avg_passes"],
    meanfield_kernel: int = DEFAULTS_SPARSE_3D["meanfield_kernel"],
    meanfield_passes: int = DEFAULTS_SPARSE_3D["meanfield_passes"],
    meanfield_iterations: int = DEFAULTS_SPARSE_3D["meanfield_iterations"],
    alpha: float = DEFAULTS_SPARSE_3D["alpha"],
    lam: float = DEFAULTS_SPARSE_3D["lam"],
    normalise: bool = True,
    return_details: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, RegistrationDetails3d]:
    """The pdd_net recipe: discrete registration on a sparse grid with sampled displacements.

    1. features at 1/``stride``;
    2. :func:`~tutorial_utils.correlation.sparse_correlation3d`: SSD costs at control points
       every ``grid_step`` feature voxels, for the displacements {-r..r}^3 sampled every
       ``disp_step`` voxels (or the given ``offsets`` [K, 3]), the moving features
       continued with their edge values beyond the volume, normalised;
    3. regularisation on that sparse representation, ``meanfield_iterations`` times: the
       min-convolution over the sampled displacements (for a cube: the 2019 approximation
       :func:`~tutorial_utils.regularisation.min_convolution3d` with its kernels counted in
       cube steps, as pdd_net; for other ``offsets``: the exact lower envelope
       :func:`~tutorial_utils.regularisation.min_convolution_sparse` with curvature ``lam``
       per voxel^2), then the mean field over the grid of control points
       (:func:`~tutorial_utils.regularisation.mean_field3d`, kernels in grid steps);
    4. soft arg-min over the K displacements, trilinearly interpolated from the control points
       to every feature voxel, then to the volume (x ``stride``).

    With ``grid_step=1`` and ``disp_step=1`` its data costs are those of
    :func:`register_volumes` (up to rounding). The search evaluates ``K * P`` costs instead of
    ``D**3 * d*h*w`` (:func:`~tutorial_utils.benchmark.cost_3d`).

    Returns:
        displacement [B, 3, Z, Y, X] (dz, dy, dx) in voxels (and details with ``return_details``).
    """
    stride = _check_volumes(volume_fixed, volume_moving, stride)
    disp_range, alpha, meanfield_iterations = _check_common3d(disp_range, alpha, meanfield_iterations)
    feat_fixed = extract_features3d(volume_fixed, features, stride)  # [B, C, d, h, w]
    feat_moving = extract_features3d(volume_moving, features, stride)
    d, h, w = feat_fixed.shape[-3:]
    sparse = _correlation_module.sparse_correlation3d(feat_fixed, feat_moving, disp_range, grid_step=grid_step,
                                                      disp_step=disp_step, offsets=offsets, border="replicate")
    B, K = sparse.cost.shape[:2]
    cost = sparse.cost.view(B, K, *sparse.grid_shape)  # [B, K, gz, gy, gx]
    if normalise:
        cost = normalise_cost(cost.flatten(3)).view_as(cost)
    disp_offsets = sparse.offsets.to(cost.dtype)  # [K, 3]
    cube = offsets is None
    side = round(K ** (1 / 3))
    belief = cost
    for _ in range(meanfield_iterations):
        if cube:
            belief = min_convolution3d(belief, side, min_kernel, avg_kernel, avg_passes)
        else:
            belief = min_convolution_sparse(belief, disp_offsets, lam)
        belief = mean_field3d(belief, meanfield_kernel, meanfield_passes)
    probabilities, field = soft_displacement_sparse(belief, disp_offsets, alpha)  # [B, 3, gz, gy, gx]
    first = tuple(sparse.points[0].tolist())  # the control point (0, 0, 0), see control_points3d
    displacement_low = interpolate_control_field3d(field, (d, h, w), grid_step, first)
    displacement = upsample_displacement3d(displacement_low, volume_fixed.shape[-3:])
    if not return_details:
        return displacement
    return displacement, RegistrationDetails3d(feat_fixed, feat_moving, cost, belief, probabilities, displacement_low,
                                               sparse.offsets, stride, disp_range, sparse.points)
