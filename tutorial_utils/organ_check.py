"""Do the organ names fit the anatomy? A check of label names against where and how large the labelled organs are.

The one idea: a label's name can be checked without anyone looking at the images, because the
anatomy of an axial abdominal slice is known. In radiological display (anterior at the top, the
patient's left on the image's right) the liver is the largest organ and lies on the image's left,
the spleen and the left kidney on its right, the spleen lateral to the left kidney, the left
kidney posterior to the pancreas, the stomach and the gallbladder, and the esophagus is small and
near the midline. :func:`anatomy_problems` measures every label (pixel count, centroid) on every
slice and lists the rules that the names break; the data layer
(:func:`~tutorial_utils.data.load_dataset`, notebook 01) runs it on the real slices, whose label
order cannot be checked by eye here.

Each rule is decided by majority over the slices where its organs appear, so a few odd slices
(an organ cut at its tip, a stray labelled pixel) do not trigger it, and each applies only when
its organs are named. Organ names are compared without case and surrounding spaces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .checks import check_labels, describe

__all__ = ["LabelOrderWarning", "anatomy_problems", "ESOPHAGUS_MAX_FRACTION_OF_LIVER",
           "ESOPHAGUS_MAX_FRACTION_OF_IMAGE"]

ESOPHAGUS_MAX_FRACTION_OF_LIVER = 0.05
"""The esophagus's median area must be under this fraction of the liver's median area (measured on
the phantom: about 0.02; the gallbladder, the next smallest organ, about 0.1)."""
ESOPHAGUS_MAX_FRACTION_OF_IMAGE = 0.01
"""... and under this fraction of the image (a tube of about 2 cm across: a few hundred pixels)."""

POSTERIOR_TO = (("left kidney", "pancreas"), ("left kidney", "stomach"), ("left kidney", "gallbladder"))
"""(a, b): organ a lies posterior to organ b (its centroid lower in the image): retroperitoneal
behind intraperitoneal organs."""
LATERAL_TO = (("spleen", "left kidney"),)
"""(a, b): organ a lies lateral to organ b on the patient's left (its centroid further right)."""


class LabelOrderWarning(UserWarning):
    """The organ names of a label map contradict the anatomy (the label order is probably not the assumed one)."""


