"""Your own scans in and out: NIfTI volumes and label maps, their geometry, and the results.

Conventions (every function here uses them):

* **voxel order**: a loaded :class:`Scan` holds ``data`` [Z, Y, X] whose voxel axes point to
  the patient's Left, Posterior and Superior (LPS+, the closest axes of the file, as
  ``nibabel.as_closest_canonical`` picks them for RAS+). An axial slice ``data[z]`` [Y, X] is
  then shown like the tutorial's slices (radiological display): anterior at the top, the
  patient's left on the image's right; ``z`` grows towards the head.
* **world**: millimetres in NIfTI's RAS+ (x to the Right, y Anterior, z Superior).
  ``affine @ (x, y, z, 1)`` is the world point of voxel ``data[z, y, x]`` (note the order).
* **displacements**: the tutorial's pull field [3, Z, Y, X] (dz, dy, dx) in voxels (or [2, H, W]
  (dy, dx) for one slice): ``warped[v] = moving[v + d(v)]`` on one grid. In millimetres it is
  ``u = R @ (dx, dy, dz)`` (R: the affine's 3 x 3 part), channels (x, y, z) in RAS mm, so that
  fixed point + u = moving point. Files hold it as ITK/ANTs read it: see :func:`save_displacement`.
* **intensities**: CT in Hounsfield units is windowed to [0, 1] with :data:`DEFAULT_WINDOW`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Union

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations

from .checks import check_choice, check_int, check_number, describe
from .data import Dataset
from .phantom import WINDOW_HU

__all__ = ["DEFAULT_WINDOW", "LPS", "Scan", "ScanError", "load_scan", "window_intensities", "check_same_grid",
           "resample_scan", "slice_scan", "axial_slice", "dataset_from_scans", "dataset_from_folder",
           "scan_files", "pad_to_multiple",
           "displacement_to_mm", "displacement_to_voxels", "save_image", "save_labels", "save_displacement"]

DEFAULT_WINDOW: tuple[float, float] = WINDOW_HU
"""(-200, 300) HU, the abdominal soft-tissue window (level 50, width 500): fat (about -100),
water, organs and contrast-enhanced vessels (up to about 250) keep their contrast; air and
lung go to 0 and bone to 1. The phantom and the shipped feature CNN use it too."""
LPS = ("L", "P", "S")
"""The voxel axes of a loaded :class:`Scan` (x, y, z)."""
Window = Union[tuple[float, float], str, None]


class ScanError(ValueError):
    """A file that cannot be used as a scan or label map; the message names the file and why."""


@dataclass
class Scan:
    """A volume in LPS+ voxel order (see the module docstring).

    Attributes:
        data: [Z, Y, X], float32 (an image) or int64 (labels).
        affine: [4, 4] float64, voxel (x, y, z) -> RAS mm of ``data[z, y, x]``.
        kind: "image" or "labels".
        path: the file it came from (None if made in memory).
        file_axcodes: the voxel axes of the file (e.g. ("R", "A", "S")); results are written back in them.
        header: the file's NIfTI header (codes and units are copied to the results).
    """

    data: torch.Tensor
    affine: np.ndarray
    kind: str = "image"
    path: Path | None = None
    file_axcodes: tuple[str, ...] = LPS
    header: nib.Nifti1Header | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (z, y, x) in mm, the order of ``data``'s dimensions."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0)[::-1])

    def __repr__(self) -> str:
        name = self.path.name if self.path else "memory"
        return (f"Scan({self.kind}, {name}, shape [Z, Y, X] = {list(self.data.shape)}, spacing (z, y, x) = "
                f"{tuple(round(s, 3) for s in self.spacing)} mm, file axes {''.join(self.file_axcodes)})")


def _read(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The NIfTI image at ``path`` and its data as [X, Y, Z] (a 2D file gets Z = 1, trailing axes
    of size 1 are dropped), or a :class:`ScanError` that says what is wrong with the file."""
    if not path.is_file():
        raise ScanError(f"{path}: no such file")
    try:
        image = nib.load(path)
        nifti = isinstance(image, (nib.Nifti1Image, nib.Nifti2Image))
        array = np.asanyarray(image.dataobj) if nifti else None  # reads every byte: a truncated file fails here
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise ScanError(f"{path}: not a readable NIfTI file (.nii or .nii.gz), or a truncated one "
                        f"({type(exc).__name__}: {exc})") from None
    if not nifti:
        raise ScanError(f"{path}: a {type(image).__name__}, expected a NIfTI file (.nii or .nii.gz)")
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ScanError(f"{path}: expected a 3D volume (or a 2D slice), got data of shape {list(array.shape)}")
    return image, array


