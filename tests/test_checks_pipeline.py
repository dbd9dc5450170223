"""Bad input to the pipeline and its commands gets one clear error, before any computation.

The registrations, instance optimisation, the trainers, ``Dataset.from_arrays`` and the
command lines all use the shared checks of :mod:`tutorial_utils.checks`. Most important: one
NaN pixel used to reach grid_sample's backward pass in the affine pre-alignment and kill the
Python process; the tests below never let such a computation start (the building blocks are
replaced by functions that fail the test if they are called), and the crash itself is only
ever provoked in a subprocess.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from blob_data import blob_dataset
from cli_helpers import exits_with_usage

from tutorial_utils import continuous, instance, train
from tutorial_utils import prealign as P
from tutorial_utils import registration as G
from tutorial_utils.data import Dataset
from tutorial_utils.explorer import validate_parameters
from tutorial_utils.models import DisplacementUNet
from tutorial_utils.three_d import registration as G3
from tutorial_utils.three_d import sparse as S3

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]


def _image(H: int = 32, W: int = 48, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A smooth random image [1, 1, H, W] in [0, 1]."""
    noise = torch.rand(1, 1, H // 4, W // 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return torch.nn.functional.interpolate(noise, size=(H, W), mode="bilinear", align_corners=False)


def _with(image: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of ``image`` with one pixel set to ``value``."""
    image = image.clone()
    image[0, 0, 5, 7] = value
    return image


@pytest.fixture
def no_computation(monkeypatch):
    """Replace the computing building blocks by functions that fail the test: a check that is
    missing then shows as a failure, never as a NaN grid in grid_sample (a crashed process)."""
    def boom(*args, **kwargs):
        raise AssertionError("a computation started before the inputs were checked")

    for module, names in ((G, ("warp", "extract_features")),
                          (P, ("warp", "affine_displacement", "translation_displacement", "_intensity_moments")),
                          (G3, ("extract_features3d",)),
                          (S3, ("extract_features3d",)),
                          (instance, ("extract_features", "warp")),
                          (continuous, ("prealign_displacement", "_prepare_training_data")),
                          (train, ("_prepare_training_data",))):
        for name in names:
            monkeypatch.setattr(module, name, boom)


# --------------------------------------------------------------------------- NaN and inf pixels


def _entry_points(fixed: torch.Tensor, moving: torch.Tensor) -> dict:
    """Every entry that takes a pair of 2D images, as zero-argument calls."""
    zeros = torch.zeros(1, 2, *fixed.shape[-2:])
    matrix = torch.eye(2, 3)[None]
    return {
        "register_images": lambda: G.register_images(fixed, moving),
        "register_images none": lambda: G.register_images(fixed, moving, "intensity", prealign="none"),
        "prealign_displacement": lambda: P.prealign_displacement(fixed, moving, "affine"),
        "refine_affine": lambda: P.refine_affine(fixed, moving, matrix),
        "moments_affine": lambda: P.moments_affine(fixed, moving),
        "centre_of_mass_shift": lambda: P.centre_of_mass_shift(fixed, moving),
        "instance_optimise": lambda: instance.instance_optimise(fixed, moving, zeros),
        "register_unet": lambda: continuous.register_unet(DisplacementUNet(), fixed, moving),
    }


@pytest.mark.parametrize("entry", list(_entry_points(_image(), _image())))
@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "inf"), (-float("inf"), "inf")])
@pytest.mark.parametrize("which", ["image_fixed", "image_moving"])
def test_a_non_finite_pixel_is_refused_before_any_computation(no_computation, entry, value, kind, which):
    fixed, moving = _image(seed=1), _image(seed=2)
    if which == "image_fixed":
        fixed = _with(fixed, value)
    else:
        moving = _with(moving, value)
    with pytest.raises(ValueError, match=f"{which} must be finite, but 1 of its 1536 values are {kind}"):
        _entry_points(fixed, moving)[entry]()


@pytest.mark.parametrize("register", [G3.register_volumes, S3.register_volumes_sparse])
def test_a_non_finite_voxel_is_refused_before_any_computation(no_computation, register):
    volume = torch.rand(1, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    bad = volume.clone()
    bad[0, 0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="volume_moving must be finite.*NaN"):
        register(volume, bad)


def test_the_nan_crash_is_gone():
    """Before the checks, this killed the interpreter (SIGSEGV); run in a subprocess just in case."""
    code = ("import torch; from tutorial_utils.registration import register_images\n"
            "image = torch.rand(1, 1, 32, 32); image[0, 0, 3, 3] = float('nan')\n"
            "try:\n    register_images(image, torch.rand(1, 1, 32, 32))\n"
            "except ValueError as err:\n    print('refused:', err)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    assert "refused: image_fixed must be finite" in run.stdout


def test_a_refinement_that_diverges_stops_with_an_error():
    """Absurd intensities overflow the squared difference: stop before a NaN grid reaches grid_sample."""
    fixed, moving = _image(seed=1) * 1e30, _image(seed=2) * 1e30
    with pytest.raises(ValueError, match="refine_affine: the mean squared difference became inf"):
        P.refine_affine(fixed, moving, torch.eye(2, 3)[None], iterations=2)


# --------------------------------------------------------------------------- devices, shapes, dtypes


def test_images_on_two_devices_are_named_in_the_error(no_computation):
    fixed, moving = _image(), _image().to("meta")  # "meta" stands in for a GPU
    for call in (lambda: G.register_images(fixed, moving), lambda: P.prealign_displacement(fixed, moving),
                 lambda: instance.instance_optimise(fixed, moving, torch.zeros(1, 2, 32, 48)),
                 lambda: continuous.register_unet(DisplacementUNet(), fixed, moving)):
        with pytest.raises(ValueError, match="image_fixed is on cpu but image_moving is on meta"):
            call()
    volume = torch.rand(1, 1, 4, 8, 8)
    with pytest.raises(ValueError, match="volume_fixed is on meta but volume_moving is on cpu"):
        G3.register_volumes(volume.to("meta"), volume)


def test_a_displacement_or_matrix_on_another_device_is_refused(no_computation):
    image = _image()
    with pytest.raises(ValueError, match="image_fixed is on cpu but displacement is on meta"):
        instance.instance_optimise(image, image, torch.zeros(1, 2, 32, 48, device="meta"))
    with pytest.raises(ValueError, match="matrix is on meta but must be on cpu"):
        P.refine_affine(image, image, torch.eye(2, 3, device="meta")[None])


@pytest.mark.parametrize("fixed, moving, error, match", [
    (_image(32, 48), _image(32, 32), ValueError, r"image_fixed \[1, 1, 32, 48\] and image_moving \[1, 1, 32, 32\] "
                                                 r"differ in shape"),
    (_image(30, 48), _image(30, 48), ValueError, r"sizes \[30, 48\] of image_fixed and image_moving must be "
                                                 r"divisible by 4"),
    (_image()[0], _image()[0], ValueError, r"image_fixed must be \[B, 1, H, W\], got a torch.float32 tensor of "
                                           r"shape \[1, 32, 48\]"),
    (torch.rand(1, 2, 32, 48), _image(), ValueError, r"1 channel\(s\) in dimension 1"),
    ((_image() * 255).byte(), _image(), ValueError, r"image_fixed must be floating point .* got torch.uint8: "
                                                    r"convert it first, e.g. image_fixed.float\(\) / 255"),
    (_image(), torch.zeros(1, 1, 32, 48, dtype=torch.int16), ValueError, "image_moving must be floating point"),
    (_image().numpy(), _image(), TypeError, "image_fixed must be a torch.Tensor"),
])
def test_bad_image_pairs_get_a_clear_error(no_computation, fixed, moving, error, match):
    with pytest.raises(error, match=match):
        G.register_images(fixed, moving)
    with pytest.raises(error, match=match):
        instance.instance_optimise(fixed, moving, torch.zeros(1, 2, 32, 48))


def test_float64_images_work():
    fixed, moving = _image(seed=1, dtype=torch.float64), _image(seed=2, dtype=torch.float64)
    displacement = G.register_images(fixed, moving, "intensity", prealign="affine", refine_range=None)
    assert displacement.dtype == torch.float64 and torch.isfinite(displacement).all()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(disp_range=8), ValueError, "disp_range must be an odd integer >= 1"),
    (dict(disp_range=9.0), TypeError, "disp_range must be an integer, got 9.0"),
    (dict(refine_range=True), TypeError, "refine_range must be an integer, got True"),
    (dict(alpha=float("nan")), ValueError, "alpha must be a finite number, got nan"),
    (dict(alpha=-1), ValueError, "alpha must be > 0"),
    (dict(chunk_size=0), ValueError, "chunk_size must be an integer >= 1"),
    (dict(meanfield_passes=-1), ValueError, "meanfield_passes must be an integer >= 0"),
    (dict(avg_kernel=4), ValueError, "avg_kernel must be an odd integer"),
    (dict(prealign="rigid"), ValueError, "prealign must be one of 'none', 'com', 'moments', 'affine'"),
    (dict(border="reflect"), ValueError, "border must be one of 'replicate', 'zeros'"),
])
def test_bad_hyper_parameters_are_refused_before_any_computation(no_computation, kwargs, error, match):
    with pytest.raises(error, match=match):
        G.register_images(_image(), _image(), **kwargs)


def test_numpy_integers_are_accepted_like_ints():
    fixed, moving = _image(seed=1), _image(seed=2)
    kwargs = dict(prealign="none", refine_range=None, meanfield_iterations=1)
    plain = G.register_images(fixed, moving, "intensity", disp_range=5, **kwargs)
    numpy = G.register_images(fixed, moving, "intensity", disp_range=np.int64(5), **kwargs)
    assert torch.equal(plain, numpy)
    validate_parameters(disp_range=np.int64(9), min_kernel=np.int32(3), avg_kernel=3, meanfield_kernel=5,
                        meanfield_iterations=np.int64(1), alpha=np.float32(10))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(disp_range=1), ValueError, "disp_range must be an odd integer >= 3"),
    (dict(disp_range=np.float64(9)), TypeError, "disp_range must be an integer"),
    (dict(min_kernel=np.int64(2)), ValueError, "min_kernel must be an odd integer >= 1"),
    (dict(meanfield_iterations=False), TypeError, "meanfield_iterations must be an integer, got False"),
    (dict(alpha=np.inf), ValueError, "alpha must be a finite number"),
])
def test_the_widgets_use_the_same_checks(kwargs, error, match):
    arguments = dict(disp_range=9, min_kernel=3, avg_kernel=3, meanfield_kernel=5, meanfield_iterations=1, alpha=1.0)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        validate_parameters(**arguments)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(displacement=torch.zeros(1, 2, 32, 48).numpy()), TypeError, "displacement must be a torch.Tensor"),
    (dict(displacement=_with(torch.zeros(1, 2, 32, 48), float("nan"))), ValueError, "displacement must be finite"),
    (dict(displacement=torch.zeros(1, 3, 32, 48)), ValueError, r"displacement must be \[B, 2, H, W\]"),
    (dict(lr=float("nan")), ValueError, "lr must be a finite number"),
    (dict(diffusion_weight=float("inf")), ValueError, "diffusion_weight must be a finite number"),
    (dict(iterations=2.0), TypeError, "iterations must be an integer"),
    (dict(smooth=-1), ValueError, "smooth must be an integer >= 0"),
    (dict(grid_stride=np.int64(5)), ValueError, "divisible by grid_stride=5"),
])
def test_instance_optimise_uses_the_shared_checks(no_computation, kwargs, error, match):
    arguments = dict(image_fixed=_image(), image_moving=_image(), displacement=torch.zeros(1, 2, 32, 48))
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        instance.instance_optimise(**arguments)


def test_refine_affine_checks_its_matrix_and_settings(no_computation):
    image = _image()
    for matrix, match in ((torch.eye(2, 3), r"matrix must be \[B, 2, 3\], got a torch.float32 tensor of shape \[2"),
                          (torch.eye(3, 3)[None], r"matrix must be \[B, 2, 3\] = \[1, 2, 3\]"),
                          (torch.eye(2, 3, dtype=torch.long)[None], "matrix must be floating point")):
        with pytest.raises(ValueError, match=match):
            P.refine_affine(image, image, matrix)
    nan_matrix = torch.eye(2, 3)[None].clone()
    nan_matrix[0, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="matrix must be finite"):
        P.refine_affine(image, image, nan_matrix)
    with pytest.raises(ValueError, match="scale must be an integer <= 32"):
        P.refine_affine(image, image, torch.eye(2, 3)[None], scale=64)
    with pytest.raises(ValueError, match="lr must be > 0"):
        P.refine_affine(image, image, torch.eye(2, 3)[None], lr=0)


# --------------------------------------------------------------------------- empty and constant images


def _disc(H: int = 32, W: int = 32, radius: float = 8.0) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return ((yy - (H - 1) / 2) ** 2 + (xx - (W - 1) / 2) ** 2 <= radius**2).float()[None, None]


EMPTY_PAIRS = {
    "both zero": (torch.zeros(1, 1, 32, 48), torch.zeros(1, 1, 32, 48)),
    "both constant": (torch.full((1, 1, 32, 48), 0.5), torch.full((1, 1, 32, 48), 0.5)),
    "moving zero": (_image(seed=3), torch.zeros(1, 1, 32, 48)),
    "fixed zero": (torch.zeros(1, 1, 32, 48), _image(seed=3)),
    "fixed constant": (torch.full((1, 1, 32, 48), 0.3), _image(seed=3)),
}


@pytest.mark.parametrize("pair", list(EMPTY_PAIRS))
def test_empty_and_constant_images_give_a_finite_result_with_the_defaults(pair):
    fixed, moving = EMPTY_PAIRS[pair]
    displacement = G.register_images(fixed, moving)
    assert torch.isfinite(displacement).all()


@pytest.mark.parametrize("prealign", P.PREALIGN_MODES)
@pytest.mark.parametrize("pair", list(EMPTY_PAIRS))
def test_empty_and_constant_images_give_a_finite_result_with_each_prealignment(pair, prealign):
    fixed, moving = EMPTY_PAIRS[pair]
    displacement = G.register_images(fixed, moving, "intensity", prealign=prealign, refine_range=None)
    assert torch.isfinite(displacement).all()
    pre = P.prealign_displacement(fixed, moving, prealign, iterations=5)
    assert torch.isfinite(pre).all()
    if "zero" in pair:  # nothing to match: the pre-alignment stays (nearly) the identity
        assert pre.abs().max() < 1e-3 or prealign == "affine"


def test_the_centre_of_mass_of_an_empty_image_is_not_matched():
    image = _image(seed=4)
    empty = torch.zeros_like(image)
    both = torch.cat([image, empty, empty])
    shift = P.centre_of_mass_shift(both, torch.cat([empty, image, empty]))
    assert torch.equal(shift, torch.zeros(3, 2))
    assert shift.dtype == image.dtype
    disc = _disc(32, 48)
    shifted = P.centre_of_mass_shift(disc, torch.roll(disc, 3, dims=-1))  # a real pair still moves
    assert torch.allclose(shifted, torch.tensor([[0.0, 3.0]]), atol=1e-4)


def test_moments_of_degenerate_images_stay_the_identity():
    identity = torch.eye(2, 3)[None]
    empty, constant = torch.zeros(1, 1, 32, 32), torch.full((1, 1, 32, 32), 0.7)
    ellipse = (_disc(32, 32, 10) * 0).clone()
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ellipse[0, 0] = (((yy - 14) / 5) ** 2 + ((xx - 17) / 11) ** 2 <= 1).float()
    for fixed, moving in ((empty, ellipse), (ellipse, empty), (empty, empty)):
        assert torch.equal(P.moments_affine(fixed, moving), identity)
    # a constant square and a disc have no principal axes: a scale and a translation, no rotation
    for fixed, moving in ((constant, ellipse), (_disc(), ellipse), (ellipse, _disc())):
        matrix = P.moments_affine(fixed, moving)
        assert torch.isfinite(matrix).all()
        assert matrix[0, 0, 1] == 0 and matrix[0, 1, 0] == 0 and matrix[0, 0, 0] == matrix[0, 1, 1] > 0
    # a point or a line has no area: no scale (it would be infinite or zero)
    point, line = torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32)
    point[0, 0, 10, 12] = 1.0
    line[0, 0, 16, 4:28] = 1.0
    for fixed, moving in ((point, ellipse), (ellipse, point), (line, ellipse)):
        matrix = P.moments_affine(fixed, moving)
        assert torch.isfinite(matrix).all()
        assert torch.allclose(torch.linalg.det(matrix[:, :, :2]), torch.ones(1), atol=1e-5)


def test_refine_affine_leaves_matrices_of_images_without_structure_alone():
    matrix = torch.tensor([[[1.1, 0.1, 2.0], [-0.1, 0.9, -3.0]]])
    for fixed, moving in ((torch.zeros(1, 1, 32, 48), torch.zeros(1, 1, 32, 48)),
                          (torch.full((1, 1, 32, 48), 0.5), torch.full((1, 1, 32, 48), 0.5))):
        refined = P.refine_affine(fixed, moving, matrix, iterations=10)
        assert torch.allclose(refined, matrix, atol=1e-6)


# --------------------------------------------------------------------------- Dataset.from_arrays


@pytest.mark.parametrize("change, error, match", [
    (dict(images=np.full((3, 8, 8), np.nan, np.float32)), ValueError, "images must be finite.*NaN"),
    (dict(images=np.where(np.eye(8, dtype=bool), np.inf, 0.5)[None].repeat(3, 0)), ValueError,
     "images must be finite.*inf"),
    (dict(test_ids=[1, 2]), ValueError, r"train_ids and test_ids must be disjoint; both contain \[1\]"),
    (dict(train_ids=[0, 3]), ValueError, r"train_ids must be slice indices in 0\.\.2, got \[3\]"),
    (dict(test_ids=[-1]), ValueError, r"test_ids must be slice indices in 0\.\.2, got \[-1\]"),
    (dict(train_ids=[0, 1, 0]), ValueError, r"train_ids must name each slice once, got \[0\]"),
    (dict(labels=np.full((3, 8, 8), 3)), ValueError, r"label values must lie in 0\.\.2 \(one name per value: "
                                                    r"label_names has 3\), got 3\.\.3"),
    (dict(label_names="bga"), TypeError, "label_names must be a list of names.*split into its characters"),
    (dict(label_names=3), TypeError, "label_names must be a list of names"),
    (dict(train_ids=[0, 1.7]), TypeError, r"train_ids\[1\] must be an integer, got 1\.7"),
    (dict(train_ids=np.array([0.0, 1.0])), TypeError, r"train_ids\[0\] must be an integer, got 0\.0"),
    (dict(test_ids=[True]), TypeError, r"test_ids\[0\] must be an integer, got True"),
    (dict(test_ids="2"), TypeError, "test_ids must be a list of slice indices"),
    (dict(test_ids=2), TypeError, "test_ids must be a list of slice indices"),
    (dict(labels=np.zeros((2, 8, 8), int)), ValueError, "there are 3 images but 2 label maps"),
    (dict(images=np.zeros((4, 8, 8), np.uint8)), ValueError, "there are 4 images but 3 label maps"),
])
def test_from_arrays_refuses_what_it_used_to_accept(change, error, match):
    args = dict(images=np.zeros((3, 8, 8), np.uint8), labels=np.zeros((3, 8, 8), int),
                label_names=["bg", "a", "b"], train_ids=[0, 1], test_ids=[2])
    args.update(change)
    with pytest.raises(error, match=match):
        Dataset.from_arrays(**args)


def test_from_arrays_still_takes_integers_of_every_kind():
    args = dict(images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros((4, 8, 8), int), label_names=("bg", "a"))
    for train_ids, test_ids in (([0, 1], [2, 3]), (range(2), range(2, 4)), (np.array([0, 1]), torch.tensor([2, 3])),
                                ([np.int64(0), np.int32(1)], (2, 3))):
        ds = Dataset.from_arrays(**args, train_ids=train_ids, test_ids=test_ids)
        assert ds.train_ids == (0, 1) and ds.test_ids == (2, 3)
        assert all(type(i) is int for i in ds.train_ids + ds.test_ids)


def test_a_dataset_built_directly_is_checked_too():
    good = Dataset.from_arrays(np.zeros((3, 8, 8), np.uint8), np.zeros((3, 8, 8), int), ["bg", "a"], [0, 1], [2])
    with pytest.raises(TypeError, match="label_names must be a tuple of strings"):
        Dataset(good.images, good.labels, ["bg", "a"], (0, 1), (2,))
    with pytest.raises(TypeError, match=r"train_ids\[1\] must be an integer, got 1\.5"):
        Dataset(good.images, good.labels, ("bg", "a"), (0, 1.5), (2,))
    images = good.images.clone()
    images[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="images must be finite"):
        Dataset(images, good.labels, ("bg", "a"), (0, 1), (2,))


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def dataset():
    return blob_dataset(num_labels=3, size=(32, 48), n=5, seed=1)


FEATURE_ARGUMENTS = [
    (dict(diffusion_weight=float("nan")), ValueError, "diffusion_weight must be a finite number, got nan"),
    (dict(diffusion_weight=float("inf")), ValueError, "diffusion_weight must be a finite number, got inf"),
    (dict(diffusion_weight=-0.1), ValueError, "diffusion_weight must be >= 0"),
    (dict(lr=float("nan")), ValueError, "lr must be a finite number"),
    (dict(lr=0.0), ValueError, "lr must be > 0"),
    (dict(lr="1e-3"), TypeError, "lr must be a number"),
    (dict(num_pairs=1.5), TypeError, "num_pairs must be an integer"),
    (dict(num_pairs=True), TypeError, "num_pairs must be an integer"),
    (dict(images_per_step=1), ValueError, "images_per_step must be an integer >= 2"),
    (dict(images_per_step=4.0), TypeError, "images_per_step must be an integer"),
    (dict(seed=0.5), TypeError, "seed must be an integer"),
    (dict(threads=0), ValueError, "threads must be an integer >= 1"),
    (dict(train_ids=[0, 9]), ValueError, r"train_ids must be slice indices in 0\.\.4, got \[9\]"),
    (dict(train_ids=[0, 1.7]), TypeError, r"train_ids\[1\] must be an integer"),
    (dict(prealign="rigid"), ValueError, "prealign must be one of"),
]


@pytest.mark.parametrize("kwargs, error, match", FEATURE_ARGUMENTS + [
    (dict(alpha=float("nan")), ValueError, "alpha must be a finite number"),
    (dict(alpha=0), ValueError, "alpha must be > 0"),
    (dict(disp_range=9.0), TypeError, "disp_range must be an integer"),
    (dict(min_kernel=2), ValueError, "min_kernel must be an odd integer"),
    (dict(meanfield_iterations=-1), ValueError, "meanfield_iterations must be an integer >= 0"),
    (dict(border="reflect"), ValueError, "border must be one of"),
])
def test_train_features_refuses_bad_hyper_parameters_before_training(no_computation, dataset, kwargs, error,
                                                                      match):
    with pytest.raises(error, match=match):
        train.train_features(dataset, progress=False, **kwargs)


@pytest.mark.parametrize("kwargs, error, match", FEATURE_ARGUMENTS + [
    (dict(seconds=float("nan")), ValueError, "seconds must be a finite number"),
    (dict(seconds=0), ValueError, "seconds must be > 0"),
    (dict(loss="l1"), ValueError, "loss must be one of 'mse', 'dice'"),
])
def test_train_unet_refuses_bad_hyper_parameters_before_training(no_computation, dataset, kwargs, error, match):
    with pytest.raises(error, match=match):
        continuous.train_unet(dataset, progress=False, **kwargs)


@pytest.mark.parametrize("trainer", [train.train_features, continuous.train_unet])
def test_trainers_refuse_non_finite_training_images(no_computation, trainer):
    ds = blob_dataset(num_labels=3, size=(32, 48), n=5, seed=1)
    ds.images[2, 0, 3, 4] = float("nan")  # changed after the dataset was checked
    with pytest.raises(ValueError, match=r"the training images \(dataset.images\[train_ids\]\) must be finite"):
        trainer(ds, progress=False)
    trainer_kwargs = dict(train_ids=[0, 1])  # slice 2 not used: no complaint about it
    with pytest.raises(AssertionError, match="a computation started"):
        trainer(ds, progress=False, **trainer_kwargs)


@pytest.mark.parametrize("weights, match", [([1.0, float("nan"), 1.0], "label_weights must be finite"),
                                            ([1.0, -1.0, 1.0], "label_weights must be >= 0")])
def test_bad_label_weights_are_refused(dataset, weights, match):
    with pytest.raises(ValueError, match=match):
        train.train_features(dataset, num_pairs=2, label_weights=weights, progress=False, device="cpu")


def test_an_empty_training_slice_is_not_moved_by_the_centre_of_mass():
    images = torch.zeros(2, 1, 8, 12)
    images[1, 0, 2, 3] = 1.0
    shift = P.centre_of_mass_shift(torch.ones_like(images), images)  # the "com" of the training slices
    assert shift[0].tolist() == [0.0, 0.0] and shift[1].tolist() == [2.0 - 3.5, 3.0 - 5.5]


# --------------------------------------------------------------------------- command lines


def _data_download():
    spec = importlib.util.spec_from_file_location("data_download", REPO / "data_download.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--pairs", "-5"], "argument --pairs: must be an integer >= 1, got -5"),
    (["--pairs", "0"], "argument --pairs: must be an integer >= 1, got 0"),
    (["--pairs", "2.5"], "argument --pairs: expected an integer, got '2.5'"),
    (["--pairs", "many"], "argument --pairs: expected an integer, got 'many'"),
    (["--disp-range", "8"], "argument --disp-range: must be an odd integer >= 1"),
    (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["--lr", "0"], "argument --lr: must be > 0"),
    (["--diffusion-weight", "-1"], "argument --diffusion-weight: must be >= 0"),
    (["--images-per-step", "1"], "argument --images-per-step: must be an integer >= 2"),
    (["--source", "bogus"], "argument --source: invalid choice: 'bogus'"),
    (["--threads", "0"], "argument --threads: must be an integer >= 1, got 0"),
    (["--threads", "two"], "argument --threads: expected an integer, got 'two'"),
    (["--data-seed", "-1"], "argument --data-seed: must be an integer >= 0"),
    (["--device", "gpu"], "argument --device:"),
])
def test_train_command_line_refuses_bad_arguments(argv, message, capsys, tmp_path):
    exits_with_usage(train.main, ["--out", str(tmp_path / "cnn.pt"), *argv], message, capsys)


def test_train_command_line_refuses_a_folder_as_out(capsys, tmp_path):
    exits_with_usage(train.main, ["--out", str(tmp_path)], "--out must be a file to write", capsys)


@pytest.mark.parametrize("argv, message", [
    (["--pairs", "-5"], "argument --pairs: must be an integer >= 1, got -5"),
    (["--pairs", "x"], "argument --pairs: expected an integer, got 'x'"),
    (["--seconds", "0"], "argument --seconds: must be > 0"),
    (["--seconds", "inf"], "argument --seconds: must be a finite number"),
    (["--measure-budget", "0"], "argument --measure-budget: must be an integer >= 1"),
    (["--measure-repeats", "-1"], "argument --measure-repeats: must be an integer >= 1"),
    (["--lr", "-0.001"], "argument --lr: must be > 0"),
    (["--diffusion-weight", "nan"], "argument --diffusion-weight: must be a finite number"),
    (["--source", "kaggle"], "argument --source: invalid choice: 'kaggle'"),
    (["--threads", "-2"], "argument --threads: must be an integer >= 1"),
])
def test_continuous_command_line_refuses_bad_arguments(argv, message, capsys, tmp_path):
    exits_with_usage(continuous.main, ["--out", str(tmp_path / "unet.pt"), *argv], message, capsys)


@pytest.mark.parametrize("argv, message", [
    (["--synthetic", "--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
    (["--synthetic", "--seed", "1.5"], "argument --seed: expected an integer, got '1.5'"),
])
def test_data_download_command_line_refuses_bad_arguments(argv, message, capsys):
    exits_with_usage(_data_download().main, argv, message, capsys)


def test_data_download_refuses_a_file_as_dest(capsys, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("")
    exits_with_usage(_data_download().main, ["--synthetic", "--dest", str(file)], "--dest must be a folder", capsys)


def test_good_command_lines_parse_to_the_same_values():
    args = train.build_parser().parse_args(["--out", "x.pt", "--pairs", "12", "--lr", "1e-3", "--disp-range", "7",
                                            "--threads", "2", "--data-seed", "3"])
    assert (args.pairs, args.lr, args.disp_range, args.threads, args.data_seed) == (12, 1e-3, 7, 2, 3)
    assert type(args.pairs) is int and type(args.lr) is float
    defaults = train.build_parser().parse_args(["--out", "x.pt"])
    assert (defaults.pairs, defaults.lr, defaults.disp_range) == (train.DEFAULT_PAIRS, train.DEFAULTS["lr"], 9)
