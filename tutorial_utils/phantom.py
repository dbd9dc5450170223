"""Deterministic synthetic stand-in for the tutorial's 2D abdominal CT slices.

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
* with the default arguments the pairs of the tutorial's test split (slices 35, 41, 0, 4,
  33, 38, 39, 17) overlap with a mean Dice of about 0.39 before registration (the 2019 data:
  about 0.49), and most organ displacements between two patients are within the +-16 px
  that the discrete search covers. ``misalignment=1`` adds whole-body affine differences
  (mean Dice about 0.16), a population that needs a pre-alignment first.

Everything is drawn from ``numpy.random.default_rng`` streams seeded by ``(seed, slice
index)`` (never the global random state) and computed in float64 on one CPU thread, so the
same arguments give the same bytes on any machine (NumPy's ``Generator`` streams have been
stable since NumPy 1.17), and the first ``n`` slices of a set do not depend on ``num_slices``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F

LABEL_NAMES: tuple[str, ...] = (
    "background",
    "spleen",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "pancreas",
    "duodenum",
)
"""Organ names; the index is the label value (0 = background, 1..8 = organs)."""

NUM_LABELS: int = len(LABEL_NAMES)

PHANTOM_VERSION: int = 1
"""Bumped whenever the generator changes its output, so that cached sets are rebuilt."""
"""Number of label values, background included (9)."""

WINDOW_HU: tuple[float, float] = (-200.0, 300.0)
"""CT window mapped linearly to the grey values 0..255."""

MAX_MISALIGNMENT: float = 3.0
"""Largest accepted ``misalignment`` (beyond it the scaling could flip or vanish)."""

REFERENCE_SHAPE: tuple[int, int] = (256, 320)
"""(H, W) of the grid the anatomy is designed on; other shapes are scaled isotropically."""

# Labels (keep in sync with LABEL_NAMES).
_SPLEEN, _LKIDNEY, _GALLBLADDER, _ESOPHAGUS, _LIVER, _STOMACH, _PANCREAS, _DUODENUM = range(1, 9)

# Tissue intensities in HU (portal venous phase).
_HU_AIR = -1000.0
_HU_FAT = -100.0
_HU_FLUID = 10.0
_HU_BILE = 8.0
_HU_MUSCLE = 50.0
_HU_LIVER = 100.0
_HU_SPLEEN = 108.0
_HU_PANCREAS = 92.0
_HU_BOWEL_WALL = 88.0
_HU_KIDNEY_CORTEX = 180.0
_HU_KIDNEY_MEDULLA = 155.0
_HU_PORTAL = 165.0
_HU_AORTA = 190.0
_HU_IVC = 140.0
_HU_BONE_CORTEX = 750.0
_HU_BONE_MARROW = 230.0
_HU_ORAL_CONTRAST = 350.0

_F64 = torch.float64

# Inter-patient variability (reference px): the standard deviation of each organ's own shift
# and the amplitude of the smooth whole-anatomy deformation; with the patient's overall
# shift and size they give organ displacements of about 10-20 px between two patients.
_ORGAN_SD = 5.5
_ELASTIC_PX = 6.5


# --------------------------------------------------------------------------------------
# small geometric helpers on canonical coordinate maps X, Y (reference pixels, y = posterior)
# --------------------------------------------------------------------------------------


def _ellipse_dist(X, Y, cx, cy, a, b, angle_deg=0.0, power=2.0, b_post=None):
    """Approximate signed distance (reference px, < 0 inside) to a rotated superellipse.

    ``a`` is the semi-axis along the direction ``angle_deg`` (image coordinates, y down),
    ``b`` the one across it; ``b_post`` (optional) replaces ``b`` on the side of +v.
    """
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    dx, dy = X - cx, Y - cy
    u = dx * c + dy * s
    v = -dx * s + dy * c
    bb = b if b_post is None else torch.where(v > 0, torch.full_like(v, b_post), torch.full_like(v, b))
    if power == 2.0:
        r = torch.sqrt((u / a) ** 2 + (v / bb) ** 2)
    else:
        r = ((u / a).abs() ** power + (v / bb).abs() ** power) ** (1.0 / power)
    rho = torch.sqrt(u * u + v * v)
    safe = r > 1e-9
    radius = torch.where(safe, rho / r.clamp_min(1e-9), torch.full_like(r, min(a, b)))
    return rho - radius


def _catmull_rom(points, samples_per_segment=16):
    """Dense points [M, 2] on a Catmull-Rom spline through ``points`` [K, 2] (numpy)."""
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


def _resample(points, spacing):
    """Points [M, 2] spaced ``spacing`` apart along the polyline ``points`` [K, 2] (numpy)."""
    p = np.asarray(points, dtype=np.float64)
    seg = np.sqrt(((p[1:] - p[:-1]) ** 2).sum(1))
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(math.ceil(arc[-1] / spacing)) + 1)
    s = np.linspace(0.0, arc[-1], n)
    return np.stack([np.interp(s, arc, p[:, 0]), np.interp(s, arc, p[:, 1])], axis=1)


def _tube_dist(X, Y, pts, radius):
    """Signed distance (reference px, < 0 inside) to a tube of slowly varying ``radius`` [M]
    around the densely sampled centre line ``pts`` [M, 2], and the distance to the centre line."""
    pts_t = torch.as_tensor(pts, dtype=_F64)
    r = torch.as_tensor(np.broadcast_to(radius, (len(pts),)).copy(), dtype=_F64)
    xs, ys = X.reshape(1, -1), Y.reshape(1, -1)
    d2 = (xs - pts_t[:, 0:1]) ** 2 + (ys - pts_t[:, 1:2]) ** 2
    d2min, nearest = d2.min(0)
    centre = d2min.sqrt()
    return (centre - r[nearest]).view(X.shape), centre.view(X.shape)


def _gaussian_blur(x, sigma):
    """Separable Gaussian blur of [C, H, W] float64 (reflect padding); sigma in pixels."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3.0 * sigma)))
    grid = torch.arange(-radius, radius + 1, dtype=_F64)
    k = torch.exp(-0.5 * (grid / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    h, w = x.shape[-2:]
    y = x[:, None]
    pad_w = min(radius, w - 1)
    pad_h = min(radius, h - 1)
    kx = k[radius - pad_w : radius + pad_w + 1]
    ky = k[radius - pad_h : radius + pad_h + 1]
    y = F.conv2d(F.pad(y, (pad_w, pad_w, 0, 0), mode="reflect"), kx.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, pad_h, pad_h), mode="reflect"), ky.view(1, 1, -1, 1))
    return y.view(c, h, w)


