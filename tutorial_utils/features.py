"""Hand-crafted features for the correlation layer: raw intensities and MIND-SSC.

Taught in ``notebooks/03_regularisation.ipynb``. Both map images [B, 1, H, W] to feature
maps at 1/``stride`` resolution (default 4, like the 2019 CNN), so that they are drop-in
replacements for the learned features of the next notebook.

MIND-SSC (Heinrich et al., "Towards realtime multimodal fusion for image-guided
interventions using self-similarities", MICCAI 2013) describes every pixel by how similar
small patches around it are to each other: for pairs of neighbouring patch positions
``(a, b)`` it computes the patch distance ``D(x, a, b) = sum_patch (I(x+a+p) - I(x+b+p))^2``
and turns it into ``exp(-D / V(x))``, where ``V(x)`` is the mean distance at ``x`` (a local
noise/contrast estimate). Because ``D`` and ``V`` scale alike, the descriptor does not
change when the intensities are scaled or shifted; it captures local *structure*. The 3D
original uses the 12 pairs of the 6-neighbourhood at distance sqrt(2); the 2D analogue used
here takes the 4-neighbourhood (at ``dilation`` pixels) and its 4 pairs at distance
``sqrt(2) * dilation`` ("self-similarity context"), optionally at several dilations. The 3D
original (the 12 pairs of the six-neighbourhood, notebook 05) is in
:mod:`tutorial_utils.three_d.features`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from .checks import check_image, check_int, check_number

__all__ = [
    "intensity_features",
    "mind_ssc",
    "mind_features",
    "ssc_pairs",
]


def check_stride(name: str, tensor: torch.Tensor, stride: object) -> int:
    """``stride`` as an int >= 1 that divides every spatial size of ``tensor`` [B, 1, *spatial].

    Shared with :mod:`tutorial_utils.three_d.features` (volumes [B, 1, Z, Y, X]).
    """
    stride = check_int("stride", stride, minimum=1)
    size = tuple(tensor.shape[2:])
    if any(n % stride for n in size):
        axes = "H and W" if len(size) == 2 else "Z, Y and X"
        raise ValueError(f"{name}: {axes} must be divisible by stride={stride}, got {size}; crop or pad it")
    return stride


def check_dilations(dilation: int | Sequence[int]) -> tuple[int, ...]:
    """One dilation or a sequence of them, as a non-empty tuple of ints >= 1.

    Shared with :mod:`tutorial_utils.three_d.features`.
    """
    single = isinstance(dilation, (str, bytes)) or not isinstance(dilation, Iterable)
    dilations = (dilation,) if single else tuple(dilation)
    if not dilations:
        raise ValueError("dilation must name at least one distance")
    return tuple(check_int("dilation", d, minimum=1) for d in dilations)


def intensity_features(image: torch.Tensor, stride: int = 4) -> torch.Tensor:
    """Raw intensities, average-pooled to 1/stride resolution: [B, 1, H, W] -> [B, 1, H/s, W/s]."""
    check_image("image", image)
    stride = check_stride("image", image, stride)
    return F.avg_pool2d(image, stride) if stride > 1 else image


def ssc_pairs(dilation: int = 2) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The pairs of 4-neighbourhood offsets ``(dy, dx)`` at distance ``sqrt(2) * dilation``.

    Four pairs: (up, left), (up, right), (left, down), (right, down) for ``dilation`` 1.
    """
    d = check_int("dilation", dilation, minimum=1)
    neighbours = [(-d, 0), (0, -d), (0, d), (d, 0)]
    return [(a, b) for a, b in itertools.combinations(neighbours, 2)
            if (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 == 2 * d * d]


def _shift(image: torch.Tensor, offset: tuple[int, int], pad: int) -> torch.Tensor:
    """``out[y, x] = image[y + dy, x + dx]`` with replicated borders; image already padded by pad."""
    dy, dx = offset
    H, W = image.shape[-2] - 2 * pad, image.shape[-1] - 2 * pad
    return image[..., pad + dy : pad + dy + H, pad + dx : pad + dx + W]


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int | tuple[int, ...] = 2, eps: float = 1e-12) -> torch.Tensor:
    """MIND-SSC self-similarity descriptor at full resolution.

    Args:
        image: [B, 1, H, W] float.
        radius: patch radius; patches are (2*radius+1)^2 (box filter).
        dilation: distance of the 4 neighbours from the centre, in pixels; a tuple stacks
            the descriptors of several dilations (4 channels each).
        eps: > 0, absolute floor of the variance estimate (only matters for constant images,
            whose descriptor is then 1 everywhere); the variance is also clamped to
            [1e-3, 1e3] x its image mean, as in the original.

    Returns:
        [B, 4 * len(dilations), H, W] in (0, 1]; invariant to ``image -> a * image + b``
        (a != 0) up to floating point error.
    """
    check_image("image", image)
    radius = check_int("radius", radius, minimum=0)
    dilations = check_dilations(dilation)
    check_number("eps", eps, minimum=0, strict_minimum=True)  # keeps the division below finite
    out = []
    for d in dilations:
        pairs = ssc_pairs(d)
        pad = d + radius
        padded = F.pad(image, (pad,) * 4, mode="replicate")
        dists = []
        for a, b in pairs:
            diff2 = (_shift(padded, a, pad) - _shift(padded, b, pad)) ** 2  # [B, 1, H, W]
            dists.append(diff2)
        dist = torch.cat(dists, dim=1)  # [B, 4, H, W]
        if radius > 0:  # patch sum (mean) with a box filter, borders replicated
            dist = F.avg_pool2d(F.pad(dist, (radius,) * 4, mode="replicate"), 2 * radius + 1, stride=1)
        dist = dist - dist.amin(dim=1, keepdim=True)  # as in the reference implementation
        variance = dist.mean(dim=1, keepdim=True)  # [B, 1, H, W]
        mean_var = variance.mean(dim=(1, 2, 3), keepdim=True)
        variance = torch.minimum(torch.maximum(variance, mean_var * 1e-3), mean_var * 1e3) + eps
        out.append(torch.exp(-dist / variance))
    return torch.cat(out, dim=1)


def mind_features(
    image: torch.Tensor,
    stride: int = 4,
    radius: int = 1,
    dilation: int | tuple[int, ...] = (2, 4, 6, 8),
    downsample: int = 2,
) -> torch.Tensor:
    """MIND-SSC at 1/stride resolution: [B, 1, H, W] -> [B, 4 * len(dilation), H/s, W/s].

    The image is first average-pooled by ``downsample`` (which must divide ``stride``), so
    that CT noise and fine texture do not dominate the descriptor and the dilations reach
    ``downsample * dilation`` image pixels; MIND-SSC is computed there and average-pooled to
    1/stride. The defaults (half resolution, dilations 2, 4, 6, 8, i.e. 4 to 16 image pixels,
    16 channels) were chosen on training pairs in notebook 03; ``downsample=1`` with a
    single small dilation is the classic full-resolution descriptor.
    """
    check_image("image", image)
    stride = check_stride("image", image, stride)
    downsample = check_int("downsample", downsample, minimum=1)
    if stride % downsample:
        raise ValueError(f"downsample must be a positive integer that divides stride={stride}, got {downsample!r}")
    small = F.avg_pool2d(image, downsample) if downsample > 1 else image
    mind = mind_ssc(small, radius=radius, dilation=dilation)
    pool = stride // downsample
    return F.avg_pool2d(mind, pool) if pool > 1 else mind
