"""Deterministic synthetic stand-in for the tutorial's abdominal CT: 2D slices and 3D volumes.

The 2019 tutorial used 43 axial slices of the TCIA Pancreas-CT collection (one per patient,
multi-organ labels of Gibson et al. 2018). They cannot be downloaded everywhere, so
:func:`make_phantom` draws slices in the same format from a simple anatomical model:

* the anatomy is described in Hounsfield units (HU) on a reference grid of 256 x 320 pixels
  (about 1.2 mm per pixel), anterior at the top and the patient's left on the image's right
  (radiological display), then windowed from [-200, 300] HU to 0..255;
* every slice is another "patient": body size, fat, organ positions, sizes and shapes, the
  slice level (which organs are cut), bowel content and textures all differ;
* organs that look alike by intensity alone (liver and spleen, pancreas and duodenum and
  unlabelled bowel loops, the labelled left and the unlabelled right kidney) must be told
  apart by their texture and their place, which is why learned features help registration;
* every patient has its own contrast enhancement (the same organ is up to about 30 %
  brighter or darker), a parenchymal texture that does not correspond between patients and its
  own noise level, so that a small patch does not identify its match in another patient on
  its own: regularisation pays off, as on real CT;
* with the default arguments the pairs of the tutorial's test split (slices 35, 41, 0, 4,
  33, 38, 39, 17) overlap with a mean Dice of about 0.47 before registration (over the
  organs present in both slices; the 2019 data: about 0.49), and most organ displacements
  between two patients are within the +-16 px that the discrete search covers.
  ``misalignment=1`` adds whole-body affine differences (mean Dice about 0.19), a
  population that needs a pre-alignment first.

:func:`make_phantom_volume` draws 3D volumes of the same anatomy (notebook 05).

Everything is drawn from ``numpy.random.default_rng`` streams seeded by ``(seed, index)``
(never the global random state) and computed in float64 on one CPU thread, so the same
arguments give the same bytes on any machine (NumPy's ``Generator`` streams have been
stable since NumPy 1.17), and the first ``n`` slices of a set do not depend on ``num_slices``.

Modules (each builds on those above it):

* ``geometry``: canonical coordinates, signed distances to ellipses, ellipsoids and tubes,
  and the canvas that organs are painted on;
* ``texture``: the random draws, Gaussian blurs and smooth noise fields;
* ``anatomy``: labels, tissue intensities and one function per organ or tissue, shared by
  slices and volumes;
* ``slice2d``: the 2D renderer (one slice at a random level);
* ``volume3d``: the 3D renderer (one volume);
* this file: the public functions, their argument checks and the CT window.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..checks import check_int, check_number, describe
from .anatomy import LABEL_NAMES, NUM_LABELS
from .geometry import REFERENCE_SHAPE
from .slice2d import render_slice
from .volume3d import render_volume

__all__ = [
    "LABEL_NAMES",
    "NUM_LABELS",
    "PHANTOM_VERSION",
    "PHANTOM_VOLUME_VERSION",
    "WINDOW_HU",
    "MAX_MISALIGNMENT",
    "REFERENCE_SHAPE",
    "make_phantom",
    "make_phantom_volume",
]

PHANTOM_VERSION: int = 2
"""Bumped whenever :func:`make_phantom` changes its output, so that cached sets are rebuilt."""

PHANTOM_VOLUME_VERSION: int = 2
"""Bumped whenever :func:`make_phantom_volume` changes its output."""

WINDOW_HU: tuple[float, float] = (-200.0, 300.0)
"""CT window mapped linearly to the grey values 0..255."""

MAX_MISALIGNMENT: float = 3.0
"""Largest accepted ``misalignment`` (beyond it the scaling could flip or vanish)."""


def make_phantom(
    num_slices: int = 43,
    seed: int = 0,
    shape: tuple[int, int] = (256, 320),
    misalignment: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic axial abdominal CT slices with multi-organ labels, one "patient" per slice.

    Args:
        num_slices: number of slices N (>= 1); slice ``i`` depends only on ``(seed, i)``,
            so the first slices of a larger set are the same as those of a smaller one.
        seed: non-negative integer; the same seed gives byte-identical output everywhere,
            another seed gives other patients.
        shape: (H, W) = (rows, columns), both divisible by 4 and >= 32. Radiological display:
            anterior at the top, the patient's left on the image's right. The anatomy is
            designed on 256 x 320 and scaled isotropically to fit other shapes.
        misalignment: in [0, 3]; 0 (default) gives the pre-registered population, like the 2019 data
            (organs of two patients mostly 5-20 px apart). ``m > 0`` applies to each slice
            an extra whole-body affine transform of the whole field of view (table
            included): translation ``m`` * 20-40 px (its vertical part scaled by 0.6 to
            keep the body in view), rotation ``m`` * 6-12 degrees, scaling ``m`` * up to
            +-10 %, anisotropy and shear ``m`` * up to 4 %. The patients are the same as
            with ``misalignment=0``; only their placement differs. Such a population needs a
            pre-alignment before the +-16 px discrete search.

    Returns:
        ``images`` uint8 [N, H, W]: CT windowed from [-200, 300] HU to 0..255, and
        ``labels`` uint8 [N, H, W] with values 0..8 (see ``LABEL_NAMES``).

    Raises:
        ValueError: for a bad value; TypeError: for a wrong kind of argument.
    """
    n = check_int("num_slices", num_slices, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    height, width = _checked_shape(shape, minimum=32)
    if height % 4 or width % 4:
        raise ValueError(
            f"shape must be divisible by 4 (feature maps are at 1/4 resolution), got {(height, width)}"
        )
    misalignment = check_number("misalignment (0: pre-aligned, 1: needs a pre-alignment)", misalignment,
                            minimum=0.0, maximum=MAX_MISALIGNMENT)
    return _render_set(lambda i: render_slice(seed, i, misalignment, height, width), n, (height, width))


def make_phantom_volume(
    num_volumes: int = 2,
    seed: int = 0,
    shape: tuple[int, int] = (64, 80),
    depth: int = 32,
    supersample: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic abdominal CT volumes with the eight organ labels, one "patient" each.

    The 3D counterpart of :func:`make_phantom` (a separate renderer; the 2D slices are not
    affected): organs are 3D shapes whose cross-sections change smoothly from slice to slice
    (the liver, spleen and stomach fill the cranial slices, the kidneys and the duodenal
    C-loop the caudal ones, the pancreas runs obliquely upwards to the spleen). Two patients
    differ by a realistic inter-patient deformation: position (+-3.5 ref px, +-6 in z), size
    (+-4.5 % per axis), a smooth elastic deformation (6.5 ref px) and every organ's own shift
    (5.5 ref px) and size (+-15 %): organs about 10-20 reference px (2.5-5 voxels at the
    default size) apart.

    Args:
        num_volumes: N >= 1; volume ``i`` depends only on ``(seed, i)``.
        seed: non-negative integer; the same arguments give the same volumes.
        shape: (Y, X) = (rows, columns) of every slice, >= 16; the anatomy is designed on the
            256 x 320 reference grid and scaled isotropically (64 x 80: 4.8 mm voxels).
        depth: Z, number of slices >= 4, at the in-plane voxel spacing (isotropic voxels),
            slice 0 caudal; 32 slices at 64 x 80 cover the levels -1..1 (about 15 cm).
        supersample: rendered this many times finer per axis, then intensities averaged
            (partial volume) and labels majority-voted (2: about 1 s per volume; 1: faster,
            blockier organ borders).

    Returns:
        ``volumes`` uint8 [N, Z, Y, X]: CT windowed from [-200, 300] HU to 0..255 (divide by
        255 for [B, 1, Z, Y, X] float input), and ``labels`` uint8 [N, Z, Y, X], values 0..8
        (``LABEL_NAMES``).

    Raises:
        ValueError: for a bad value; TypeError: for a wrong kind of argument.
    """
    n = check_int("num_volumes", num_volumes, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    height, width = _checked_shape(shape, minimum=16)
    depth = check_int("depth", depth, minimum=4)
    supersample = check_int("supersample", supersample, minimum=1)
    return _render_set(lambda i: render_volume(seed, i, depth, height, width, supersample), n, (depth, height, width))


# ---------------------------------------------------------------------------- helpers


def _checked_shape(shape: object, minimum: int) -> tuple[int, int]:
    """``shape`` as (height, width), two integers >= ``minimum``."""
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"shape must be a (height, width) pair, got {describe(shape)} ({type(shape).__name__})")
    if len(shape) != 2:
        raise ValueError(f"shape must be a (height, width) pair, got {shape!r}")
    return (check_int("shape[0] (height)", shape[0], minimum=minimum),
            check_int("shape[1] (width)", shape[1], minimum=minimum))


def _render_set(render: Callable[[int], tuple[torch.Tensor, torch.Tensor]], count: int,
                shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Render patients 0..count-1 (``render(i)`` gives HU and labels of ``shape``) into uint8
    grey values (the CT window ``WINDOW_HU`` mapped to 0..255) and labels [count, *shape]."""
    images = torch.empty((count, *shape), dtype=torch.uint8)
    labels = torch.empty((count, *shape), dtype=torch.uint8)
    lo, hi = WINDOW_HU
    # Many small element-wise operations: one thread is faster (no hand-over costs) and
    # keeps every reduction in the same order on every machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(count):
            hu, lab = render(i)
            images[i] = ((hu - lo) / (hi - lo) * 255.0).clamp(0.0, 255.0).round().to(torch.uint8)
            labels[i] = lab
    finally:
        torch.set_num_threads(threads)
    return images, labels
