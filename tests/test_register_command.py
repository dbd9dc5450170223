"""``python -m tutorial_utils.register`` end to end on phantom scans written as NIfTI files.

Fixed and moving scans are different phantom patients, written in a non-canonical, oblique
orientation with anisotropic voxels (``nifti_files``). The checks read the outputs back with
nibabel and recompute what the command reports (Dice by counting voxels, the displacement
field's convention by following it with numpy).
"""

import contextlib
import io
import json
import math
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from nifti_files import dice_loop, lps_affine, write

from tutorial_utils.phantom import NUM_LABELS, WINDOW_HU, make_phantom, make_phantom_volume
from tutorial_utils.register import main


def hounsfield(grey: torch.Tensor) -> np.ndarray:
    """The phantom's 0..255 grey values back in HU (float32)."""
    lo, hi = WINDOW_HU
    return (lo + grey.numpy().astype(np.float32) * ((hi - lo) / 255)).astype(np.float32)


def write_pair(folder, images, labels, spacing_xyz):
    """Fixed = images[0], moving = images[1] (each [Z, Y, X]), one grid; returns the four paths."""
    affine = lps_affine(spacing_xyz)
    paths = {}
    for k, name in enumerate(("fixed", "moving")):
        paths[name] = folder / f"{name}.nii.gz"
        paths[name + "_labels"] = folder / f"{name}_labels.nii.gz"
        write(paths[name], hounsfield(images[k]), affine)
        write(paths[name + "_labels"], labels[k].numpy(), affine, dtype=np.uint8)
    return paths


def run(argv):
    """``main(argv)`` with its printed output captured: (exit status, output)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main([str(a) for a in argv])
    return status, out.getvalue()


def arguments(paths, out, *extra):
    return [paths["fixed"], paths["moving"], "--fixed-labels", paths["fixed_labels"],
            "--moving-labels", paths["moving_labels"], "--out", out, *extra]


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory, single_thread):
    """Two slices per scan (256 x 320, 0.8 x 0.8 x 5 mm); the shipped feature CNN."""
    folder = tmp_path_factory.mktemp("scans2d")
    images, labels = make_phantom(4, shape=(256, 320))
    paths = write_pair(folder, [images[:2], images[2:]], [labels[:2], labels[2:]], (0.8, 0.8, 5.0))
    status, printed = run(arguments(paths, folder / "out", "--2d-slice", "auto", "--features", "cnn"))
    return paths, folder / "out", status, printed


@pytest.fixture(scope="module")
def run_3d(tmp_path_factory, single_thread):
    """Volumes of 16 x 48 x 60 voxels of 2 x 2 x 3 mm (registered at 2 mm isotropic); MIND features."""
    folder = tmp_path_factory.mktemp("scans3d")
    images, labels = make_phantom_volume(2, shape=(48, 60), depth=16, supersample=1)
    paths = write_pair(folder, images, labels, (2.0, 2.0, 3.0))
    status, printed = run(arguments(paths, folder / "out"))
    return paths, folder / "out", status, printed


def read(path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def check_outputs(paths, out, status, printed, fixed_labels: np.ndarray, moving_labels: np.ndarray):
    """The files, their grid, the JSON against Dice counted here, and the field's convention."""
    assert status == 0
    for stage in ("[1/4", "[2/4", "[3/4", "[4/4"):
        assert stage in printed
    assert "Dice before" in printed and "folding fraction" in printed
    warped_labels, affine = read(out / "moving_labels_warped.nii.gz")
    warped, warped_affine = read(out / "moving_warped.nii.gz")
    field, field_affine = read(out / "displacement.nii.gz")
    assert warped_labels.shape == warped.shape == fixed_labels.shape == field.shape[:3]
    assert field.shape[3:] == (1, 3) and nib.load(out / "displacement.nii.gz").header["intent_code"] == 1007
    assert np.allclose(affine, warped_affine) and np.allclose(affine, field_affine)
    assert warped_labels.dtype.kind == "u" and warped.dtype == np.float32
    metrics = json.loads((out / "metrics.json").read_text())
    # the primary score: only the labels that the fixed and the moving map both show count (NaN: null)
    shown_by_both = set(np.unique(fixed_labels).tolist()) & set(np.unique(moving_labels).tolist())
    before = dice_loop(fixed_labels.astype(int), moving_labels.astype(int), NUM_LABELS)
    after = dice_loop(fixed_labels.astype(int), warped_labels.astype(int), NUM_LABELS)
    before, after = ([value if label in shown_by_both else float("nan") for label, value in enumerate(values)]
                     for values in (before, after))
    for label in range(1, NUM_LABELS):
        for name, counted in (("dice_before", before), ("dice_after", after)):
            reported = metrics[name][str(label)]
            assert (reported is None) if math.isnan(counted[label]) else reported == pytest.approx(counted[label])
    mean_before = np.nanmean(before[1:])
    mean_after = np.nanmean(after[1:])
    assert metrics["mean_dice_before"] == pytest.approx(mean_before)
    assert metrics["mean_dice_after"] == pytest.approx(mean_after)
    assert mean_after > mean_before + 0.05
    assert 0 <= metrics["folding_fraction"] <= 1
    # the field, followed with numpy: fixed voxel -> world (RAS) + vector (LPS -> RAS) -> moving voxel
    moving_labels_file, moving_affine = read(paths["moving_labels"])
    index = np.stack(np.meshgrid(*[np.arange(n) for n in field.shape[:3]], indexing="ij"), -1).reshape(-1, 3)
    points = index @ field_affine[:3, :3].T + field_affine[:3, 3] + field[:, :, :, 0].reshape(-1, 3) * [-1, -1, 1]
    voxel = np.rint((points - moving_affine[:3, 3]) @ np.linalg.inv(moving_affine[:3, :3]).T).astype(int)
    inside = np.all((voxel >= 0) & (voxel < moving_labels_file.shape), axis=1)
    looked_up = np.zeros(len(voxel), int)
    looked_up[inside] = moving_labels_file[tuple(voxel[inside].T)]
    assert (looked_up == warped_labels.reshape(-1)).mean() > 0.99  # nearest-neighbour ties may differ
    return metrics