def window_intensities(values: torch.Tensor, window: Window = DEFAULT_WINDOW) -> torch.Tensor:
    """Intensities mapped linearly to [0, 1] and clipped: ``(v - lo) / (hi - lo)``.

    ``window``: (lo, hi) in the scan's units (HU for CT, default :data:`DEFAULT_WINDOW`),
    ``"auto"`` for the 0.5 and 99.5 percentiles (MR, which has no absolute units), or None
    to keep the values as they are.
    """
    if window is None:
        return values
    if isinstance(window, str):
        check_choice("window", window, ("auto",))
        lo, hi = (float(q) for q in np.percentile(values.cpu().numpy(), (0.5, 99.5)))
        hi = hi if hi > lo else lo + 1.0
    else:
        lo = check_number("window[0]", window[0])
        hi = check_number("window[1]", window[1], minimum=lo, strict_minimum=True)
    return ((values - lo) / (hi - lo)).clamp(0.0, 1.0)


def load_scan(path: str | Path, kind: str = "image", spacing: float | Sequence[float] | None = None,
              window: Window = DEFAULT_WINDOW) -> Scan:
    """Read a NIfTI volume or label map, reorient it to LPS+ and optionally resample and window it.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file (3D, or a 2D slice).
        kind: "image" (float32; windowed with ``window``, see :func:`window_intensities`) or
            "labels" (int64 values >= 0; float files are accepted when every value is a whole number).
        spacing: resample to this voxel size in mm (one number: isotropic; or (z, y, x)),
            linearly for images, nearest neighbour for labels (:func:`resample_scan`).

    Raises:
        ScanError: the file is missing, not NIfTI, truncated, not 3D, holds NaN or inf, or
            (labels) holds negative or non-integer values.
    """
    check_choice("kind", kind, ("image", "labels"))
    path = Path(path)
    image, array = _read(path)
    if not np.isfinite(array).all():
        raise ScanError(f"{path}: {int((~np.isfinite(array)).sum())} voxels are NaN or inf")
    if kind == "labels":
        if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
            bad = array[array != np.round(array)].flat[0]
            raise ScanError(f"{path}: labels must be integers, but the file holds {array.dtype} values such as "
                            f"{bad:g}; is this an image rather than a label map?")
        if array.min() < 0:
            raise ScanError(f"{path}: labels must be >= 0 (0 = background), got a minimum of {array.min():g}")
    ornt = orientations.ornt_transform(orientations.io_orientation(image.affine), orientations.axcodes2ornt(LPS))
    affine = image.affine @ orientations.inv_ornt_aff(ornt, array.shape)
    array = orientations.apply_orientation(array, ornt).transpose(2, 1, 0)  # [Z, Y, X]
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64 if kind == "labels" else np.float32))
    axcodes = tuple(orientations.aff2axcodes(image.affine))
    scan = Scan(tensor, affine, kind, path, axcodes, image.header.copy())
    scan = resample_scan(scan, spacing) if spacing is not None else scan
    return replace(scan, data=window_intensities(scan.data, window)) if kind == "image" else scan


def check_same_grid(name_a: str, a: Scan, name_b: str, b: Scan, atol: float = 1e-3) -> None:
    """Raise :class:`ScanError` unless two scans share one voxel grid (shape, and affine within ``atol`` mm)."""
    where = f"{name_a} ({a.path or 'memory'}) and {name_b} ({b.path or 'memory'})"
    if a.data.shape != b.data.shape:
        raise ScanError(f"{where} must have the same grid, but their shapes [Z, Y, X] differ: "
                        f"{list(a.data.shape)} and {list(b.data.shape)}")
    if not np.allclose(a.affine, b.affine, atol=atol):
        raise ScanError(f"{where} must have the same grid, but their affines differ (by up to "
                        f"{np.abs(a.affine - b.affine).max():.3g} mm):\n{a.affine.round(3)}\n{b.affine.round(3)}")


