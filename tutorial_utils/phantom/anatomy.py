"""The anatomy shared by slices and volumes: labels, tissue intensities, and one function per organ or tissue.

An organ function paints an organ whose shape the renderer has placed (a view of the
canvas and a signed distance, see ``geometry``), or places it too where slices and volumes
draw the same numbers: its intensities in Hounsfield units (HU, portal venous phase), its
texture and its label. Organs that look alike by intensity (liver and spleen, pancreas and
duodenum and bowel, the two kidneys) differ by texture and place, as in real CT.
Coordinates are canonical reference pixels (about 1.2 mm; x to the patient's left, y posterior).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .geometry import Canvas, View, extrude, superellipse_distance
from .texture import Draws

LABEL_NAMES: tuple[str, ...] = (
    "background",
    "spleen",
    "pancreas",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "duodenum",
)
"""Organ names; the index is the label value (0 = background, 1..8 = organs). The order of the
real 2019 slices (Gibson et al.'s TCIA labels as the OBELISK repository's ``TCIA_labels.txt``
lists them), so that a label value means the same organ on the phantom and on real CT."""

NUM_LABELS: int = len(LABEL_NAMES)
"""Number of label values, background included (9)."""

SPLEEN, PANCREAS, LEFT_KIDNEY, GALLBLADDER, ESOPHAGUS, LIVER, STOMACH, DUODENUM = range(1, 9)
"""Label values (in the order of ``LABEL_NAMES``)."""

# Tissue intensities in HU (portal venous phase).
HU_AIR = -1000.0
HU_FAT = -100.0
HU_FLUID = 10.0
HU_BILE = 8.0
HU_MUSCLE = 50.0
HU_LIVER = 100.0
HU_SPLEEN = 108.0
HU_PANCREAS = 92.0
HU_BOWEL_WALL = 88.0
HU_KIDNEY_CORTEX = 180.0
HU_KIDNEY_MEDULLA = 155.0
HU_PORTAL = 165.0
HU_AORTA = 190.0
HU_IVC = 140.0
HU_BONE_CORTEX = 750.0
HU_BONE_MARROW = 230.0
HU_ORAL_CONTRAST = 350.0

ORGAN_SD = 5.5
"""Standard deviation (reference px) of each organ's own shift between patients."""

ELASTIC_PX = 6.5
"""Amplitude (reference px) of the smooth whole-anatomy deformation between patients; with the
patient's overall shift and size and the organs' own shifts, organs of two patients lie about
10-20 px apart."""


# ---------------------------------------------------------------------------- body wall


@dataclass(frozen=True)
class BodyPlan:
    """The abdominal cavity (a superellipse, reference px) and the fat around it."""

    cx: float
    cy: float
    half_width: float
    anterior: float  # semi-axis towards the front (-y)
    posterior: float  # semi-axis towards the back (+y)
    fat: tuple[float, float, float]  # subcutaneous fat: lateral, anterior, posterior

    @classmethod
    def sample(cls, draw: Draws) -> BodyPlan:
        """One patient's body: cavity centre +-2 px, size +-4-5 %, fat 5-28 px."""
        cx, cy = draw.jitter(2.0), draw.jitter(2.0)
        half_width = 112.0 * (1 + draw.jitter(0.04))
        anterior, posterior = 74.0 * (1 + draw.jitter(0.05)), 80.0 * (1 + draw.jitter(0.03))
        fat = (draw.uniform(5, 24), draw.uniform(5, 28), draw.uniform(3, 12))
        return cls(cx, cy, half_width, anterior, posterior, fat)


