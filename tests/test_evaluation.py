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


def test_identity_dice_counted_pixel_by_pixel():
    dataset = _small_dataset(seed=1)
    result = evaluate_registration(dataset, None)
    pairs = dataset.test_pairs()
    assert result["pairs"].tolist() == [list(p) for p in pairs]
    for row, (f, m) in enumerate(pairs):
        a, b = dataset.labels[f].reshape(-1).tolist(), dataset.labels[m].reshape(-1).tolist()
        scores = []
        for label in range(dataset.num_labels):
            overlap = sum(1 for u, v in zip(a, b) if u == v == label)
            total = a.count(label) + b.count(label)
            expected = 2 * overlap / total if total else math.nan
            got = result["dice"][row, label].item()
            assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)
            if label and total:
                scores.append(expected)
        assert result["mean_dice"][row].item() == pytest.approx(sum(scores) / len(scores))
    assert result["folding"].tolist() == [0.0] * len(pairs)


def test_a_pair_without_organs_has_no_mean_dice():
    labels = torch.zeros(3, 16, 16, dtype=torch.long)
    labels[0, 2:6, 2:6] = 1  # an organ only in slice 0
    dataset = Dataset.from_arrays(torch.rand(3, 16, 16), labels, ["background", "organ"], train_ids=[0],
                                  test_ids=[1, 2])
    result = evaluate_registration(dataset, None, pairs=[(1, 2), (0, 1)])
    assert math.isnan(result["mean_dice"][0].item())  # nothing to score
    assert result["mean_dice"][1].item() == 0.0  # the organ is in one map only


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