def resample_scan(scan: Scan, spacing: float | Sequence[float]) -> Scan:
    """``scan`` on a grid of voxel size ``spacing`` (mm; one number or (z, y, x)) over the same extent.

    The first voxel stays where it is (the affine's origin is kept, its columns scaled); an axis
    of n voxels of size s gets ``round(n * s / s')`` voxels. Images are interpolated linearly
    along each axis, labels take the nearest voxel's value; positions past the last voxel take
    its value.
    """
    target = [spacing] * 3 if isinstance(spacing, (int, float)) else list(spacing)
    if len(target) != 3:
        raise ValueError(f"spacing must be one number or three (z, y, x) in mm, got {describe(spacing)}")
    target = [check_number(f"spacing[{a}]", s, 0, strict_minimum=True) for a, s in enumerate(target)]
    data, affine = scan.data, scan.affine.copy()
    for dim, (old, new) in enumerate(zip(scan.spacing, target)):
        n = data.shape[dim]
        size = max(1, round(n * old / new))
        positions = (torch.arange(size, dtype=torch.float64) * (new / old)).clamp(0, n - 1)
        if scan.kind == "labels":
            data = data.index_select(dim, torch.floor(positions + 0.5).long())
        else:
            low = positions.floor().long()
            weight = (positions - low).to(data.dtype).reshape([-1 if d == dim else 1 for d in range(3)])
            high = (low + 1).clamp(max=n - 1)
            data = data.index_select(dim, low) * (1 - weight) + data.index_select(dim, high) * weight
        affine[:3, 2 - dim] *= new / old
    return replace(scan, data=data.contiguous(), affine=affine)


def slice_scan(scan: Scan, index: int) -> Scan:
    """The one-slice scan ``data[index:index + 1]`` [1, Y, X] with its affine (origin moved to that slice)."""
    index = check_int("index", index, minimum=0, maximum=scan.data.shape[0] - 1)
    affine = scan.affine.copy()
    affine[:3, 3] += index * affine[:3, 2]
    return replace(scan, data=scan.data[index:index + 1], affine=affine)


def axial_slice(scan: Scan, labels: Scan | None = None, index: int | str = "auto") -> int:
    """The axial slice to take from ``scan``: ``index`` itself (0..Z-1), or (``"auto"``) the slice
    with the largest labelled area of ``labels`` (the first of equal ones; the middle slice Z // 2
    without labels)."""
    if index != "auto":
        return check_int("index", index, minimum=0, maximum=scan.data.shape[0] - 1)
    if labels is None:
        return scan.data.shape[0] // 2
    return int((labels.data > 0).flatten(1).sum(1).argmax())


def pad_to_multiple(tensor: torch.Tensor, multiple: int, dims: int = 2) -> torch.Tensor:
    """Pad the last ``dims`` sizes of ``tensor`` with zeros *at the end* (bottom, right, last slices)
    up to multiples of ``multiple``: voxel 0 stays voxel 0, so the scan's affine still holds."""
    multiple = check_int("multiple", multiple, minimum=1)
    pads = []
    for n in reversed(tensor.shape[-dims:]):
        pads += [0, -n % multiple]
    return F.pad(tensor, pads) if any(pads) else tensor


def dataset_from_scans(scans: Sequence[tuple[Scan, Scan]], index: int | str = "auto",
                       label_names: Sequence[str] | None = None, test_ids: Sequence[int] = ()) -> Dataset:
    """A :class:`~tutorial_utils.data.Dataset` of one axial slice per (windowed image, labels) pair.

    Each pair must share one grid (:func:`check_same_grid`); ``index``: see :func:`axial_slice`.
    Slices of different sizes are padded with zeros at the bottom and right to the largest
    height and width, rounded up to a multiple of 4 (nothing is cropped). Resample the scans to
    one spacing first (``load_scan(..., spacing=...)``) so that a pixel means the same everywhere.
    ``label_names`` default to "background", "1", "2", ...; slices not in ``test_ids`` are for training.
    """
    images, labels = [], []
    for k, (image, label) in enumerate(scans):
        check_same_grid(f"scans[{k}] image", image, f"scans[{k}] labels", label)
        z = axial_slice(image, label, index)
        images.append(image.data[z])
        labels.append(label.data[z])
    height, width = (max(s.shape[d] for s in images) for d in (0, 1))
    height, width = height + -height % 4, width + -width % 4
    images, labels = (torch.stack([F.pad(s, (0, width - s.shape[1], 0, height - s.shape[0])) for s in slices])
                      for slices in (images, labels))
    if label_names is None:
        label_names = ["background"] + [str(v) for v in range(1, max(int(labels.max()), 1) + 1)]
    test_ids = [check_int(f"test_ids[{k}]", i) for k, i in enumerate(test_ids)]
    train_ids = [i for i in range(len(images)) if i not in test_ids]
    return Dataset.from_arrays(images, labels, label_names, train_ids, test_ids, source="custom")


