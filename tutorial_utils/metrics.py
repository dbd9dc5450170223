"""Overlap and smoothness measures for registration results."""

from __future__ import annotations

import torch


def dice(labels_a: torch.Tensor, labels_b: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Dice overlap per label value.

    Args:
        labels_a, labels_b: integer label maps of the same shape (any shape, e.g. [H, W]).
        num_labels: number of label values, background 0 included.

    Returns:
        float64 tensor [num_labels]: ``2|A∩B| / (|A|+|B|)`` for each label value;
        NaN where the label is in neither map. Index 0 is the background.
    """
    if labels_a.shape != labels_b.shape:
        raise ValueError(
            f"label maps must have the same shape, got {tuple(labels_a.shape)} and {tuple(labels_b.shape)}"
        )
    if labels_a.is_floating_point() or labels_b.is_floating_point():
        raise ValueError("dice expects integer label maps, got floating point tensors")
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    a = labels_a.reshape(-1).long()
    b = labels_b.reshape(-1).long()
    for name, lab in (("labels_a", a), ("labels_b", b)):
        if lab.numel() and (lab.min() < 0 or lab.max() >= num_labels):
            raise ValueError(
                f"{name} holds values outside 0..{num_labels - 1} (min {int(lab.min())}, max {int(lab.max())})"
            )
    count_a = torch.bincount(a, minlength=num_labels).double()
    count_b = torch.bincount(b, minlength=num_labels).double()
    overlap = torch.bincount(a[a == b], minlength=num_labels).double()
    total = count_a + count_b
    return torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.full_like(total, float("nan")))


def mean_dice(labels_a: torch.Tensor, labels_b: torch.Tensor, num_labels: int) -> float:
    """Mean Dice over the foreground labels present in either map (background excluded)."""
    per_label = dice(labels_a, labels_b, num_labels)[1:]
    return float(torch.nanmean(per_label)) if torch.isfinite(per_label).any() else float("nan")
