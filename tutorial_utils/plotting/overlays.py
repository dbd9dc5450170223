"""Slices with their organs: label colours, overlays, legends, slice grids, organ presence, Dice box plots.

Used by every notebook (``show_overlay``); ``show_slices`` and ``organ_presence`` in
notebook 01, ``dice_boxplot`` in 01, 03 and 04, ``organ_legend`` in 05.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Patch

from ._arrays import _as_numpy, _finish

# one colour per organ, chosen to be told apart (index = label value; 0 = background)
_ORGAN_COLOURS = (
    (0.0, 0.0, 0.0),        # background
    (0.60, 0.31, 0.64),     # spleen: purple
    (0.99, 0.55, 0.0),      # left kidney: orange
    (0.20, 0.80, 0.20),     # gallbladder: green
    (0.0, 0.75, 0.85),      # esophagus: cyan
    (0.85, 0.15, 0.15),     # liver: red
    (0.95, 0.90, 0.25),     # stomach: yellow
    (0.13, 0.40, 0.95),     # pancreas: blue
    (0.95, 0.45, 0.75),     # duodenum: pink
)


def label_colours(num_labels: int) -> np.ndarray:
    """RGB colours [num_labels, 3] for label values 0..num_labels-1 (0 = background, black)."""
    if num_labels <= len(_ORGAN_COLOURS):
        return np.array(_ORGAN_COLOURS[:num_labels])
    extra = plt.get_cmap("tab20")(np.linspace(0, 1, num_labels - len(_ORGAN_COLOURS)))[:, :3]
    return np.vstack([np.array(_ORGAN_COLOURS), extra])


def _outline_organs(ax, labels, num_labels: int) -> None:
    """Each organ of a label map [H, W] as an outline in its colour."""
    lab = _as_numpy(labels).astype(int)
    colours = label_colours(num_labels)
    for value in range(1, num_labels):
        if (lab == value).any():
            ax.contour(lab == value, levels=[0.5], colors=[colours[value]], linewidths=1.2)


def show_overlay(ax, image, labels=None, num_labels: int = 9, alpha: float = 0.45,
                 title: str | None = None, contour: bool = False, outlines=None) -> None:
    """Draw a grey image [H, W] with its labels [H, W] as a colour overlay (or contours).

    ``outlines`` [H, W]: a second label map drawn on top as outlines in the same organ colours
    (e.g. the warped moving organs over the filled fixed ones).
    """
    ax.imshow(_as_numpy(image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    if labels is not None:
        lab = _as_numpy(labels).astype(int)
        if contour:
            _outline_organs(ax, lab, num_labels)
        else:
            rgba = np.zeros(lab.shape + (4,))
            rgba[..., :3] = label_colours(num_labels)[lab]
            rgba[..., 3] = np.where(lab > 0, alpha, 0.0)
            ax.imshow(rgba, interpolation="nearest")
    if outlines is not None:
        _outline_organs(ax, outlines, num_labels)
    _finish(ax, title)


def organ_legend(fig_or_ax, label_names: Sequence[str], present: Sequence[int] | None = None, **kwargs):
    """A legend of organ colours; ``present`` limits it to some label values."""
    colours = label_colours(len(label_names))
    values = [v for v in range(1, len(label_names)) if present is None or v in present]
    handles = [Patch(color=colours[v], label=f"{v} {label_names[v]}") for v in values]
    kwargs.setdefault("loc", "lower center")
    kwargs.setdefault("ncol", min(len(handles), 4) or 1)
    kwargs.setdefault("fontsize", 8)
    kwargs.setdefault("frameon", False)
    return fig_or_ax.legend(handles=handles, **kwargs)


def show_slices(dataset, ids: Sequence[int], overlay: bool = True, ncols: int = 4,
                size: float = 2.6, titles: Sequence[str] | None = None):
    """A grid of slices, each with its organ overlay, and one legend. Returns the figure."""
    ids = list(ids)
    nrows = int(np.ceil(len(ids) / ncols))
    h, w = dataset.image_size
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * (size * h / w + 0.3) + 0.6),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (ax, i) in enumerate(zip(axes.flat, ids)):
        title = titles[k] if titles else f"slice {i}"
        show_overlay(ax, dataset.images[i, 0], dataset.labels[i] if overlay else None,
                     dataset.num_labels, title=title)
    if overlay:
        organ_legend(fig, dataset.label_names, bbox_to_anchor=(0.5, 0.0))
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        fig.tight_layout()
    return fig


def organ_presence(dataset, ax=None):
    """A slices x organs chart: which organ each slice shows (test slices marked)."""
    n = len(dataset)
    present = np.zeros((dataset.num_labels - 1, n), dtype=bool)
    for i in range(n):
        values = torch.unique(dataset.labels[i]).tolist()
        for v in values:
            if v > 0:
                present[v - 1, i] = True
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 2.8))
    colours = label_colours(dataset.num_labels)[1:]
    rgb = np.where(present[..., None], colours[:, None, :], 0.93)
    ax.imshow(rgb, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(dataset.num_labels - 1))
    ax.set_yticklabels(dataset.label_names[1:], fontsize=8)
    ax.set_xticks(range(n))
    ax.set_xticklabels([str(i) for i in range(n)], fontsize=6)
    for tick, i in zip(ax.get_xticklabels(), range(n)):
        if i in dataset.test_ids:
            tick.set_color("crimson")
            tick.set_fontweight("bold")
    ax.set_xlabel("slice (test slices in red)")
    return present


def dice_boxplot(dice_by_method: dict[str, np.ndarray], label_names: Sequence[str], ax=None,
                 ylabel: str = "Dice"):
    """Box plots of Dice per organ, one box per method and organ.

    Args:
        dice_by_method: name -> array [num_pairs, num_labels] (column 0 = background, ignored;
            NaN where an organ is not scored, e.g. under the primary convention of
            :func:`~tutorial_utils.metrics.dice` in only one slice of the pair; such pairs are
            left out of that organ's box).
    """
    organs = list(range(1, len(label_names)))
    methods = list(dice_by_method)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 1.1 * len(organs) * max(1, len(methods)) / 1.5), 3.4))
    width = 0.8 / len(methods)
    cmap = plt.get_cmap("tab10")
    for m, name in enumerate(methods):
        values = np.asarray(dice_by_method[name], dtype=float)
        data = [values[:, o][np.isfinite(values[:, o])] for o in organs]
        positions = np.arange(len(organs)) + (m - (len(methods) - 1) / 2) * width
        box = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True,
                         showfliers=False, medianprops=dict(color="black"))
        for patch in box["boxes"]:
            patch.set_facecolor(cmap(m))
            patch.set_alpha(0.75)
        ax.plot([], [], color=cmap(m), lw=6, alpha=0.75, label=name)
    ax.set_xticks(np.arange(len(organs)))
    ax.set_xticklabels([label_names[o] for o in organs], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside, never over a box
    return ax