LABELS_SUFFIX = "_seg"
"""A scan ``NAME.nii.gz`` has its label map in ``NAME_seg.nii.gz`` beside it (:func:`scan_files`)."""


def scan_files(folder: str | Path, labels_suffix: str = LABELS_SUFFIX) -> list[tuple[Path, Path]]:
    """The (image, labels) files of a folder, sorted by name: every ``NAME.nii[.gz]`` with ``NAME_seg.nii[.gz]``.

    An image without a label map is an error (it would silently be left out of training).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ScanError(f"folder must be a folder of NIfTI files; got {str(folder)!r}, which is not a folder")
    files = {path.name.removesuffix(".gz").removesuffix(".nii"): path for path in folder.iterdir()
             if path.name.endswith((".nii", ".nii.gz"))}
    images = sorted(name for name in files if not name.endswith(labels_suffix))
    missing = [files[name].name for name in images if name + labels_suffix not in files]
    if missing:
        raise ScanError(f"every scan in {folder} needs its label map NAME{labels_suffix}.nii.gz beside it; "
                        f"missing for {', '.join(missing)}")
    if not images:
        raise ScanError(f"{folder} holds no NIfTI scans (NAME.nii.gz with NAME{labels_suffix}.nii.gz)")
    return [(files[name], files[name + labels_suffix]) for name in images]


def dataset_from_folder(folder: str | Path, num_test: int = 0, in_plane_spacing: float | None = None,
                        window: Window = DEFAULT_WINDOW, index: int | str = "auto") -> Dataset:
    """:func:`dataset_from_scans` of every scan in ``folder`` (:func:`scan_files`); the last ``num_test`` are for testing.

    ``in_plane_spacing`` (mm) resamples every scan and label map to that voxel size in x and y
    first (the slices stay as they are; see :func:`resample_scan`): a pixel must mean the same
    size in every training slice.
    """
    pairs = scan_files(folder)
    num_test = check_int("num_test", num_test, minimum=0, maximum=len(pairs) - 1)
    if in_plane_spacing is not None:
        check_number("in_plane_spacing", in_plane_spacing, 0, strict_minimum=True)
    scans = []
    for image_path, labels_path in pairs:
        image, labels = load_scan(image_path, window=window), load_scan(labels_path, kind="labels")
        if in_plane_spacing is not None:
            spacing = (image.spacing[0], in_plane_spacing, in_plane_spacing)
            image, labels = resample_scan(image, spacing), resample_scan(labels, spacing)
        scans.append((image, labels))
    return dataset_from_scans(scans, index=index, test_ids=range(len(pairs) - num_test, len(pairs)))


def displacement_to_mm(displacement: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """The pull field (dz, dy, dx) [3, Z, Y, X] or (dy, dx) [2, H, W] in voxels of the grid ``affine``
    as [3, Z, Y, X] (one slice: Z = 1) with channels (x, y, z) in RAS mm: ``u = R @ (dx, dy, dz)``."""
    if displacement.dim() == 3 and displacement.shape[0] == 2:
        displacement = torch.cat([torch.zeros_like(displacement[:1]), displacement])[:, None]
    if displacement.dim() != 4 or displacement.shape[0] != 3:
        raise ValueError(f"displacement must be [3, Z, Y, X] (dz, dy, dx) or [2, H, W] (dy, dx) in voxels, "
                         f"got {describe(displacement)}")
    rotation = torch.as_tensor(affine[:3, :3], dtype=torch.float64, device=displacement.device)
    mm = torch.einsum("ij,jzyx->izyx", rotation, displacement.double().flip(0))
    return mm.to(displacement.dtype)


def displacement_to_voxels(displacement_mm: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """The inverse of :func:`displacement_to_mm`: [3, Z, Y, X] RAS mm -> (dz, dy, dx) voxels of ``affine``."""
    inverse = torch.as_tensor(np.linalg.inv(affine[:3, :3]), dtype=torch.float64, device=displacement_mm.device)
    voxels = torch.einsum("ij,jzyx->izyx", inverse, displacement_mm.double()).flip(0)
    return voxels.to(displacement_mm.dtype)


def _write(path: str | Path, array_zyx: np.ndarray, reference: Scan, intent: str | None = None) -> Path:
    """Write [Z, Y, X, ...] on ``reference``'s grid in the voxel order of its file, atomically."""
    path = Path(path)
    if tuple(array_zyx.shape[:3]) != tuple(reference.data.shape):
        raise ValueError(f"the data [Z, Y, X] = {list(array_zyx.shape[:3])} is not on the reference's grid "
                         f"{list(reference.data.shape)}")
    array = np.moveaxis(array_zyx, (0, 1, 2), (2, 1, 0))  # [X, Y, Z, ...] in LPS
    ornt = orientations.ornt_transform(orientations.axcodes2ornt(LPS),
                                       orientations.axcodes2ornt(reference.file_axcodes))
    affine = reference.affine @ orientations.inv_ornt_aff(ornt, array.shape[:3])
    image = nib.Nifti1Image(np.ascontiguousarray(orientations.apply_orientation(array, ornt)), affine)
    codes = [int(reference.header[c]) if reference.header is not None else 0 for c in ("qform_code", "sform_code")]
    image.set_qform(affine, code=codes[0] or 1)
    image.set_sform(affine, code=codes[1] or 1)
    image.header.set_xyzt_units("mm")
    if intent:
        image.header.set_intent(intent)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(".writing-" + path.name)
    nib.save(image, temporary)
    temporary.replace(path)
    return path


