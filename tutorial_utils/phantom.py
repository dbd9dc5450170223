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


def _samplers(rng: np.random.Generator):
    """The three random draws the renderers use, all from ``rng``: ``N(sd)`` (normal jitter,
    truncated at 2.2 standard deviations), ``U(a, b)`` (uniform) and ``pick(options, p)``."""

    def N(sd=1.0):
        return float(np.clip(rng.normal(0.0, sd), -2.2 * sd, 2.2 * sd))

    def U(a, b):
        return float(rng.uniform(a, b))

    def pick(options, p):
        return options[int(rng.choice(len(options), p=p))]

    return N, U, pick


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

    N, U, pick = _samplers(rng)

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


# --------------------------------------------------------------------------------------
# 3D: synthetic abdominal CT volumes (notebook 05, "the road to 3D")
# --------------------------------------------------------------------------------------
#
# A separate, compact renderer (the 2D one draws a random slice level per patient and its
# random streams depend on it, so it cannot be stacked into a volume). The same eight labels,
# tissue intensities and CT window; organs are 3D shapes (ellipsoids, tubes along 3D centre
# lines) whose cross-sections change smoothly from slice to slice. Canonical coordinates:
# reference pixels (about 1.2 mm) from the centre of the volume, x to the image's right
# (patient's left), y posterior, z cranial; the "level" z / 64 runs from -1 (caudal, below the
# kidneys' lower poles) to +1 (cranial, the liver dome and the fundus of the stomach).

PHANTOM_VOLUME_VERSION: int = 1
"""Bumped whenever :func:`make_phantom_volume` changes its output."""

_LEVEL_PX = 64.0  # reference px from the centre to level +-1
_COARSE3D = 4  # voxel step of the coarse look-up that finds the crop of a canonical box


def _smooth_random_field(rng, channels, grid, size):
    """Smooth random fields [C, *size] with about unit standard deviation: normal values on a
    coarse ``grid`` (gz, gy, gx) spanning the volume, trilinearly upsampled 4x, blurred
    (removes the kinks) and resampled to ``size`` (float64)."""
    coarse = torch.from_numpy(rng.standard_normal((channels, *grid)))
    fine_size = tuple(4 * (g - 1) + 1 for g in grid)
    fine = F.interpolate(coarse[None], size=fine_size, mode="trilinear", align_corners=True)[0]
    fine = _gaussian_blur3d(fine, 2.0)
    fine = fine / fine.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    return F.interpolate(fine[None], size=size, mode="trilinear", align_corners=True)[0]