def body_wall(plan: BodyPlan, front: torch.Tensor, back: torch.Tensor, dx: torch.Tensor, fat_wobble: torch.Tensor,
              muscle_wobble: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Thickness (reference px) of the subcutaneous fat and of the muscle wall around the cavity.

    ``front``, ``back``: how much each point lies in front of / behind the cavity's centre
    (0..1); ``dx``: its x offset from the centre (the paired rectus muscles beside the midline).
    """
    lateral, anterior, posterior = plan.fat
    fat = lateral + (anterior - lateral) * front + (posterior - lateral) * back + 1.5 * fat_wobble
    side = 1.0 - front - back
    rectus = torch.exp(-(((dx.abs() - 30.0) / 16.0) ** 2))  # paired, linea alba between
    muscle = 3.0 + 8.0 * side + 9.0 * front * rectus + 10.0 * back
    if muscle_wobble is not None:
        muscle = muscle + 1.2 * muscle_wobble
    return fat, muscle


def body(view: View, d_cavity: torch.Tensor, fat: torch.Tensor, muscle: torch.Tensor, table_mask: torch.Tensor, *,
         table_hu: float | torch.Tensor, fat_hu: torch.Tensor,
         mesentery_hu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint the patient table, subcutaneous fat, skin, muscle wall and the (fatty) cavity.

    ``d_cavity``: signed distance to the cavity; ``fat``, ``muscle``: wall thickness
    (:func:`body_wall`); ``table_mask``: the table (:func:`table`). Returns the masks (body, cavity).
    """
    inside = d_cavity < muscle + fat
    cavity = d_cavity < 0
    view.paint(table_mask & ~inside, table_hu)
    view.paint(inside, fat_hu)
    view.paint(inside & (d_cavity > muscle + fat - 1.5), 30.0)  # skin
    view.paint(d_cavity < muscle, HU_MUSCLE + 6.0 * view.medium[0])
    view.paint(cavity, mesentery_hu)
    return inside, cavity


def table(Xa: torch.Tensor, Ya: torch.Tensor, pose_y: float, size_y: float, plan: BodyPlan) -> torch.Tensor:
    """Mask of the patient table (4 px thick, below the back's fat): ``Xa``, ``Ya`` are the
    coordinates in the scanner's frame, ``pose_y`` and ``size_y`` the patient's shift and size in y."""
    top = pose_y + size_y * (plan.cy + plan.posterior + 13.0 + plan.fat[2]) + 3.0
    return (Ya > top) & (Ya < top + 4.0) & (Xa.abs() < 150.0)


# ---------------------------------------------------------------------------- hollow organs


def bowel(view: View, d: torch.Tensor, wall: float, kind: str, draw: Draws, air_level: float | None = None,
          bubbles: bool = True) -> None:
    """An unlabelled bowel loop: wall (``wall`` px) and content of ``kind`` ("fluid", "collapsed",
    "air" (above ``air_level`` in y), "feces", "contrast"); ``bubbles``: a few gas bubbles in fluid."""
    outer = view.cavity & (d < 0)
    view.paint(outer, HU_BOWEL_WALL + 8.0 * view.fine[0])
    if kind == "collapsed":
        content = HU_BOWEL_WALL - 15.0 + 10.0 * view.fine[1]
    elif kind == "air":
        content = torch.where(view.Y < air_level, HU_AIR, 15.0 + 5.0 * view.fine[1])
    elif kind == "feces":
        content = 10.0 + 40.0 * view.medium[0] + 30.0 * view.fine[1]
        content = torch.where(view.fine[0] > 0.9, -850.0 + 0.0 * content, content)
    elif kind == "contrast":
        content = HU_ORAL_CONTRAST * draw.uniform(0.6, 1.0) + 40.0 * view.fine[1]
    else:  # fluid
        content = 12.0 + 6.0 * view.fine[1]
        if bubbles:
            content = torch.where(view.fine[0] > 2.2, -800.0 + 0.0 * content, content)
    view.paint(outer & (d < -wall), content)


def stomach(view: View, d: torch.Tensor, draw: Draws, air_level: Callable[[], float], *, food_bubbles: bool,
            folds: bool) -> None:
    """The stomach: a wall of 3.5-5.5 px (thick when collapsed; ``folds``: uneven), and fluid,
    food (``food_bubbles``: with gas), positive oral contrast or nothing inside, with air
    above ``air_level()`` (drawn after the content)."""
    outer = view.cavity & (d < 0)
    kind = draw.pick(("fluid", "food", "collapsed", "contrast"), [0.45, 0.3, 0.15, 0.1])
    wall = draw.uniform(3.5, 5.5) + 1.5 * view.fine[0].clamp(-1, 1)
    if kind == "collapsed":
        wall = wall + 6.0
        if folds:
            wall = wall + 3.0 * view.medium[0]
    view.paint(outer, HU_BOWEL_WALL + 20.0 + 8.0 * view.fine[1], STOMACH)
    if kind == "food":
        content = 25.0 + 30.0 * view.medium[1] + 20.0 * view.fine[1]
        if food_bubbles:
            content = torch.where(view.fine[0] > 1.3, -800.0 + 0.0 * content, content)
    elif kind == "contrast":
        content = HU_ORAL_CONTRAST * draw.uniform(0.6, 1.0) + 20.0 * view.fine[1]
    elif kind == "collapsed":
        content = 20.0 + 10.0 * view.fine[1]
    else:
        content = HU_FLUID + 5.0 + 5.0 * view.fine[1]
    content = torch.where(view.Y < air_level(), HU_AIR + 0.0 * content, content)
    view.paint(outer & (d < -wall), content, STOMACH)


def duodenum(view: View, d: torch.Tensor, width: float, content: str, bubbles: bool) -> None:
    """The duodenum, a tube of radius ``width``: wall, and inside "collapsed" (nothing), "fluid"
    or "air" (``bubbles``: a few, or with "air" many, gas bubbles in the fluid)."""
    outer = view.cavity & (d < 0)
    view.paint(outer, HU_BOWEL_WALL + 8.0 + 8.0 * view.fine[1], DUODENUM)
    if content == "collapsed":
        return
    fluid = 12.0 + 6.0 * view.fine[1]
    if bubbles:
        fluid = torch.where(view.fine[0] > (0.9 if content == "air" else 2.0), -850.0 + 0.0 * fluid, fluid)
    view.paint(outer & (d < -0.45 * width), fluid, DUODENUM)


def gallbladder(view: View, outline: torch.Tensor, bile: torch.Tensor) -> None:
    """The gallbladder: a wall, and bile inside 1.5 px (signed distances ``outline`` and ``bile``)."""
    inside = view.cavity & (outline < 0)
    view.paint(inside, 55.0 + 5.0 * view.fine[0], GALLBLADDER)
    view.paint(inside & (bile < -1.5), HU_BILE + 4.0 * view.fine[1], GALLBLADDER)


def esophagus(view: View, d: torch.Tensor) -> None:
    """The esophagus: muscular wall."""
    view.paint(d < 0, HU_MUSCLE + 5.0 + 6.0 * view.fine[1], ESOPHAGUS)


# ---------------------------------------------------------------------------- solid organs


def spleen(canvas: Canvas, draw: Draws, centre: tuple, axes: tuple, angle: float, wobble: int,
           tilt: tuple[float, float] = (0.0, 0.0)) -> None:
    """The spleen: homogeneous, an ellipse(oid) with a concave visceral (medial) surface."""
    view, d = canvas.ellipse(centre, axes, angle, pad=10.0, tilt=tilt)
    if view is None:
        return
    t = math.radians(angle)
    nx, ny = math.sin(t), -math.cos(t)  # normal of the long axis, pointing medially
    a, b = axes[0], axes[1]
    hollow_centre = (centre[0] + 1.6 * b * nx, centre[1] + 1.6 * b * ny, *centre[2:])
    hollow_axes = (0.8 * a, 1.0 * b, *(1.2 * c for c in axes[2:]))
    hollow = superellipse_distance(view, hollow_centre, hollow_axes, angle, tilt=tilt)
    d = torch.maximum(d, -hollow) - 3.0 * view.wobble[wobble]
    view.paint(view.cavity & (d < 0), HU_SPLEEN + draw.jitter(6.0) + 3.0 * view.medium[0], SPLEEN)


def liver(view: View, d: torch.Tensor, wobble: int, draw: Draws) -> float:
    """The liver (fine texture); returns the HU of its vessels (about 55 HU brighter)."""
    d = d - 5.0 * view.wobble[wobble]
    liver_hu = HU_LIVER + draw.jitter(6.0)
    view.paint(view.cavity & (d < 0), liver_hu + 4.0 * view.medium[1] + 2.0 * view.fine[0], LIVER)
    return liver_hu + 55.0 + draw.jitter(8.0)


def liver_vessel(view: View, inside: torch.Tensor, vessel_hu: float) -> None:
    """Portal or hepatic vessels where ``inside``, only within the liver."""
    view.shade(inside & (view.lab == LIVER), vessel_hu + 5.0 * view.fine[1])


def kidney(view: View, d: torch.Tensor, sinus: torch.Tensor, size: float, label: int, wobble: int,
           notch: torch.Tensor | None = None) -> None:
    """A kidney in perirenal fat: cortex, medulla, renal sinus fat and pelvis (``sinus``: signed
    distance), the hilum ``notch`` cut out; ``label`` 0 for the unlabelled right kidney."""
    d = d - 2.0 * view.wobble[wobble]
    tissue = view.cavity & (d < 0)
    if notch is not None:
        tissue = tissue & (notch > 0)
    view.shade(view.cavity & (d < 4.0) & ~tissue & (view.lab == 0), HU_FAT + 5.0 * view.medium[0])  # perirenal fat
    hu = torch.where(d < -4.5 * size, HU_KIDNEY_MEDULLA + 8.0 * view.medium[1], HU_KIDNEY_CORTEX + 6.0 * view.fine[1])
    hu = torch.where(sinus < 0, -60.0 + 20.0 * view.medium[0], hu)
    hu = torch.where(sinus < -3.0, 20.0 + 0.0 * hu, hu)  # renal pelvis
    view.paint(tissue, hu, label)


def pancreas(view: View, d: torch.Tensor, wobble: int, draw: Draws, clefts: torch.Tensor,
             centre_line: torch.Tensor | None = None) -> None:
    """The pancreas: lobulated outline, fat in the ``clefts`` between lobules and, given the
    distance to its ``centre_line``, sometimes (40 %) a visible duct; never over the duodenum."""
    d = d - 1.8 * view.medium[1] - 1.5 * view.wobble[wobble]
    tissue = view.cavity & (d < 0) & (view.lab != DUODENUM)
    hu = HU_PANCREAS + draw.jitter(5.0) + 8.0 * view.fine[0] + 4.0 * view.medium[0]
    hu = torch.where(clefts, -30.0 + 25.0 * view.fine[0], hu)
    if centre_line is not None and draw.chance(0.4):
        hu = torch.where(centre_line < 1.0, 20.0 + 0.0 * hu, hu)  # pancreatic duct
    view.paint(tissue, hu, PANCREAS)


# ---------------------------------------------------------------------------- vessels (unlabelled)


def aorta_centre(draw: Draws) -> tuple[float, float, float]:
    """(x, y, radius) of the aorta, in front of the spine."""
    return 8.0 + draw.jitter(2.5), 18.0 + draw.jitter(2.5), 9.0 + draw.jitter(0.8)


def aorta(view: View, wall: torch.Tensor, lumen: torch.Tensor, draw: Draws) -> None:
    """The aorta: muscular wall (and the diaphragm's crura) and contrast-filled lumen."""
    view.paint(wall, HU_MUSCLE + 10.0)
    view.paint(lumen, HU_AORTA + draw.jitter(12.0) + 5.0 * view.fine[1])


def artery_in_fat(view: View, d: torch.Tensor) -> None:
    """The superior mesenteric artery in its collar of fat."""
    view.paint(view.cavity & (d < 4.0) & (view.lab == 0), HU_FAT + 5.0 * view.medium[0])
    view.paint(view.cavity & (d < 0), HU_AORTA - 10.0 + 5.0 * view.fine[1])


def portal_vein(view: View, d: torch.Tensor, hu: float) -> None:
    """A vein of the portal system (splenic, superior mesenteric, portal) of intensity ``hu``."""
    view.paint(view.cavity & (d < 0), hu + 5.0 * view.fine[1])


def renal_vein(view: View, d: torch.Tensor) -> None:
    """The left renal vein, behind everything painted so far."""
    view.paint(view.cavity & (d < 0) & (view.lab == 0), HU_IVC + 5.0 * view.fine[1])


def vena_cava(canvas: Canvas, draw: Draws, half_length: float | None = None) -> None:
    """The inferior vena cava: right of the aorta, flat or round; ``half_length`` (reference px)
    along z on a volume, where it leans slightly."""
    centre = (-24.0 + draw.jitter(2.5), 14.0 + draw.jitter(2.5))
    axes = (12.0 * draw.uniform(0.8, 1.15), 8.0 * draw.uniform(0.6, 1.1))
    angle, tilt = draw.jitter(10), (0.0, 0.0)
    if half_length is not None:
        centre, axes, tilt = (*centre, 0.0), (*axes, half_length), (-0.05, 0.0)
    view, d = canvas.ellipse(centre, axes, angle, tilt=tilt)
    if view is not None:
        view.paint(d < 0, HU_IVC + draw.jitter(12.0) + 5.0 * view.fine[1])


# ---------------------------------------------------------------------------- muscles and bones


def muscle(view: View, mask: torch.Tensor) -> None:
    """Skeletal muscle (the psoas) where ``mask``."""
    view.paint(mask, HU_MUSCLE + 5.0 * view.medium[0])


def back_muscle(canvas: Canvas, draw: Draws, side: float, wobble: int, within_body: bool) -> None:
    """The erector spinae beside the spine (``side`` -1 or +1), marbled with fat; along all of z
    on a volume; ``within_body``: clipped to the body."""
    centre, axes = extrude(canvas, (side * 29.0 + draw.jitter(1.5), 78.0 + draw.jitter(1.5)), (24.0, 14.0))
    view, d = canvas.ellipse(centre, axes, side * 8.0, pad=8.0)
    if view is None:
        return
    hu = torch.where(view.medium[1] > 1.6, HU_FAT + 20.0 * view.medium[0], HU_MUSCLE + 5.0 * view.medium[0])
    inside = d - 1.5 * view.wobble[wobble] < 0
    view.paint(view.body & inside if within_body else inside, hu)


def spine_centre(draw: Draws) -> tuple[float, float]:
    """(x, y) of the vertebral body's centre."""
    return draw.jitter(1.5), 42.0 + draw.jitter(1.5)


def vertebral_body(view: View, centre: tuple[float, float], draw: Draws) -> torch.Tensor:
    """Signed distance to the vertebral body (a boxy ellipse of 19 x 15 px +-1 px)."""
    centre, axes = extrude(view, centre, (19.0 + draw.jitter(1.0), 15.0 + draw.jitter(1.0)))
    return superellipse_distance(view, centre, axes, 0.0, 2.2)


def vertebral_arch(view: View, centre: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The spinal canal's distance from its axis, and the masks of the bony ring around it
    (pedicles and lamina) and of the spinous process."""
    x, y = centre
    d_canal = torch.sqrt((view.X - x) ** 2 + (view.Y - y - 24.0) ** 2)
    ring = (d_canal < 12.5) & ((view.Y > y + 16.0) | ((view.X - x).abs() > 6.0))
    spinous = superellipse_distance(view, *extrude(view, (x, y + 37.0), (8.0, 4.0)), 90.0) < 0
    return d_canal, ring, spinous


def paint_arch_and_canal(view: View, arch: torch.Tensor, d_canal: torch.Tensor) -> None:
    """The vertebral arch (cortical bone) where ``arch``, and the fluid-filled spinal canal."""
    view.paint(arch, HU_BONE_CORTEX - 150.0 + 60.0 * view.fine[0])
    view.paint(d_canal < 8.0, 25.0 + 4.0 * view.fine[1])


def rib(view: View, d: torch.Tensor, cortex_hu: float = 550.0, within: torch.Tensor | None = None) -> None:
    """A rib (or costal cartilage, ``cortex_hu`` 150): a cortical shell, marrow inside 1.3 px."""
    outer, inner = d < 0, d < -1.3
    if within is not None:
        outer, inner = within & outer, within & inner
    view.paint(outer, cortex_hu + 40.0 * view.fine[0])
    view.paint(inner, 200.0 + 30.0 * view.fine[1])
