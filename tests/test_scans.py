"""NIfTI in and out (tutorial_utils.scans): orientation, affine, spacing, labels, resampling,
the displacement field's ITK convention, and clear errors for bad files.

The files are written by hand (``nifti_files``: numpy and a hand-written voxel mapping, not
nibabel's orientation functions) in a non-canonical, oblique orientation with anisotropic voxels.
"""

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from nifti_files import file_voxel_to_lps, lps_affine, to_file_order, write

from tutorial_utils.register import resample_to
from tutorial_utils.scans import (
    DEFAULT_WINDOW,
    Scan,
    ScanError,
    axial_slice,
    check_same_grid,
    dataset_from_folder,
    dataset_from_scans,
    displacement_to_mm,
    displacement_to_voxels,
    load_scan,
    pad_to_multiple,
    resample_scan,
    save_displacement,
    save_image,
    save_labels,
    scan_files,
    slice_scan,
    window_intensities,
)

SHAPE = (5, 6, 7)  # [Z, Y, X]
SPACING_XYZ = (0.8, 0.9, 2.5)


@pytest.fixture
def volume():
    """HU values [Z, Y, X] and labels 0..4 [Z, Y, X]."""
    generator = np.random.default_rng(0)
    hu = generator.uniform(-1000, 1000, SHAPE).astype(np.float32)
    labels = generator.integers(0, 5, SHAPE).astype(np.uint8)
    return hu, labels


@pytest.fixture
def files(tmp_path, volume):
    hu, labels = volume
    affine = lps_affine(SPACING_XYZ)
    write(tmp_path / "image.nii.gz", hu, affine)
    write(tmp_path / "labels.nii.gz", labels, affine, dtype=np.uint8)
    return tmp_path / "image.nii.gz", tmp_path / "labels.nii.gz", affine


def test_load_reorients_to_lps_and_keeps_the_affine(files, volume):
    image_path, labels_path, affine = files
    assert nib.aff2axcodes(nib.load(image_path).affine) == ("P", "R", "S")  # not canonical
    image = load_scan(image_path, window=None)
    assert torch.equal(image.data, torch.from_numpy(volume[0]))
    assert image.data.dtype == torch.float32 and image.kind == "image"
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)  # the file stores float32
    assert image.spacing == pytest.approx(SPACING_XYZ[::-1], abs=1e-6)  # (z, y, x)
    assert image.file_axcodes == ("P", "R", "S")
    labels = load_scan(labels_path, kind="labels")
    assert labels.data.dtype == torch.int64
    assert torch.equal(labels.data, torch.from_numpy(volume[1]).long())
    check_same_grid("image", image, "labels", labels)


