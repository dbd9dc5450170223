"""What the figures share: tensors and arrays as matplotlib draws them, feature-pixel centres.

Used by every module of :mod:`tutorial_utils.plotting` (so by every notebook's figures).
"""

from __future__ import annotations

import numpy as np
import torch


def _as_numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu()
    x = np.asarray(x)
    while x.ndim > 2 and x.shape[0] == 1:  # [1, 1, H, W] -> [H, W]
        x = x[0]
    return x


def _single(x) -> np.ndarray:
    """A batch of one [1, C, H, W] (a tensor) as [C, H, W]; anything else as it is; as NumPy."""
    return _as_numpy(x[0] if torch.is_tensor(x) and x.dim() == 4 else x)


def _feature_centre(index: int, stride: int) -> float:
    """Image coordinate of the centre of feature pixel ``index`` (a feature pixel covers
    ``stride`` image pixels, as after average pooling or strided convolutions)."""
    return (index + 0.5) * stride - 0.5


def _finish(ax, title: str | None) -> None:
    """The title (if any) in the figures' small font, and no axes: images, not plots."""
    if title:
        ax.set_title(title, fontsize=9)
    ax.axis("off")
