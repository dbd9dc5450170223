"""The 3D renderer: one synthetic abdominal CT volume [Z, Y, X] of one patient (notebook 05).

A renderer of its own (the 2D one draws a random slice level per patient, so its slices
cannot be stacked into a volume), on the same anatomy: the same labels, tissues and organ
painting, with organs as 3D shapes (ellipsoids, tubes along 3D centre lines) whose
cross-sections change smoothly from slice to slice. The "level" z / 64 runs from -1 (caudal,
below the kidneys' lower poles) to +1 (cranial, the liver dome and the stomach's fundus).
The volume is rendered ``supersample`` times finer per axis, then averaged (partial volume)
and majority-voted (labels).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import anatomy
from .anatomy import ORGAN_SD, BodyPlan
from .geometry import F64, REFERENCE_SHAPE, Canvas, extrude, superellipse_distance
from .texture import Draws, control_point_field_3d, gaussian_blur3d, noise_3d

LEVEL_PX = 64.0
"""Reference px from the volume's centre to level +-1."""

L = LEVEL_PX  # short, for the many positions along z written as levels: 0.5 * L


def render_volume(seed: int, index: int, depth: int, height: int, width: int,
                  supersample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HU [Z, Y, X] float64 and labels [Z, Y, X] uint8 of patient ``index`` of set ``seed`` at the
    output resolution (rendered ``supersample`` times finer and averaged / majority-voted)."""
    scale = min(height / REFERENCE_SHAPE[0], width / REFERENCE_SHAPE[1])  # voxels per reference px
    draw = Draws(np.random.default_rng([seed, index, 3]))  # the anatomy
    rng_texture = np.random.default_rng([seed, index, 4])  # textures and noise
    canvas, Xa, Ya, pose_y, size_y = _patient(draw, rng_texture, (depth, height, width), supersample, scale)
    plan = _body(canvas, draw, Xa, Ya, pose_y, size_y)
    del Xa, Ya
    _bowel_loops(canvas, draw)
    _spleen(canvas, draw)
    _liver(canvas, draw)
    _kidney(canvas, (-62.0 + draw.jitter(ORGAN_SD), 44.0 + draw.jitter(ORGAN_SD), (-0.4 + draw.jitter(0.08)) * L),
            55.0 + draw.jitter(8), draw.uniform(0.85, 1.1), 0, -1.0)  # the right kidney lies lower
    _kidney(canvas, (62.0 + draw.jitter(ORGAN_SD), 40.0 + draw.jitter(ORGAN_SD), (-0.22 + draw.jitter(0.08)) * L),
            -55.0 + draw.jitter(8), draw.uniform(0.85, 1.1), anatomy.LEFT_KIDNEY, 1.0)
    aorta_x, aorta_y, aorta_radius = _esophagus_and_stomach(canvas, draw)
    pancreas_shift = _duodenum_and_pancreas(canvas, draw)
    _gallbladder(canvas, draw)
    _vessels(canvas, draw, pancreas_shift, aorta_x, aorta_y, aorta_radius)
    _back(canvas, draw, plan)
    return _scanner(canvas, draw, rng_texture, supersample)


def _patient(draw: Draws, rng_texture: np.random.Generator, shape: tuple[int, int, int], supersample: int,
             scale: float) -> tuple[Canvas, torch.Tensor, torch.Tensor, float, float]:
    """The canvas (``supersample`` times finer than ``shape``): canonical coordinates after the
    patient's own position, size and elastic deformation, and the texture fields; also the
    aligned coordinates Xa, Ya and the patient's y shift and size (for the table)."""
    fine_shape = tuple(n * supersample for n in shape)
    step = scale * supersample  # voxels per reference px
    axes = [(torch.arange(n, dtype=F64) + 0.5 - n / 2) / step for n in fine_shape]
    Za, Ya, Xa = torch.meshgrid(*axes, indexing="ij")
    pose_x, pose_y, pose_z = draw.jitter(3.5), draw.jitter(3.5), draw.jitter(6.0)
    size_x, size_y, size_z = (draw.size_factor() for _ in range(3))
    elastic = control_point_field_3d(draw.rng, 3, (4, 5, 6), fine_shape)
    X = (Xa - pose_x) / size_x + anatomy.ELASTIC_PX * elastic[0]
    Y = (Ya - pose_y) / size_y + anatomy.ELASTIC_PX * elastic[1]
    Z = (Za - pose_z) / size_z + anatomy.ELASTIC_PX * elastic[2]
    del elastic, Za
    fields = {
        "wobble": control_point_field_3d(draw.rng, 10, (7, 9, 11), fine_shape),  # a channel per structure
        "fine": noise_3d(rng_texture, shape, 0.6, fine_shape),  # organ textures
        "medium": noise_3d(rng_texture, shape, 1.5, fine_shape),
    }
    canvas = Canvas((X, Y, Z), fields, step, coarse=4, fill=anatomy.HU_AIR, tube_spacing=4.0)
    return canvas, Xa, Ya, pose_y, size_y


def _body(canvas: Canvas, draw: Draws, Xa: torch.Tensor, Ya: torch.Tensor, pose_y: float, size_y: float) -> BodyPlan:
    """Table, skin, fat, muscle wall and the cavity: elliptic cylinders, slightly wider cranially."""
    plan = BodyPlan.sample(draw)
    full = canvas.view()
    half_width = plan.half_width * (1.0 + 0.04 * (full.Z / LEVEL_PX))
    d_cavity = superellipse_distance(full, (plan.cx, plan.cy), (half_width, plan.anterior), 0.0, 2.3,
                                     plan.posterior) - 2.0 * full.wobble[0]
    del half_width
    dx, dy = full.X - plan.cx, full.Y - plan.cy
    sin_phi = dy / torch.sqrt(dx * dx + dy * dy).clamp_min(1e-6)
    front, back = (-sin_phi).clamp_min(0) ** 1.5, sin_phi.clamp_min(0) ** 1.5
    fat, wall = anatomy.body_wall(plan, front, back, dx, full.wobble[1])
    del dx, dy, sin_phi, front, back
    _, canvas.fields["cavity"] = anatomy.body(
        full, d_cavity, fat, wall, anatomy.table(Xa, Ya, pose_y, size_y, plan), table_hu=250.0,
        fat_hu=anatomy.HU_FAT + 6.0 * full.medium[0], mesentery_hu=anatomy.HU_FAT + 8.0 + 6.0 * full.medium[1])
    return plan


def _bowel_loops(canvas: Canvas, draw: Draws) -> None:
    """Unlabelled small bowel loops (short ellipsoids, caudal) and the colon's frame."""
    for k in range(draw.integer(10, 16)):
        r = draw.uniform(7.0, 13.0)
        cx, cy, cz = draw.uniform(-40.0, 100.0), draw.uniform(-66.0, 20.0), draw.uniform(-1.15, 0.3) * L
        view, d = canvas.ellipse((cx, cy, cz), (r * draw.uniform(1.0, 1.5), r, draw.uniform(10.0, 22.0)),
                                 draw.uniform(0, 180))
        if view is not None:
            kind = draw.pick(("fluid", "collapsed", "air", "feces"), [0.4, 0.35, 0.12, 0.13])
            air_level = cy + draw.uniform(-0.3, 0.5) * r
            anatomy.bowel(view, d - 1.5 * view.wobble[2 + k % 3], 2.5, kind, draw, air_level, bubbles=False)
    # colon: ascending (image left), transverse (anterior), descending (image right)
    colon_y, colon_z = -60.0 + draw.jitter(4), (-0.1 + draw.jitter(0.08)) * L
    colon = [(-95.0 + draw.jitter(4), 22.0 + draw.jitter(4), -1.3 * L), (-95.0 + draw.jitter(4), 10.0, colon_z - 10),
             (-60.0, colon_y, colon_z), (0.0, colon_y + draw.jitter(4), colon_z - 12.0 + draw.jitter(6)),
             (60.0, colon_y, colon_z + 10), (98.0 + draw.jitter(4), 15.0, colon_z + 22.0),
             (98.0 + draw.jitter(4), 28.0 + draw.jitter(4), -1.3 * L)]
    radius = draw.uniform(10.0, 13.0)
    view, d, _ = canvas.tube(colon, radius)
    if view is not None:
        kind = draw.pick(("air", "feces"), [0.5, 0.5])
        anatomy.bowel(view, d, 3.0, kind, draw, colon_y - 0.2 * radius, bubbles=False)


def _spleen(canvas: Canvas, draw: Draws) -> None:
    """The spleen: image right, posterolateral, cranial, tilted."""
    size = draw.uniform(0.85, 1.15)
    centre = (88.0 + draw.jitter(ORGAN_SD), 24.0 + draw.jitter(ORGAN_SD), (0.45 + draw.jitter(0.08)) * L)
    anatomy.spleen(canvas, draw, centre, (40.0 * size, 19.0 * size, 42.0 * size), -67.0 + draw.jitter(8),
                   wobble=3, tilt=(-0.25, 0.3))


def _liver(canvas: Canvas, draw: Draws) -> None:
    """The liver (image left, cranial) and its left lobe, portal veins from the hilum."""
    size = draw.uniform(0.85, 1.15)
    cx, cy = -75.0 + draw.jitter(1.3 * ORGAN_SD), -14.0 + draw.jitter(1.3 * ORGAN_SD)
    cz = (0.5 + draw.jitter(0.08)) * L
    view, d = canvas.ellipse((cx, cy, cz), (52.0 * size, 70.0 * size, 72.0 * size), 15.0 + draw.jitter(8),
                             tilt=(0.15, 0.0))
    lobe_centre = (-22.0 + draw.jitter(5), -52.0 + draw.jitter(4), (0.7 + draw.jitter(0.08)) * L)
    lobe = superellipse_distance(view, lobe_centre, (48.0 * size, 16.0 * size, 38.0 * size), -12.0 + draw.jitter(6))
    vessel_hu = anatomy.liver(view, torch.minimum(d, lobe), wobble=4, draw=draw)
    hilum = (cx + 36.0 + draw.jitter(4), cy + 10.0 + draw.jitter(4), (0.2 + draw.jitter(0.05)) * L)
    hx, hy, hz = hilum
    for _ in range(5):  # straight-ish branches towards every side
        az, el, length = draw.uniform(100, 260), draw.uniform(-30, 50), draw.uniform(40, 70) * size
        dx, dy = math.cos(math.radians(az)), math.sin(math.radians(az))
        end = (hx + length * dx * math.cos(math.radians(el)), hy + length * dy * math.cos(math.radians(el)),
               hz + length * math.sin(math.radians(el)))
        mid = tuple((p + e) / 2 + draw.jitter(6) for p, e in zip(hilum, end))
        view, d, _ = canvas.tube([hilum, mid, end], [4.0, 2.0], pad=2.0)
        if view is not None:
            anatomy.liver_vessel(view, d < 0, vessel_hu)


def _kidney(canvas: Canvas, centre: tuple[float, float, float], angle: float, size: float, label: int,
            hilum_side: float) -> None:
    """One kidney: a tilted ellipsoid with its renal sinus towards the hilum (``hilum_side``)."""
    cx, cy, cz = centre
    a, b, c = 27.0 * size, 16.0 * size, 44.0 * size
    tilt = (-0.12 * hilum_side, 0.0)
    view, d = canvas.ellipse(centre, (a, b, c), angle, pad=10.0, tilt=tilt)
    if view is None:
        return
    t = math.radians(angle + hilum_side * 90.0)
    sinus = superellipse_distance(view, (cx + 0.5 * b * math.cos(t), cy + 0.5 * b * math.sin(t), cz),
                                  (0.45 * a, 0.4 * b, 0.6 * c), angle, tilt=tilt)
    anatomy.kidney(view, d, sinus, size, label, wobble=5)


def _esophagus_and_stomach(canvas: Canvas, draw: Draws) -> tuple[float, float, float]:
    """The esophagus (cranial) into the J-shaped stomach (fundus, body, antrum); returns the
    aorta's x, y and radius (drawn here, the esophagus lies in front of it)."""
    ax, ay, radius = anatomy.aorta_centre(draw)
    points = [(ax + 14.0 + draw.jitter(2), ay - 10.0 + draw.jitter(2), 1.5 * L), (ax + 16.0, ay - 14.0, 0.85 * L),
              (28.0 + draw.jitter(3), -20.0 + draw.jitter(3), 0.5 * L)]
    view, d, _ = canvas.tube(points, draw.uniform(6.0, 7.5))
    if view is not None:
        anatomy.esophagus(view, d)
    size = draw.uniform(0.8, 1.15)
    shift = np.array([draw.jitter(ORGAN_SD), draw.jitter(ORGAN_SD), draw.jitter(4.0)])
    points = np.array([(58, -4, 0.92 * L), (58, -24, 0.62 * L), (56, -42, 0.3 * L), (34, -56, 0.08 * L),
                       (2, -52, 0.05 * L), (-12, -36, 0.12 * L)]) + shift
    view, d, _ = canvas.tube(points, np.array([22.0, 25.0, 22.0, 16.0, 11.0, 8.0]) * size, pad=8.0)
    if view is not None:
        anatomy.stomach(view, d - 3.0 * view.wobble[6], draw, lambda: -50.0 + shift[1] + draw.uniform(-8, 8),
                        food_bubbles=False, folds=False)
    return ax, ay, radius


def _duodenum_and_pancreas(canvas: Canvas, draw: Draws) -> np.ndarray:
    """The duodenal C-loop (descending part vertical) and the pancreas: head in the loop
    (uncinate process caudal), tail rising to the spleen; returns their common shift (x, y, z)."""
    shift = np.array([draw.jitter(ORGAN_SD), draw.jitter(ORGAN_SD), draw.jitter(4.0)])
    points = np.array([(-12, -36, 0.12 * L), (-40, -26, 0.08 * L), (-54, 0, -0.12 * L), (-52, 10, -0.45 * L),
                       (-30, 30, -0.62 * L), (0, 30, -0.62 * L), (24, 20, -0.45 * L), (30, 8, -0.28 * L)])
    points = points + 0.7 * shift + np.clip(draw.rng.normal(0, 2.5, points.shape), -5.0, 5.0)
    width = 8.5 * draw.uniform(0.85, 1.2)
    view, d, _ = canvas.tube(points, width)
    if view is not None:
        d = d - 1.5 * view.wobble[7]
        anatomy.duodenum(view, d, width, "fluid" if draw.chance(0.55) else "collapsed", bubbles=False)
    points = np.array([(-34, 8, -0.38 * L), (-28, -4, -0.2 * L), (-8, -16, -0.08 * L), (18, -18, 0.0),
                       (42, -12, 0.1 * L), (64, 0, 0.22 * L)])
    points = points + shift + np.clip(draw.rng.normal(0, 2.5, (6, 3)), -5, 5)
    view, d, _ = canvas.tube(points, np.array([14.0, 12.0, 8.5, 9.5, 9.0, 7.5]) * draw.uniform(0.85, 1.15))
    if view is not None:
        anatomy.pancreas(view, d, 8, draw, view.medium[0] > 1.3)
    return shift


def _gallbladder(canvas: Canvas, draw: Draws) -> None:
    """The gallbladder (85 % of the patients), at the liver's inferior-medial edge."""
    if draw.chance(0.85):
        size = draw.uniform(0.75, 1.2)
        centre = (-52.0 + draw.jitter(ORGAN_SD), -34.0 + draw.jitter(ORGAN_SD), (0.05 + draw.jitter(0.1)) * L)
        view, d = canvas.ellipse(centre, (17.0 * size, 11.0 * size, 26.0 * size), 60.0 + draw.jitter(20),
                                 tilt=(0.0, -0.3))
        if view is not None:
            anatomy.gallbladder(view, d - 1.5 * view.wobble[9], d)


def _vessels(canvas: Canvas, draw: Draws, shift: np.ndarray, ax: float, ay: float, radius: float) -> None:
    """Splenic and portal vein, SMV, SMA, left renal vein, aorta, IVC (unlabelled)."""
    portal_hu = anatomy.HU_PORTAL + draw.jitter(8.0)
    veins = [[(-8, -3, -1.3 * L), (-8, -3, -0.3 * L), (-10, -4, 0.0), (-40 + shift[0], -6, 0.2 * L)],  # SMV, portal
             [(-8, -4, -0.05 * L), (16, -6, 0.0), (40, -2, 0.1 * L), (62, 8, 0.2 * L), (80, 14, 0.3 * L)]]  # splenic
    for points in veins:
        view, d, _ = canvas.tube(np.array(points) + shift * [1.0, 1.0, 0.0], draw.uniform(3.3, 5.0))
        if view is not None:
            anatomy.portal_vein(view, d, portal_hu)
    sma = [(ax, ay, 0.05 * L), (ax + draw.jitter(1.5), ay - 16.0, -0.1 * L),
           (ax + draw.jitter(1.5), ay - 20.0, -1.3 * L)]
    view, d, _ = canvas.tube(sma, 3.5, pad=8.0)
    if view is not None:
        anatomy.artery_in_fat(view, d)
    view, d, _ = canvas.tube([(58, 34, -0.22 * L), (28, 8, -0.15 * L), (8, 4, -0.15 * L), (-22, 10, -0.18 * L)], 2.8)
    if view is not None:
        anatomy.renal_vein(view, d)
    points = [(ax - 3.0, ay + 2.0, 1.5 * L), (ax, ay, 0.0), (ax + 3.0 + draw.jitter(2), ay - 2.0, -1.5 * L)]
    view, d, _ = canvas.tube(points, radius + 1.5, pad=2.0)
    if view is not None:
        anatomy.aorta(view, d < 0, d < -1.5, draw)
    anatomy.vena_cava(canvas, draw, half_length=3.0 * L)


def _back(canvas: Canvas, draw: Draws, plan: BodyPlan) -> None:
    """Psoas (growing caudally), back muscles, the spine (vertebrae and discs) and ribs: painted last."""
    for side in (-1.0, 1.0):
        view = canvas.view((side * 28.0 - 30, side * 28.0 + 30, 14.0, 74.0, -1.5 * L, 1.5 * L))
        if view is not None:
            grow = (0.8 - 0.3 * view.Z / L).clamp(0.2, 1.2)
            d = superellipse_distance(view, *extrude(view, (side * 28.0, 44.0), (12.0 * grow, 9.0 * grow)), side * 65.0)
            anatomy.muscle(view, (d < 0) & (view.Z < 0.6 * L))
        anatomy.back_muscle(canvas, draw, side, wobble=1, within_body=False)
    centre = anatomy.spine_centre(draw)
    x, y = centre
    view = canvas.view((x - 35, x + 35, y - 20, y + 52, -1.5 * L, 1.5 * L))
    if view is not None:
        period, phase = 36.0 + draw.jitter(1.5), draw.uniform(0.0, 1.0)
        disc = torch.remainder(view.Z / period + phase, 1.0) < 0.22  # intervertebral discs
        d_body = anatomy.vertebral_body(view, centre, draw)
        bone = torch.where(d_body < -2.5, anatomy.HU_BONE_MARROW + 50.0 * view.fine[0],
                           anatomy.HU_BONE_CORTEX + 50.0 * view.fine[0])
        view.paint(d_body < 0, torch.where(disc, 85.0 + 5.0 * view.fine[1], bone))
        d_canal, ring, spinous = anatomy.vertebral_arch(view, centre)
        anatomy.paint_arch_and_canal(view, (ring & (view.Y > y + 8.0)) | (spinous & ~disc), d_canal)
    for side in (-1.0, 1.0):  # ribs: arcs around the cavity, sloping down anteriorly, cranial half
        for k in range(draw.integer(3, 5)):
            z0 = (0.0 + 0.32 * k + draw.jitter(0.04)) * L
            arc = [(plan.cx + side * (plan.half_width + 4.0) * math.cos(phi),
                    plan.cy + (plan.posterior if phi > 0 else plan.anterior) * 1.05 * math.sin(phi),
                    z0 - 15.0 * (1.0 - math.sin(phi))) for phi in np.radians(np.linspace(75, -35, 7))]
            view, d, _ = canvas.tube(arc, 3.5, pad=2.0)
            if view is not None:
                anatomy.rib(view, d)


def _scanner(canvas: Canvas, draw: Draws, rng_texture: np.random.Generator,
             supersample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Down to the output grid (mean HU: partial volume; majority label), then the scanner's
    blur and noise: HU [Z, Y, X] float64 and labels [Z, Y, X] uint8."""
    hu, lab = canvas.hu, canvas.lab
    if supersample > 1:
        hu = F.avg_pool3d(hu[None, None], supersample)[0, 0]
        one_hot = F.one_hot(lab.long(), anatomy.NUM_LABELS).permute(3, 0, 1, 2)[None].to(F64)
        votes = F.avg_pool3d(one_hot, supersample)[0]
        lab = votes.argmax(0).to(torch.uint8)
    hu = gaussian_blur3d(hu[None], 0.4)[0]
    noise = gaussian_blur3d(torch.from_numpy(rng_texture.standard_normal((1, *hu.shape))), 0.6)[0]
    hu = hu + draw.uniform(5.0, 8.0) * noise / noise.std().clamp_min(1e-12)
    return hu, lab
