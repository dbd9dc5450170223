"""The 2D renderer: one axial CT slice [H, W] of one synthetic patient, at a random level.

Each slice is another patient, drawn from three random streams seeded by ``(seed, index)``:
the anatomy (independent of the image size), the misalignment and the pixel textures and
noise. A slice level ``level`` in [-1, 1] (+1 cranial: more liver, stomach and spleen; -1
caudal: kidneys, no spleen) decides which organs are cut and how large they are. The anatomy
is designed on the 256 x 320 reference grid (radiological display: anterior at the top, the
patient's left on the image's right) and scaled isotropically to the requested size.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import anatomy
from .anatomy import ORGAN_SD, BodyPlan
from .geometry import F64, REFERENCE_SHAPE, Canvas, catmull_rom, resample, superellipse_distance
from .texture import Draws, control_point_field_2d, gaussian_blur2d, noise_2d


def render_slice(seed: int, index: int, misalignment: float, height: int,
                 width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HU image [H, W] float64 and labels [H, W] uint8 of patient ``index`` of set ``seed``."""
    scale = min(height / REFERENCE_SHAPE[0], width / REFERENCE_SHAPE[1])  # pixels per reference px
    draw = Draws(np.random.default_rng([seed, index, 0]))
    rng_misalignment = np.random.default_rng([seed, index, 1])
    rng_texture = np.random.default_rng([seed, index, 2])
    # pixel centres in reference px from the image centre
    cols = (torch.arange(width, dtype=F64) + 0.5 - width / 2) / scale
    rows = (torch.arange(height, dtype=F64) + 0.5 - height / 2) / scale
    Yi, Xi = torch.meshgrid(rows, cols, indexing="ij")
    Xa, Ya = _misaligned(Draws(rng_misalignment), misalignment, Xi, Yi)
    canvas, pose_y, size_y = _patient(draw, rng_texture, Xi, Yi, Xa, Ya, scale)
    level = draw.uniform(-1.0, 1.0)  # +1 cranial, -1 caudal
    plan = _body(canvas, draw, Xa, Ya, pose_y, size_y)
    _bowel_loops(canvas, draw, level)
    if level > -0.85:
        _spleen(canvas, draw, level)
    _liver(canvas, draw, level)
    _kidneys(canvas, draw, level)
    if level > -0.9:
        _stomach(canvas, draw, level)
    pancreas_shift = _pancreas_and_duodenum(canvas, draw, level)
    _gallbladder(canvas, draw)
    aorta_x, aorta_y = _vessels(canvas, draw, level, pancreas_shift)
    if level > 0.0:
        _esophagus(canvas, draw, aorta_x, aorta_y)
    _back(canvas, draw, level, plan)
    # the scanner: partial volume (its point spread blurs every edge a little), drift and noise
    hu = gaussian_blur2d(canvas.hu[None], 0.65 * scale)[0]
    hu = hu + 6.0 * canvas.fields["bias"] + draw.uniform(10.0, 15.0) * canvas.fields["ct"]
    hu = _patient_contrast(hu, np.random.default_rng([seed, index, 3]), scale)
    return hu, canvas.lab


