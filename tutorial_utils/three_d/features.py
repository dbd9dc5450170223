"""Hand-crafted features of volumes: raw intensities and 3D MIND-SSC (taught in notebook 05).

The 3D versions of :mod:`tutorial_utils.features`: volumes [B, 1, Z, Y, X] become feature
volumes at 1/``stride`` resolution (default 2). :func:`mind_ssc3d` is the original
descriptor of Heinrich et al. (MICCAI 2013): patch distances between the 12 pairs of the
six-neighbourhood at distance ``sqrt(2) * dilation`` (:func:`ssc_pairs3d`, the edges of the
octahedron), normalised by their local mean and mapped through ``exp(-.)``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ..checks import check_int, check_number, check_volume
from ..features import check_dilations, check_stride

__all__ = [
    "intensity_features3d",
    "mind_ssc3d",
    "mind_features3d",
    "ssc_pairs3d",
]


def intensity_features3d(volume: torch.Tensor, stride: int = 2) -> torch.Tensor:
    """Raw intensities, average-pooled: [B, 1, Z, Y, X] -> [B, 1, Z/s, Y/s, X/s]."""
    check_volume("volume", volume)
    stride = check_stride("volume", volume, stride)
    return F.avg_pool3d(volume, stride) if stride > 1 else volume


def ssc_pairs3d(dilation: int = 1) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The 12 pairs of six-neighbourhood offsets ``(dz, dy, dx)`` at distance ``sqrt(2) * dilation``.

    The edges of the octahedron spanned by the 6 neighbours (Heinrich et al. 2013): every
    neighbour paired with the 4 neighbours on the other two axes, each pair once.
    """
    d = check_int("dilation", dilation, minimum=1)
    neighbours = [(-d, 0, 0), (0, -d, 0), (0, 0, -d), (0, 0, d), (0, d, 0), (d, 0, 0)]
    return [(a, b) for a, b in itertools.combinations(neighbours, 2)
            if sum((p - q) ** 2 for p, q in zip(a, b)) == 2 * d * d]


def mind_ssc3d(volume: torch.Tensor, radius: int = 1, dilation: int | tuple[int, ...] = 1,
               eps: float = 1e-12) -> torch.Tensor:
    """MIND-SSC of volumes at full resolution: 12 channels per dilation.

    As :func:`~tutorial_utils.features.mind_ssc` one dimension up: patch distances (cubes of
    (2*radius+1)^3, box filter, replicated borders) between the 12 pairs of
    :func:`ssc_pairs3d`, minus their minimum, divided by their mean (clamped to [1e-3, 1e3] x
    its volume mean), ``exp(-.)``.

    Args:
        volume: [B, 1, Z, Y, X] float. radius: >= 0. dilation: neighbour distance in voxels,
            or a tuple of them (12 channels each). eps: > 0, as in
            :func:`~tutorial_utils.features.mind_ssc`.

    Returns:
        [B, 12 * len(dilations), Z, Y, X] in (0, 1] (1 everywhere for a constant volume).
    """
    check_volume("volume", volume)
    radius = check_int("radius", radius, minimum=0)
    dilations = check_dilations(dilation)
    check_number("eps", eps, minimum=0, strict_minimum=True)  # keeps the division below finite
    Z, Y, X = volume.shape[-3:]
    out = []
    for d in dilations:
        pad = d + radius
        padded = F.pad(volume, (pad,) * 6, mode="replicate")

        def shifted(offset, padded=padded, pad=pad):
            dz, dy, dx = offset
            return padded[..., pad + dz:pad + dz + Z, pad + dy:pad + dy + Y, pad + dx:pad + dx + X]

        dist = torch.cat([(shifted(a) - shifted(b)) ** 2 for a, b in ssc_pairs3d(d)], dim=1)  # [B, 12, Z, Y, X]
        if radius > 0:
            dist = F.avg_pool3d(F.pad(dist, (radius,) * 6, mode="replicate"), 2 * radius + 1, stride=1)
        dist = dist - dist.amin(dim=1, keepdim=True)
        variance = dist.mean(dim=1, keepdim=True)
        mean_var = variance.mean(dim=(1, 2, 3, 4), keepdim=True)
        variance = torch.minimum(torch.maximum(variance, mean_var * 1e-3), mean_var * 1e3) + eps
        out.append(torch.exp(-dist / variance))
    return torch.cat(out, dim=1)


def mind_features3d(volume: torch.Tensor, stride: int = 2, radius: int = 1,
                    dilation: int | tuple[int, ...] = (1, 2)) -> torch.Tensor:
    """MIND-SSC of the full-resolution volume, average-pooled to 1/stride:
    [B, 1, Z, Y, X] -> [B, 12 * len(dilation), Z/s, Y/s, X/s]."""
    check_volume("volume", volume)
    stride = check_stride("volume", volume, stride)
    mind = mind_ssc3d(volume, radius=radius, dilation=dilation)
    return F.avg_pool3d(mind, stride) if stride > 1 else mind