def save_image(path: str | Path, image: torch.Tensor, reference: Scan) -> Path:
    """Write ``image`` [Z, Y, X] (float) on ``reference``'s grid, with its affine and file orientation."""
    return _write(path, image.detach().cpu().float().numpy(), reference)


def save_labels(path: str | Path, labels: torch.Tensor, reference: Scan) -> Path:
    """Write integer ``labels`` [Z, Y, X] (values 0..65535) as uint16 on ``reference``'s grid."""
    if labels.is_floating_point() or (labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 65535)):
        raise ValueError(f"labels must be integers in 0..65535, got {describe(labels)}")
    return _write(path, labels.detach().cpu().numpy().astype(np.uint16), reference)


def save_displacement(path: str | Path, displacement: torch.Tensor, reference: Scan, units: str = "voxels") -> Path:
    """Write a displacement field as ITK and ANTs read it (``antsApplyTransforms -t displacement.nii.gz``).

    The file: a NIfTI vector image (intent_code 1007, NIFTI_INTENT_VECTOR), float32, shape
    [X, Y, Z, 1, 3] on ``reference``'s grid and affine, holding at every fixed voxel the vector
    from its physical point to the corresponding moving point, in mm, in ITK's LPS world
    (x to the Left, y Posterior): the RAS vector with x and y negated. This is ITK's
    convention for registration results (fixed point + displacement = moving point), i.e. our
    pull field in millimetres.

    ``displacement``: ``units="voxels"``: the pull field on ``reference``'s grid ([3, Z, Y, X]
    (dz, dy, dx), or [2, H, W] (dy, dx) for a one-slice reference); ``units="mm"``: [3, Z, Y, X]
    (x, y, z) RAS mm, as :func:`displacement_to_mm` gives.
    """
    check_choice("units", units, ("voxels", "mm"))
    mm = displacement_to_mm(displacement, reference.affine) if units == "voxels" else displacement
    lps = mm.detach().cpu().double() * torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)[:, None, None, None]
    return _write(path, lps.permute(1, 2, 3, 0)[:, :, :, None, :].float().numpy(), reference, intent="vector")
