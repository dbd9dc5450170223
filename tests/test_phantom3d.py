"""The synthetic abdominal CT volumes (tutorial_utils.phantom.make_phantom_volume)."""

from __future__ import annotations

import pytest
import torch

from tutorial_utils import phantom
from tutorial_utils.metrics import dice
from tutorial_utils.phantom import LABEL_NAMES, NUM_LABELS, make_phantom_volume

LIVER, KIDNEY = LABEL_NAMES.index("liver"), LABEL_NAMES.index("left kidney")
SMALL = {"shape": (32, 40), "depth": 16, "supersample": 1}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pair():
    return make_phantom_volume()  # the default pair of notebook 05: 2 x 32 x 64 x 80


def test_format_label_set_and_intensities(pair):
    volumes, labels = pair
    assert volumes.dtype == labels.dtype == torch.uint8
    assert volumes.shape == labels.shape == (2, 32, 64, 80)
    for lab in labels:
        assert set(lab.unique().tolist()) == set(range(NUM_LABELS))  # every organ in both patients
    assert ((volumes == 0).float().mean(dim=(1, 2, 3)) > 0.05).all()  # air around the body
    assert ((volumes == 255).float().mean(dim=(1, 2, 3)) > 1e-4).all()  # bone
    liver = volumes[labels == LIVER].float().mean()
    assert 130 < liver < 175  # 100 HU in the [-200, 300] window: 153


def test_cross_sections_change_smoothly_along_z(pair):
    """Neighbouring slices overlap much more than slices 8 apart (organs are 3D shapes)."""
    _, labels = pair
    lab = labels[0].long()
    near = [dice(lab[z], lab[z + 1], NUM_LABELS)[LIVER].item() for z in range(8, 24)]
    far = [dice(lab[z], lab[z + 8], NUM_LABELS)[LIVER].item() for z in range(8, 24)]
    assert min(near) > 0.7 and sum(near) / len(near) > 0.85 and sum(far) / len(far) < sum(near) / len(near) - 0.1
    # organs appear and vanish with the level: the kidney's cranial end lies below the top slice
    kidney_slices = (labels[0] == KIDNEY).flatten(1).any(1).nonzero().flatten()
    assert 0 < kidney_slices.min() or kidney_slices.max() < 31


def test_the_two_patients_differ_by_a_deformation(pair):
    _, labels = pair
    overlap = dice(labels[0].long(), labels[1].long(), NUM_LABELS)[1:]
    assert 0.1 < overlap[~overlap.isnan()].mean() < 0.7
    assert 0.5 < overlap[LIVER - 1] < 0.95  # the largest organ overlaps, but not perfectly


def test_deterministic_and_independent_of_the_set_size():
    one = make_phantom_volume(1, seed=3, **SMALL)
    again = make_phantom_volume(1, seed=3, **SMALL)
    two = make_phantom_volume(2, seed=3, **SMALL)
    assert torch.equal(one[0], again[0]) and torch.equal(one[1], again[1])
    assert torch.equal(two[0][:1], one[0]) and torch.equal(two[1][:1], one[1])
    assert not torch.equal(two[0][0], two[0][1])
    assert not torch.equal(make_phantom_volume(1, seed=4, **SMALL)[0], one[0])
    assert one[0].shape == (1, 16, 32, 40)


def test_the_versions():
    assert phantom.PHANTOM_VERSION == 2 and phantom.PHANTOM_VOLUME_VERSION == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"num_volumes": 0}, "num_volumes"),
    ({"seed": -1}, "seed"),
    ({"shape": (64,)}, "shape"),
    ({"shape": (8, 80)}, "height"),
    ({"depth": 2}, "depth"),
    ({"supersample": 0}, "supersample"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_phantom_volume(**kwargs)
