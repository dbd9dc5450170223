"""Shapes and the canvas they are painted on: signed distances to ellipses, ellipsoids and tubes.

Coordinates are canonical: reference pixels (about 1.2 mm) from the centre of the
256 x 320 reference image, x to the image's right (the patient's left), y posterior and,
in volumes, z cranial. Every pixel (voxel) of a :class:`Canvas` knows its canonical
coordinates ``X, Y`` (and ``Z``), already deformed by the patient's pose, so an organ is
simply a shape in canonical coordinates: its signed distance is negative inside, in
reference pixels. The same code serves slices ([H, W]) and volumes ([Z, Y, X]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

F64 = torch.float64

REFERENCE_SHAPE: tuple[int, int] = (256, 320)
"""(H, W) of the grid the anatomy is designed on; other shapes are scaled isotropically."""

CYLINDER_LENGTH = 1e6
"""Half-length (reference px) along z of an ellipsoid that stands for an endless column (:func:`extrude`)."""

Number = Union[float, torch.Tensor]


def superellipse_distance(
    view: View,
    centre: Sequence[float],
    axes: Sequence[Number],
    angle_deg: float = 0.0,
    power: float = 2.0,
    b_post: float | None = None,
    tilt: tuple[float, float] = (0.0, 0.0),
) -> torch.Tensor:
    """Approximate signed distance (reference px, < 0 inside) to a rotated (super-)ellipse or ellipsoid.

    Args:
        view: where to evaluate it; the result has the view's shape.
        centre: (cx, cy), or (cx, cy, cz) for an ellipsoid. A 2D shape on a volume is an
            elliptic cylinder along z (see also :func:`extrude`).
        axes: semi-axes (a, b) or (a, b, c): ``a`` along the direction ``angle_deg`` (image
            coordinates, y down), ``b`` across it, ``c`` along z; floats or tensors of the
            view's shape (cross-sections that change with z).
        power: 2 for an ellipse, larger for a boxier superellipse.
        b_post: replaces ``b`` on the side of +b (for an egg shape), or None.
        tilt: (kx, ky), how far the centre moves in x and y per reference px of z (a tilted organ).
    """
    a, b = axes[0], axes[1]
    dx, dy = view.X - centre[0], view.Y - centre[1]
    w = None
    if len(centre) == 3:
        w = view.Z - centre[2]
        dx, dy = dx - tilt[0] * w, dy - tilt[1] * w
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    u = dx * c + dy * s  # along the a axis
    v = -dx * s + dy * c  # across it
    bb = b if b_post is None else torch.where(v > 0, torch.full_like(v, b_post), torch.full_like(v, b))
    if power == 2.0:
        total = (u / a) ** 2 + (v / bb) ** 2
        r = torch.sqrt(total if w is None else total + (w / axes[2]) ** 2)
    else:
        total = (u / a).abs() ** power + (v / bb).abs() ** power
        r = (total if w is None else total + (w / axes[2]).abs() ** power) ** (1.0 / power)
    rho = torch.sqrt(u * u + v * v if w is None else u * u + v * v + w * w)
    # the boundary lies at rho / r along every ray; at the very centre take the smaller semi-axis
    smaller = torch.minimum(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)).expand_as(r)
    radius = torch.where(r > 1e-9, rho / r.clamp_min(1e-9), smaller)
    return rho - radius


def extrude(where: View | Canvas, centre: Sequence[float], axes: Sequence[Number]) -> tuple[tuple, tuple]:
    """``centre`` and ``axes`` of a 2D shape; on a volume those of an ellipsoid centred at z = 0
    and :data:`CYLINDER_LENGTH` long, for the parts that run through every slice (spine, back)."""
    if hasattr(where, "Z"):
        return (*centre, 0.0), (*axes, CYLINDER_LENGTH)
    return tuple(centre), tuple(axes)


def catmull_rom(points: np.ndarray | Sequence, samples_per_segment: int = 16) -> np.ndarray:
    """Dense points [M, D] on a Catmull-Rom spline through ``points`` [K, D] (numpy, any D)."""
    p = np.asarray(points, dtype=np.float64)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = []
    ts = np.linspace(0.0, 1.0, samples_per_segment, endpoint=False)[:, None]
    for k in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[k - 1], ext[k], ext[k + 1], ext[k + 2]
        out.append(
            0.5
            * (
                2 * p1
                + (-p0 + p2) * ts
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * ts**2
                + (-p0 + 3 * p1 - 3 * p2 + p3) * ts**3
            )
        )
    out.append(p[-1:])
    return np.vstack(out)


def resample(points: np.ndarray | Sequence, spacing: float) -> np.ndarray:
    """Points [M, D] spaced ``spacing`` apart along the polyline ``points`` [K, D] (numpy)."""
    p = np.asarray(points, dtype=np.float64)
    seg = np.sqrt(((p[1:] - p[:-1]) ** 2).sum(1))
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(math.ceil(arc[-1] / spacing)) + 1)
    s = np.linspace(0.0, arc[-1], n)
    return np.stack([np.interp(s, arc, p[:, k]) for k in range(p.shape[1])], axis=1)


def tube_distance_2d(view: View, pts: np.ndarray, radius: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed distance (reference px, < 0 inside) to a tube of slowly varying ``radius`` [M]
    around the densely sampled centre line ``pts`` [M, 2], and the distance to the centre line
    (both of the view's shape [h, w]): the nearest centre-line point decides."""
    pts_t = torch.as_tensor(pts, dtype=F64)
    r = torch.as_tensor(np.broadcast_to(radius, (len(pts),)).copy(), dtype=F64)
    xs, ys = view.X.reshape(1, -1), view.Y.reshape(1, -1)
    d2 = (xs - pts_t[:, 0:1]) ** 2 + (ys - pts_t[:, 1:2]) ** 2
    d2min, nearest = d2.min(0)
    centre = d2min.sqrt()
    return (centre - r[nearest]).view(view.X.shape), centre.view(view.X.shape)


