"""Tests of the synthetic abdominal CT slices (tutorial_utils.phantom)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tutorial_utils.metrics import dice
from tutorial_utils.phantom import LABEL_NAMES, NUM_LABELS, make_phantom

TEST_IDS = [35, 41, 0, 4, 33, 38, 39, 17]  # the tutorial's fixed test split
ORGANS = range(1, NUM_LABELS)
LIVER, SPLEEN, LKIDNEY, STOMACH = (LABEL_NAMES.index(n) for n in ("liver", "spleen", "left kidney", "stomach"))
PANCREAS, DUODENUM = LABEL_NAMES.index("pancreas"), LABEL_NAMES.index("duodenum")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def phantom():
    return make_phantom()


@pytest.fixture(scope="module")
def small_pair():
    """The same 12 patients at half size, pre-aligned and not (misalignment 1)."""
    return make_phantom(12, shape=(128, 160)), make_phantom(12, shape=(128, 160), misalignment=1.0)


def _centroids(masks):
    """Row and column centroid [N, 2] of boolean masks [N, H, W] (NaN where empty)."""
    m = masks.double()
    rows = torch.arange(m.shape[1], dtype=torch.float64)
    cols = torch.arange(m.shape[2], dtype=torch.float64)
    area = m.sum(dim=(1, 2))
    return torch.stack([m.sum(2) @ rows / area, m.sum(1) @ cols / area], dim=1)


def test_default_data_set_has_reference_format(phantom):
    images, labels = phantom
    assert images.dtype == torch.uint8 and labels.dtype == torch.uint8
    assert images.shape == labels.shape == (43, 256, 320)
    assert int(labels.max()) == NUM_LABELS - 1 == 8
    # CT window: air outside the body maps to 0, bone to 255
    assert int(images.min()) == 0 and int(images.max()) == 255
    assert ((images == 0).float().mean(dim=(1, 2)) > 0.05).all()  # air around every body
    assert ((images == 255).float().mean(dim=(1, 2)) > 0.001).all()  # bone in every slice


def test_label_names():
    assert LABEL_NAMES[0] == "background"
    assert LABEL_NAMES[1:] == (
        "spleen", "pancreas", "left kidney", "gallbladder",
        "esophagus", "liver", "stomach", "duodenum",
    )  # fmt: skip
    assert NUM_LABELS == len(LABEL_NAMES) == 9


def test_organs_present_in_some_but_not_all_slices(phantom):
    _, labels = phantom
    present = torch.stack([(labels == k).flatten(1).any(1) for k in ORGANS], 1)  # [N, 8]
    fraction = present.double().mean(0)
    assert (present.sum(0) >= 10).all(), f"every organ in >= 10 slices, got {present.sum(0).tolist()}"
    assert not present.all(), "not every organ in every slice"
    gallbladder = fraction[LABEL_NAMES.index("gallbladder") - 1].item()
    esophagus = fraction[LABEL_NAMES.index("esophagus") - 1].item()
    assert 0.35 < gallbladder < 0.85, gallbladder
    assert 0.3 < esophagus < 0.75, esophagus
    assert fraction[LIVER - 1] == 1.0 and fraction[PANCREAS - 1] == 1.0
    assert present.sum(1).min() >= 4  # every slice shows at least half of the organs


def test_same_seed_gives_identical_bytes_and_other_seeds_other_patients():
    a_img, a_lab = make_phantom(4, seed=7, shape=(128, 160))
    b_img, b_lab = make_phantom(4, seed=7, shape=(128, 160))
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    c_img, c_lab = make_phantom(4, seed=8, shape=(128, 160))
    for i in range(4):  # every patient differs, images and labels
        assert not torch.equal(a_img[i], c_img[i])
        assert not torch.equal(a_lab[i], c_lab[i])
    # the slices within one set are different patients too
    assert not torch.equal(a_lab[0], a_lab[1])


def test_generation_does_not_touch_global_random_state():
    torch.manual_seed(123)
    np.random.seed(123)
    expected_torch, expected_np = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    threads = torch.get_num_threads()
    make_phantom(2, seed=1, shape=(64, 80))
    assert torch.equal(torch.rand(3), expected_torch)
    assert np.array_equal(np.random.rand(3), expected_np)
    assert torch.get_num_threads() == threads


def test_strongest_misalignment_still_gives_valid_slices():
    images, labels = make_phantom(3, seed=2, shape=(64, 80), misalignment=3.0)
    assert images.shape == labels.shape == (3, 64, 80) and int(labels.max()) <= 8
    assert (labels == LIVER).flatten(1).any(1).all()  # the body is still in view


def test_slice_depends_only_on_seed_and_index():
    small_img, small_lab = make_phantom(2, seed=5, shape=(64, 80))
    big_img, big_lab = make_phantom(5, seed=5, shape=(64, 80))
    assert torch.equal(small_img, big_img[:2]) and torch.equal(small_lab, big_lab[:2])


@pytest.mark.parametrize("shape", [(128, 160), (256, 256), (96, 200)])
def test_shape_is_rows_by_columns_and_anatomy_scales(shape, phantom):
    images, labels = make_phantom(3, shape=shape)
    assert images.shape == labels.shape == (3, *shape)
    # the same patients, drawn at another size: organ areas scale with the isotropic zoom
    zoom = min(shape[0] / 256, shape[1] / 320)
    _, ref_labels = phantom
    for k in (LIVER, SPLEEN, PANCREAS):
        area = (labels == k).sum().item() / zoom**2
        ref_area = (ref_labels[:3] == k).sum().item()
        assert ref_area > 0 and abs(area / ref_area - 1) < 0.15, (k, area, ref_area)


def test_radiological_orientation(phantom):
    """Anterior at the top, the patient's left (spleen, labelled kidney) on the image right."""
    _, labels = phantom
    width = labels.shape[2]
    cent = {k: _centroids(labels == k) for k in (LIVER, SPLEEN, LKIDNEY, STOMACH)}
    assert (cent[LIVER][:, 1] < width / 2).all()  # liver present in every slice
    for k in (SPLEEN, LKIDNEY, STOMACH):
        col = cent[k][:, 1]
        assert (col[~col.isnan()] > width / 2).all(), LABEL_NAMES[k]
    both = ~(cent[STOMACH][:, 0].isnan() | cent[LKIDNEY][:, 0].isnan())
    assert both.sum() > 20
    assert (cent[STOMACH][both, 0] < cent[LKIDNEY][both, 0]).all()  # stomach anterior to kidney


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_slices": 0}, "num_slices"),
        ({"num_slices": 2.0}, "num_slices"),
        ({"num_slices": True}, "num_slices"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"shape": (255, 320)}, "divisible by 4"),
        ({"shape": (256, 322)}, "divisible by 4"),
        ({"shape": (256,)}, "shape"),
        ({"shape": (256, 320, 1)}, "shape"),
        ({"shape": "256x320"}, "shape"),
        ({"shape": (16, 16)}, "shape"),
        ({"shape": (256.0, 320)}, "shape"),
        ({"misalignment": -0.5}, "misalignment"),
        ({"misalignment": math.nan}, "misalignment"),
        ({"misalignment": math.inf}, "misalignment"),
        ({"misalignment": 3.5}, "misalignment"),
        ({"misalignment": "1"}, "misalignment"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_phantom(**kwargs)


def _interior_pixels(images, labels, k):
    """Grey values of label k away from its border (3x3 erosion), over all slices."""
    mask = (labels == k).float()[:, None]
    eroded = -torch.nn.functional.max_pool2d(-mask, 3, stride=1, padding=1) > 0.5
    return images[eroded[:, 0]].double()


def test_organs_are_ambiguous_by_intensity_but_differ_in_texture(phantom):
    images, labels = phantom
    liver, spleen = (_interior_pixels(images, labels, k) for k in (LIVER, SPLEEN))
    pancreas, duodenum = (_interior_pixels(images, labels, k) for k in (PANCREAS, DUODENUM))
    # by mean grey value alone liver ~ spleen and pancreas ~ duodenum (bowel wall)
    assert abs(liver.mean() - spleen.mean()) < 8.0, (liver.mean(), spleen.mean())
    assert abs(pancreas.median() - duodenum.median()) < 12.0, (pancreas.median(), duodenum.median())
    # ... but their textures differ: the spleen is homogeneous, the liver has bright vessels,
    # the pancreas is lobulated with fat between the lobules
    assert liver.std() > 1.15 * spleen.std(), (liver.std(), spleen.std())
    assert (liver > spleen.quantile(0.99)).double().mean() > 0.02
    assert pancreas.std() > 1.5 * spleen.std(), (pancreas.std(), spleen.std())
    water_grey = 255 * (0 + 200) / 500  # 0 HU: darker means fat (or air)
    assert (pancreas < water_grey + 8).double().mean() > 0.05  # fat between the lobules
    assert (spleen < water_grey + 8).double().mean() < 0.005


def _mean_dice_over_pairs(labels, ids):
    per_pair = []
    for f in ids:
        for m in ids:
            if f != m:
                per_label = dice(labels[f], labels[m], NUM_LABELS)[1:]
                per_pair.append(torch.nanmean(per_label).item())
    assert len(per_pair) == len(ids) * (len(ids) - 1)
    return float(np.mean(per_pair))


def test_dice_before_registration_is_like_the_2019_data(phantom):
    _, labels = phantom
    before = _mean_dice_over_pairs(labels, TEST_IDS)
    assert 0.3 <= before <= 0.5, before


def test_organs_shift_by_realistic_amounts(phantom):
    _, labels = phantom
    for k in (LIVER, SPLEEN, LKIDNEY, STOMACH):
        c = _centroids(labels == k)
        c = c[~c[:, 0].isnan()]
        spread = (c - c.mean(0)).norm(dim=1).pow(2).mean().sqrt().item()  # RMS distance
        lo = 10.0 if k == LIVER else 7.0
        assert lo <= spread <= 25.0, (LABEL_NAMES[k], spread)
        pairwise = torch.cdist(c, c)[tuple(torch.triu_indices(len(c), len(c), 1))]
        # registrable by a +-16 px search: most displacements are within ~20 px
        assert pairwise.median() < 16.0 and torch.quantile(pairwise, 0.75) < 22.0, LABEL_NAMES[k]


def test_misalignment_moves_whole_bodies_and_lowers_dice(small_pair):
    (images, labels), (mis_images, mis_labels) = small_pair
    assert mis_images.shape == images.shape == (12, 128, 160) and mis_labels.dtype == torch.uint8
    aligned = _mean_dice_over_pairs(labels, range(12))
    misaligned = _mean_dice_over_pairs(mis_labels, range(12))
    assert misaligned < aligned - 0.05, (aligned, misaligned)
    # the same patients, moved: the bodies (non-air) move by 10-40 px at full size (5-20 here),
    # while the liver's area changes only by the scaling (about +-10 % per axis)
    shift = (_centroids(images > 25) - _centroids(mis_images > 25)).norm(dim=1)
    assert 5.0 < shift.mean() < 20.0, shift
    ratio = (mis_labels == LIVER).sum(dim=(1, 2)) / (labels == LIVER).sum(dim=(1, 2))
    assert ((ratio > 0.6) & (ratio < 1.45)).all(), ratio
    # misalignment 0 is the default
    img0, lab0 = make_phantom(2, shape=(128, 160), misalignment=0.0)
    assert torch.equal(img0, images[:2]) and torch.equal(lab0, labels[:2])
