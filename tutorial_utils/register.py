"""Register two scans of your own: ``python -m tutorial_utils.register FIXED MOVING [options]``.

The discrete pipeline of the notebooks on NIfTI files (:mod:`~tutorial_utils.scans` reads and
writes them), one axial slice (``--2d-slice auto|N``, :func:`~tutorial_utils.registration.register_images`,
optionally refined by :func:`~tutorial_utils.instance.instance_optimise`) or the whole volumes
(:func:`~tutorial_utils.three_d.registration.register_volumes`)::

    python -m tutorial_utils.register fixed.nii.gz moving.nii.gz --fixed-labels fixed_seg.nii.gz \\
        --moving-labels moving_seg.nii.gz --2d-slice auto --features cnn --out results/

How the two scans meet (:func:`register_scans`):

1. the output grid is the fixed scan's (2D: its slice ``N``; ``auto``: the slice with the
   largest labelled area of the fixed labels, the middle slice without labels);
2. the registration grid: the output grid, resampled to ``--spacing`` mm if given (2D: in plane
   only). In 3D the volumes are registered at an isotropic spacing: ``--spacing``, default the
   fixed scan's smallest voxel size but at least :data:`MIN_SPACING_3D` mm, whenever the fixed
   voxels differ from it (memory grows as 1/spacing^3);
3. the moving scan is resampled onto that grid (:func:`resample_to`) after an initial translation (``--initial``: the
   centres of the fields of view (default, like ITK's geometry-centred initialiser), the scanner
   coordinates as they are (``world``), or the intensity centres of mass (``mass``)); for two scans
   on one grid the default changes nothing, and 2D slice ``N`` of both is the same plane;
4. both are windowed to [0, 1] (``--window``), padded with zeros at the end to the feature
   stride, registered, and the result (the pull field in mm, plus the initial translation) is
   brought to the output grid, where the original moving intensities and labels are warped.

Written to ``--out``: ``displacement.nii.gz`` (ITK/ANTs displacement field, see
:func:`~tutorial_utils.scans.save_displacement`), ``moving_warped.nii.gz``,
``moving_labels_warped.nii.gz`` (with ``--moving-labels``) and, with both label maps,
``metrics.json``: Dice per label before (after the initial translation) and after registration
(the primary score: labels that both label maps show; null for the others, see
:func:`~tutorial_utils.metrics.registration_dice`), and the folding fraction of the registration's field. Bad arguments or files: argparse's
message naming the option or file, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checks import argument_type, check_choice, check_int, check_number
from .environment import choose_device
from .instance import instance_optimise
from .metrics import dice, folding_fraction, mean_over_organs, registration_dice
from .prealign import PREALIGN_MODES
from .registration import DEFAULTS, FEATURE_STRIDE, Features, register_images
from .scans import (
    DEFAULT_WINDOW,
    Scan,
    ScanError,
    Window,
    axial_slice,
    check_same_grid,
    displacement_to_mm,
    load_scan,
    pad_to_multiple,
    resample_scan,
    save_displacement,
    save_image,
    save_labels,
    slice_scan,
    window_intensities,
)
from .three_d.metrics import folding_fraction3d
from .three_d.registration import DEFAULTS_3D, register_volumes
from .train import load_features
from .training import device_name

__all__ = ["INITIAL_MODES", "MIN_SPACING_3D", "ScanRegistration", "build_parser", "main", "register_scans", "resample_to"]

MIN_SPACING_3D = 2.0
"""The finest default isotropic spacing (mm) of 3D registration (Learn2Reg's abdominal CT task uses 2 mm)."""
INITIAL_MODES = ("centres", "world", "mass")
"""How the moving scan is placed on the fixed grid before registration (see the module docstring)."""


@dataclass
class ScanRegistration:
    """The result of :func:`register_scans`, everything on the grid of ``reference``.

    ``displacement_mm`` [3, Z, Y, X] (x, y, z) RAS mm: fixed point + u = moving point (initial
    translation included); ``warped`` [Z, Y, X] the moving intensities as in its file;
    ``warped_labels`` int64 [Z, Y, X]; ``dice_before``/``dice_after`` [L] (NaN: label missing
    from the fixed or the moving map, :func:`~tutorial_utils.metrics.registration_dice`) when both
    label maps were given; ``folding``: the fraction of the registration
    field's pixels (voxels) with a Jacobian determinant <= 0, on the registration grid.
    """

    reference: Scan
    displacement_mm: torch.Tensor
    warped: torch.Tensor
    warped_labels: torch.Tensor | None
    folding: float
    offset_mm: np.ndarray
    slice_index: int | None = None
    dice_before: torch.Tensor | None = None
    dice_after: torch.Tensor | None = None


def resample_to(data: torch.Tensor, affine: np.ndarray, target_affine: np.ndarray, target_shape: Sequence[int],
                *, offset_mm: Sequence[float] | None = None, displacement_mm: torch.Tensor | None = None,
                mode: str = "linear", padding: str = "zeros", slab: int = 16) -> torch.Tensor:
    """Sample ``data`` [C, Z, Y, X] (grid ``affine``) at the world points of another grid.

    Target voxel ``v`` reads ``data`` at the world point ``target_affine @ v + offset_mm + u(v)``
    (``displacement_mm`` u: [3, Z', Y', X'], channels (x, y, z) in RAS mm on the target grid):
    the pull warp in millimetres. ``mode``: "linear" or "nearest"; ``padding``: "zeros" or
    "border" (outside ``data``). Computed in slabs of ``slab`` target slices (memory).

    Returns:
        [C, Z', Y', X'] in ``data``'s dtype (labels: pass them as float, round afterwards).
    """
    check_choice("mode", mode, ("linear", "nearest"))
    device, (Z, Y, X) = data.device, tuple(int(n) for n in target_shape)
    to_source = torch.as_tensor(np.linalg.inv(affine) @ target_affine, dtype=torch.float64, device=device)
    rotation_inv = torch.as_tensor(np.linalg.inv(affine[:3, :3]), dtype=torch.float64, device=device)
    offset = torch.as_tensor(np.zeros(3) if offset_mm is None else np.asarray(offset_mm, float), device=device)
    sizes = torch.tensor(data.shape[1:][::-1], dtype=torch.float64, device=device)  # (X, Y, Z)
    out = []
    for z0 in range(0, Z, slab):
        axes = [torch.arange(z0, min(z0 + slab, Z), device=device, dtype=torch.float64),
                torch.arange(Y, device=device, dtype=torch.float64), torch.arange(X, device=device, dtype=torch.float64)]
        zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
        points = torch.stack([xx, yy, zz], dim=-1)  # [z, Y, X, 3] voxel (x, y, z)
        source = points @ to_source[:3, :3].T + to_source[:3, 3] + rotation_inv @ offset
        if displacement_mm is not None:
            source = source + displacement_mm[:, z0:z0 + slab].permute(1, 2, 3, 0).double() @ rotation_inv.T
        grid = (2 * source / (sizes - 1).clamp_min(1) - 1).to(data.dtype)[None]  # (x, y, z) in [-1, 1]
        sampled = F.grid_sample(data[None], grid, mode="bilinear" if mode == "linear" else "nearest",
                                padding_mode=padding, align_corners=True)
        out.append(sampled[0])
    return torch.cat(out, dim=1)


def _initial_offset(fixed: Scan, moving: Scan, initial: str, window: Window) -> np.ndarray:
    """The translation (RAS mm) from the fixed scan's world to the moving one's (see :data:`INITIAL_MODES`)."""
    def centre(scan: Scan) -> np.ndarray:
        if initial == "centres":
            index = (np.array(scan.data.shape[::-1]) - 1) / 2  # (x, y, z)
        else:
            mass = window_intensities(scan.data, window).double()
            total = float(mass.sum())
            if total <= 0:
                raise ScanError(f"{scan.path or 'a scan'}: no intensity inside the window, no centre of mass")
            index = np.array([float((mass.sum(dims) * torch.arange(n, dtype=torch.float64)).sum()) / total
                              for dims, n in (((0, 1), mass.shape[2]), ((0, 2), mass.shape[1]),
                                              ((1, 2), mass.shape[0]))])
        return scan.affine[:3, :3] @ index + scan.affine[:3, 3]

    return np.zeros(3) if initial == "world" else centre(moving) - centre(fixed)


def _register(fixed: torch.Tensor, moving: torch.Tensor, two_d: bool, features: Features, prealign: str | None,
              instance: bool) -> torch.Tensor:
    """The pull field (dy, dx) [2, H, W] or (dz, dy, dx) [3, Z, Y, X] in voxels of [Z, Y, X] windowed volumes."""
    size = fixed.shape[1:] if two_d else fixed.shape
    multiple = FEATURE_STRIDE if two_d else DEFAULTS_3D.stride
    fixed = pad_to_multiple(fixed[0] if two_d else fixed, multiple, dims=len(size))[None, None]
    moving = pad_to_multiple(moving[0] if two_d else moving, multiple, dims=len(size))[None, None]
    if two_d:
        field = register_images(fixed, moving, features, prealign=prealign)
        if instance:
            field = instance_optimise(fixed, moving, field, features)
    else:
        field = register_volumes(fixed, moving, features)
    return field[0][(slice(None), *(slice(0, n) for n in size))]


def register_scans(fixed: Scan, moving: Scan, fixed_labels: Scan | None = None, moving_labels: Scan | None = None,
                   *, features: Features = "mind", slice_index: int | str | None = None,
                   prealign: str = DEFAULTS.prealign, instance: bool = False, spacing: float | None = None,
                   initial: str = "centres", window: Window = DEFAULT_WINDOW, device: str | None = None,
                   log: Callable[[str], None] = print) -> ScanRegistration:
    """Register ``moving`` to ``fixed`` (scans with their original intensities, ``window=None`` at loading).

    ``slice_index``: None for 3D, else an axial slice (``"auto"``: see the module docstring);
    ``prealign``, ``instance``: 2D only (:data:`~tutorial_utils.prealign.PREALIGN_MODES`,
    instance optimisation); ``features``: "mind", "intensity" or (2D) a feature CNN on ``device``.
    """
    check_choice("initial", initial, INITIAL_MODES)
    for name, labels, image in (("fixed labels", fixed_labels, fixed), ("moving labels", moving_labels, moving)):
        if labels is not None:
            check_same_grid(name, labels, name.split()[0] + " image", image)
    device = choose_device(device)
    two_d = slice_index is not None
    if two_d:
        index = axial_slice(fixed, fixed_labels, slice_index)
        reference = slice_scan(fixed, index)
        target = None if spacing is None else (reference.spacing[0], spacing, spacing)
    else:
        index, reference = None, fixed
        iso = spacing or max(min(fixed.spacing), MIN_SPACING_3D)
        target = None if np.allclose(fixed.spacing, iso, rtol=1e-4) else (iso, iso, iso)
    work = Scan(window_intensities(reference.data, window), reference.affine)
    work = resample_scan(work, target) if target is not None else work
    if not two_d and min(work.data.shape) < 8:
        raise ScanError(f"{fixed.path or 'the fixed scan'}: the 3D registration grid {list(work.data.shape)} has "
                        f"fewer than 8 voxels along an axis; register one slice (--2d-slice) or use a finer --spacing")
    offset = _initial_offset(fixed, moving, initial, window)
    moving_work = resample_to(window_intensities(moving.data, window)[None].to(device), moving.affine, work.affine,
                              work.data.shape, offset_mm=offset)[0]
    log(f"registration: {'slice ' + str(index) if two_d else '3D'}, grid [Z, Y, X] = {list(work.data.shape)} at "
        f"{tuple(round(s, 2) for s in work.spacing)} mm, initial translation {np.round(offset, 1).tolist()} mm, "
        f"{features if isinstance(features, str) else type(features).__name__} features, on {device}")
    field = _register(work.data.to(device), moving_work, two_d, features, prealign, instance)
    folding = float((folding_fraction if two_d else folding_fraction3d)(field[None])[0])
    shift = torch.as_tensor(offset, dtype=field.dtype, device=device)[:, None, None, None]
    mm = displacement_to_mm(field, work.affine) + shift  # [3, Z, Y, X] RAS mm on the registration grid
    if work.data.shape != reference.data.shape or not np.allclose(work.affine, reference.affine):
        mm = resample_to(mm, work.affine, reference.affine, reference.data.shape, padding="border")
    low = float(moving.data.min())  # outside the moving scan: its lowest value (air), not 0
    warped = resample_to(moving.data[None].to(device) - low, moving.affine, reference.affine, reference.data.shape,
                         displacement_mm=mm)[0] + low
    result = ScanRegistration(reference, mm.cpu(), warped.cpu(), None, folding, offset, index)
    if moving_labels is not None:
        _add_labels(result, moving_labels, fixed_labels, mm)
    return result


def _add_labels(result: ScanRegistration, moving_labels: Scan, fixed_labels: Scan | None, mm: torch.Tensor) -> None:
    """The warped moving labels (nearest neighbour) and, with fixed labels, Dice before and after."""
    reference = result.reference

    def labels_at(**where) -> torch.Tensor:  # the moving labels at the reference grid's points (+ where)
        return resample_to(moving_labels.data[None].to(mm.device).float(), moving_labels.affine, reference.affine,
                           reference.data.shape, mode="nearest", **where)[0].round().long().cpu()

    result.warped_labels = labels_at(displacement_mm=mm)
    if fixed_labels is not None:
        index = result.slice_index
        fixed_ref = slice_scan(fixed_labels, index).data if index is not None else fixed_labels.data
        num_labels = int(max(fixed_ref.max(), moving_labels.data.max())) + 1
        before = labels_at(offset_mm=result.offset_mm)  # the moving labels before registration
        result.dice_before = dice(fixed_ref, before, num_labels)
        result.dice_after = registration_dice(fixed_ref, before, result.warped_labels, num_labels)


def _metrics(result: ScanRegistration, args: argparse.Namespace) -> dict:
    """What ``metrics.json`` holds (NaN, a label not scored, becomes null)."""
    def values(per_label: torch.Tensor) -> dict:
        return {str(v): (None if math.isnan(x) else x) for v, x in enumerate(per_label.tolist()) if v > 0}

    def mean(per_label: torch.Tensor) -> float | None:
        value = float(mean_over_organs(per_label))
        return None if math.isnan(value) else value

    return {"fixed": str(args.fixed), "moving": str(args.moving), "mode": "2d" if args.slice is not None else "3d",
            "slice": result.slice_index, "features": args.features, "num_labels": len(result.dice_after),
            "dice_before": values(result.dice_before), "dice_after": values(result.dice_after),
            "mean_dice_before": mean(result.dice_before), "mean_dice_after": mean(result.dice_after),
            "folding_fraction": result.folding}


def _table(metrics: dict) -> str:
    lines = [f"{'label':>8s}  {'Dice before':>11s}  {'Dice after':>10s}"]
    rows = [(v, metrics["dice_before"][v], metrics["dice_after"][v]) for v in metrics["dice_after"]]
    rows.append(("mean", metrics["mean_dice_before"], metrics["mean_dice_after"]))
    for name, before, after in rows:
        lines.append(f"{name:>8s}  {'-' if before is None else f'{before:.3f}':>11s}  "
                     f"{'-' if after is None else f'{after:.3f}':>10s}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _slice_argument(text: str) -> int | str:
    """``--2d-slice``: "auto" or a slice index >= 0."""
    return "auto" if text.strip() == "auto" else argument_type(check_int, minimum=0)(text)


def _window_argument(text: str) -> Window:
    """``--window``: "LO,HI" (e.g. -200,300 HU), "auto" (percentiles) or "none"."""
    text = text.strip()
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    values = argument_type(check_number, float, many=True)(text)
    if len(values) != 2 or not values[0] < values[1]:
        raise argparse.ArgumentTypeError(f"expected LO,HI with LO < HI (e.g. -200,300), auto or none, got {text!r}")
    return tuple(values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tutorial_utils.register",
                                     description="Register MOVING to FIXED (NIfTI scans) with the discrete pipeline.")
    parser.add_argument("fixed", type=Path, help="the fixed scan (.nii or .nii.gz)")
    parser.add_argument("moving", type=Path, help="the moving scan, warped onto the fixed grid")
    parser.add_argument("--fixed-labels", type=Path, help="label map of the fixed scan (Dice)")
    parser.add_argument("--moving-labels", type=Path, help="label map of the moving scan (warped, Dice)")
    parser.add_argument("--features", default="mind", metavar="NAME|PATH",
                        help="mind (default), intensity, cnn (the shipped feature CNN, 2D) or a checkpoint file (2D)")
    parser.add_argument("--2d-slice", dest="slice", type=_slice_argument, default=None, metavar="auto|N",
                        help="register one axial slice: auto (largest labelled area) or an index; default: 3D")
    parser.add_argument("--prealign", choices=PREALIGN_MODES, default=None,
                        help=f"2D pre-alignment (default {DEFAULTS.prealign})")
    parser.add_argument("--instance-optimise", action="store_true", help="refine by instance optimisation (2D)")
    parser.add_argument("--initial", choices=INITIAL_MODES, default="centres",
                        help="initial translation: centres of the fields of view (default), world, or mass")
    parser.add_argument("--spacing", type=argument_type(check_number, float, minimum=0, strict_minimum=True),
                        metavar="MM",
                        help=f"register at this spacing in mm (3D default: finest fixed voxel, >= {MIN_SPACING_3D})")
    parser.add_argument("--window", type=_window_argument, default=DEFAULT_WINDOW, metavar="LO,HI|auto|none",
                        help="intensity window (default -200,300 HU; write --window=-100,200), auto "
                             "(0.5 and 99.5 percentiles, MR) or none")
    parser.add_argument("--out", type=Path, default=Path("registration"), metavar="DIR", help="output folder (default registration/)")
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if present)")
    return parser


def _features(parser: argparse.ArgumentParser, args: argparse.Namespace, device: torch.device) -> Features:
    """The features the option names: "mind", "intensity", or a feature CNN loaded on ``device``."""
    if args.features in ("mind", "intensity"):
        return args.features
    if args.slice is None:
        parser.error(f"--features {args.features}: a feature CNN is 2D; use --2d-slice, or mind/intensity in 3D")
    path = None if args.features == "cnn" else Path(args.features)
    if path is not None and not path.is_file():
        parser.error(f"--features {args.features}: expected mind, intensity, cnn or an existing checkpoint file")
    try:
        return load_features(path, device)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        parser.error(f"--features {args.features}: not a feature CNN checkpoint ({type(exc).__name__}: {exc})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.slice is None and (args.prealign is not None or args.instance_optimise):
        parser.error("--prealign and --instance-optimise are 2D options (with --2d-slice); in 3D see --initial")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out must be a folder, but {args.out} is a file")
    start = time.perf_counter()

    def stage(number: int, text: str) -> None:
        print(f"[{number}/4 {time.perf_counter() - start:6.1f} s] {text}", flush=True)

    stage(1, f"loading {args.fixed} and {args.moving}")
    try:
        scans = {"fixed": load_scan(args.fixed, window=None), "moving": load_scan(args.moving, window=None)}
        for name in ("fixed_labels", "moving_labels"):
            path = getattr(args, name)
            scans[name] = load_scan(path, kind="labels") if path is not None else None
        if args.slice not in (None, "auto") and args.slice >= scans["fixed"].data.shape[0]:
            parser.error(f"--2d-slice {args.slice}: {args.fixed} has axial slices 0..{scans['fixed'].data.shape[0] - 1}")
        device = choose_device(args.device)
        stage(2, f"features: {args.features}")
        features = _features(parser, args, device)
        stage(3, "registration")
        result = register_scans(scans["fixed"], scans["moving"], scans["fixed_labels"], scans["moving_labels"],
                                features=features, slice_index=args.slice, prealign=args.prealign or DEFAULTS.prealign,
                                instance=args.instance_optimise, spacing=args.spacing, initial=args.initial,
                                window=args.window, device=str(device), log=lambda text: print(f"    {text}"))
    except ScanError as exc:
        parser.error(str(exc))
    stage(4, f"writing to {args.out}/")
    written = [save_displacement(args.out / "displacement.nii.gz", result.displacement_mm, result.reference, units="mm"),
               save_image(args.out / "moving_warped.nii.gz", result.warped, result.reference)]
    if result.warped_labels is not None:
        written.append(save_labels(args.out / "moving_labels_warped.nii.gz", result.warped_labels, result.reference))
    if result.dice_after is not None:
        metrics = _metrics(result, args)
        print(_table(metrics))
        written.append(args.out / "metrics.json")
        written[-1].write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"folding fraction {100 * result.folding:.3f} % of the {'pixels' if args.slice is not None else 'voxels'}")
    print("wrote " + ", ".join(path.name for path in written) + f" ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