def _organ_statistics(labels: torch.Tensor, num_labels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel counts [N, L], centroid x and centroid y [N, L] (fractions of the width and height,
    pixel centres, NaN where a label is absent) of every label value on every slice."""
    N, H, W = labels.shape
    flat = labels.reshape(N, H * W).long()
    ones = torch.ones((), dtype=torch.float64, device=labels.device).expand(N, H * W)
    counts = torch.zeros(N, num_labels, dtype=torch.float64, device=labels.device).scatter_add_(1, flat, ones)
    xs = ((torch.arange(W, dtype=torch.float64, device=labels.device) + 0.5) / W).repeat(H).expand(N, -1)
    ys = ((torch.arange(H, dtype=torch.float64, device=labels.device) + 0.5) / H).repeat_interleave(W).expand(N, -1)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=labels.device)
    centroids = []
    for coordinate in (xs, ys):
        sums = torch.zeros(N, num_labels, dtype=torch.float64, device=labels.device).scatter_add_(1, flat, coordinate)
        centroids.append(torch.where(counts > 0, sums / counts.clamp_min(1), nan))
    return counts, centroids[0], centroids[1]


def _label_names(label_names: object) -> tuple[str, ...]:
    """``label_names`` as a tuple of strings (background first); one string is refused."""
    if isinstance(label_names, (str, bytes)) or not isinstance(label_names, Sequence):
        raise TypeError(f"label_names must be a sequence of names, one per label value (background first), "
                        f"got {describe(label_names)} ({type(label_names).__name__})")
    if not all(isinstance(name, str) for name in label_names):
        raise TypeError(f"label_names must hold strings, got {describe(list(label_names))}")
    if len(label_names) < 2:
        raise ValueError(f"label_names needs the background and at least one organ, got {list(label_names)}")
    return tuple(label_names)


def anatomy_problems(labels: torch.Tensor, label_names: Sequence[str]) -> list[str]:
    """The contradictions between the organ names and the anatomy of axial abdominal slices.

    Args:
        labels: integer [N, H, W], values in 0..len(label_names)-1 (0 = background), in
            radiological display: anterior at the top, the patient's left on the image's right.
        label_names: one name per label value, index = value (e.g. ``phantom.LABEL_NAMES``).

    Returns:
        One plain-English sentence per broken rule, naming the organ, its label value, what was
        expected and what was found; an empty list when the names fit. The rules, each over the
        slices where its organs appear, by majority, and only for the organs named:

        * the liver is the largest organ;
        * the liver's centroid lies in the image's left half, the spleen's and the left kidney's
          in the right half;
        * the spleen lies lateral to (right of) the left kidney; the left kidney posterior to
          (below) the pancreas, the stomach and the gallbladder;
        * the esophagus is small (median area under 5 % of the liver's median area and under
          1 % of the image) and near the midline (centroid in the middle third of the width).

        A name given to two label values is a problem too.
    """
    check_labels("labels", labels, dims=3, layout="an integer label map [N, H, W]")
    names = _label_names(label_names)
    check_labels("labels", labels, dims=3, layout="an integer label map [N, H, W]", num_labels=len(names))
    N, H, W = labels.shape
    problems: list[str] = []
    value: dict[str, int] = {}
    for v, name in enumerate(names[1:], start=1):
        key = name.strip().lower()
        if key in value:
            problems.append(f"the name {name!r} is given to labels {value[key]} and {v} (expected one label per organ)")
        else:
            value[key] = v
    if N == 0 or H * W == 0:
        return problems
    counts, cx, cy = _organ_statistics(labels, len(names))
    present = counts > 0  # [N, L]

    def label(organ: str) -> str:
        return f"label {value[organ]} {names[value[organ]]!r}"

    def majority(holds: torch.Tensor, where: torch.Tensor) -> tuple[bool, int, int]:
        """Whether ``holds`` is true on more than half of the slices ``where`` (no slice: true)."""
        total = int(where.sum())
        hits = int((holds & where).sum())
        return total == 0 or 2 * hits > total, hits, total

    if "liver" in value:
        v = value["liver"]
        largest = counts[:, v] >= counts[:, 1:].max(dim=1).values
        ok, hits, total = majority(largest, present[:, v])
        if not ok:
            problems.append(f"{label('liver')} is the largest organ on {hits} of {total} slices where it appears "
                            f"(expected most)")
    for organ, side in (("liver", "left"), ("spleen", "right"), ("left kidney", "right")):
        if organ in value:
            v = value[organ]
            on_side = cx[:, v] < 0.5 if side == "left" else cx[:, v] > 0.5
            ok, hits, total = majority(on_side, present[:, v])
            if not ok:
                problems.append(f"{label(organ)} has its centroid in the image's {side} half on {hits} of {total} "
                                f"slices where it appears (expected most: the patient's "
                                f"{'right' if side == 'left' else 'left'} is on the image's {side})")
    for (a, b), axis, relation in ([(pair, cx, "lateral to (right of)") for pair in LATERAL_TO]
                                   + [(pair, cy, "posterior to (below)") for pair in POSTERIOR_TO]):
        if a in value and b in value:
            va, vb = value[a], value[b]
            ok, hits, total = majority(axis[:, va] > axis[:, vb], present[:, va] & present[:, vb])
            if not ok:
                problems.append(f"{label(a)} lies {relation} {label(b)} on {hits} of {total} slices where both "
                                f"appear (expected most)")
    if "esophagus" in value and bool(present[:, value["esophagus"]].any()):
        v = value["esophagus"]
        area = float(counts[present[:, v], v].median())
        limit = ESOPHAGUS_MAX_FRACTION_OF_IMAGE * H * W
        found = f"{area:.0f} pixels ({100 * area / (H * W):.2g} % of the image"
        expected = f"under {100 * ESOPHAGUS_MAX_FRACTION_OF_IMAGE:.2g} % of the image"
        if "liver" in value and bool(present[:, value["liver"]].any()):
            liver = float(counts[present[:, value["liver"]], value["liver"]].median())
            limit = min(limit, ESOPHAGUS_MAX_FRACTION_OF_LIVER * liver)
            found += f", {100 * area / liver:.2g} % of the liver's median area"
            expected += f" and under {100 * ESOPHAGUS_MAX_FRACTION_OF_LIVER:.2g} % of the liver's median area"
        if area >= limit:
            problems.append(f"{label('esophagus')} has a median area of {found}) on the slices where it appears "
                            f"(expected a small organ: {expected})")
        middle = (cx[:, v] > 1 / 3) & (cx[:, v] < 2 / 3)
        ok, hits, total = majority(middle, present[:, v])
        if not ok:
            problems.append(f"{label('esophagus')} has its centroid in the middle third of the width on {hits} of "
                            f"{total} slices where it appears (expected most: it runs near the midline)")
    return problems