def test_the_default_window_maps_hu_to_0_1(files, volume):
    image = load_scan(files[0])
    lo, hi = DEFAULT_WINDOW
    expected = np.clip((volume[0] - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(image.data.numpy(), expected, atol=1e-6)
    values = torch.tensor([-1000.0, -200.0, 50.0, 300.0, 3000.0])
    assert window_intensities(values).tolist() == pytest.approx([0, 0, 0.5, 1, 1])
    assert window_intensities(values, (0, 100)).tolist() == pytest.approx([0, 0, 0.5, 1, 1])
    assert window_intensities(values, None) is values
    auto = window_intensities(torch.linspace(0, 1000, 1001), "auto")
    assert float(auto.min()) == 0 and float(auto.max()) == 1 and float(auto[500]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"window\[1\] must be >"):
        window_intensities(values, (300, -200))


def test_saved_image_and_labels_read_back_identically(tmp_path, files, volume):
    image = load_scan(files[0], window=None)
    labels = load_scan(files[1], kind="labels")
    save_image(tmp_path / "out" / "image.nii.gz", image.data, image)
    save_labels(tmp_path / "out" / "labels.nii.gz", labels.data, labels)
    original = nib.load(files[0])
    for name, expected in (("image", volume[0]), ("labels", volume[1])):
        written = nib.load(tmp_path / "out" / f"{name}.nii.gz")
        assert nib.aff2axcodes(written.affine) == ("P", "R", "S")  # the file's own orientation
        np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)
        np.testing.assert_allclose(written.header.get_zooms(), original.header.get_zooms(), atol=1e-6)
        assert int(written.header["sform_code"]) > 0 and int(written.header["qform_code"]) > 0
        assert np.array_equal(np.asanyarray(written.dataobj), to_file_order(expected))
    assert np.asanyarray(nib.load(tmp_path / "out" / "labels.nii.gz").dataobj).dtype.kind == "u"
    again = load_scan(tmp_path / "out" / "labels.nii.gz", kind="labels")
    assert torch.equal(again.data, labels.data)
    with pytest.raises(ValueError, match="labels must be integers"):
        save_labels(tmp_path / "bad.nii.gz", labels.data.float(), labels)
    with pytest.raises(ValueError, match="not on the reference's grid"):
        save_image(tmp_path / "bad.nii.gz", image.data[:2], image)


def test_pixels_to_mm_and_back_is_exact_on_a_rotated_anisotropic_grid():
    affine = lps_affine((0.7, 1.3, 3.1))
    field = torch.randn(3, 4, 5, 6, dtype=torch.float64) * 3  # (dz, dy, dx) voxels
    mm = displacement_to_mm(field, affine)
    torch.testing.assert_close(displacement_to_voxels(mm, affine), field, atol=1e-12, rtol=0)
    for z, y, x in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:  # fixed point + u = the point d voxels away
        dz, dy, dx = field[:, z, y, x].tolist()
        moved = affine @ [x + dx, y + dy, z + dz, 1] - affine @ [x, y, z, 1]
        np.testing.assert_allclose(mm[:, z, y, x].numpy(), moved[:3], atol=1e-12)
    one_slice = displacement_to_mm(field[1:, 0], affine)  # (dy, dx) [2, H, W]
    assert one_slice.shape == (3, 1, 5, 6)
    torch.testing.assert_close(displacement_to_voxels(one_slice, affine)[1:, 0], field[1:, 0], atol=1e-12, rtol=0)


def test_saved_displacement_is_itk_lps_and_maps_fixed_to_moving_points(tmp_path, files):
    reference = load_scan(files[0])
    generator = torch.Generator().manual_seed(1)
    field = torch.randn(3, *SHAPE, generator=generator, dtype=torch.float64) * 2  # (dz, dy, dx) voxels
    save_displacement(tmp_path / "displacement.nii.gz", field, reference)
    written = nib.load(tmp_path / "displacement.nii.gz")
    assert written.header["intent_code"] == 1007  # NIFTI_INTENT_VECTOR, as ANTs writes its warps
    assert written.shape == (SHAPE[1], SHAPE[2], SHAPE[0], 1, 3)  # the file's voxel order, then 1, 3
    assert written.get_data_dtype() == np.float32
    vectors = np.asanyarray(written.dataobj)[:, :, :, 0, :].astype(np.float64)  # LPS mm
    ras = vectors * [-1, -1, 1]  # ITK's LPS -> NIfTI's RAS: x and y change sign
    lps_affine_ = written.affine @ np.linalg.inv(file_voxel_to_lps(SHAPE))
    for a, b, c in [(0, 0, 0), (5, 6, 4), (2, 3, 1), (4, 1, 3)]:
        fixed_point = written.affine @ [a, b, c, 1]
        x, y, z = (file_voxel_to_lps(SHAPE) @ [a, b, c, 1])[:3].astype(int)
        dz, dy, dx = field[:, z, y, x].tolist()
        moving_point = lps_affine_ @ [x + dx, y + dy, z + dz, 1]
        np.testing.assert_allclose(fixed_point[:3] + ras[a, b, c], moving_point[:3], atol=1e-4)
    mm = displacement_to_mm(field, reference.affine)  # the same file from a field in mm
    save_displacement(tmp_path / "mm.nii.gz", mm, reference, units="mm")
    assert np.array_equal(np.asanyarray(nib.load(tmp_path / "mm.nii.gz").dataobj), np.asanyarray(written.dataobj))


def test_resample_scan_is_linear_for_images_nearest_for_labels(files):
    image = load_scan(files[0], window=None)
    z, y, x = image.spacing
    finer = resample_scan(image, (z / 2, y, x))  # twice as many slices
    assert finer.data.shape == (10, 6, 7)
    torch.testing.assert_close(finer.data[0:9:2], image.data, rtol=0, atol=1e-4)  # the old slices
    torch.testing.assert_close(finer.data[1:8:2], (image.data[:-1] + image.data[1:]) / 2, rtol=0, atol=1e-3)
    torch.testing.assert_close(finer.data[9], image.data[4])  # past the last slice: its values
    for k in (0, 3, 7):  # new slice k lies at old slice k / 2
        np.testing.assert_allclose(finer.affine @ [2, 3, k, 1], image.affine @ [2, 3, k / 2, 1], atol=1e-9)
    assert finer.spacing == pytest.approx((z / 2, y, x))
    labels = load_scan(files[1], kind="labels")
    coarse = resample_scan(labels, 2 * max(labels.spacing))  # isotropic
    assert coarse.data.dtype == torch.int64 and coarse.spacing == pytest.approx((5.0,) * 3)
    assert set(coarse.data.unique().tolist()) <= set(labels.data.unique().tolist())
    assert int(coarse.data[0, 0, 0]) == int(labels.data[0, 0, 0])  # the first voxel stays in place
    with pytest.raises(ValueError, match="three"):
        resample_scan(labels, (1.0, 2.0))


def test_resample_to_follows_the_world_coordinates(files):
    image = load_scan(files[0], window=None)
    data = image.data[None]
    same = resample_to(data, image.affine, image.affine, image.data.shape)
    torch.testing.assert_close(same, data, rtol=0, atol=1e-3)
    one_slice_on = image.affine[:3, 2]  # the world vector of one slice
    shifted = resample_to(data, image.affine, image.affine, image.data.shape, offset_mm=one_slice_on)
    torch.testing.assert_close(shifted[0, :-1], image.data[1:], rtol=0, atol=1e-3)
    assert float(shifted[0, -1].abs().max()) < 1e-2  # past the volume: zeros
    field = torch.from_numpy(np.broadcast_to(one_slice_on[:, None, None, None], (3, *SHAPE)).copy()).float()
    torch.testing.assert_close(resample_to(data, image.affine, image.affine, image.data.shape,
                                           displacement_mm=field), shifted, rtol=0, atol=1e-3)
    nearest = resample_to(data, image.affine, image.affine, image.data.shape, mode="nearest")
    assert torch.equal(nearest, data)


def test_slices_and_a_dataset_from_scans():
    affine = lps_affine((1.0, 1.0, 2.0), oblique=False)
    labels = torch.zeros(4, 30, 37, dtype=torch.int64)
    labels[1, :5, :5] = 1
    labels[2, :10, :10] = 2  # the largest labelled area
    image = torch.rand(4, 30, 37)
    scans = [(Scan(image, affine), Scan(labels, affine, "labels")), (Scan(image[:, :28], affine),
                                                                      Scan(labels[:, :28], affine, "labels"))]
    assert axial_slice(scans[0][0], scans[0][1]) == 2
    assert axial_slice(scans[0][0]) == 2  # no labels: the middle slice
    assert axial_slice(scans[0][0], scans[0][1], 1) == 1
    with pytest.raises(ValueError, match="index must be an integer <= 3"):
        axial_slice(scans[0][0], None, 4)
    one = slice_scan(scans[0][0], 2)
    np.testing.assert_allclose(one.affine @ [0, 0, 0, 1], affine @ [0, 0, 2, 1])
    dataset = dataset_from_scans(scans, test_ids=[1])
    assert dataset.images.shape == (2, 1, 32, 40)  # padded at the end to multiples of 4
    assert torch.equal(dataset.images[0, 0, :30, :37], image[2]) and float(dataset.images[0, 0, 30:].abs().max()) == 0
    assert torch.equal(dataset.labels[1, :28, :37], labels[2, :28])
    assert dataset.label_names == ("background", "1", "2") and dataset.test_ids == (1,)
    assert pad_to_multiple(torch.ones(1, 5, 6), 4, dims=3).shape == (4, 8, 8)


def labelled_folder(folder, count: int = 3, spacing_xyz=(0.8, 0.9, 2.5)):
    """``count`` scans case_k.nii.gz with case_k_seg.nii.gz; in scan k, slice k % 4 has the largest labelled area."""
    generator = np.random.default_rng(1)
    volumes = []
    for k in range(count):
        hu = generator.uniform(-300, 400, SHAPE).astype(np.float32)  # [Z, Y, X]
        labels = np.zeros(SHAPE, dtype=np.uint8)
        labels[:, 0, 0] = 1
        labels[k % SHAPE[0], :3, :4] = 2
        write(folder / f"case_{k}.nii.gz", hu, lps_affine(spacing_xyz))
        write(folder / f"case_{k}_seg.nii.gz", labels, lps_affine(spacing_xyz), dtype=np.uint8)
        volumes.append((hu, labels))
    return volumes


def test_a_dataset_from_a_folder_takes_each_scans_most_labelled_slice(tmp_path):
    volumes = labelled_folder(tmp_path)
    (tmp_path / "notes.txt").write_text("not a scan")
    assert [(a.name, b.name) for a, b in scan_files(tmp_path)] == [
        (f"case_{k}.nii.gz", f"case_{k}_seg.nii.gz") for k in range(3)]
    dataset = dataset_from_folder(tmp_path, num_test=1)
    assert dataset.train_ids == (0, 1) and dataset.test_ids == (2,)
    assert dataset.images.shape == (3, 1, 8, 8)  # [Y, X] = [6, 7] padded to multiples of 4
    for k, (hu, labels) in enumerate(volumes):
        low, high = DEFAULT_WINDOW
        expected = np.clip((hu[k] - low) / (high - low), 0, 1)  # the window, by hand
        np.testing.assert_allclose(dataset.images[k, 0, :6, :7].numpy(), expected, atol=1e-6)
        assert torch.equal(dataset.labels[k, :6, :7], torch.from_numpy(labels[k].astype(np.int64)))
    finer = dataset_from_folder(tmp_path, in_plane_spacing=0.45)  # x: 7 * 0.8 / 0.45 -> 12, y: 6 * 0.9 / 0.45 = 12
    assert finer.images.shape == (3, 1, 12, 12) and finer.test_ids == ()


def test_a_folder_with_a_scan_but_no_labels(tmp_path):
    labelled_folder(tmp_path, count=2)
    (tmp_path / "case_1_seg.nii.gz").rename(tmp_path / "case_1_mask.nii.gz")
    with pytest.raises(ScanError, match="missing for case_1.nii.gz"):
        scan_files(tmp_path)
    with pytest.raises(ScanError, match="not a folder"):
        scan_files(tmp_path / "case_0.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanError, match="holds no NIfTI scans"):
        scan_files(tmp_path / "empty")
    (tmp_path / "case_1_mask.nii.gz").rename(tmp_path / "case_1_seg.nii.gz")
    with pytest.raises(ValueError, match="num_test must be"):
        dataset_from_folder(tmp_path, num_test=2)


# --------------------------------------------------------------------------- bad files


def test_a_file_that_is_not_nifti(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("this is not an image\n" * 40)
    with pytest.raises(ScanError, match="notes.nii: not a readable NIfTI file"):
        load_scan(path)
    with pytest.raises(ScanError, match="missing.nii.gz: no such file"):
        load_scan(tmp_path / "missing.nii.gz")


def test_a_truncated_file(tmp_path, files):
    data = files[0].read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ScanError, match="truncated.nii.gz: not a readable NIfTI file .* truncated"):
        load_scan(path)
    raw = tmp_path / "raw.nii"  # uncompressed, cut in the middle of the voxels
    raw.write_bytes(gzip.decompress(data)[:400])
    with pytest.raises(ScanError, match="raw.nii: not a readable NIfTI"):
        load_scan(raw)


def test_another_format_that_nibabel_reads(tmp_path):
    path = tmp_path / "scan.mgz"
    nib.save(nib.MGHImage(np.zeros((4, 4, 4), np.float32), np.eye(4)), path)
    with pytest.raises(ScanError, match="scan.mgz: a MGHImage, expected a NIfTI file"):
        load_scan(path)


def test_image_and_labels_on_different_grids(tmp_path, files, volume):
    image = load_scan(files[0])
    write(tmp_path / "small.nii.gz", volume[1][:, :4], lps_affine(SPACING_XYZ), dtype=np.uint8)
    write(tmp_path / "moved.nii.gz", volume[1], lps_affine(SPACING_XYZ, origin=(0, 0, 0)), dtype=np.uint8)
    with pytest.raises(ScanError, match=r"small.nii.gz\) must have the same grid, but their shapes"):
        check_same_grid("image", image, "labels", load_scan(tmp_path / "small.nii.gz", kind="labels"))
    with pytest.raises(ScanError, match=r"image \(.*image.nii.gz\) and labels .* affines differ"):
        check_same_grid("image", image, "labels", load_scan(tmp_path / "moved.nii.gz", kind="labels"))


def test_labels_that_are_not_integers(tmp_path, volume):
    affine = lps_affine(SPACING_XYZ)
    write(tmp_path / "whole.nii.gz", volume[1].astype(np.float32), affine)  # floats holding whole numbers: fine
    assert load_scan(tmp_path / "whole.nii.gz", kind="labels").data.dtype == torch.int64
    write(tmp_path / "float.nii.gz", volume[1] + 0.5, affine)
    with pytest.raises(ScanError, match="float.nii.gz: labels must be integers, .* such as \\d\\.5"):
        load_scan(tmp_path / "float.nii.gz", kind="labels")
    write(tmp_path / "negative.nii.gz", volume[1].astype(np.int16) - 1, affine, dtype=np.int16)
    with pytest.raises(ScanError, match="negative.nii.gz: labels must be >= 0"):
        load_scan(tmp_path / "negative.nii.gz", kind="labels")


def test_nan_voxels_and_4d_files(tmp_path, volume):
    hu = volume[0].copy()
    hu[0, 0, 0] = np.nan
    write(tmp_path / "nan.nii.gz", hu, lps_affine(SPACING_XYZ))
    with pytest.raises(ScanError, match="nan.nii.gz: 1 voxels are NaN or inf"):
        load_scan(tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), tmp_path / "series.nii.gz")
    with pytest.raises(ScanError, match=r"series.nii.gz: expected a 3D volume .* \[4, 4, 4, 2\]"):
        load_scan(tmp_path / "series.nii.gz")
