"""Overlap and smoothness measures for registration results.

Dice convention: the primary score (``present_in="both"``) counts the organs that both slices
show; ``present_in="either"`` is the Learn2Reg 3D convention (0 for an organ in one map only).
:func:`dice_ceiling` says how far apart the two are for a pair.
"""

from __future__ import annotations

import torch

from .checks import (
    check_choice,
    check_displacement,
    check_int,
    check_labels,
    check_number,
    check_same,
)

PRESENT_IN = ("both", "either")
"""Which organs a Dice score counts: ``"both"`` (the primary score: organs present in both slices) or
``"either"`` (the Learn2Reg 3D convention: organs present in either map, 0 where only one has it)."""


def _overlap_counts(labels_a: torch.Tensor, labels_b: torch.Tensor,
                    num_labels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel counts [L] (float64) of every label value in a, in b and in both (same pixel, same value)."""
    a = labels_a.reshape(-1).long()
    b = labels_b.reshape(-1).long()
    count_a = torch.bincount(a, minlength=num_labels).double()
    count_b = torch.bincount(b, minlength=num_labels).double()
    overlap = torch.bincount(a[a == b], minlength=num_labels).double()
    return count_a, count_b, overlap


def dice(labels_a: torch.Tensor, labels_b: torch.Tensor, num_labels: int, present_in: str = "both") -> torch.Tensor:
    """Dice overlap per label value.

    Args:
        labels_a, labels_b: integer label maps of the same shape (any shape, e.g. [H, W]).
        num_labels: number of label values, background 0 included.
        present_in: which labels are scored. ``"both"`` (default, the primary score): only
            the labels present in both maps; NaN where a label is missing from either. Two 2D
            slices of different patients cut the body at different levels: an organ that only
            one slice shows is a through-plane difference that no in-plane registration can
            fix, so it is left out rather than scored 0. ``"either"`` (the Learn2Reg
            convention for 3D volumes): the labels present in either map; 0 where only one map
            has the label, NaN where neither has it.

    Returns:
        float64 tensor [num_labels]: ``2|A∩B| / (|A|+|B|)`` for each scored label value, NaN
        for the others. Index 0 is the background.
    """
    _check_label_pair(labels_a, labels_b, num_labels, dims=range(9), layout="an integer label map (any shape)")
    check_choice("present_in", present_in, PRESENT_IN)
    count_a, count_b, overlap = _overlap_counts(labels_a, labels_b, num_labels)
    total = count_a + count_b
    scored = (count_a > 0) & (count_b > 0) if present_in == "both" else total > 0
    return torch.where(scored, 2 * overlap / total.clamp_min(1), torch.full_like(total, float("nan")))


def registration_dice(labels_fixed: torch.Tensor, labels_moving: torch.Tensor, labels_warped: torch.Tensor,
                      num_labels: int, present_in: str = "both") -> torch.Tensor:
    """Dice per label value of a registration result: the fixed labels against the warped moving ones.

    Args:
        labels_fixed, labels_moving, labels_warped: integer label maps of one shape (any shape);
            ``labels_warped`` are the moving labels after the registration.
        num_labels: number of label values, background 0 included.
        present_in: ``"both"`` (default, the primary score): the labels that the fixed and the
            *moving* map both show are scored, NaN for the others (an organ that only one slice
            shows is a through-plane difference, see :func:`dice`). Which organs count is then
            fixed by the pair, not by the registration: an organ that the warp loses scores 0,
            so no method gains by erasing an organ, and every method is scored on the same
            organs. ``"either"``: the Learn2Reg convention on the result,
            ``dice(labels_fixed, labels_warped, num_labels, "either")``.

    Returns:
        float64 tensor [num_labels]: ``2|F∩W| / (|F|+|W|)`` per scored label, NaN for the others.
        Without a registration (``labels_warped`` = ``labels_moving``) it equals :func:`dice`.
    """
    _check_label_pair(labels_fixed, labels_moving, num_labels, dims=range(9),
                      layout="an integer label map (any shape)", names=("labels_fixed", "labels_moving"))
    _check_label_pair(labels_fixed, labels_warped, num_labels, dims=range(9),
                      layout="an integer label map (any shape)", names=("labels_fixed", "labels_warped"))
    check_choice("present_in", present_in, PRESENT_IN)
    if present_in == "either":
        return dice(labels_fixed, labels_warped, num_labels, "either")
    _, count_m, _ = _overlap_counts(labels_fixed, labels_moving, num_labels)
    count_f, count_w, overlap = _overlap_counts(labels_fixed, labels_warped, num_labels)
    total = count_f + count_w
    scored = (count_f > 0) & (count_m > 0)
    return torch.where(scored, 2 * overlap / total.clamp_min(1), torch.full_like(total, float("nan")))


def dice_ceiling(labels_a: torch.Tensor, labels_b: torch.Tensor, num_labels: int) -> float:
    """The highest ``"either"``-convention mean Dice that any registration of these two maps could reach.

    An organ that only one map shows scores 0 under ``present_in="either"`` whatever the
    registration does (warping cannot create an organ the moving slice lacks, nor one the fixed
    slice lacks), while each organ of both maps can at best reach 1. The ceiling is therefore
    (organs present in both maps) / (organs present in either map), background excluded: how
    much of the Learn2Reg-convention score two 2D slices leave to registration at all.

    Args:
        labels_a, labels_b: integer label maps of the same shape (any shape).
        num_labels: number of label values, background 0 included.

    Returns:
        a float in [0, 1]; NaN if neither map shows an organ.
    """
    _check_label_pair(labels_a, labels_b, num_labels, dims=range(9), layout="an integer label map (any shape)")
    count_a, count_b, _ = _overlap_counts(labels_a, labels_b, num_labels)
    in_both = int(((count_a[1:] > 0) & (count_b[1:] > 0)).sum())
    in_either = int(((count_a[1:] > 0) | (count_b[1:] > 0)).sum())
    return in_both / in_either if in_either else float("nan")


def mean_over_organs(dice_per_label: torch.Tensor) -> torch.Tensor:
    """The mean of Dice values over the organs, from :func:`dice`'s per-label values.

    Args:
        dice_per_label: float [..., L], e.g. [L] for one pair or [P, L] for P pairs; index 0
            (the background) is left out, NaN entries (labels not scored) too.

    Returns:
        float [...]: the mean over the finite foreground entries; NaN where there are none
        (no organ to score: none in both maps under the primary convention).
    """
    foreground = dice_per_label[..., 1:]
    scored = torch.isfinite(foreground)
    total = torch.where(scored, foreground, torch.zeros((), dtype=foreground.dtype)).sum(-1)
    count = scored.sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def mean_dice(labels_a: torch.Tensor, labels_b: torch.Tensor, num_labels: int, present_in: str = "both", *,
              labels_moving: torch.Tensor | None = None) -> float:
    """Mean Dice over the scored foreground labels (background excluded); NaN if none.

    The one definition of a pair's score: :func:`mean_over_organs` of :func:`dice`. With
    ``present_in="both"`` (default) the organs present in both maps count; with ``"either"``
    those present in either map (0 for an organ in one map only), see :func:`dice`.

    For a registration result pass ``labels_a`` = the fixed labels, ``labels_b`` = the warped
    moving labels and ``labels_moving`` = the moving labels before the warp: the organs scored
    are then those of the fixed and the moving slice, so an organ that the warp loses scores 0
    (:func:`registration_dice`), as in :func:`~tutorial_utils.evaluation.evaluate_registration`.
    """
    if labels_moving is not None:
        return float(mean_over_organs(registration_dice(labels_a, labels_moving, labels_b, num_labels, present_in)))
    return float(mean_over_organs(dice(labels_a, labels_b, num_labels, present_in)))


def _check_label_pair(labels_a: torch.Tensor, labels_b: torch.Tensor, num_labels: int, dims: range | tuple[int, ...],
                      layout: str, names: tuple[str, str] = ("labels_a", "labels_b")) -> None:
    """Two integer label maps of one shape and device, values in 0..num_labels-1."""
    num_labels = check_int("num_labels", num_labels, minimum=1)
    pair = tuple(zip(names, (labels_a, labels_b)))
    for name, labels in pair:
        check_labels(name, labels, dims=dims, layout=layout)
    check_same(names[0], labels_a, names[1], labels_b, shape=True, device=True)
    for name, labels in pair:  # the values last: reading them needs a real device ("meta" has none)
        check_labels(name, labels, dims=dims, layout=layout, num_labels=num_labels)


def _centroids(labels: torch.Tensor, num_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids [B, L, 2] (y, x) and pixel counts [B, L] of every label value of [B, H, W]."""
    B, H, W = labels.shape
    flat = labels.reshape(B, -1).long()  # [B, H*W]
    counts = torch.zeros(B, num_labels, dtype=torch.float64, device=labels.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
    ys = torch.arange(H, dtype=torch.float64, device=labels.device).repeat_interleave(W)  # [H*W]
    xs = torch.arange(W, dtype=torch.float64, device=labels.device).repeat(H)
    sums = torch.zeros(B, num_labels, 2, dtype=torch.float64, device=labels.device)
    for c, coordinate in enumerate((ys, xs)):
        sums[:, :, c].scatter_add_(1, flat, coordinate.expand(B, -1))
    return sums / counts.clamp_min(1)[:, :, None], counts


def centroid_distance(labels_a: torch.Tensor, labels_b: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Distance in pixels between the centroids of each label in two label maps.

    Args:
        labels_a, labels_b: integer label maps [H, W] or [B, H, W] of the same shape.
        num_labels: number of label values, background 0 included.

    Returns:
        float64 [L] (or [B, L]): the Euclidean distance between the centre of mass of the
        pixels of label l in ``labels_a`` and in ``labels_b``; NaN where the label is missing
        in either map. Index 0 is the background. The mean over the organs
        (``torch.nanmean(d[..., 1:], -1)``) measures how far apart two slices are before
        registration.
    """
    _check_label_pair(labels_a, labels_b, num_labels, dims=(2, 3), layout="an integer label map [H, W] or [B, H, W]")
    single = labels_a.dim() == 2
    a = labels_a[None] if single else labels_a
    b = labels_b[None] if single else labels_b
    centre_a, count_a = _centroids(a, num_labels)
    centre_b, count_b = _centroids(b, num_labels)
    distance = (centre_a - centre_b).square().sum(-1).sqrt()  # [B, L]
    distance = torch.where((count_a > 0) & (count_b > 0), distance, torch.full_like(distance, float("nan")))
    return distance[0] if single else distance


def _check_field(displacement: torch.Tensor, ndim: int = 2) -> None:
    """A finite displacement [B, 2, H, W] (``ndim=3``: [B, 3, Z, Y, X]) of at least 2 pixels per axis."""
    check_displacement("displacement", displacement, ndim=ndim)
    if min(displacement.shape[2:]) < 2:
        unit = "pixels" if ndim == 2 else "voxels"
        raise ValueError(f"displacement needs at least 2 {unit} along each axis (for the differences), "
                         f"got {tuple(displacement.shape[2:])}")


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of the map ``p -> p + u(p)`` at every pixel.

    Args:
        displacement: [B, 2, H, W], channels (dy, dx) in pixels.

    Returns:
        [B, H, W]: ``(1 + d(dy)/dy) * (1 + d(dx)/dx) - d(dy)/dx * d(dx)/dy`` with central
        differences inside and one-sided differences at the border (``torch.gradient``), so
        it is exact for affine maps. 1 = volume kept, < 1 shrinks, > 1 grows,
        <= 0 = folding (the map is not invertible there).
    """
    _check_field(displacement)
    ddy_dy, ddy_dx = torch.gradient(displacement[:, 0], dim=(1, 2))  # each [B, H, W]
    ddx_dy, ddx_dx = torch.gradient(displacement[:, 1], dim=(1, 2))
    return (1 + ddy_dy) * (1 + ddx_dx) - ddy_dx * ddx_dy


def folding_fraction(displacement: torch.Tensor) -> torch.Tensor:
    """Fraction of pixels with a non-positive Jacobian determinant, per field: [B] in [0, 1]."""
    return (jacobian_determinant(displacement) <= 0).flatten(1).double().mean(dim=1)


def log_jacobian_std(displacement: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Standard deviation of ``log(det J)`` over the pixels, per field: [B].

    0 for any rigid or uniformly scaled map; larger = rougher deformation. Determinants
    below ``eps`` (folding) are clamped to ``eps`` so that one folded pixel does not give
    an infinite value.
    """
    check_number("eps", eps, minimum=0, strict_minimum=True)
    log_det = jacobian_determinant(displacement).clamp_min(eps).log().flatten(1)
    return log_det.double().std(dim=1)
