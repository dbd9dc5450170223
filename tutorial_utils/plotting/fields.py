"""Displacement fields as pictures: arrows, the deformed grid, the Jacobian determinant.

Notebook 02 (``show_displacement_field``), notebook 03 (all three), notebook 05
(``show_deformation_grid``).
"""

from __future__ import annotations

import numpy as np

from ._arrays import _as_numpy, _feature_centre, _finish, _single
from .overlays import show_overlay


def show_displacement_field(ax, displacement, image=None, step: int = 2, stride: int = 1,
                            title: str | None = None, color: str = "orange", mask=None) -> None:
    """Arrows of a displacement field [1, 2, h, w] ((dy, dx) in pixels of its own grid) over
    ``image`` [H, W] (H = stride * h); every ``step``-th arrow, drawn to scale: an arrow from a
    fixed pixel points to where that pixel looks in the moving image. ``mask`` [h, w] bool:
    draw arrows only where it is True (e.g. inside the body, leaving out the air)."""
    disp = _single(displacement)
    h, w = disp.shape[-2:]
    if image is not None:
        show_overlay(ax, image)
    ys, xs = np.mgrid[0:h:step, 0:w:step]
    dy, dx = disp[0, ::step, ::step] * stride, disp[1, ::step, ::step] * stride
    if mask is not None:
        keep = _as_numpy(mask).astype(bool)[::step, ::step]
        ys, xs, dy, dx = ys[keep], xs[keep], dy[keep], dx[keep]
    ax.quiver(_feature_centre(xs, stride), _feature_centre(ys, stride), dx, dy, angles="xy",
              scale_units="xy", scale=1, color=color, width=0.004, headwidth=3)
    if image is None:
        ax.set_xlim(-0.5, stride * w - 0.5)
        ax.set_ylim(stride * h - 0.5, -0.5)
        ax.set_aspect("equal")
    _finish(ax, title)


def show_deformation_grid(ax, displacement, image=None, spacing: int = 8, title: str | None = None,
                          color: str = "orange", mask=None) -> None:
    """The deformed grid of a displacement [1, 2, H, W] or [2, H, W] (image pixels) over ``image``.

    Every ``spacing``-th row and column of the fixed image grid is drawn at the positions it
    samples in the moving image, ``(y + dy, x + dx)``: where the lines cross over, the map folds.
    ``mask`` [H, W] bool: draw the grid only where it is True (e.g. inside the body).
    """
    disp = _single(displacement)
    H, W = disp.shape[-2:]
    if image is not None:
        show_overlay(ax, image)
    ys, xs = np.mgrid[0:H, 0:W]
    py, px = ys + disp[0], xs + disp[1]
    if mask is not None:  # NaN breaks the lines outside the mask
        outside = ~_as_numpy(mask).astype(bool)
        py, px = np.where(outside, np.nan, py), np.where(outside, np.nan, px)
    for y in range(0, H, spacing):
        ax.plot(px[y, :], py[y, :], color=color, lw=0.7)
    for x in range(0, W, spacing):
        ax.plot(px[:, x], py[:, x], color=color, lw=0.7)
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_aspect("equal")
    _finish(ax, title)


def show_jacobian(ax, jacobian, title: str | None = None, vmax: float = 2.0, mask=None):
    """A Jacobian determinant map [H, W] (or [1, H, W]): blue shrinks, red grows, 1 is white,
    folded pixels (det <= 0) black; ``mask`` [H, W] bool: grey where False (e.g. the air, whose
    deformation means nothing). Returns the image artist (for a colour bar)."""
    from matplotlib.colors import ListedColormap

    jac = _as_numpy(jacobian).astype(float)
    if jac.ndim == 3:
        jac = jac[0]
    inside = np.ones_like(jac, dtype=bool) if mask is None else _as_numpy(mask).astype(bool).reshape(jac.shape)
    im = ax.imshow(np.ma.masked_where(~inside, jac), cmap="RdBu_r", vmin=2 - vmax, vmax=vmax,
                   interpolation="nearest")
    folded = np.ma.masked_where((jac > 0) | ~inside, np.ones_like(jac))
    ax.imshow(folded, cmap=ListedColormap(["black"]), vmin=0, vmax=1, interpolation="nearest")
    if mask is not None:  # the masked-out pixels in grey, on top
        ax.imshow(np.ma.masked_where(inside, np.full_like(jac, 0.5)), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
    _finish(ax, title)
    return im