def test_2d_registration_end_to_end(run_2d):
    paths, out, status, printed = run_2d
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "2d" and metrics["features"] == "cnn"
    fixed_labels, fixed_affine = read(paths["fixed_labels"])  # file axes (P, R, S): [Y, X, Z]
    moving_labels, _ = read(paths["moving_labels"])
    areas = (fixed_labels > 0).sum(axis=(0, 1))
    k = int(np.argmax(areas))
    assert metrics["slice"] == k  # auto: the slice with the largest labelled area
    check_outputs(paths, out, status, printed, fixed_labels[:, :, k:k + 1], moving_labels[:, :, k:k + 1])
    _, affine = read(out / "moving_labels_warped.nii.gz")
    slice_affine = fixed_affine.copy()
    slice_affine[:3, 3] += k * fixed_affine[:3, 2]  # the file's third axis is S: slice k
    np.testing.assert_allclose(affine, slice_affine, atol=1e-4)


def test_3d_registration_end_to_end(run_3d):
    paths, out, status, printed = run_3d
    fixed_labels, fixed_affine = read(paths["fixed_labels"])
    moving_labels, _ = read(paths["moving_labels"])
    metrics = check_outputs(paths, out, status, printed, fixed_labels, moving_labels)
    assert metrics["mode"] == "3d" and metrics["slice"] is None
    assert "at (2.0, 2.0, 2.0) mm" in printed  # registered at 2 mm isotropic
    _, affine = read(out / "moving_warped.nii.gz")
    np.testing.assert_allclose(affine, fixed_affine, atol=1e-4)  # written on the fixed scan's own grid
    warped, _ = read(out / "moving_warped.nii.gz")
    assert WINDOW_HU[0] - 1e-3 <= warped.min() and warped.max() <= WINDOW_HU[1] + 1e-3  # HU, as in the file


def test_displacement_field_as_simpleitk_reads_it(run_3d):
    """ITK itself: resampling the moving labels with the field gives the command's warped labels."""
    sitk = pytest.importorskip("SimpleITK")
    paths, out, _, _ = run_3d
    field = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    reference = sitk.ReadImage(str(out / "moving_labels_warped.nii.gz"))
    resampled = sitk.Resample(sitk.ReadImage(str(paths["moving_labels"])), reference, transform,
                              sitk.sitkNearestNeighbor, 0)
    same = sitk.GetArrayFromImage(resampled) == sitk.GetArrayFromImage(reference)
    assert same.mean() > 0.99


