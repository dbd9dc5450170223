"""Pre-alignment: a first, global map from the moving image to the fixed one (notebook 03).

The discrete search of :func:`~tutorial_utils.registration.register_images` reaches
+-2(D-1) pixels; patients lie in the scanner further apart than that. So the registration
starts from a global map that matches what every image has: the intensity centre of mass
(a translation), the principal axes (rotation and isotropic scale, closed form), and then a
full affine map refined by gradient descent on the mean squared intensity difference.
:func:`prealign_displacement` gives the chosen one as a displacement field.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import (
    check_choice,
    check_finite,
    check_image_pair,
    check_int,
    check_number,
    check_tensor,
)
from .transform import affine_displacement, translation_displacement, warp

__all__ = ["PREALIGN_MODES", "centre_of_mass_shift", "moments_affine", "prealign_displacement", "refine_affine"]

PREALIGN_MODES = ("none", "com", "moments", "affine")
"""How :func:`register_images` starts (before the discrete search of +-2(D-1) pixels):

* ``none``: from the identity, for pairs that are already roughly aligned (the 2019 data);
* ``com``: a translation that matches the intensity centres of mass;
* ``moments``: the affine map (rotation, isotropic scale, translation) that matches the
  intensity centres of mass and the principal axes of the two images (closed form, instant);
* ``affine``: ``moments``, then refined by gradient descent on the mean squared intensity
  difference of the images at 1/4 resolution (a full affine: 6 parameters per pair).
"""

_NO_MASS = 1e-8
"""An image whose clamped intensities sum to no more than this is empty: no centre of mass, no axes."""


def centre_of_mass_shift(image_fixed: torch.Tensor, image_moving: torch.Tensor) -> torch.Tensor:
    """Translation [B, 2] (dy, dx) that moves the moving image's intensity centre of mass onto the fixed one's.

    ``warp(image_moving, translation_displacement(shift, (H, W)))`` has (about) the centre
    of mass of ``image_fixed``. A pair in which either image has no mass (all zero or
    negative: an empty slice) has no centre of mass to match: its shift is 0.
    """
    check_image_pair(image_fixed, image_moving)
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
    check_image_pair(image_fixed, image_moving)
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
    check_image_pair(image_fixed, image_moving)
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
    check_image_pair(image_fixed, image_moving)
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
