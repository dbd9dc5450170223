"""NIfTI files for the tests, built by hand (numpy only), in a non-canonical, oblique orientation.

A volume is given as the tutorial holds it, ``[Z, Y, X]`` with voxel axes Left, Posterior,
Superior (LPS+: radiological display, like the phantom). The file stores it as a scanner might:
voxel axes (Posterior, Right, Superior) -- file voxel ``(a, b, c)`` is the LPS voxel
``(x, y, z) = (X - 1 - b, a, c)`` -- with an affine rotated by 10 degrees about S and 4 about R.
"""

import nibabel as nib
import numpy as np


def rotation(degrees_s: float = 10.0, degrees_r: float = 4.0) -> np.ndarray:
    """A rotation [3, 3] about the S axis, then about the R axis (RAS world)."""
    a, b = np.deg2rad(degrees_s), np.deg2rad(degrees_r)
    about_s = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_r = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return about_r @ about_s


def lps_affine(spacing_xyz=(0.8, 0.9, 2.5), origin=(12.0, -30.0, 40.0), oblique: bool = True) -> np.ndarray:
    """The affine of LPS voxels (x, y, z): columns -sx R, -sy A, sz S (rotated when ``oblique``)."""
    affine = np.eye(4)
    affine[:3, :3] = (rotation() if oblique else np.eye(3)) @ np.diag([-spacing_xyz[0], -spacing_xyz[1],
                                                                       spacing_xyz[2]])
    affine[:3, 3] = origin
    return affine


def file_voxel_to_lps(shape_zyx) -> np.ndarray:
    """[4, 4]: file voxel (a, b, c, 1) -> LPS voxel (x, y, z, 1) = (X - 1 - b, a, c, 1)."""
    X = shape_zyx[2]
    return np.array([[0, -1, 0, X - 1], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)


def to_file_order(volume_zyx: np.ndarray) -> np.ndarray:
    """[Z, Y, X] (LPS) -> the file's [Y, X reversed, Z] (axes P, R, S)."""
    lps_xyz = np.asarray(volume_zyx).transpose(2, 1, 0)  # [X, Y, Z]
    return np.ascontiguousarray(lps_xyz[::-1].transpose(1, 0, 2))


def write(path, volume_zyx, affine_lps: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Write ``volume_zyx`` [Z, Y, X] with LPS affine ``affine_lps`` in the file orientation above;
    returns the file's affine."""
    volume_zyx = np.asarray(volume_zyx)
    affine = affine_lps @ file_voxel_to_lps(volume_zyx.shape)
    nib.save(nib.Nifti1Image(to_file_order(volume_zyx).astype(dtype), affine), str(path))
    return affine


def dice_loop(a: np.ndarray, b: np.ndarray, num_labels: int) -> list:
    """Dice of every label 0..num_labels-1, counting voxel by voxel (NaN: a label in neither map)."""
    size_a, size_b, both = [0] * num_labels, [0] * num_labels, [0] * num_labels
    for x, y in zip(a.ravel().tolist(), b.ravel().tolist()):
        size_a[x] += 1
        size_b[y] += 1
        if x == y:
            both[x] += 1
    return [2 * both[v] / (size_a[v] + size_b[v]) if size_a[v] + size_b[v] else float("nan")
            for v in range(num_labels)]