def tube_distance_3d(view: View, pts: np.ndarray, radius: np.ndarray, pad: float) -> torch.Tensor:
    """Signed distance (reference px, < 0 inside) over ``view`` [d, h, w] to a tube around the
    polyline ``pts`` [M, 3] (x, y, z) with radius ``radius`` [M] (linear along each segment).
    Each segment is evaluated only in the crop of its own bounding box (``pad`` around it)."""
    canvas = view.canvas
    d = torch.full(view.X.shape, math.inf, dtype=F64)
    origin = [s.start or 0 for s in view.sl]
    for p0, p1, r0, r1 in zip(pts[:-1], pts[1:], radius[:-1], radius[1:]):
        lo = np.minimum(p0, p1) - max(r0, r1) - pad
        hi = np.maximum(p0, p1) + max(r0, r1) + pad
        seg = canvas.view((lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]))
        if seg is None:
            continue
        sub = tuple(slice(s.start - o, s.stop - o) for s, o in zip(seg.sl, origin))
        e = p1 - p0
        length2 = max(float(e @ e), 1e-12)
        rel = [seg.X - p0[0], seg.Y - p0[1], seg.Z - p0[2]]
        t = ((rel[0] * e[0] + rel[1] * e[1] + rel[2] * e[2]) / length2).clamp(0.0, 1.0)
        dist = torch.sqrt((rel[0] - t * e[0]) ** 2 + (rel[1] - t * e[1]) ** 2 + (rel[2] - t * e[2]) ** 2)
        torch.minimum(d[sub], dist - (r0 + t * (r1 - r0)), out=d[sub])
    return d