def _gaussian_blur3d(x, sigma):
    """Separable Gaussian blur of [C, Z, Y, X] float64 (replicated borders); sigma in voxels."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3.0 * sigma)))
    grid = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (grid / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, -1)
    y = x[:, None]  # [C, 1, Z, Y, X]
    for axis in range(3):
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(shape))
    return y[:, 0]


def _resample3d(points, spacing):
    """Points [M, 3] spaced ``spacing`` apart along the polyline ``points`` [K, 3] (numpy)."""
    p = np.asarray(points, dtype=np.float64)
    arc = np.concatenate([[0.0], np.cumsum(np.sqrt(((p[1:] - p[:-1]) ** 2).sum(1)))])
    n = max(2, int(math.ceil(arc[-1] / spacing)) + 1)
    s = np.linspace(0.0, arc[-1], n)
    return np.stack([np.interp(s, arc, p[:, k]) for k in range(3)], axis=1)


class _Scene3d(_Scene):
    """The volume being painted: HU and labels [Z, Y, X], canonical coordinates X, Y, Z."""

    def __init__(self, X, Y, Z, fields, scale):
        self.X, self.Y, self.Z, self.fields = X, Y, Z, fields
        self.hu = torch.full(X.shape, _HU_AIR, dtype=_F64)
        self.lab = torch.zeros(X.shape, dtype=torch.uint8)
        c = _COARSE3D
        self._coarse = [t[::c, ::c, ::c] for t in (X, Y, Z)]
        self._margin = 2.0 * c / scale  # canonical px, covers a coarse cell's diagonal

    def view(self, box=None):
        """The crop holding every voxel whose canonical coordinates lie in ``box`` =
        (x0, x1, y0, y1, z0, z1); the whole volume for ``None``; ``None`` if outside."""
        if box is None:
            return _View3d(self, (slice(None),) * 3)
        m = self._margin
        inside = torch.ones_like(self._coarse[0], dtype=torch.bool)
        for t, lo, hi in zip(self._coarse, box[0::2], box[1::2]):
            inside &= (t > lo - m) & (t < hi + m)
        if not inside.any():
            return None
        sl = []
        for axis, n in enumerate(self.X.shape):
            other = tuple(a for a in range(3) if a != axis)
            idx = inside.any(dim=other[1]).any(dim=other[0]).nonzero()
            lo = max(0, (int(idx.min()) - 1) * _COARSE3D)
            hi = min(n, (int(idx.max()) + 1) * _COARSE3D + 1)
            sl.append(slice(lo, hi))
        return _View3d(self, tuple(sl))


class _View3d(_View):
    def __init__(self, scene, sl):
        super().__init__(scene, sl)
        self.Z = scene.Z[sl]


def _ellipsoid_dist(v, cx, cy, cz, a, b, c, ang=0.0, kx=0.0, ky=0.0, power=2.0, b_post=None):
    """Approximate signed distance (reference px, < 0 inside) to a (super-)ellipsoid.

    In-plane semi-axes ``a`` (along ``ang`` degrees) and ``b`` (across; ``b_post`` on the side
    of +v), ``c`` along z; the centre moves by ``(kx, ky)`` per unit of z (a tilted organ).
    ``a``, ``b``, ``c`` may be tensors of the view's shape (cross-sections that change with z).
    """
    w = v.Z - cz
    dx, dy = v.X - cx - kx * w, v.Y - cy - ky * w
    t = math.radians(ang)
    u = dx * math.cos(t) + dy * math.sin(t)
    q = -dx * math.sin(t) + dy * math.cos(t)
    if b_post is not None:
        b = torch.where(q > 0, b_post, b) if isinstance(b_post, torch.Tensor) else torch.where(
            q > 0, torch.full_like(q, b_post), torch.full_like(q, b) if not isinstance(b, torch.Tensor) else b)
    if power == 2.0:
        r = torch.sqrt((u / a) ** 2 + (q / b) ** 2 + (w / c) ** 2)
    else:
        r = ((u / a).abs() ** power + (q / b).abs() ** power + (w / c).abs() ** power) ** (1.0 / power)
    rho = torch.sqrt(u * u + q * q + w * w)
    return rho - rho / r.clamp_min(1e-9)


def _segment_tube(scene, view, pts, radius, pad):
    """Signed distance (reference px, < 0 inside) over ``view`` to a tube around the polyline
    ``pts`` [M, 3] (x, y, z) with radius ``radius`` [M] (linear along each segment). Each
    segment is evaluated only in the crop of its own bounding box."""
    d = torch.full(view.X.shape, math.inf, dtype=_F64)
    origin = [s.start or 0 for s in view.sl]
    for p0, p1, r0, r1 in zip(pts[:-1], pts[1:], radius[:-1], radius[1:]):
        lo = np.minimum(p0, p1) - max(r0, r1) - pad
        hi = np.maximum(p0, p1) + max(r0, r1) + pad
        seg = scene.view((lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]))
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


def _render_volume(seed, index, depth, height, width, supersample):
    """HU [Z, Y, X] float64 and labels [Z, Y, X] uint8 of one synthetic patient at the
    output resolution (rendered ``supersample`` times finer and averaged / majority-voted)."""
    scale = min(height / REFERENCE_SHAPE[0], width / REFERENCE_SHAPE[1])  # voxels per ref px
    ss = supersample
    zs, hs, ws, sc = depth * ss, height * ss, width * ss, scale * ss
    rng = np.random.default_rng([seed, index, 3])  # the anatomy
    rng_tex = np.random.default_rng([seed, index, 4])  # textures and noise

    N, U, pick = _samplers(rng)

    # ---- voxel grid in reference px; the patient's pose, size and elastic deformation --
    axes = [(torch.arange(n, dtype=_F64) + 0.5 - n / 2) / sc for n in (zs, hs, ws)]
    Za, Ya, Xa = torch.meshgrid(*axes, indexing="ij")
    gx, gy, gz = N(3.5), N(3.5), N(6.0)
    gsx, gsy, gsz = (1.0 + float(np.clip(rng.normal(0.0, 0.045), -0.09, 0.09)) for _ in range(3))
    elastic = _smooth_random_field(rng, 3, (4, 5, 6), (zs, hs, ws))
    X = (Xa - gx) / gsx + _ELASTIC_PX * elastic[0]
    Y = (Ya - gy) / gsy + _ELASTIC_PX * elastic[1]
    Z = (Za - gz) / gsz + _ELASTIC_PX * elastic[2]
    del elastic
    level = Z / _LEVEL_PX

    def texture(sigma):  # two unit-std noise channels at the output resolution, upsampled
        noise = _gaussian_blur3d(torch.from_numpy(rng_tex.standard_normal((2, depth, height, width))), sigma)
        noise = noise / noise.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        return F.interpolate(noise[None], size=(zs, hs, ws), mode="trilinear", align_corners=False)[0]

    fields = {"wob": _smooth_random_field(rng, 10, (7, 9, 11), (zs, hs, ws)),
              "fine": texture(0.6), "medium": texture(1.5)}
    scene = _Scene3d(X, Y, Z, fields, sc)
    full = scene.view()

    # ---- body: subcutaneous fat, muscle wall, abdominal cavity (elliptic cylinders) -----
    cav_cx, cav_cy = N(2.0), N(2.0)
    cav_a0 = 112.0 * (1 + N(0.04))
    cav_a = cav_a0 * (1.0 + 0.04 * level)
    cav_ant, cav_post = 74.0 * (1 + N(0.05)), 80.0 * (1 + N(0.03))
    u, q = X - cav_cx, Y - cav_cy
    bb = torch.where(q > 0, torch.full_like(q, cav_post), torch.full_like(q, cav_ant))
    rho = torch.sqrt(u * u + q * q).clamp_min(1e-6)
    r = ((u / cav_a).abs() ** 2.3 + (q / bb).abs() ** 2.3) ** (1.0 / 2.3)
    d_cav = rho - rho / r.clamp_min(1e-9) - 2.0 * full.wob[0]
    sin_phi = q / rho
    ant, post = (-sin_phi).clamp_min(0) ** 1.5, sin_phi.clamp_min(0) ** 1.5
    fat_lat, fat_ant, fat_post = U(5, 24), U(5, 28), U(3, 12)
    fat = fat_lat + (fat_ant - fat_lat) * ant + (fat_post - fat_lat) * post + 1.5 * full.wob[1]
    lat = 1.0 - ant - post
    rectus = torch.exp(-(((u.abs() - 30.0) / 16.0) ** 2))
    mus = 3.0 + 8.0 * lat + 9.0 * ant * rectus + 10.0 * post
    body, cavity = d_cav < mus + fat, d_cav < 0
    fields["cavity"] = cavity
    table_y = gy + gsy * (cav_cy + cav_post + 13.0 + fat_post) + 3.0
    full.paint((Ya > table_y) & (Ya < table_y + 4.0) & (Xa.abs() < 150.0) & ~body, 250.0)
    full.paint(body, _HU_FAT + 6.0 * full.medium[0])
    full.paint(body & (d_cav > mus + fat - 1.5), 30.0)  # skin
    full.paint(d_cav < mus, _HU_MUSCLE + 6.0 * full.medium[0])
    full.paint(cavity, _HU_FAT + 8.0 + 6.0 * full.medium[1])  # mesenteric fat
    del u, q, bb, rho, r, sin_phi, ant, post, fat, lat, rectus, mus, body, d_cav

    def ellipsoid(cx, cy, cz, a, b, c, ang=0.0, kx=0.0, ky=0.0, pad=6.0):
        """(view, signed distance) of an ellipsoid, or (None, None) outside the volume."""
        rr = max(a, b) + pad
        sx, sy = abs(kx) * c, abs(ky) * c
        v = scene.view((cx - rr - sx, cx + rr + sx, cy - rr - sy, cy + rr + sy, cz - c - pad, cz + c + pad))
        if v is None:
            return None, None
        return v, _ellipsoid_dist(v, cx, cy, cz, a, b, c, ang, kx, ky)

    def tube(points, radius, pad=4.0, spacing=4.0):
        """(view, signed distance) of a tube along a 3D spline through ``points`` [K, 3]."""
        pts = _resample3d(_catmull_rom(np.asarray(points, dtype=np.float64)), spacing)
        rad = np.interp(np.linspace(0, 1, len(pts)), np.linspace(0, 1, np.size(radius)),
                        np.atleast_1d(np.asarray(radius, dtype=np.float64)))
        lo, hi = pts.min(0) - rad.max() - pad, pts.max(0) + rad.max() + pad
        v = scene.view((lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]))
        if v is None:
            return None, None
        return v, _segment_tube(scene, v, pts, rad, pad)

    L = _LEVEL_PX  # level -> canonical z

    def lumen(v, outer, d, wall, kind, cy):
        """Bowel wall and content (the air rises anteriorly: smaller y)."""
        v.paint(outer, _HU_BOWEL_WALL + 8.0 * v.fine[0])
        inner = outer & (d < -wall)
        if kind == "collapsed":
            v.paint(inner, _HU_BOWEL_WALL - 15.0 + 10.0 * v.fine[1])
        elif kind == "air":
            v.paint(inner, torch.where(v.Y < cy, _HU_AIR, 15.0 + 5.0 * v.fine[1]))
        elif kind == "feces":
            content = 10.0 + 40.0 * v.medium[0] + 30.0 * v.fine[1]
            v.paint(inner, torch.where(v.fine[0] > 0.9, -850.0 + 0.0 * content, content))
        else:
            v.paint(inner, 12.0 + 6.0 * v.fine[1])

    # ---- unlabelled small bowel loops and the colon --------------------------------------
    for k in range(int(rng.integers(10, 16))):
        rr = U(7.0, 13.0)
        cx, cy, cz = U(-40.0, 100.0), U(-66.0, 20.0), U(-1.15, 0.3) * L
        v, d = ellipsoid(cx, cy, cz, rr * U(1.0, 1.5), rr, U(10.0, 22.0), U(0, 180))
        if v is not None:
            d = d - 1.5 * v.wob[2 + k % 3]
            lumen(v, v.cavity & (d < 0), d, 2.5, pick(("fluid", "collapsed", "air", "feces"), [0.4, 0.35, 0.12, 0.13]),
                  cy + U(-0.3, 0.5) * rr)
    colon_y, colon_z = -60.0 + N(4), (-0.1 + N(0.08)) * L
    colon = [(-95.0 + N(4), 22.0 + N(4), -1.3 * L), (-95.0 + N(4), 10.0, colon_z - 10), (-60.0, colon_y, colon_z),
             (0.0, colon_y + N(4), colon_z - 12.0 + N(6)), (60.0, colon_y, colon_z + 10),
             (98.0 + N(4), 15.0, colon_z + 22.0), (98.0 + N(4), 28.0 + N(4), -1.3 * L)]
    cr = U(10.0, 13.0)
    v, d = tube(colon, cr)
    if v is not None:
        lumen(v, v.cavity & (d < 0), d, 3.0, pick(("air", "feces"), [0.5, 0.5]), colon_y - 0.2 * cr)

    # ---- spleen (image right, posterolateral, cranial; concave medial surface) -----------
    size = U(0.85, 1.15)
    cx, cy, cz = 88.0 + N(_ORGAN_SD), 24.0 + N(_ORGAN_SD), (0.45 + N(0.08)) * L
    a, b, c, ang = 40.0 * size, 19.0 * size, 42.0 * size, -67.0 + N(8)
    v, d = ellipsoid(cx, cy, cz, a, b, c, ang, kx=-0.25, ky=0.3, pad=10.0)
    if v is not None:
        t = math.radians(ang)
        nx, ny = math.sin(t), -math.cos(t)  # towards the medial side
        inner = _ellipsoid_dist(v, cx + 1.6 * b * nx, cy + 1.6 * b * ny, cz, 0.8 * a, b, 1.2 * c, ang, -0.25, 0.3)
        d = torch.maximum(d, -inner) - 3.0 * v.wob[3]
        v.paint(v.cavity & (d < 0), _HU_SPLEEN + N(6.0) + 3.0 * v.medium[0], _SPLEEN)

    # ---- liver (image left, cranial) and its left lobe, portal veins inside --------------
    ls = U(0.85, 1.15)
    lcx, lcy, lcz = -75.0 + N(1.3 * _ORGAN_SD), -14.0 + N(1.3 * _ORGAN_SD), (0.5 + N(0.08)) * L
    v_liver, d_liver = ellipsoid(lcx, lcy, lcz, 52.0 * ls, 70.0 * ls, 72.0 * ls, 15.0 + N(8), kx=0.15)
    v = v_liver
    lobe = _ellipsoid_dist(v, -22.0 + N(5), -52.0 + N(4), (0.7 + N(0.08)) * L, 48.0 * ls, 16.0 * ls, 38.0 * ls,
                           -12.0 + N(6))
    d = torch.minimum(d_liver, lobe) - 5.0 * v.wob[4]
    liver_hu = _HU_LIVER + N(6.0)
    v.paint(v.cavity & (d < 0), liver_hu + 4.0 * v.medium[1] + 2.0 * v.fine[0], _LIVER)
    vessel_hu = liver_hu + 55.0 + N(8.0)
    hx, hy, hz = lcx + 36.0 + N(4), lcy + 10.0 + N(4), (0.2 + N(0.05)) * L  # the hilum
    for _ in range(5):
        az, el, length = U(100, 260), U(-30, 50), U(40, 70) * ls
        dx, dy = math.cos(math.radians(az)), math.sin(math.radians(az))
        end = (hx + length * dx * math.cos(math.radians(el)), hy + length * dy * math.cos(math.radians(el)),
               hz + length * math.sin(math.radians(el)))
        mid = tuple((p + e) / 2 + N(6) for p, e in zip((hx, hy, hz), end))
        v, d = tube([(hx, hy, hz), mid, end], [4.0, 2.0], pad=2.0)
        if v is not None:
            v.shade((d < 0) & (v.lab == _LIVER), vessel_hu + 5.0 * v.fine[1])

    # ---- kidneys: the left one labelled, the right one (lower) an unlabelled look-alike --
    def kidney(cx, cy, cz, ang, size, label, hilum_sign):
        a, b, c = 27.0 * size, 16.0 * size, 44.0 * size
        v, d = ellipsoid(cx, cy, cz, a, b, c, ang, kx=-0.12 * hilum_sign, pad=10.0)
        if v is None:
            return
        d = d - 2.0 * v.wob[5]
        t = math.radians(ang + hilum_sign * 90.0)
        sinus = _ellipsoid_dist(v, cx + 0.5 * b * math.cos(t), cy + 0.5 * b * math.sin(t), cz,
                                0.45 * a, 0.4 * b, 0.6 * c, ang, -0.12 * hilum_sign)
        kid = v.cavity & (d < 0)
        v.shade(v.cavity & (d < 4.0) & ~kid & (v.lab == 0), _HU_FAT + 5.0 * v.medium[0])  # perirenal fat
        hu = torch.where(d < -4.5 * size, _HU_KIDNEY_MEDULLA + 8.0 * v.medium[1], _HU_KIDNEY_CORTEX + 6.0 * v.fine[1])
        hu = torch.where(sinus < 0, -60.0 + 20.0 * v.medium[0], hu)
        hu = torch.where(sinus < -3.0, 20.0 + 0.0 * hu, hu)  # renal pelvis
        v.paint(kid, hu, label)

    kidney(-62.0 + N(_ORGAN_SD), 44.0 + N(_ORGAN_SD), (-0.4 + N(0.08)) * L, 55.0 + N(8), U(0.85, 1.1), 0, -1.0)
    kidney(62.0 + N(_ORGAN_SD), 40.0 + N(_ORGAN_SD), (-0.22 + N(0.08)) * L, -55.0 + N(8), U(0.85, 1.1), _LKIDNEY, 1.0)

    # ---- esophagus (cranial) into the stomach (J-shaped tube: fundus, body, antrum) ------
    ax_c, ay_c, r_ao = 8.0 + N(2.5), 18.0 + N(2.5), 9.0 + N(0.8)
    eso = [(ax_c + 14.0 + N(2), ay_c - 10.0 + N(2), 1.5 * L), (ax_c + 16.0, ay_c - 14.0, 0.85 * L),
           (28.0 + N(3), -20.0 + N(3), 0.5 * L)]
    v, d = tube(eso, U(6.0, 7.5))
    if v is not None:
        v.paint(d < 0, _HU_MUSCLE + 5.0 + 6.0 * v.fine[1], _ESOPHAGUS)
    ss_ = U(0.8, 1.15)
    sshift = np.array([N(_ORGAN_SD), N(_ORGAN_SD), N(4.0)])
    stomach = np.array([(58, -4, 0.92 * L), (58, -24, 0.62 * L), (56, -42, 0.3 * L), (34, -56, 0.08 * L),
                        (2, -52, 0.05 * L), (-12, -36, 0.12 * L)]) + sshift
    v, d = tube(stomach, np.array([22.0, 25.0, 22.0, 16.0, 11.0, 8.0]) * ss_, pad=8.0)
    if v is not None:
        d = d - 3.0 * v.wob[6]
        outer = v.cavity & (d < 0)
        kind = pick(("fluid", "food", "collapsed", "contrast"), [0.45, 0.3, 0.15, 0.1])
        wall = U(3.5, 5.5) + 1.5 * v.fine[0].clamp(-1, 1) + (6.0 if kind == "collapsed" else 0.0)
        v.paint(outer, _HU_BOWEL_WALL + 20.0 + 8.0 * v.fine[1], _STOMACH)
        if kind == "food":
            content = 25.0 + 30.0 * v.medium[1] + 20.0 * v.fine[1]
        elif kind == "contrast":
            content = _HU_ORAL_CONTRAST * U(0.6, 1.0) + 20.0 * v.fine[1]
        elif kind == "collapsed":
            content = 20.0 + 10.0 * v.fine[1]
        else:
            content = _HU_FLUID + 5.0 + 5.0 * v.fine[1]
        content = torch.where(v.Y < -50.0 + sshift[1] + U(-8, 8), _HU_AIR + 0.0 * content, content)
        v.paint(outer & (d < -wall), content, _STOMACH)

    # ---- duodenum (C-loop: descending part vertical, around the pancreatic head) --------
    pshift = np.array([N(_ORGAN_SD), N(_ORGAN_SD), N(4.0)])
    duo = np.array([(-12, -36, 0.12 * L), (-40, -26, 0.08 * L), (-54, 0, -0.12 * L), (-52, 10, -0.45 * L),
                    (-30, 30, -0.62 * L), (0, 30, -0.62 * L), (24, 20, -0.45 * L), (30, 8, -0.28 * L)])
    duo = duo + 0.7 * pshift + np.clip(rng.normal(0, 2.5, duo.shape), -5.0, 5.0)
    duo_w = 8.5 * U(0.85, 1.2)
    v, d = tube(duo, duo_w)
    if v is not None:
        d = d - 1.5 * v.wob[7]
        outer = v.cavity & (d < 0)
        v.paint(outer, _HU_BOWEL_WALL + 8.0 + 8.0 * v.fine[1], _DUODENUM)
        if rng.random() < 0.55:
            v.paint(outer & (d < -0.45 * duo_w), 12.0 + 6.0 * v.fine[1], _DUODENUM)

    # ---- pancreas: head in the C-loop (uncinate process caudal), tail up to the spleen ---
    pan = np.array([(-34, 8, -0.38 * L), (-28, -4, -0.2 * L), (-8, -16, -0.08 * L), (18, -18, 0.0),
                    (42, -12, 0.1 * L), (64, 0, 0.22 * L)]) + pshift + np.clip(rng.normal(0, 2.5, (6, 3)), -5, 5)
    v, d = tube(pan, np.array([14.0, 12.0, 8.5, 9.5, 9.0, 7.5]) * U(0.85, 1.15))
    if v is not None:
        d = d - 1.8 * v.medium[1] - 1.5 * v.wob[8]
        pan_hu = _HU_PANCREAS + N(5.0) + 8.0 * v.fine[0] + 4.0 * v.medium[0]
        pan_hu = torch.where(v.medium[0] > 1.3, -30.0 + 25.0 * v.fine[0], pan_hu)  # fatty clefts
        v.paint(v.cavity & (d < 0) & (v.lab != _DUODENUM), pan_hu, _PANCREAS)

    # ---- gallbladder (bile, at the liver's inferior-medial edge) ------------------------
    if rng.random() < 0.85:
        gs = U(0.75, 1.2)
        v, d = ellipsoid(-52.0 + N(_ORGAN_SD), -34.0 + N(_ORGAN_SD), (0.05 + N(0.1)) * L, 17.0 * gs, 11.0 * gs,
                         26.0 * gs, 60.0 + N(20), ky=-0.3)
        if v is not None:
            gb = v.cavity & (d - 1.5 * v.wob[9] < 0)
            v.paint(gb, 55.0 + 5.0 * v.fine[0], _GALLBLADDER)
            v.paint(gb & (d < -1.5), _HU_BILE + 4.0 * v.fine[1], _GALLBLADDER)

    # ---- vessels (unlabelled): splenic and portal vein, SMV, SMA, left renal vein, aorta, IVC
    portal_hu = _HU_PORTAL + N(8.0)
    veins = [[(-8, -3, -1.3 * L), (-8, -3, -0.3 * L), (-10, -4, 0.0), (-40 + pshift[0], -6, 0.2 * L)],  # SMV, portal
             [(-8, -4, -0.05 * L), (16, -6, 0.0), (40, -2, 0.1 * L), (62, 8, 0.2 * L), (80, 14, 0.3 * L)]]  # splenic
    for pts in veins:
        v, d = tube(np.array(pts) + pshift * [1.0, 1.0, 0.0], U(3.3, 5.0))
        if v is not None:
            v.paint(v.cavity & (d < 0), portal_hu + 5.0 * v.fine[1])
    v, d = tube([(ax_c, ay_c, 0.05 * L), (ax_c + N(1.5), ay_c - 16.0, -0.1 * L), (ax_c + N(1.5), ay_c - 20.0, -1.3 * L)],
                   3.5, pad=8.0)  # SMA in its fat collar
    if v is not None:
        v.paint(v.cavity & (d < 4.0) & (v.lab == 0), _HU_FAT + 5.0 * v.medium[0])
        v.paint(v.cavity & (d < 0), _HU_AORTA - 10.0 + 5.0 * v.fine[1])
    v, d = tube([(58, 34, -0.22 * L), (28, 8, -0.15 * L), (8, 4, -0.15 * L), (-22, 10, -0.18 * L)], 2.8)
    if v is not None:
        v.paint(v.cavity & (d < 0) & (v.lab == 0), _HU_IVC + 5.0 * v.fine[1])
    aorta = [(ax_c - 3.0, ay_c + 2.0, 1.5 * L), (ax_c, ay_c, 0.0), (ax_c + 3.0 + N(2), ay_c - 2.0, -1.5 * L)]
    v, d = tube(aorta, r_ao + 1.5, pad=2.0)
    if v is not None:
        v.paint(d < 0, _HU_MUSCLE + 10.0)  # wall, crura
        v.paint(d < -1.5, _HU_AORTA + N(12.0) + 5.0 * v.fine[1])
    ivc_x, ivc_y = -24.0 + N(2.5), 14.0 + N(2.5)
    v, d = ellipsoid(ivc_x, ivc_y, 0.0, 12.0 * U(0.8, 1.15), 8.0 * U(0.6, 1.1), 3.0 * L, N(10), kx=-0.05)
    if v is not None:
        v.paint(d < 0, _HU_IVC + N(12.0) + 5.0 * v.fine[1])

    # ---- psoas, back muscles, spine (vertebrae and discs), ribs: painted last ----------
    for sgn in (-1.0, 1.0):
        v = scene.view((sgn * 28.0 - 30, sgn * 28.0 + 30, 14.0, 74.0, -1.5 * L, 1.5 * L))
        if v is not None:
            grow = (0.8 - 0.3 * v.Z / L).clamp(0.2, 1.2)
            d = _ellipsoid_dist(v, sgn * 28.0, 44.0, 0.0, 12.0 * grow, 9.0 * grow, 1e6, sgn * 65.0)
            v.paint((d < 0) & (v.Z < 0.6 * L), _HU_MUSCLE + 5.0 * v.medium[0])
        v, d = ellipsoid(sgn * 29.0 + N(1.5), 78.0 + N(1.5), 0.0, 24.0, 14.0, 1e6, sgn * 8.0, pad=8.0)
        if v is not None:
            musc = torch.where(v.medium[1] > 1.6, _HU_FAT + 20.0 * v.medium[0], _HU_MUSCLE + 5.0 * v.medium[0])
            v.paint(d - 1.5 * v.wob[1] < 0, musc)
    vbx, vby = N(1.5), 42.0 + N(1.5)
    v = scene.view((vbx - 35, vbx + 35, vby - 20, vby + 52, -1.5 * L, 1.5 * L))
    if v is not None:
        period, phase = 36.0 + N(1.5), U(0.0, 1.0)
        disc = torch.remainder(v.Z / period + phase, 1.0) < 0.22  # intervertebral discs
        d_vb = _ellipsoid_dist(v, vbx, vby, 0.0, 19.0 + N(1.0), 15.0 + N(1.0), 1e6, power=2.2)
        bone = torch.where(d_vb < -2.5, _HU_BONE_MARROW + 50.0 * v.fine[0], _HU_BONE_CORTEX + 50.0 * v.fine[0])
        v.paint(d_vb < 0, torch.where(disc, 85.0 + 5.0 * v.fine[1], bone))
        d_canal = torch.sqrt((v.X - vbx) ** 2 + (v.Y - vby - 24.0) ** 2)
        arch = (d_canal < 12.5) & ((v.Y > vby + 16.0) | ((v.X - vbx).abs() > 6.0)) & (v.Y > vby + 8.0)
        spinous = (_ellipsoid_dist(v, vbx, vby + 37.0, 0.0, 8.0, 4.0, 1e6, 90.0) < 0) & ~disc
        v.paint(arch | spinous, _HU_BONE_CORTEX - 150.0 + 60.0 * v.fine[0])
        v.paint(d_canal < 8.0, 25.0 + 4.0 * v.fine[1])
    for sgn in (-1.0, 1.0):  # ribs: arcs around the cavity, sloping down anteriorly, cranial half
        for k in range(int(rng.integers(3, 5))):
            z0 = (0.0 + 0.32 * k + N(0.04)) * L
            arc = [(cav_cx + sgn * (cav_a0 + 4.0) * math.cos(phi),
                    cav_cy + (cav_post if phi > 0 else cav_ant) * 1.05 * math.sin(phi),
                    z0 - 15.0 * (1.0 - math.sin(phi))) for phi in np.radians(np.linspace(75, -35, 7))]
            v, d = tube(arc, 3.5, pad=2.0)
            if v is not None:
                v.paint(d < 0, 550.0 + 40.0 * v.fine[0])
                v.paint(d < -1.3, 200.0 + 30.0 * v.fine[1])

    # ---- down to the output grid: mean HU (partial volume), majority label; scanner ----
    hu, lab = scene.hu, scene.lab
    if ss > 1:
        hu = F.avg_pool3d(hu[None, None], ss)[0, 0]
        votes = F.avg_pool3d(F.one_hot(lab.long(), NUM_LABELS).permute(3, 0, 1, 2)[None].to(_F64), ss)[0]
        lab = votes.argmax(0).to(torch.uint8)
    hu = _gaussian_blur3d(hu[None], 0.4)[0]
    noise = _gaussian_blur3d(torch.from_numpy(rng_tex.standard_normal((1, depth, height, width))), 0.6)[0]
    hu = hu + U(5.0, 8.0) * noise / noise.std().clamp_min(1e-12)
    return hu, lab


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
    """
    n = _check_int("num_volumes", num_volumes, 1)
    seed = _check_int("seed", seed, 0)
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise ValueError(f"shape must be a (height, width) pair, got {shape!r}")
    height = _check_int("shape[0] (height)", shape[0], 16)
    width = _check_int("shape[1] (width)", shape[1], 16)
    depth = _check_int("depth", depth, 4)
    supersample = _check_int("supersample", supersample, 1)
    volumes = torch.empty((n, depth, height, width), dtype=torch.uint8)
    labels = torch.empty((n, depth, height, width), dtype=torch.uint8)
    lo, hi = WINDOW_HU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(n):
            hu, lab = _render_volume(seed, i, depth, height, width, supersample)
            volumes[i] = ((hu - lo) / (hi - lo) * 255.0).clamp(0.0, 255.0).round().to(torch.uint8)
            labels[i] = lab
    finally:
        torch.set_num_threads(threads)
    return volumes, labels
