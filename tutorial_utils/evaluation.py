"""Measuring a registration method on the test pairs: Dice of the warped labels, folding, time.

Taught in ``notebooks/04_training.ipynb`` and used by every notebook after it: one function,
:func:`evaluate_registration`, measures the MIND-SSC pipeline, the trained feature CNN, the
U-Net of :mod:`~tutorial_utils.continuous`, instance optimisation or another toolkit
(:mod:`~tutorial_utils.compare`) with exactly the same code: the moving labels are warped
with the displacement (nearest label, :func:`~tutorial_utils.transform.warp_labels`) and
compared with the fixed ones (:func:`~tutorial_utils.metrics.registration_dice`, averaged over
the organs with :func:`~tutorial_utils.metrics.mean_over_organs`; by default only the organs that
both slices of a pair show count); the folding is the fraction of pixels
with a non-positive Jacobian determinant (:func:`~tutorial_utils.metrics.folding_fraction`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from .checks import check_choice, check_int
from .data import Dataset, _check_dataset
from .metrics import (
    PRESENT_IN,
    folding_fraction,
    log_jacobian_std,
    mean_over_organs,
    registration_dice,
)
from .registration import register_images
from .transform import warp_labels

__all__ = ["evaluate_registration"]


def _displacement(dataset: Dataset, fixed: torch.Tensor, moving: torch.Tensor, features, register, device,
                  kwargs: dict) -> torch.Tensor:
    """The displacements [b, 2, H, W] (on the CPU) of the pairs (fixed[i], moving[i]), checked."""
    image_fixed, image_moving = dataset.images[fixed].to(device), dataset.images[moving].to(device)
    with torch.no_grad():
        if register is not None:
            displacement = register(image_fixed, image_moving)
        else:
            displacement = register_images(image_fixed, image_moving, features, **kwargs)
    expected = (len(fixed), 2, *dataset.image_size)
    if not isinstance(displacement, torch.Tensor) or tuple(displacement.shape) != expected:
        raise ValueError(f"register must return a displacement {list(expected)}, "
                         f"got {getattr(displacement, 'shape', type(displacement).__name__)}")
    return displacement.cpu()


def evaluate_registration(dataset: Dataset, features="mind", pairs: Sequence[tuple[int, int]] | None = None,
                          batch_size: int = 8, register=None, present_in: str = "both", **kwargs) -> dict:
    """Register every (fixed, moving) pair and measure Dice and folding.

    Args:
        dataset: the slices. features: ``None`` for no registration (identity), else what
            :func:`~tutorial_utils.registration.register_images` takes ("mind", a model, ...).
        pairs: (fixed, moving) slice indices; default ``dataset.test_pairs()``.
        register: optional callable ``(image_fixed [b, 1, H, W], image_moving [b, 1, H, W])
            -> displacement [b, 2, H, W]`` used instead of ``register_images`` (then
            ``features`` and ``kwargs`` are not used), so that any method (the U-Net of
            :mod:`~tutorial_utils.continuous`, instance optimisation, ...) is measured by
            exactly this code. It gets CPU tensors, ``batch_size`` pairs at a time, and is
            called under ``torch.no_grad()``.
        present_in: which organs a pair's Dice counts (:func:`~tutorial_utils.metrics.registration_dice`).
            ``"both"`` (default, the primary score): the organs that the fixed and the moving
            slice both show; an organ cut by only one of two 2D slices is a through-plane
            difference that no in-plane registration can fix. ``"either"``: the Learn2Reg 3D
            convention, 0 for an organ in only one of the fixed and warped maps.
        kwargs: passed to ``register_images``.

    Returns:
        ``{"pairs": [P, 2] ints, "dice": float64 [P, L] (per label value; NaN where a label
        is not scored: with "both" where the fixed or the moving slice lacks it, with "either"
        where the fixed and the warped map both lack it), "mean_dice": [P]
        (:func:`~tutorial_utils.metrics.mean_over_organs` of "dice": the mean over the scored
        organs; NaN for a pair with none. Average it over pairs with ``torch.nanmean``),
        "folding": [P] (fraction of pixels with det J <= 0), "log_jacobian_std": [P] (the
        standard deviation of log det J over the pixels: 0 for an affine map, larger = rougher;
        :func:`~tutorial_utils.metrics.log_jacobian_std`), "seconds": wall time of
        everything, "seconds_per_pair": wall time of the registration alone (the
        ``register_images`` / ``register`` calls, not the Dice and folding) divided by P}``.
    """
    if register is not None and not callable(register):
        raise ValueError(f"register must be a callable (image_fixed, image_moving) -> displacement, "
                         f"got {type(register).__name__}")
    _check_dataset(dataset)
    check_choice("present_in", present_in, PRESENT_IN)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    pairs = list(dataset.test_pairs() if pairs is None else pairs)
    if register is None and isinstance(features, nn.Module):
        features.eval()
    device = (next(features.parameters()).device if register is None and isinstance(features, nn.Module)
              else torch.device("cpu"))
    L = dataset.num_labels
    dices, foldings, roughness = [], [], []
    registering = 0.0
    start = time.perf_counter()
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        fixed = torch.tensor([f for f, _ in chunk])
        moving = torch.tensor([m for _, m in chunk])
        labels_moving = dataset.labels[moving]
        if register is None and features is None:
            warped = labels_moving
            foldings += [0.0] * len(chunk)
            roughness += [0.0] * len(chunk)
        else:
            begin = time.perf_counter()
            displacement = _displacement(dataset, fixed, moving, features, register, device, kwargs)
            registering += time.perf_counter() - begin
            warped = warp_labels(labels_moving, displacement, L)
            foldings += folding_fraction(displacement).tolist()
            roughness += log_jacobian_std(displacement).tolist()
        dices += [registration_dice(dataset.labels[f], dataset.labels[m], w, L, present_in)
                  for f, m, w in zip(fixed.tolist(), moving.tolist(), warped)]
    per_label = torch.stack(dices)  # [P, L]
    return {"pairs": torch.tensor(pairs), "dice": per_label, "mean_dice": mean_over_organs(per_label),
            "folding": torch.tensor(foldings, dtype=torch.float64),
            "log_jacobian_std": torch.tensor(roughness, dtype=torch.float64), "seconds": time.perf_counter() - start,
            "seconds_per_pair": registering / max(len(pairs), 1)}