class Canvas:
    """The HU image (or volume) and label map being painted, later strokes over earlier ones.

    Args:
        coords: canonical coordinates (X, Y) of every pixel [H, W], or (X, Y, Z) of every voxel [Z, Y, X].
        fields: texture fields, looked up through views (``view.fine``): tensors [..., *shape].
        scale: pixels per reference px.
        coarse: pixel step of the coarse look-up that finds the crop of a canonical box.
        fill: the initial HU value (air).
        tube_spacing: default spacing (reference px) of the points along a tube's centre line.
    """

    def __init__(self, coords: tuple[torch.Tensor, ...], fields: dict, scale: float, coarse: int,
                 fill: float, tube_spacing: float):
        self.coords, self.fields, self.tube_spacing = coords, fields, tube_spacing
        self.X, self.Y = coords[0], coords[1]
        if len(coords) == 3:
            self.Z = coords[2]
        self.hu = torch.full(self.X.shape, fill, dtype=F64)
        self.lab = torch.zeros(self.X.shape, dtype=torch.uint8)
        self._coarse, self._step = [t[(slice(None, None, coarse),) * len(coords)] for t in coords], coarse
        self._margin = 2.0 * coarse / scale  # canonical px, covers a coarse cell's diagonal

    def view(self, box: Sequence[float] | None = None) -> View | None:
        """The crop holding every pixel whose canonical coordinates lie in ``box`` =
        (x0, x1, y0, y1[, z0, z1]); the whole canvas for ``None``; ``None`` if off the canvas."""
        if box is None:
            return View(self, (slice(None),) * len(self.coords))
        m = self._margin
        inside = torch.ones_like(self._coarse[0], dtype=torch.bool)
        for t, lo, hi in zip(self._coarse, box[0::2], box[1::2]):
            inside &= (t > lo - m) & (t < hi + m)
        if not inside.any():
            return None
        crop = []
        for axis, n in enumerate(self.X.shape):
            along = inside
            for other in reversed([a for a in range(inside.dim()) if a != axis]):
                along = along.any(dim=other)
            idx = along.nonzero()
            lo, hi = (int(idx.min()) - 1) * self._step, (int(idx.max()) + 1) * self._step + 1
            crop.append(slice(max(0, lo), min(n, hi)))
        return View(self, tuple(crop))

    def ellipse(self, centre: Sequence[float], axes: Sequence[float], angle_deg: float = 0.0, power: float = 2.0,
                pad: float = 6.0, tilt: tuple[float, float] = (0.0, 0.0)) -> tuple[View | None, torch.Tensor | None]:
        """(view, signed distance) of an ellipse (or, with (cx, cy, cz), an ellipsoid), or (None, None)
        if it lies off the canvas; ``pad`` reference px of margin around it (see :func:`superellipse_distance`)."""
        reach = max(axes[0], axes[1]) + pad
        sx, sy = (abs(tilt[0]) * axes[2], abs(tilt[1]) * axes[2]) if len(centre) == 3 else (0.0, 0.0)
        box = (centre[0] - reach - sx, centre[0] + reach + sx, centre[1] - reach - sy, centre[1] + reach + sy)
        if len(centre) == 3:
            box += (centre[2] - axes[2] - pad, centre[2] + axes[2] + pad)
        view = self.view(box)
        if view is None:
            return None, None
        return view, superellipse_distance(view, centre, axes, angle_deg, power, tilt=tilt)

    def tube(self, points: np.ndarray | Sequence, radius: float | Sequence[float], pad: float = 4.0,
             spacing: float | None = None) -> tuple[View | None, torch.Tensor | None, torch.Tensor | None]:
        """(view, signed distance, distance to the centre line) of a tube along a Catmull-Rom spline
        through ``points`` [K, 2] or [K, 3], its radius interpolated along it from ``radius``
        (one value or several); (None, None, None) off the canvas. On a volume the centre-line
        distance is None."""
        pts = resample(catmull_rom(points), spacing or self.tube_spacing)
        rad = np.interp(np.linspace(0, 1, len(pts)), np.linspace(0, 1, np.size(radius)),
                        np.atleast_1d(np.asarray(radius, dtype=np.float64)))
        lo, hi = pts.min(0) - rad.max() - pad, pts.max(0) + rad.max() + pad
        view = self.view(tuple(x for k in range(pts.shape[1]) for x in (lo[k], hi[k])))
        if view is None:
            return None, None, None
        if pts.shape[1] == 3:
            return view, tube_distance_3d(view, pts, rad, pad), None
        return (view, *tube_distance_2d(view, pts, rad))


class View:
    """A rectangular crop of a :class:`Canvas`: its coordinates ``X, Y`` (``Z``), its texture
    fields by attribute (``view.fine`` is ``canvas.fields["fine"]`` cropped) and painting."""

    def __init__(self, canvas: Canvas, sl: tuple[slice, ...]):
        self.canvas, self.sl = canvas, sl
        self.X, self.Y = canvas.X[sl], canvas.Y[sl]
        if len(sl) == 3:
            self.Z = canvas.Z[sl]

    def __getattr__(self, name: str) -> torch.Tensor:
        fields = self.__dict__["canvas"].fields
        if name not in fields:
            raise AttributeError(name)
        return fields[name][(...,) + self.__dict__["sl"]]

    @property
    def lab(self) -> torch.Tensor:
        """The label map of the crop (painted so far)."""
        return self.canvas.lab[self.sl]

    def paint(self, mask: torch.Tensor, value: float | torch.Tensor, label: int = 0) -> None:
        """Set intensity ``value`` (HU: a float or a tensor of the crop's shape) and ``label`` where ``mask``."""
        self.shade(mask, value)
        self.canvas.lab[self.sl][mask] = label

    def shade(self, mask: torch.Tensor, value: float | torch.Tensor) -> None:
        """Set the intensity only (texture inside an organ), labels untouched."""
        hu = self.canvas.hu[self.sl]
        if isinstance(value, torch.Tensor):
            hu[mask] = value.expand(mask.shape)[mask]
        else:
            hu[mask] = float(value)