def _unit_noise(rng, channels, h, w, sigma):
    """Smooth Gaussian noise [C, H, W] with unit standard deviation (blur sigma in px).

    Broad blurs are done at half resolution and upsampled bilinearly (4-8x cheaper)."""
    factor = 2 if sigma >= 2.0 else 1
    hs, ws = -(-h // factor), -(-w // factor)
    smooth = _gaussian_blur(torch.from_numpy(rng.standard_normal((channels, hs, ws))), sigma / factor)
    if factor > 1:
        smooth = F.interpolate(smooth[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return smooth / smooth.std(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def _sample_grid(field, X, Y):
    """Smoothly interpolate control-point fields [C, gh, gw] that span the reference frame
    at the canonical coordinates X, Y [H, W] (bicubic x4, then bilinear); returns [C, H, W]."""
    _, gh, gw = field.shape
    dense = F.interpolate(
        field[None], size=(4 * (gh - 1) + 1, 4 * (gw - 1) + 1), mode="bicubic", align_corners=True
    )
    grid = torch.stack([X / (REFERENCE_SHAPE[1] / 2), Y / (REFERENCE_SHAPE[0] / 2)], dim=-1)[None]
    return F.grid_sample(dense, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


# --------------------------------------------------------------------------------------
# one patient
# --------------------------------------------------------------------------------------

_COARSE = 8  # pixel step of the coarse look-up that finds the image crop of a canonical box


class _Scene:
    """HU image and label map being painted (later strokes over earlier ones), the
    canonical coordinates of every pixel and the texture fields."""

    def __init__(self, X, Y, fields, scale):
        self.X, self.Y, self.fields = X, Y, fields
        self.hu = torch.full(X.shape, _HU_AIR, dtype=_F64)
        self.lab = torch.zeros(X.shape, dtype=torch.uint8)
        self._Xc, self._Yc = X[::_COARSE, ::_COARSE], Y[::_COARSE, ::_COARSE]
        self._margin = 2.0 * _COARSE / scale  # canonical px, covers a coarse cell's diagonal

    def view(self, box=None):
        """The image crop holding every pixel whose canonical coordinates lie in ``box``
        = (x0, x1, y0, y1); the whole image for ``None``; ``None`` if off the image."""
        if box is None:
            return _View(self, (slice(None), slice(None)))
        x0, x1, y0, y1 = box
        m = self._margin
        inside = (self._Xc > x0 - m) & (self._Xc < x1 + m) & (self._Yc > y0 - m) & (self._Yc < y1 + m)
        rows = inside.any(1).nonzero()
        if rows.numel() == 0:
            return None
        cols = inside.any(0).nonzero()
        h, w = self.X.shape
        r0 = max(0, (int(rows.min()) - 1) * _COARSE)
        r1 = min(h, (int(rows.max()) + 1) * _COARSE + 1)
        c0 = max(0, (int(cols.min()) - 1) * _COARSE)
        c1 = min(w, (int(cols.max()) + 1) * _COARSE + 1)
        return _View(self, (slice(r0, r1), slice(c0, c1)))


class _View:
    """A rectangular crop of a :class:`_Scene`; fields are looked up by attribute."""

    def __init__(self, scene, sl):
        self.scene, self.sl = scene, sl
        self.X, self.Y = scene.X[sl], scene.Y[sl]

    def __getattr__(self, name):
        fields = self.__dict__["scene"].fields
        if name not in fields:
            raise AttributeError(name)
        return fields[name][(...,) + self.__dict__["sl"]]

    @property
    def lab(self):
        return self.scene.lab[self.sl]

    def paint(self, mask, value, label=0):
        """Set intensity ``value`` (float or tensor of the crop's shape) and ``label``."""
        self.shade(mask, value)
        self.scene.lab[self.sl][mask] = label

    def shade(self, mask, value):
        """Set the intensity only (texture inside an organ), labels untouched."""
        hu = self.scene.hu[self.sl]
        if isinstance(value, torch.Tensor):
            hu[mask] = value.expand(mask.shape)[mask]
        else:
            hu[mask] = float(value)


def _render_patient(seed, index, misalignment, height, width):
    """HU image [H, W] float64 and labels [H, W] uint8 of one synthetic patient.

    Three independent random streams: the anatomy (does not depend on the image size), the
    misalignment, and the pixel textures and noise.

    Canonical coordinates: reference pixels (about 1.2 mm), origin at the centre of the
    256 x 320 reference image, x to the image's right (patient's left), y posterior.
    """
    scale = min(height / REFERENCE_SHAPE[0], width / REFERENCE_SHAPE[1])  # pixels per ref px
    rng = np.random.default_rng([seed, index, 0])
    rng_mis = np.random.default_rng([seed, index, 1])
    rng_tex = np.random.default_rng([seed, index, 2])

    def N(sd=1.0):  # jitter: normal, truncated at 2.2 standard deviations
        return float(np.clip(rng.normal(0.0, sd), -2.2 * sd, 2.2 * sd))

    def U(a, b):
        return float(rng.uniform(a, b))

    def pick(options, p):
        return options[int(rng.choice(len(options), p=p))]

    # ---- pixel grid in reference pixels, origin at the image centre ------------------
    cols = (torch.arange(width, dtype=_F64) + 0.5 - width / 2) / scale
    rows = (torch.arange(height, dtype=_F64) + 0.5 - height / 2) / scale
    Yi, Xi = torch.meshgrid(rows, cols, indexing="ij")

    # ---- misalignment: an extra whole-body affine transform (not pre-aligned data) -----
    m = misalignment
    angle = math.radians(m * float(rng_mis.choice([-1.0, 1.0])) * float(rng_mis.uniform(6, 12)))
    zoom = 1.0 + m * float(rng_mis.uniform(-0.10, 0.10))
    aniso = 1.0 + m * float(rng_mis.uniform(-0.04, 0.04))
    shear = m * float(rng_mis.uniform(-0.04, 0.04))
    t_len = m * float(rng_mis.uniform(20, 40))
    t_dir = float(rng_mis.uniform(0, 2 * math.pi))
    tx, ty = t_len * math.cos(t_dir), 0.6 * t_len * math.sin(t_dir)  # keep the body in view
    # image = R(angle) @ [[zoom*aniso, shear], [0, zoom/aniso]] @ anatomy + t
    ca, sa = math.cos(angle), math.sin(angle)
    ur = ca * (Xi - tx) + sa * (Yi - ty)
    vr = -sa * (Xi - tx) + ca * (Yi - ty)
    Ya = vr / (zoom / aniso)
    Xa = (ur - shear * Ya) / (zoom * aniso)

    # ---- the patient's own in-plane variation: position, size, elastic deformation -----
    gx, gy = N(3.5), N(3.5)
    gsx = 1.0 + float(np.clip(rng.normal(0.0, 0.045), -0.09, 0.09))
    gsy = 1.0 + float(np.clip(rng.normal(0.0, 0.045), -0.09, 0.09))
    elastic = _sample_grid(torch.from_numpy(rng.standard_normal((2, 5, 6))), Xa, Ya)
    X = (Xa - gx) / gsx + _ELASTIC_PX * elastic[0]
    Y = (Ya - gy) / gsy + _ELASTIC_PX * elastic[1]

    # organ-scale boundary wobble (unit std, one channel per structure), textures in pixels
    wob = _sample_grid(torch.from_numpy(rng.standard_normal((16, 11, 13))), X, Y)
    fields = {
        "wob": wob,
        "fine": _unit_noise(rng_tex, 2, height, width, 1.2 * scale),
        "medium": _unit_noise(rng_tex, 2, height, width, 3.0 * scale),
        "ct": _unit_noise(rng_tex, 1, height, width, 0.7 * scale)[0],
        "bias": _sample_grid(torch.from_numpy(rng.standard_normal((1, 4, 5))), Xi, Yi)[0],
        "Xa": Xa,
        "Ya": Ya,
    }
    scene = _Scene(X, Y, fields, scale)
    full = scene.view()

    z = U(-1.0, 1.0)  # slice level: +1 cranial (more liver, stomach, spleen), -1 caudal

    # ---- body: skin, subcutaneous fat, muscle wall, abdominal cavity ------------------
    cav_cx, cav_cy = N(2.0), N(2.0)
    cav_a = 112.0 * (1 + N(0.04))
    cav_ant, cav_post = 74.0 * (1 + N(0.05)), 80.0 * (1 + N(0.03))
    d_cav = _ellipse_dist(X, Y, cav_cx, cav_cy, cav_a, cav_ant, 0.0, 2.3, cav_post) - 2.0 * wob[0]
    rho = torch.sqrt((X - cav_cx) ** 2 + (Y - cav_cy) ** 2).clamp_min(1e-6)
    sin_phi = (Y - cav_cy) / rho
    ant = (-sin_phi).clamp_min(0)
    ant = ant * ant.sqrt()
    post = sin_phi.clamp_min(0)
    post = post * post.sqrt()
    fat_lat, fat_ant, fat_post = U(5, 24), U(5, 28), U(3, 12)
    fat = fat_lat + (fat_ant - fat_lat) * ant + (fat_post - fat_lat) * post + 1.5 * wob[1]
    lat = 1.0 - ant - post
    rectus = torch.exp(-((((X - cav_cx).abs() - 30.0) / 16.0) ** 2))  # paired, linea alba between
    mus = 3.0 + 8.0 * lat + 9.0 * ant * rectus + 10.0 * post + 1.2 * wob[2]
    body = d_cav < mus + fat
    cavity = d_cav < 0
    fields["body"], fields["cavity"] = body, cavity
    # patient table, in the scanner frame (moves with the misalignment only)
    table_y = gy + gsy * (cav_cy + cav_post + 13.0 + fat_post) + 3.0
    table = (Ya > table_y) & (Ya < table_y + 4.0) & (Xa.abs() < 150.0) & ~body
    full.paint(table, 250.0 + 30.0 * full.fine[0])
    septa = 25.0 * (full.medium[1].abs() < 0.06)
    full.paint(body, _HU_FAT + 6.0 * full.medium[0] + septa)
    full.paint(body & (d_cav > mus + fat - 1.5), 30.0)  # skin
    full.paint(d_cav < mus, _HU_MUSCLE + 6.0 * full.medium[0])
    mesentery = _HU_FAT + 8.0 + 6.0 * full.medium[1]
    mesentery = torch.where(full.fine[1] > 2.4, torch.full_like(X, 120.0), mesentery)
    full.paint(cavity, mesentery)

    def ellipse(cx, cy, a, b, ang=0.0, power=2.0, pad=6.0):
        """(view, signed distance) of a superellipse, or (None, None) if off the image."""
        r = max(a, b) + pad
        v = scene.view((cx - r, cx + r, cy - r, cy + r))
        if v is None:
            return None, None
        return v, _ellipse_dist(v.X, v.Y, cx, cy, a, b, ang, power)

    def tube(points, radius, pad=4.0, spacing=1.5):
        """(view, signed distance, centre-line distance) of a tube along a spline."""
        pts = _resample(_catmull_rom(points), spacing)
        rad = np.interp(np.linspace(0, 1, len(pts)), np.linspace(0, 1, np.size(radius)),
                        np.atleast_1d(np.asarray(radius, dtype=np.float64)))
        lo, hi = pts.min(0) - rad.max() - pad, pts.max(0) + rad.max() + pad
        v = scene.view((lo[0], hi[0], lo[1], hi[1]))
        if v is None:
            return None, None, None
        d, c = _tube_dist(v.X, v.Y, pts, rad)
        return v, d, c

    # ---- unlabelled bowel loops (jejunum, colon): intensities like the gut organs ------
    def bowel(cx, cy, a, b, ang, kind, ch, wall=2.5):
        v, d = ellipse(cx, cy, a, b, ang)
        if v is None:
            return
        d = d - 1.5 * v.wob[ch]
        outer = v.cavity & (d < 0)
        v.paint(outer, _HU_BOWEL_WALL + 8.0 * v.fine[0])
        if kind == "collapsed":
            v.paint(outer & (d < -wall), _HU_BOWEL_WALL - 15.0 + 10.0 * v.fine[1])
            return
        lumen = outer & (d < -wall)
        if kind == "air":
            content = torch.where(v.Y < cy + U(-0.3, 0.5) * b, _HU_AIR, 15.0 + 5.0 * v.fine[1])
        elif kind == "feces":
            content = 10.0 + 40.0 * v.medium[0] + 30.0 * v.fine[1]
            content = torch.where(v.fine[0] > 0.9, -850.0 + 0.0 * content, content)
        elif kind == "contrast":
            content = _HU_ORAL_CONTRAST * U(0.6, 1.0) + 40.0 * v.fine[1]
        else:  # fluid with a few bubbles
            content = 12.0 + 6.0 * v.fine[1]
            content = torch.where(v.fine[0] > 2.2, -800.0 + 0.0 * content, content)
        v.paint(lumen, content)

    kinds = ("fluid", "collapsed", "air", "feces", "contrast")
    for k in range(int(rng.integers(6, 11))):
        r = U(7.0, 13.0)
        bowel(U(-40.0, 100.0), U(-66.0, 20.0), r * U(1.0, 1.5), r, U(0, 180),
              pick(kinds, [0.35, 0.3, 0.12, 0.15, 0.08]), 3 + k % 4)
    # colon: transverse (anterior) and, in caudal slices, descending (image right, lateral)
    bowel(U(-40.0, 50.0), -60.0 + N(4), U(16, 24), U(10, 13), N(10), pick(("air", "feces"), [0.5, 0.5]), 7, 3.0)
    if z < 0.3:
        bowel(98.0 + N(4), 28.0 + N(5), U(11, 15), U(9, 12), U(0, 180), pick(("air", "feces"), [0.4, 0.6]), 7, 3.0)

    # ---- spleen (image right, posterolateral; homogeneous) ------------------------------
    if z > -0.85:
        size = (1.0 + 0.2 * z) * U(0.85, 1.15)
        cranial = max(z - 0.5, 0.0)  # above the kidney the spleen takes its place
        size = size * (1.0 + 0.25 * cranial)
        cx, cy = 96.0 - 20.0 * cranial + N(_ORGAN_SD), 14.0 + 25.0 * cranial + N(_ORGAN_SD)
        a, b, ang = 40.0 * size, 19.0 * size, -67.0 + N(8)
        v, d = ellipse(cx, cy, a, b, ang, pad=10.0)
        if v is not None:
            # concave visceral (medial) surface: cut away an ellipse on the medial side
            t = math.radians(ang)
            nx, ny = math.sin(t), -math.cos(t)  # normal of the long axis, pointing medially
            inner = _ellipse_dist(v.X, v.Y, cx + 1.6 * b * nx, cy + 1.6 * b * ny, 0.8 * a, 1.0 * b, ang)
            d = torch.maximum(d, -inner) - 3.0 * v.wob[8]
            v.paint(v.cavity & (d < 0), _HU_SPLEEN + N(6.0) + 3.0 * v.medium[0], _SPLEEN)

    # ---- liver (image left) with left lobe and portal branches --------------------------
    ls = (1.0 + 0.12 * z) * U(0.85, 1.15)
    lcx, lcy = -75.0 + N(1.3 * _ORGAN_SD), -14.0 + N(1.3 * _ORGAN_SD)
    d_liver = _ellipse_dist(X, Y, lcx, lcy, 52.0 * ls, 70.0 * ls, 15.0 + N(8))
    lobe = 0.55 + 0.45 * z + N(0.1)
    if lobe > 0.2:
        d_lobe = _ellipse_dist(X, Y, -22.0 + N(5), -52.0 + N(4), 44.0 * lobe, 15.0 * lobe, -12.0 + N(6))
        d_liver = torch.minimum(d_liver, d_lobe)
    liver = cavity & (d_liver - 5.0 * wob[9] < 0)
    liver_hu = _HU_LIVER + N(6.0)
    full.paint(liver, liver_hu + 4.0 * full.medium[1] + 2.0 * full.fine[0], _LIVER)
    # portal / hepatic vessel tree from the hilum: curved branches that taper and divide
    vessel_hu = liver_hu + 55.0 + N(8.0)
    hx, hy = lcx + 36.0 + N(4), lcy + 10.0 + N(4)  # hilum (porta hepatis)
    branches = []
    for base in (U(160, 200), U(115, 150), U(-150, -115), U(-105, -70)):
        branches.append(((hx, hy), math.radians(base), U(30, 55) * ls, 3.0, 0))
    while branches:
        (bx, by), ang, length, r0, depth = branches.pop()
        pts, heading, (px, py) = [(bx, by)], ang, (bx, by)
        for _ in range(3):
            heading += math.radians(N(18))
            px, py = px + length / 3 * math.cos(heading), py + length / 3 * math.sin(heading)
            pts.append((px, py))
        v, d, _ = tube(pts, [r0, 0.55 * r0], pad=2.0, spacing=2.0)
        if v is not None:
            v.shade((d < 0) & (v.lab == _LIVER), vessel_hu + 5.0 * v.fine[1])
        if depth < 1 or (depth < 2 and rng.random() < 0.5):
            for _ in range(int(rng.integers(1, 3))):
                f = int(rng.integers(1, 4))
                side = float(rng.choice([-1.0, 1.0]))
                branches.append((pts[f], heading + side * math.radians(U(25, 55)),
                                 0.6 * length, max(0.65 * r0 * (1.0 - f / 6.0), 1.0), depth + 1))
    lv = scene.view((lcx - 70, lcx + 70, lcy - 80, lcy + 80))
    cut = torch.zeros_like(lv.X, dtype=torch.bool)
    for _ in range(int(rng.integers(4, 10))):  # vessels cut across
        vx, vy = lcx + U(-45, 35) * ls, lcy + U(-55, 55) * ls
        cut |= (lv.X - vx) ** 2 + (lv.Y - vy) ** 2 < U(1.3, 2.8) ** 2
    lv.shade(cut & (lv.lab == _LIVER), vessel_hu + 5.0 * lv.fine[1])

    # ---- kidneys: the left one labelled, the right one an unlabelled look-alike ---------
    def kidney(cx, cy, ang, size, label, ch, hilum_sign):
        a, b = 28.0 * size, 16.0 * size
        v, d = ellipse(cx, cy, a, b, ang, pad=10.0)
        if v is None:
            return
        d = d - 2.0 * v.wob[ch]
        t = math.radians(ang + hilum_sign * 90.0)
        notch = _ellipse_dist(v.X, v.Y, cx + b * math.cos(t), cy + b * math.sin(t), 0.3 * a, 0.35 * b, ang)
        sinus = _ellipse_dist(v.X, v.Y, cx + 0.45 * b * math.cos(t), cy + 0.45 * b * math.sin(t),
                              0.4 * a, 0.32 * b, ang)
        kid = v.cavity & (d < 0) & (notch > 0)
        v.shade(v.cavity & (d < 4.0) & ~kid & (v.lab == 0), _HU_FAT + 5.0 * v.medium[0])  # perirenal fat
        hu = torch.where(d < -4.5 * size, _HU_KIDNEY_MEDULLA + 8.0 * v.medium[1],
                         _HU_KIDNEY_CORTEX + 6.0 * v.fine[1])
        hu = torch.where(sinus < 0, -60.0 + 20.0 * v.medium[0], hu)
        hu = torch.where(sinus < -3.0, 20.0 + 0.0 * hu, hu)  # renal pelvis
        v.paint(kid, hu, label)

    for sgn in (-1.0, 1.0):  # adrenal glands: thin soft-tissue limbs near the crura
        adrenal = np.array([(30, 6), (38, 22), (47, 30)], dtype=np.float64) * [sgn, 1.0] + rng.normal(0, 2.0, 2)
        v, d, _ = tube(adrenal, 1.8, pad=2.0)
        if v is not None and z > -0.4:
            v.paint(v.cavity & (d < 0) & (v.lab == 0), 60.0 + 5.0 * v.fine[1])
    if z < 0.95:  # the right kidney lies lower than the left one
        kidney(-62.0 + N(_ORGAN_SD), 44.0 + N(_ORGAN_SD), 55.0 + N(8), (1.0 - 0.3 * z) * U(0.85, 1.1), 0, 10, -1.0)
    if z < 0.85:
        kidney(62.0 + N(_ORGAN_SD), 40.0 + N(_ORGAN_SD), -55.0 + N(8), (1.0 - 0.3 * z) * U(0.85, 1.1), _LKIDNEY, 11, 1.0)

    # ---- stomach (image right, anterior): wall with folds, fluid / air / food ------------
    if z > -0.9:
        ss = (1.0 + 0.2 * z) * U(0.8, 1.15)
        scx, scy, sb = 50.0 + N(_ORGAN_SD), -46.0 + N(_ORGAN_SD), 24.0 * ss
        v, d = ellipse(scx, scy, 42.0 * ss, sb, -15.0 + N(10), pad=10.0)
        if v is not None:
            d = d - 4.0 * v.wob[12]
            outer = v.cavity & (d < 0)
            kind = pick(("fluid", "food", "collapsed", "contrast"), [0.45, 0.3, 0.15, 0.1])
            wall = U(3.5, 5.5) + 1.5 * v.fine[0].clamp(-1, 1)
            if kind == "collapsed":
                wall = wall + 6.0 + 3.0 * v.medium[0]
            v.paint(outer, _HU_BOWEL_WALL + 20.0 + 8.0 * v.fine[1], _STOMACH)
            if kind == "food":
                content = 25.0 + 30.0 * v.medium[1] + 20.0 * v.fine[1]
                content = torch.where(v.fine[0] > 1.3, -800.0 + 0.0 * content, content)
            elif kind == "contrast":
                content = _HU_ORAL_CONTRAST * U(0.6, 1.0) + 20.0 * v.fine[1]
            elif kind == "collapsed":
                content = 20.0 + 10.0 * v.fine[1]
            else:
                content = _HU_FLUID + 5.0 + 5.0 * v.fine[1]
            content = torch.where(v.Y < scy - sb * U(-0.1, 0.5), _HU_AIR + 0.0 * content, content)
            v.paint(outer & (d < -wall), content, _STOMACH)

    # ---- pancreas geometry (painted after the duodenum) ---------------------------------
    pshift = np.array([N(_ORGAN_SD), N(_ORGAN_SD)])
    pan_pts = np.array([(-32, 4), (-24, -8), (-6, -16), (18, -18), (42, -12), (62, -2)], dtype=np.float64)
    pan_pts = pan_pts + pshift + np.clip(rng.normal(0, 2.5, pan_pts.shape), -5.0, 5.0)
    pan_w = np.array([13.0, 11.0, 8.5, 9.5, 9.0, 7.5]) * U(0.85, 1.15)
    t0 = float(np.clip(0.45 * (z - 0.3) + N(0.05), 0.0, 0.35))  # cranial: no head
    t1 = float(np.clip(1.0 + 0.5 * (z + 0.3) + N(0.05), 0.6, 1.0))  # caudal: no tail
    dense = _resample(_catmull_rom(pan_pts), 1.0)
    k0, k1 = int(round(t0 * (len(dense) - 1))), int(round(t1 * (len(dense) - 1)))
    pan_curve = dense[k0 : k1 + 1 : 3]
    pan_width = np.interp(np.linspace(t0, t1, 8), np.linspace(0, 1, len(pan_w)), pan_w)

    # ---- duodenum (C-loop around the pancreatic head; lumen with fluid and air) ---------
    if z < 0.8:
        duo_pts = np.array([(-12, -30), (-40, -24), (-54, 0), (-46, 26), (-24, 34)], dtype=np.float64)
        duo_pts = duo_pts + 0.7 * pshift + np.clip(rng.normal(0, 2.5, duo_pts.shape), -5.0, 5.0)
        dense = _resample(_catmull_rom(duo_pts), 1.0)
        tc = float(np.clip(0.5 - 0.15 * z + N(0.06), 0.3, 0.7))
        half = U(0.22, 0.34)
        j0 = int(round(max(tc - half, 0.0) * (len(dense) - 1)))
        j1 = int(round(min(tc + half, 1.0) * (len(dense) - 1)))
        duo_w = 8.5 * U(0.85, 1.2)
        v, d, _ = tube(dense[j0 : j1 + 1 : 3], duo_w)
        if v is not None:
            d = d - 1.5 * v.wob[13]
            duo = v.cavity & (d < 0)
            v.paint(duo, _HU_BOWEL_WALL + 8.0 + 8.0 * v.fine[1], _DUODENUM)
            duo_kind = pick(("fluid", "collapsed", "air"), [0.4, 0.45, 0.15])
            if duo_kind != "collapsed":
                content = 12.0 + 6.0 * v.fine[1]
                bubble = v.fine[0] > (0.9 if duo_kind == "air" else 2.0)
                content = torch.where(bubble, -850.0 + 0.0 * content, content)
                v.paint(duo & (d < -0.45 * duo_w), content, _DUODENUM)

    # ---- pancreas: lobulated outline, fatty clefts, sometimes a visible duct -------------
    v, d, centre = tube(pan_curve, pan_width)
    if v is not None:
        d = d - 1.8 * v.medium[1] - 1.5 * v.wob[14]
        pancreas = v.cavity & (d < 0) & (v.lab != _DUODENUM)
        pan_hu = _HU_PANCREAS + N(5.0) + 8.0 * v.fine[0] + 4.0 * v.medium[0]
        cleft = (v.medium[0] > 1.2) | (v.fine[1] < -1.8)
        pan_hu = torch.where(cleft, -30.0 + 25.0 * v.fine[0], pan_hu)  # fat between lobules
        if rng.random() < 0.4:
            pan_hu = torch.where(centre < 1.0, 20.0 + 0.0 * pan_hu, pan_hu)  # pancreatic duct
        v.paint(pancreas, pan_hu, _PANCREAS)

    # ---- gallbladder (bile, at the liver's inferior-medial edge) ------------------------
    if rng.random() < 0.6:
        gs = U(0.7, 1.2)
        v, d = ellipse(-52.0 + N(_ORGAN_SD), -34.0 + N(_ORGAN_SD), 17.0 * gs, 11.0 * gs, 60.0 + N(20))
        if v is not None:
            d = d - 1.5 * v.wob[15]
            gb = v.cavity & (d < 0)
            v.paint(gb, 55.0 + 5.0 * v.fine[0], _GALLBLADDER)
            v.paint(gb & (d < -1.5), _HU_BILE + 4.0 * v.fine[1], _GALLBLADDER)

    # ---- vessels (unlabelled): splenic vein, SMV, SMA, renal vein, aorta, IVC ------------
    portal_hu = _HU_PORTAL + N(8.0)
    sv_pts = np.array([(-8, -4), (16, -6), (40, -2), (60, 8), (80, 14)], dtype=np.float64)
    sv_pts = sv_pts + pshift + rng.normal(0, 2.0, sv_pts.shape)
    dense = _resample(_catmull_rom(sv_pts), 1.0)
    v, d, _ = tube(dense[: max(2, int(round((0.6 + 0.4 * max(z, -0.5)) * (len(dense) - 1))) + 1) : 3], 3.3)
    if v is not None:
        v.paint(v.cavity & (d < 0), portal_hu + 5.0 * v.fine[1])
    v, d = ellipse(-8.0 + pshift[0], -3.0 + pshift[1], U(5.0, 6.5), U(4.5, 6.0))  # SMV / confluence
    if v is not None:
        v.paint(v.cavity & (d < 0), portal_hu + 5.0 * v.fine[1])
    ax_c, ay_c, r_ao = 8.0 + N(2.5), 18.0 + N(2.5), 9.0 + N(0.8)
    v, d = ellipse(ax_c + N(1.5), ay_c - 18.0 + N(1.5), 3.5, 3.5, pad=8.0)  # SMA in its fat collar
    if v is not None:
        v.paint(v.cavity & (d < 4.0) & (v.lab == 0), _HU_FAT + 5.0 * v.medium[0])
        v.paint(v.cavity & (d < 0), _HU_AORTA - 10.0 + 5.0 * v.fine[1])
    if -0.6 < z < 0.4:  # left renal vein, between SMA and aorta, into the IVC
        lrv = np.array([(50, 34), (28, 8), (8, 4), (-22, 10)], dtype=np.float64) + rng.normal(0, 1.5, 2)
        v, d, _ = tube(lrv, 2.8)
        if v is not None:
            v.paint(v.cavity & (d < 0) & (v.lab == 0), _HU_IVC + 5.0 * v.fine[1])
    v, d = ellipse(ax_c, ay_c, r_ao, r_ao)
    if v is not None:
        v.paint(d < 1.5, _HU_MUSCLE + 10.0)  # wall, crura
        v.paint(d < 0, _HU_AORTA + N(12.0) + 5.0 * v.fine[1])
        if rng.random() < 0.35:  # wall calcification
            phi = U(0, 2 * math.pi)
            calc = (v.X - ax_c - r_ao * math.cos(phi)) ** 2 + (v.Y - ay_c - r_ao * math.sin(phi)) ** 2 < 4.0
            v.paint(calc, 600.0)
    v, d = ellipse(-24.0 + N(2.5), 14.0 + N(2.5), 12.0 * U(0.8, 1.15), 8.0 * U(0.6, 1.1), N(10))
    if v is not None:
        v.paint(d < 0, _HU_IVC + N(12.0) + 5.0 * v.fine[1])

    # ---- esophagus (cranial slices: small, left-anterior of the aorta) -------------------
    if z > 0.0:
        v, d = ellipse(ax_c + 18.0 + N(2.5), ay_c - 10.0 + N(2.5), U(5.5, 7.5), U(5.0, 7.0), U(0, 180))
        if v is not None:
            d = d - 0.8 * v.wob[4]
            v.paint(d < 0, _HU_MUSCLE + 5.0 + 6.0 * v.fine[1], _ESOPHAGUS)
            if rng.random() < 0.5:
                v.paint(d < -4.0, _HU_AIR, _ESOPHAGUS)

    # ---- psoas, back muscles, spine, ribs (unlabelled, painted last) --------------------
    psoas = 0.8 - 0.3 * z
    for sgn in (-1.0, 1.0):
        v, d = ellipse(sgn * 28.0 + N(1.5), 44.0 + N(1.5), 12.0 * psoas, 9.0 * psoas, sgn * 65.0)
        if v is not None:
            v.paint(d < 0, _HU_MUSCLE + 5.0 * v.medium[0])
        v, d = ellipse(sgn * 29.0 + N(1.5), 78.0 + N(1.5), 24.0, 14.0, sgn * 8.0, pad=8.0)
        if v is not None:
            d = d - 1.5 * v.wob[5]
            musc = _HU_MUSCLE + 5.0 * v.medium[0]
            musc = torch.where(v.medium[1] > 1.6, _HU_FAT + 20.0 * v.medium[0], musc)
            v.paint(v.body & (d < 0), musc)
    vbx, vby = N(1.5), 42.0 + N(1.5)
    v = scene.view((vbx - 35, vbx + 35, vby - 20, vby + 52))
    if v is not None:
        d_vb = _ellipse_dist(v.X, v.Y, vbx, vby, 19.0 + N(1.0), 15.0 + N(1.0), 0.0, 2.2)
        v.paint(d_vb < 0, _HU_BONE_CORTEX + 50.0 * v.fine[0])
        v.paint(d_vb < -2.5, _HU_BONE_MARROW + 50.0 * v.fine[0] + 20.0 * v.medium[1])
        d_canal = torch.sqrt((v.X - vbx) ** 2 + (v.Y - vby - 24.0) ** 2)
        arch = (d_canal < 12.5) & (v.Y > vby + 16.0)
        pedicle = (d_canal < 12.5) & ((v.X - vbx).abs() > 6.0)
        spinous = _ellipse_dist(v.X, v.Y, vbx, vby + 37.0, 8.0, 4.0, 90.0) < 0
        transverse = (_ellipse_dist(v.X, v.Y, vbx - 19.0, vby + 21.0, 9.0, 3.5, 15.0) < 0) | (
            _ellipse_dist(v.X, v.Y, vbx + 19.0, vby + 21.0, 9.0, 3.5, -15.0) < 0
        )
        v.paint(v.body & (arch | pedicle | spinous | transverse), _HU_BONE_CORTEX - 150.0 + 60.0 * v.fine[0])
        v.paint(d_canal < 8.0, 25.0 + 4.0 * v.fine[1])
    for sgn in (-1.0, 1.0):  # ribs (posterolateral) and costal cartilage (anterolateral)
        for phi_deg in rng.uniform(10, 70, size=int(rng.integers(1, 4))).tolist() + [-U(20, 45)]:
            phi = math.radians(phi_deg)
            cx = cav_cx + sgn * (cav_a + 4.0) * math.cos(phi)
            cy = cav_cy + (cav_post if phi > 0 else cav_ant) * math.sin(phi) * 1.05
            tang = math.degrees(math.atan2(math.cos(phi), sgn * math.sin(phi)))
            v, d = ellipse(cx, cy, U(5.0, 8.0), 3.5, tang)
            if v is not None:
                v.paint(v.body & (d < 0), (550.0 if phi_deg > 0 else 150.0) + 40.0 * v.fine[0])
                v.paint(v.body & (d < -1.3), 200.0 + 30.0 * v.fine[1])

    # ---- scanner: smooth intensity drift and correlated noise ---------------------------
    # partial volume: the scanner's point spread blurs every edge a little
    hu = _gaussian_blur(scene.hu[None], 0.65 * scale)[0]
    hu = hu + 6.0 * fields["bias"] + U(10.0, 15.0) * fields["ct"]
    return hu, scene.lab


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


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
    """
    n = _check_int("num_slices", num_slices, 1)
    seed = _check_int("seed", seed, 0)
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise ValueError(f"shape must be a (height, width) pair, got {shape!r}")
    height = _check_int("shape[0] (height)", shape[0], 32)
    width = _check_int("shape[1] (width)", shape[1], 32)
    if height % 4 or width % 4:
        raise ValueError(
            f"shape must be divisible by 4 (feature maps are at 1/4 resolution), got {(height, width)}"
        )
    if isinstance(misalignment, bool) or not isinstance(misalignment, numbers.Real):
        raise ValueError(f"misalignment must be a real number in [0, 3], got {misalignment!r}")
    misalignment = float(misalignment)
    if not math.isfinite(misalignment) or not 0.0 <= misalignment <= MAX_MISALIGNMENT:
        raise ValueError(
            f"misalignment must be a number in [0, {MAX_MISALIGNMENT}] (0: pre-aligned, 1: a "
            f"population that needs a pre-alignment), got {misalignment}"
        )

    images = torch.empty((n, height, width), dtype=torch.uint8)
    labels = torch.empty((n, height, width), dtype=torch.uint8)
    lo, hi = WINDOW_HU
    # Many small element-wise operations: one thread is faster (no hand-over costs) and
    # keeps every reduction in the same order on every machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(n):
            hu, lab = _render_patient(seed, i, misalignment, height, width)
            grey = ((hu - lo) / (hi - lo) * 255.0).clamp(0.0, 255.0).round()
            images[i] = grey.to(torch.uint8)
            labels[i] = lab
    finally:
        torch.set_num_threads(threads)
    return images, labels