def test_options_without_fixed_labels(tmp_path, single_thread):
    """Instance optimisation, no pre-alignment, centres of mass, an automatic window; no metrics."""
    images, labels = make_phantom(4, shape=(64, 80))
    paths = write_pair(tmp_path, [images[:2], images[2:]], [labels[:2], labels[2:]], (3.2, 3.2, 5.0))
    status, printed = run([paths["fixed"], paths["moving"], "--moving-labels", paths["moving_labels"],
                           "--out", tmp_path / "out", "--2d-slice", "1", "--prealign", "none",
                           "--instance-optimise", "--initial", "mass", "--window", "auto", "--features", "intensity", "--spacing", "1.6"])
    assert status == 0 and "slice 1, grid [Z, Y, X] = [1, 128, 160]" in printed  # registered at 1.6 mm
    assert (tmp_path / "out" / "moving_labels_warped.nii.gz").is_file()
    assert not (tmp_path / "out" / "metrics.json").exists()
    warped_labels, _ = read(tmp_path / "out" / "moving_labels_warped.nii.gz")
    assert warped_labels.shape == (64, 80, 1)  # written on the fixed slice's own grid (file axes P, R, S)
    assert set(np.unique(warped_labels)) <= set(range(NUM_LABELS))


# --------------------------------------------------------------------------- bad files, bad arguments


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    images, labels = make_phantom(2, shape=(32, 40))
    paths = write_pair(folder, [images[:1], images[1:]], [labels[:1], labels[1:]], (6.4, 6.4, 5.0))
    (folder / "notes.nii.gz").write_text("not a scan")
    data = paths["moving"].read_bytes()
    (folder / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    write(folder / "other_grid.nii.gz", labels[:1, :, :20].numpy(), lps_affine((6.4, 6.4, 5.0)), dtype=np.uint8)
    (folder / "weights.pt").write_text("not a checkpoint")
    return paths, folder


@pytest.mark.parametrize("change, message", [
    ({"fixed": "notes.nii.gz"}, r"notes.nii.gz: not a readable NIfTI file"),
    ({"moving": "truncated.nii.gz"}, r"truncated.nii.gz: not a readable NIfTI file .* truncated"),
    ({"fixed": "missing.nii.gz"}, r"missing.nii.gz: no such file"),
    ({"fixed_labels": "other_grid.nii.gz"}, r"fixed labels \(.*other_grid.nii.gz\) and fixed image .* shapes"),
    ({"extra": ["--2d-slice", "-1"]}, r"--2d-slice: must be an integer >= 0"),
    ({"extra": ["--2d-slice", "3"]}, r"--2d-slice 3: .*fixed.nii.gz has axial slices 0..0"),
    ({"extra": ["--features", "missing.pt", "--2d-slice", "0"]}, r"--features missing.pt: expected mind, intensity"),
    ({"extra": ["--features", "WEIGHTS", "--2d-slice", "0"]}, r"--features .*weights.pt: not a feature CNN checkpoint"),
    ({"extra": ["--features", "cnn"]}, r"--features cnn: a feature CNN is 2D"),
    ({"extra": ["--instance-optimise"]}, r"--prealign and --instance-optimise are 2D options"),
    ({"extra": ["--window", "300,-200"]}, r"--window: .*LO < HI"),
    ({"extra": ["--spacing", "0"]}, r"--spacing: .*must be > 0"),
    ({}, r"fixed.nii.gz: the 3D registration grid \[1, \d+, \d+\] has fewer than 8 voxels"),
])
def test_bad_files_and_arguments_exit_2_with_a_message(small_files, tmp_path, capsys, change, message):
    paths, folder = small_files
    paths = dict(paths, **{k: folder / v for k, v in change.items() if k != "extra"})
    extra = [str(folder / "weights.pt") if a == "WEIGHTS" else a for a in change.get("extra", [])]
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        run(arguments(paths, tmp_path / "out", *extra))
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out" / "displacement.nii.gz").exists()