def _patient_contrast(hu: torch.Tensor, rng: np.random.Generator, scale: float) -> torch.Tensor:
    """What makes two patients' soft tissue look different beyond its shape (HU [H, W] in and out):

    * the contrast agent's dose and timing: every soft-tissue value above water is stretched
      by a patient's own gain (+-30 %) and shifted by an offset (sd 20 HU), so that the same
      organ has another grey value in another patient, as in real portal venous CT;
    * a mottled texture of the parenchyma (10 HU, blobs of about 2.5 reference px) that, unlike
      the organ's shape, does not correspond between patients;
    * the scanner's noise level, which differs between patients (dose, body size).

    Fat, air and the fat-organ borders keep their values, so each organ is still told apart by
    its edges, its texture and its place; a single 4 x 4 patch, though, no longer identifies its
    match in another patient, which is what regularisation is for (notebook 03). Drawn from the
    slice's own stream ``(seed, index, 3)``: the anatomy is unchanged.
    """
    h, w = hu.shape
    soft = ((hu + 30.0) / 40.0).clamp(0.0, 1.0)  # 0 in fat (-30 HU and below), 1 from +10 HU
    gain = 1.0 + rng.uniform(-0.3, 0.3)
    offset = 20.0 * float(np.clip(rng.normal(), -2.0, 2.0))
    hu = hu + soft * ((gain - 1.0) * (hu - 20.0).clamp(-50.0, 250.0) + offset)
    hu = hu + soft * 10.0 * noise_2d(rng, 1, h, w, 2.5 * scale)[0]
    return hu + rng.uniform(0.0, 10.0) * noise_2d(rng, 1, h, w, 0.7 * scale)[0]


