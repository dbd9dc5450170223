"""Measuring a registration method: Dice per label and per pair, folding, the register callable.

References are independent: overlaps counted pixel by pixel, means over the organs written out.
"""

from __future__ import annotations

import math

import pytest
import torch
from blob_data import blob_dataset

from tutorial_utils.data import Dataset
from tutorial_utils.evaluation import evaluate_registration


def _small_dataset(seed=0):
    return blob_dataset(size=(32, 48), seed=seed, parts=5)


@pytest.mark.parametrize("present_in", ["both", "either"])
def test_identity_dice_counted_pixel_by_pixel(present_in):
    dataset = _small_dataset(seed=1)
    result = evaluate_registration(dataset, None, present_in=present_in)
    pairs = dataset.test_pairs()
    assert result["pairs"].tolist() == [list(p) for p in pairs]
    for row, (f, m) in enumerate(pairs):
        a, b = dataset.labels[f].reshape(-1).tolist(), dataset.labels[m].reshape(-1).tolist()
        scores = []
        for label in range(dataset.num_labels):
            overlap = sum(1 for u, v in zip(a, b) if u == v == label)
            size_a, size_b = a.count(label), b.count(label)
            scored = (size_a and size_b) if present_in == "both" else (size_a or size_b)
            expected = 2 * overlap / (size_a + size_b) if scored else math.nan
            got = result["dice"][row, label].item()
            assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)
            if label and scored:
                scores.append(expected)
        assert result["mean_dice"][row].item() == pytest.approx(sum(scores) / len(scores))
    assert result["folding"].tolist() == [0.0] * len(pairs)


def _two_organ_dataset() -> Dataset:
    """Slice 0: organs 1 and 2; slice 1: organ 1 only (at the same place); slice 2: no organ."""
    labels = torch.zeros(3, 16, 16, dtype=torch.long)
    labels[0, 2:6, 2:6] = 1
    labels[0, 10:14, 10:14] = 2
    labels[1, 2:6, 2:6] = 1
    return Dataset.from_arrays(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)), labels,
                               ["background", "organ 1", "organ 2"], train_ids=[0], test_ids=[1, 2])


def test_organs_in_one_slice_only_are_not_scored_by_default():
    dataset = _two_organ_dataset()
    both = evaluate_registration(dataset, None, pairs=[(1, 2), (0, 1), (1, 0)])
    either = evaluate_registration(dataset, None, pairs=[(1, 2), (0, 1), (1, 0)], present_in="either")
    assert math.isnan(both["mean_dice"][0].item())  # no organ in both slices: nothing to score
    assert either["mean_dice"][0].item() == 0.0  # organ 1, in one slice only, scores 0
    for row in (1, 2):  # organ 1 overlaps perfectly, organ 2 is in slice 0 only
        assert both["dice"][row, 1].item() == 1.0 and math.isnan(both["dice"][row, 2].item())
        assert both["mean_dice"][row].item() == 1.0
        assert either["dice"][row, 2].item() == 0.0 and either["mean_dice"][row].item() == 0.5


def test_an_organ_the_registration_loses_scores_zero():
    """Which organs count is fixed by the pair, not by the result: erasing an organ cannot help."""
    dataset = _two_organ_dataset()

    def away(image_fixed, image_moving):  # u = (0, +8): warped[y, x] = moving[y, x + 8], organ 1 gone
        u = torch.zeros(image_fixed.shape[0], 2, 16, 16)
        u[:, 1] = 8.0
        return u

    result = evaluate_registration(dataset, register=away, pairs=[(0, 1)])
    assert result["dice"][0, 1].item() == 0.0 and math.isnan(result["dice"][0, 2].item())
    assert result["mean_dice"][0].item() == 0.0


def test_a_register_callable_is_measured_by_the_same_code():
    dataset = _small_dataset(seed=4)
    identity = evaluate_registration(dataset, None)
    calls = []

    def zero(image_fixed, image_moving):
        calls.append(image_fixed.shape[0])
        return torch.zeros(image_fixed.shape[0], 2, *image_fixed.shape[-2:])

    result = evaluate_registration(dataset, "this is ignored", register=zero, batch_size=1)
    assert calls == [1, 1]
    assert torch.allclose(result["dice"], identity["dice"], equal_nan=True)
    assert result["folding"].tolist() == [0.0, 0.0]
    assert result["seconds_per_pair"] >= 0 and identity["seconds_per_pair"] == 0
    with pytest.raises(ValueError, match="displacement"):
        evaluate_registration(dataset, register=lambda f, m: torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="callable"):
        evaluate_registration(dataset, register="unet")


def test_roughness_is_zero_for_affine_maps_and_grows_with_a_local_bump():
    dataset = _small_dataset(seed=5)
    H, W = dataset.image_size
    ys, xs = torch.meshgrid(torch.arange(H).double(), torch.arange(W).double(), indexing="ij")
    push = 2.0 * torch.exp(-((ys - H / 2) ** 2 + (xs - W / 2) ** 2) / 20.0)  # a smooth local push along y

    def scaled(image_fixed, image_moving):  # u(p) = 0.1 p: det J = 1.1^2 everywhere
        return 0.1 * torch.stack([ys, xs]).expand(image_fixed.shape[0], 2, H, W).float()

    def bump(image_fixed, image_moving):  # u = (push, 0): det J = 1 + d push / dy
        return torch.stack([push, torch.zeros_like(push)]).expand(image_fixed.shape[0], 2, H, W).float()

    flat = evaluate_registration(dataset, register=scaled)["log_jacobian_std"]
    rough = evaluate_registration(dataset, register=bump)["log_jacobian_std"]
    reference = float((1 + torch.gradient(push, dim=0)[0]).log().std())  # central differences, by hand
    assert flat.shape == (2,) and float(flat.abs().max()) < 1e-5
    assert reference > 0.05 and rough.tolist() == pytest.approx([reference] * 2, rel=0.05)
    assert evaluate_registration(dataset, None)["log_jacobian_std"].tolist() == [0.0, 0.0]


def test_evaluate_registration_refuses_bad_arguments():
    with pytest.raises(ValueError, match="dataset must be a tutorial_utils.data.Dataset"):
        evaluate_registration("slices", None)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        evaluate_registration(_small_dataset(), None, batch_size=0)
    with pytest.raises(ValueError, match="present_in must be one of 'both', 'either'; got 'all'"):
        evaluate_registration(_small_dataset(), None, present_in="all")
