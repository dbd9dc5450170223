"""Randomness and texture: the anatomy's random draws, Gaussian blurs and smooth noise fields.

Every number of a patient comes from a ``numpy.random.Generator`` seeded by ``(seed, index,
stream)``, never from the global random state, and all arithmetic is float64, so the same
arguments give the same bytes on every machine. The anatomy's draws go through
:class:`Draws`, in a fixed order: that order *is* the patient, so code that draws must keep it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import F64, REFERENCE_SHAPE


class Draws:
    """The random draws of one patient's anatomy, all from one generator ``rng``."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def jitter(self, sd: float = 1.0) -> float:
        """Normal with mean 0 and standard deviation ``sd``, truncated at 2.2 standard deviations."""
        return float(np.clip(self.rng.normal(0.0, sd), -2.2 * sd, 2.2 * sd))

    def uniform(self, low: float, high: float) -> float:
        """Uniform in [low, high)."""
        return float(self.rng.uniform(low, high))

    def pick(self, options: Sequence, p: Sequence[float]):
        """One of ``options``, chosen with probabilities ``p``."""
        return options[int(self.rng.choice(len(options), p=p))]

    def chance(self, p: float) -> bool:
        """True with probability ``p``."""
        return self.rng.random() < p

    def integer(self, low: int, high: int) -> int:
        """A whole number in [low, high)."""
        return int(self.rng.integers(low, high))

    def sign(self) -> float:
        """-1.0 or +1.0."""
        return float(self.rng.choice([-1.0, 1.0]))

    def size_factor(self) -> float:
        """A patient's size along one axis: 1 + N(0, 4.5 %), truncated at +-9 %."""
        return 1.0 + float(np.clip(self.rng.normal(0.0, 0.045), -0.09, 0.09))


def gaussian_kernel(sigma: float) -> tuple[torch.Tensor, int]:
    """Normalised 1D Gaussian kernel [2 * radius + 1] (float64) of standard deviation ``sigma`` px, and its radius."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    grid = torch.arange(-radius, radius + 1, dtype=F64)
    k = torch.exp(-0.5 * (grid / sigma) ** 2)
    return k / k.sum(), radius


def gaussian_blur2d(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [C, H, W] float64 (reflect padding); sigma in pixels."""
    if sigma <= 0:
        return x
    k, radius = gaussian_kernel(sigma)
    c = x.shape[0]
    h, w = x.shape[-2:]
    y = x[:, None]
    pad_w = min(radius, w - 1)
    pad_h = min(radius, h - 1)
    kx = k[radius - pad_w : radius + pad_w + 1]
    ky = k[radius - pad_h : radius + pad_h + 1]
    y = F.conv2d(F.pad(y, (pad_w, pad_w, 0, 0), mode="reflect"), kx.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, pad_h, pad_h), mode="reflect"), ky.view(1, 1, -1, 1))
    return y.view(c, h, w)


def gaussian_blur3d(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [C, Z, Y, X] float64 (replicated borders); sigma in voxels."""
    if sigma <= 0:
        return x
    k, radius = gaussian_kernel(sigma)
    k = k.view(1, 1, -1)
    y = x[:, None]  # [C, 1, Z, Y, X]
    for axis in range(3):
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(shape))
    return y[:, 0]


def unit_std(x: torch.Tensor) -> torch.Tensor:
    """``x`` [C, ...] divided by the standard deviation of each channel."""
    return x / x.std(dim=tuple(range(1, x.dim())), keepdim=True).clamp_min(1e-12)


def noise_2d(rng: np.random.Generator, channels: int, h: int, w: int, sigma: float) -> torch.Tensor:
    """Smooth Gaussian noise [C, H, W] with unit standard deviation (blur sigma in px).

    Broad blurs are done at half resolution and upsampled bilinearly (4-8x cheaper)."""
    factor = 2 if sigma >= 2.0 else 1
    hs, ws = -(-h // factor), -(-w // factor)
    smooth = gaussian_blur2d(torch.from_numpy(rng.standard_normal((channels, hs, ws))), sigma / factor)
    if factor > 1:
        smooth = F.interpolate(smooth[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return unit_std(smooth)


def noise_3d(rng: np.random.Generator, size: tuple[int, int, int], sigma: float,
             upsampled: tuple[int, int, int]) -> torch.Tensor:
    """Two channels of smooth Gaussian noise, unit standard deviation, drawn at ``size`` (Z, Y, X)
    with blur sigma in voxels, then trilinearly upsampled to ``upsampled``: [2, *upsampled]."""
    noise = unit_std(gaussian_blur3d(torch.from_numpy(rng.standard_normal((2, *size))), sigma))
    return F.interpolate(noise[None], size=upsampled, mode="trilinear", align_corners=False)[0]


def control_point_field_2d(rng: np.random.Generator, grid: tuple[int, int, int], X: torch.Tensor,
                           Y: torch.Tensor) -> torch.Tensor:
    """Smooth random fields [C, H, W]: standard normal control points ``grid`` = (C, gh, gw)
    spanning the reference frame, interpolated (bicubic x4, then bilinear) at the canonical
    coordinates X, Y [H, W]."""
    field = torch.from_numpy(rng.standard_normal(grid))
    _, gh, gw = field.shape
    dense = F.interpolate(
        field[None], size=(4 * (gh - 1) + 1, 4 * (gw - 1) + 1), mode="bicubic", align_corners=True
    )
    sample_at = torch.stack([X / (REFERENCE_SHAPE[1] / 2), Y / (REFERENCE_SHAPE[0] / 2)], dim=-1)[None]
    return F.grid_sample(dense, sample_at, mode="bilinear", padding_mode="border", align_corners=True)[0]


def control_point_field_3d(rng: np.random.Generator, channels: int, grid: tuple[int, int, int],
                           size: tuple[int, int, int]) -> torch.Tensor:
    """Smooth random fields [C, *size] with about unit standard deviation: normal values on a
    coarse ``grid`` (gz, gy, gx) spanning the volume, trilinearly upsampled 4x, blurred
    (removes the kinks) and resampled to ``size`` (float64)."""
    coarse = torch.from_numpy(rng.standard_normal((channels, *grid)))
    fine_size = tuple(4 * (g - 1) + 1 for g in grid)
    fine = F.interpolate(coarse[None], size=fine_size, mode="trilinear", align_corners=True)[0]
    fine = unit_std(gaussian_blur3d(fine, 2.0))
    return F.interpolate(fine[None], size=size, mode="trilinear", align_corners=True)[0]