def _misaligned(draw: Draws, misalignment: float, Xi: torch.Tensor,
                Yi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates (Xa, Ya) [H, W] in the patient's aligned frame of the image pixels (Xi, Yi):
    ``misalignment`` m scales an extra whole-body affine transform (not pre-aligned data)."""
    m = misalignment
    angle = math.radians(m * draw.sign() * draw.uniform(6, 12))
    zoom = 1.0 + m * draw.uniform(-0.10, 0.10)
    aniso = 1.0 + m * draw.uniform(-0.04, 0.04)
    shear = m * draw.uniform(-0.04, 0.04)
    t_len = m * draw.uniform(20, 40)
    t_dir = draw.uniform(0, 2 * math.pi)
    tx, ty = t_len * math.cos(t_dir), 0.6 * t_len * math.sin(t_dir)  # keep the body in view
    # image = R(angle) @ [[zoom*aniso, shear], [0, zoom/aniso]] @ anatomy + t
    ca, sa = math.cos(angle), math.sin(angle)
    ur = ca * (Xi - tx) + sa * (Yi - ty)
    vr = -sa * (Xi - tx) + ca * (Yi - ty)
    Ya = vr / (zoom / aniso)
    Xa = (ur - shear * Ya) / (zoom * aniso)
    return Xa, Ya


def _patient(draw: Draws, rng_texture: np.random.Generator, Xi: torch.Tensor, Yi: torch.Tensor, Xa: torch.Tensor,
             Ya: torch.Tensor, scale: float) -> tuple[Canvas, float, float]:
    """The canvas of one patient: canonical coordinates after the patient's own position, size and
    elastic deformation, and the texture fields; also the patient's y shift and size (for the table)."""
    pose_x, pose_y = draw.jitter(3.5), draw.jitter(3.5)
    size_x, size_y = draw.size_factor(), draw.size_factor()
    elastic = control_point_field_2d(draw.rng, (2, 5, 6), Xa, Ya)
    X = (Xa - pose_x) / size_x + anatomy.ELASTIC_PX * elastic[0]
    Y = (Ya - pose_y) / size_y + anatomy.ELASTIC_PX * elastic[1]
    h, w = X.shape
    fields = {
        "wobble": control_point_field_2d(draw.rng, (16, 11, 13), X, Y),  # boundary wobble, a channel per structure
        "fine": noise_2d(rng_texture, 2, h, w, 1.2 * scale),  # organ textures, in pixels
        "medium": noise_2d(rng_texture, 2, h, w, 3.0 * scale),
        "ct": noise_2d(rng_texture, 1, h, w, 0.7 * scale)[0],  # the scanner's noise
        "bias": control_point_field_2d(draw.rng, (1, 4, 5), Xi, Yi)[0],  # and intensity drift
    }
    return Canvas((X, Y), fields, scale, coarse=8, fill=anatomy.HU_AIR, tube_spacing=1.5), pose_y, size_y


def _body(canvas: Canvas, draw: Draws, Xa: torch.Tensor, Ya: torch.Tensor, pose_y: float, size_y: float) -> BodyPlan:
    """Table, skin, fat (with septa), muscle wall and the cavity (mesenteric fat with small vessels)."""
    plan = BodyPlan.sample(draw)
    full = canvas.view()
    d_cavity = superellipse_distance(full, (plan.cx, plan.cy), (plan.half_width, plan.anterior), 0.0, 2.3,
                                     plan.posterior) - 2.0 * full.wobble[0]
    rho = torch.sqrt((full.X - plan.cx) ** 2 + (full.Y - plan.cy) ** 2).clamp_min(1e-6)
    sin_phi = (full.Y - plan.cy) / rho
    front = (-sin_phi).clamp_min(0)
    front = front * front.sqrt()
    back = sin_phi.clamp_min(0)
    back = back * back.sqrt()
    fat, wall = anatomy.body_wall(plan, front, back, full.X - plan.cx, full.wobble[1], full.wobble[2])
    septa = 25.0 * (full.medium[1].abs() < 0.06)
    mesentery = anatomy.HU_FAT + 8.0 + 6.0 * full.medium[1]
    mesentery = torch.where(full.fine[1] > 2.4, torch.full_like(full.X, 120.0), mesentery)
    canvas.fields["body"], canvas.fields["cavity"] = anatomy.body(
        full, d_cavity, fat, wall, anatomy.table(Xa, Ya, pose_y, size_y, plan), table_hu=250.0 + 30.0 * full.fine[0],
        fat_hu=anatomy.HU_FAT + 6.0 * full.medium[0] + septa, mesentery_hu=mesentery)
    return plan


def _bowel_loops(canvas: Canvas, draw: Draws, level: float) -> None:
    """Unlabelled loops of small bowel and the colon: intensities like the gut organs."""
    kinds = ("fluid", "collapsed", "air", "feces", "contrast")
    for k in range(draw.integer(6, 11)):
        r = draw.uniform(7.0, 13.0)
        centre = (draw.uniform(-40.0, 100.0), draw.uniform(-66.0, 20.0))
        _bowel_loop(canvas, draw, centre, (r * draw.uniform(1.0, 1.5), r), draw.uniform(0, 180),
                    draw.pick(kinds, [0.35, 0.3, 0.12, 0.15, 0.08]), 3 + k % 4)
    # colon: transverse (anterior) and, in caudal slices, descending (image right, lateral)
    _bowel_loop(canvas, draw, (draw.uniform(-40.0, 50.0), -60.0 + draw.jitter(4)),
                (draw.uniform(16, 24), draw.uniform(10, 13)), draw.jitter(10),
                draw.pick(("air", "feces"), [0.5, 0.5]), 7, 3.0)
    if level < 0.3:
        _bowel_loop(canvas, draw, (98.0 + draw.jitter(4), 28.0 + draw.jitter(5)),
                    (draw.uniform(11, 15), draw.uniform(9, 12)), draw.uniform(0, 180),
                    draw.pick(("air", "feces"), [0.4, 0.6]), 7, 3.0)


def _bowel_loop(canvas: Canvas, draw: Draws, centre: tuple[float, float], axes: tuple[float, float], angle: float,
                kind: str, wobble: int, wall: float = 2.5) -> None:
    """One bowel loop cut across: an ellipse; air (if any) fills its anterior part."""
    view, d = canvas.ellipse(centre, axes, angle)
    if view is None:
        return
    air_level = centre[1] + draw.uniform(-0.3, 0.5) * axes[1] if kind == "air" else None
    anatomy.bowel(view, d - 1.5 * view.wobble[wobble], wall, kind, draw, air_level)


def _spleen(canvas: Canvas, draw: Draws, level: float) -> None:
    """The spleen, image right, posterolateral; larger and more anterior cranially."""
    size = (1.0 + 0.2 * level) * draw.uniform(0.85, 1.15)
    cranial = max(level - 0.5, 0.0)  # above the kidney the spleen takes its place
    size = size * (1.0 + 0.25 * cranial)
    centre = (96.0 - 20.0 * cranial + draw.jitter(ORGAN_SD), 14.0 + 25.0 * cranial + draw.jitter(ORGAN_SD))
    anatomy.spleen(canvas, draw, centre, (40.0 * size, 19.0 * size), -67.0 + draw.jitter(8), wobble=8)


def _liver(canvas: Canvas, draw: Draws, level: float) -> None:
    """The liver (image left) with its left lobe cranially, and its vessels."""
    size = (1.0 + 0.12 * level) * draw.uniform(0.85, 1.15)
    cx, cy = -75.0 + draw.jitter(1.3 * ORGAN_SD), -14.0 + draw.jitter(1.3 * ORGAN_SD)
    full = canvas.view()
    d = superellipse_distance(full, (cx, cy), (52.0 * size, 70.0 * size), 15.0 + draw.jitter(8))
    lobe = 0.55 + 0.45 * level + draw.jitter(0.1)
    if lobe > 0.2:
        left = superellipse_distance(full, (-22.0 + draw.jitter(5), -52.0 + draw.jitter(4)),
                                     (44.0 * lobe, 15.0 * lobe), -12.0 + draw.jitter(6))
        d = torch.minimum(d, left)
    vessel_hu = anatomy.liver(full, d, wobble=9, draw=draw)
    hilum = (cx + 36.0 + draw.jitter(4), cy + 10.0 + draw.jitter(4))  # porta hepatis
    _portal_tree(canvas, draw, hilum, size, vessel_hu)
    crop = canvas.view((cx - 70, cx + 70, cy - 80, cy + 80))
    cut = torch.zeros_like(crop.X, dtype=torch.bool)
    for _ in range(draw.integer(4, 10)):  # vessels cut across
        vx, vy = cx + draw.uniform(-45, 35) * size, cy + draw.uniform(-55, 55) * size
        cut |= (crop.X - vx) ** 2 + (crop.Y - vy) ** 2 < draw.uniform(1.3, 2.8) ** 2
    anatomy.liver_vessel(crop, cut, vessel_hu)


def _portal_tree(canvas: Canvas, draw: Draws, hilum: tuple[float, float], size: float, vessel_hu: float) -> None:
    """Portal vein branches in the slice's plane: curved, tapering, dividing up to twice."""
    branches = [(hilum, math.radians(base), draw.uniform(30, 55) * size, 3.0, 0)
                for base in (draw.uniform(160, 200), draw.uniform(115, 150), draw.uniform(-150, -115),
                             draw.uniform(-105, -70))]
    while branches:
        (bx, by), heading, length, r0, depth = branches.pop()
        pts, (px, py) = [(bx, by)], (bx, by)
        for _ in range(3):
            heading += math.radians(draw.jitter(18))
            px, py = px + length / 3 * math.cos(heading), py + length / 3 * math.sin(heading)
            pts.append((px, py))
        view, d, _ = canvas.tube(pts, [r0, 0.55 * r0], pad=2.0, spacing=2.0)
        if view is not None:
            anatomy.liver_vessel(view, d < 0, vessel_hu)
        if depth < 1 or (depth < 2 and draw.chance(0.5)):
            for _ in range(draw.integer(1, 3)):
                f = draw.integer(1, 4)
                side = draw.sign()
                branches.append((pts[f], heading + side * math.radians(draw.uniform(25, 55)),
                                 0.6 * length, max(0.65 * r0 * (1.0 - f / 6.0), 1.0), depth + 1))


def _kidneys(canvas: Canvas, draw: Draws, level: float) -> None:
    """Adrenal glands, and the kidneys: the left one labelled, the right one (lower) unlabelled."""
    for side in (-1.0, 1.0):  # adrenal glands: thin soft-tissue limbs near the crura
        points = np.array([(30, 6), (38, 22), (47, 30)], dtype=np.float64) * [side, 1.0] + draw.rng.normal(0, 2.0, 2)
        view, d, _ = canvas.tube(points, 1.8, pad=2.0)
        if view is not None and level > -0.4:
            view.paint(view.cavity & (d < 0) & (view.lab == 0), 60.0 + 5.0 * view.fine[1])
    grow = 1.0 - 0.3 * level
    if level < 0.95:
        _kidney(canvas, (-62.0 + draw.jitter(ORGAN_SD), 44.0 + draw.jitter(ORGAN_SD)), 55.0 + draw.jitter(8),
                grow * draw.uniform(0.85, 1.1), 0, 10, -1.0)
    if level < 0.85:
        _kidney(canvas, (62.0 + draw.jitter(ORGAN_SD), 40.0 + draw.jitter(ORGAN_SD)), -55.0 + draw.jitter(8),
                grow * draw.uniform(0.85, 1.1), anatomy.LEFT_KIDNEY, 11, 1.0)


def _kidney(canvas: Canvas, centre: tuple[float, float], angle: float, size: float, label: int, wobble: int,
            hilum_side: float) -> None:
    """One kidney cut across: an ellipse with the hilum notched in on its medial side."""
    cx, cy = centre
    a, b = 28.0 * size, 16.0 * size
    view, d = canvas.ellipse(centre, (a, b), angle, pad=10.0)
    if view is None:
        return
    t = math.radians(angle + hilum_side * 90.0)
    notch = superellipse_distance(view, (cx + b * math.cos(t), cy + b * math.sin(t)), (0.3 * a, 0.35 * b), angle)
    sinus = superellipse_distance(view, (cx + 0.45 * b * math.cos(t), cy + 0.45 * b * math.sin(t)),
                                  (0.4 * a, 0.32 * b), angle)
    anatomy.kidney(view, d, sinus, size, label, wobble, notch)


def _stomach(canvas: Canvas, draw: Draws, level: float) -> None:
    """The stomach, image right, anterior; larger cranially."""
    size = (1.0 + 0.2 * level) * draw.uniform(0.8, 1.15)
    cx, cy, b = 50.0 + draw.jitter(ORGAN_SD), -46.0 + draw.jitter(ORGAN_SD), 24.0 * size
    view, d = canvas.ellipse((cx, cy), (42.0 * size, b), -15.0 + draw.jitter(10), pad=10.0)
    if view is not None:
        anatomy.stomach(view, d - 4.0 * view.wobble[12], draw, lambda: cy - b * draw.uniform(-0.1, 0.5),
                        food_bubbles=True, folds=True)


def _pancreas_and_duodenum(canvas: Canvas, draw: Draws, level: float) -> np.ndarray:
    """The pancreas along a spline (head, body, tail: cranially no head, caudally no tail) and the
    duodenum's C-loop around its head, painted first; returns their common shift (x, y)."""
    shift = np.array([draw.jitter(ORGAN_SD), draw.jitter(ORGAN_SD)])
    points = np.array([(-32, 4), (-24, -8), (-6, -16), (18, -18), (42, -12), (62, -2)], dtype=np.float64)
    points = points + shift + np.clip(draw.rng.normal(0, 2.5, points.shape), -5.0, 5.0)
    widths = np.array([13.0, 11.0, 8.5, 9.5, 9.0, 7.5]) * draw.uniform(0.85, 1.15)
    t0 = float(np.clip(0.45 * (level - 0.3) + draw.jitter(0.05), 0.0, 0.35))  # cranial: no head
    t1 = float(np.clip(1.0 + 0.5 * (level + 0.3) + draw.jitter(0.05), 0.6, 1.0))  # caudal: no tail
    dense = resample(catmull_rom(points), 1.0)
    k0, k1 = int(round(t0 * (len(dense) - 1))), int(round(t1 * (len(dense) - 1)))
    curve = dense[k0 : k1 + 1 : 3]
    width = np.interp(np.linspace(t0, t1, 8), np.linspace(0, 1, len(widths)), widths)
    if level < 0.8:
        _duodenum(canvas, draw, level, shift)
    view, d, centre_line = canvas.tube(curve, width)
    if view is not None:
        clefts = (view.medium[0] > 1.2) | (view.fine[1] < -1.8)
        anatomy.pancreas(view, d, 14, draw, clefts, centre_line)
    return shift


def _duodenum(canvas: Canvas, draw: Draws, level: float, shift: np.ndarray) -> None:
    """The part of the duodenal C-loop that the slice cuts (lower slices: lower parts)."""
    points = np.array([(-12, -30), (-40, -24), (-54, 0), (-46, 26), (-24, 34)], dtype=np.float64)
    points = points + 0.7 * shift + np.clip(draw.rng.normal(0, 2.5, points.shape), -5.0, 5.0)
    dense = resample(catmull_rom(points), 1.0)
    middle = float(np.clip(0.5 - 0.15 * level + draw.jitter(0.06), 0.3, 0.7))
    half = draw.uniform(0.22, 0.34)
    j0 = int(round(max(middle - half, 0.0) * (len(dense) - 1)))
    j1 = int(round(min(middle + half, 1.0) * (len(dense) - 1)))
    width = 8.5 * draw.uniform(0.85, 1.2)
    view, d, _ = canvas.tube(dense[j0 : j1 + 1 : 3], width)
    if view is not None:
        d = d - 1.5 * view.wobble[13]
        anatomy.duodenum(view, d, width, draw.pick(("fluid", "collapsed", "air"), [0.4, 0.45, 0.15]), bubbles=True)


def _gallbladder(canvas: Canvas, draw: Draws) -> None:
    """The gallbladder (in 60 % of the slices), at the liver's inferior-medial edge."""
    if draw.chance(0.6):
        size = draw.uniform(0.7, 1.2)
        centre = (-52.0 + draw.jitter(ORGAN_SD), -34.0 + draw.jitter(ORGAN_SD))
        view, d = canvas.ellipse(centre, (17.0 * size, 11.0 * size), 60.0 + draw.jitter(20))
        if view is not None:
            d = d - 1.5 * view.wobble[15]
            anatomy.gallbladder(view, d, d)


def _vessels(canvas: Canvas, draw: Draws, level: float, shift: np.ndarray) -> tuple[float, float]:
    """Splenic vein, SMV, SMA, left renal vein, aorta, IVC (unlabelled); returns the aorta's (x, y)."""
    portal_hu = anatomy.HU_PORTAL + draw.jitter(8.0)
    points = np.array([(-8, -4), (16, -6), (40, -2), (60, 8), (80, 14)], dtype=np.float64)
    points = points + shift + draw.rng.normal(0, 2.0, points.shape)
    dense = resample(catmull_rom(points), 1.0)  # the splenic vein, longer in cranial slices
    end = max(2, int(round((0.6 + 0.4 * max(level, -0.5)) * (len(dense) - 1))) + 1)
    view, d, _ = canvas.tube(dense[:end:3], 3.3)
    if view is not None:
        anatomy.portal_vein(view, d, portal_hu)
    view, d = canvas.ellipse((-8.0 + shift[0], -3.0 + shift[1]), (draw.uniform(5.0, 6.5), draw.uniform(4.5, 6.0)))
    if view is not None:  # SMV / confluence
        anatomy.portal_vein(view, d, portal_hu)
    ax, ay, radius = anatomy.aorta_centre(draw)
    view, d = canvas.ellipse((ax + draw.jitter(1.5), ay - 18.0 + draw.jitter(1.5)), (3.5, 3.5), pad=8.0)
    if view is not None:
        anatomy.artery_in_fat(view, d)
    if -0.6 < level < 0.4:  # left renal vein, between SMA and aorta, into the IVC
        points = np.array([(50, 34), (28, 8), (8, 4), (-22, 10)], dtype=np.float64) + draw.rng.normal(0, 1.5, 2)
        view, d, _ = canvas.tube(points, 2.8)
        if view is not None:
            anatomy.renal_vein(view, d)
    view, d = canvas.ellipse((ax, ay), (radius, radius))
    if view is not None:
        anatomy.aorta(view, d < 1.5, d < 0, draw)
        if draw.chance(0.35):  # wall calcification
            phi = draw.uniform(0, 2 * math.pi)
            calc = (view.X - ax - radius * math.cos(phi)) ** 2 + (view.Y - ay - radius * math.sin(phi)) ** 2 < 4.0
            view.paint(calc, 600.0)
    anatomy.vena_cava(canvas, draw)
    return ax, ay


def _esophagus(canvas: Canvas, draw: Draws, aorta_x: float, aorta_y: float) -> None:
    """The esophagus (cranial slices): small, left-anterior of the aorta, sometimes with air."""
    centre = (aorta_x + 18.0 + draw.jitter(2.5), aorta_y - 10.0 + draw.jitter(2.5))
    view, d = canvas.ellipse(centre, (draw.uniform(5.5, 7.5), draw.uniform(5.0, 7.0)), draw.uniform(0, 180))
    if view is not None:
        d = d - 0.8 * view.wobble[4]
        anatomy.esophagus(view, d)
        if draw.chance(0.5):
            view.paint(d < -4.0, anatomy.HU_AIR, anatomy.ESOPHAGUS)


def _back(canvas: Canvas, draw: Draws, level: float, plan: BodyPlan) -> None:
    """Psoas and back muscles, the vertebra, ribs and costal cartilage (unlabelled, painted last)."""
    psoas = 0.8 - 0.3 * level
    for side in (-1.0, 1.0):
        centre = (side * 28.0 + draw.jitter(1.5), 44.0 + draw.jitter(1.5))
        view, d = canvas.ellipse(centre, (12.0 * psoas, 9.0 * psoas), side * 65.0)
        if view is not None:
            anatomy.muscle(view, d < 0)
        anatomy.back_muscle(canvas, draw, side, wobble=5, within_body=True)
    centre = anatomy.spine_centre(draw)
    x, y = centre
    view = canvas.view((x - 35, x + 35, y - 20, y + 52))
    if view is not None:
        d_body = anatomy.vertebral_body(view, centre, draw)
        view.paint(d_body < 0, anatomy.HU_BONE_CORTEX + 50.0 * view.fine[0])
        view.paint(d_body < -2.5, anatomy.HU_BONE_MARROW + 50.0 * view.fine[0] + 20.0 * view.medium[1])
        d_canal, ring, spinous = anatomy.vertebral_arch(view, centre)
        transverse = (superellipse_distance(view, (x - 19.0, y + 21.0), (9.0, 3.5), 15.0) < 0) | (
            superellipse_distance(view, (x + 19.0, y + 21.0), (9.0, 3.5), -15.0) < 0)
        anatomy.paint_arch_and_canal(view, view.body & (ring | spinous | transverse), d_canal)
    for side in (-1.0, 1.0):  # ribs (posterolateral) and costal cartilage (anterolateral)
        for phi_deg in draw.rng.uniform(10, 70, size=draw.integer(1, 4)).tolist() + [-draw.uniform(20, 45)]:
            phi = math.radians(phi_deg)
            cx = plan.cx + side * (plan.half_width + 4.0) * math.cos(phi)
            cy = plan.cy + (plan.posterior if phi > 0 else plan.anterior) * math.sin(phi) * 1.05
            tangent = math.degrees(math.atan2(math.cos(phi), side * math.sin(phi)))
            view, d = canvas.ellipse((cx, cy), (draw.uniform(5.0, 8.0), 3.5), tangent)
            if view is not None:
                anatomy.rib(view, d, 550.0 if phi_deg > 0 else 150.0, within=view.body)
