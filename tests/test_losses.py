"""The losses: one-hot labels, the non-local label warp and loss, the U-Net's label loss, the diffusion penalty.

References are independent: brute-force loops over pairs, labels, pixels and offsets
(``label_loops``), per-label formulas, closed forms and torch.autograd.gradcheck.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from label_loops import loss_loops, onehot_loops, warp_loops

from tutorial_utils.losses import (
    diffusion_penalty,
    label_loss,
    label_onehot,
    nonlocal_label_loss,
    nonlocal_label_loss_reference,
    nonlocal_label_warp,
    nonlocal_label_warp_unfold,
)


def _probabilities(B, D, h, w, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(B, D * D, h, w, generator=generator, dtype=dtype), dim=1)


def _labels(B, H, W, L, seed):
    return torch.randint(0, L, (B, H, W), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- one-hot labels and the warp


def test_label_onehot_is_the_block_fraction():
    labels = _labels(2, 8, 12, 4, seed=0)
    onehot = label_onehot(labels, 4, stride=4, dtype=torch.float64)
    assert onehot.shape == (2, 4, 2, 3)
    assert torch.allclose(onehot, onehot_loops(labels, 4, 4))
    assert torch.allclose(onehot.sum(1), torch.ones(2, 2, 3, dtype=torch.float64))


def test_label_onehot_rejects_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        label_onehot(torch.zeros(1, 6, 8, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="outside"):
        label_onehot(torch.full((1, 8, 8), 3), 3)
    with pytest.raises(ValueError, match="integer"):
        label_onehot(torch.zeros(1, 8, 8), 3)


@pytest.mark.parametrize("B, L, h, w, D", [(1, 3, 4, 5, 3), (2, 4, 3, 6, 5), (2, 2, 2, 3, 7)])
def test_warp_matches_loops(B, L, h, w, D):
    probabilities = _probabilities(B, D, h, w, seed=1)
    onehot = torch.rand(B, L, h, w, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = warp_loops(probabilities, onehot)
    assert torch.allclose(nonlocal_label_warp(probabilities, onehot), expected)
    assert torch.allclose(nonlocal_label_warp_unfold(probabilities, onehot), expected)


def test_warp_with_shared_moving_maps():
    probabilities = _probabilities(5, 3, 4, 4, seed=3)
    onehot = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    moving_index = torch.tensor([2, 0, 2, 1, 0])
    out = nonlocal_label_warp(probabilities, onehot, moving_index)
    assert torch.allclose(out, warp_loops(probabilities, onehot[moving_index]))
    with pytest.raises(ValueError, match="moving_index"):
        nonlocal_label_warp(probabilities, onehot, torch.tensor([0, 1, 3, 0, 0]))


def test_warp_gradcheck():
    probabilities = _probabilities(2, 3, 3, 4, seed=5).requires_grad_(True)
    onehot = torch.rand(3, 2, 3, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    index = torch.tensor([2, 0])
    assert torch.autograd.gradcheck(lambda p: nonlocal_label_warp(p, onehot, index), (probabilities,))


def test_warp_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="feature resolution"):
        nonlocal_label_warp(_probabilities(1, 3, 4, 4, 0), torch.rand(1, 2, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="D\\*D"):
        nonlocal_label_warp(torch.rand(1, 8, 4, 4), torch.rand(1, 2, 4, 4))


# --------------------------------------------------------------------------- the non-local label loss


@pytest.mark.parametrize("B, L, h, w, D", [(1, 3, 3, 4, 3), (2, 4, 2, 3, 5)])
def test_loss_matches_loops(B, L, h, w, D):
    probabilities = _probabilities(B, D, h, w, seed=7)
    labels_fixed, labels_moving = _labels(B, 4 * h, 4 * w, L, 8), _labels(B, 4 * h, 4 * w, L, 9)
    expected = loss_loops(probabilities, labels_fixed, labels_moving, L)
    got = nonlocal_label_loss_reference(probabilities, labels_fixed, labels_moving, L)
    assert got.dim() == 0
    assert torch.allclose(got, expected)


def test_loss_gradcheck():
    probabilities = _probabilities(2, 3, 3, 4, seed=10).requires_grad_(True)
    fixed = label_onehot(_labels(2, 12, 16, 3, 11), 3, dtype=torch.float64)
    moving = label_onehot(_labels(2, 12, 16, 3, 12), 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: nonlocal_label_loss(p, fixed, moving), (probabilities,))


def test_loss_is_zero_for_identical_labels_and_identity_probabilities():
    D, h, w = 5, 4, 6
    labels = _labels(2, 4 * h, 4 * w, 4, 13)
    identity = torch.zeros(2, D * D, h, w, dtype=torch.float64)
    identity[:, (D * D) // 2] = 1.0  # all mass on the offset (0, 0)
    assert nonlocal_label_loss_reference(identity, labels, labels, 4).item() == pytest.approx(0.0, abs=1e-12)
    background = torch.zeros_like(labels)
    assert nonlocal_label_loss_reference(identity, labels, background, 4).item() > 0.5


def test_loss_per_pair_reduction():
    probabilities = _probabilities(3, 3, 2, 2, seed=15)
    fixed = label_onehot(_labels(3, 8, 8, 2, 16), 2, dtype=torch.float64)
    moving = label_onehot(_labels(3, 8, 8, 2, 17), 2, dtype=torch.float64)
    per_pair = nonlocal_label_loss(probabilities, fixed, moving, reduction="none")
    assert per_pair.shape == (3,)
    assert torch.allclose(per_pair.mean(), nonlocal_label_loss(probabilities, fixed, moving))


# --------------------------------------------------------------------------- the U-Net's label loss


def _onehot(labels, L):
    return F.one_hot(labels, L).permute(0, 3, 1, 2).double()


def test_label_loss_against_per_label_formulas():
    generator = torch.Generator().manual_seed(0)
    warped = torch.softmax(torch.randn(2, 4, 6, 5, generator=generator, dtype=torch.float64), 1)
    labels = torch.randint(0, 3, (2, 6, 5), generator=generator)  # label 3 in neither map of pair 1?
    fixed = _onehot(labels, 4)
    warped[1, 3] = 0.0
    fixed[1, 3] = 0.0  # label 3 absent from the second pair: skipped
    expected_dice, expected_mse = [], []
    for b in range(2):
        terms = []
        for label in range(1, 4):
            a, f = warped[b, label], fixed[b, label]
            if a.sum() + f.sum() > 0:
                terms.append(1 - 2 * (a * f).sum() / (a.sum() + f.sum()))
        expected_dice.append(sum(terms) / len(terms))
        total = 0.0
        for y in range(6):
            for x in range(5):
                total += sum((warped[b, c, y, x] - fixed[b, c, y, x]) ** 2 for c in range(4))
        expected_mse.append(total / 30)
    assert torch.allclose(label_loss(warped, fixed, "dice"), torch.stack(expected_dice))
    assert torch.allclose(label_loss(warped, fixed, "mse"), torch.stack(expected_mse))
    assert torch.allclose(label_loss(fixed, fixed), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="loss must be"):
        label_loss(warped, fixed, "ce")


# --------------------------------------------------------------------------- the diffusion penalty


def test_diffusion_penalty():
    constant = torch.ones(1, 2, 4, 5)
    assert diffusion_penalty(constant).item() == 0.0
    ramp = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 2, 4, 5)  # slope 1 along x
    assert diffusion_penalty(ramp).item() == pytest.approx(1.0)


def test_diffusion_penalty_with_a_spacing_per_field():
    constant = torch.ones(2, 2, 4, 5)
    assert diffusion_penalty(constant, 4, reduction="none").tolist() == [0.0, 0.0]
    ramp = 4.0 * torch.arange(5.0).view(1, 1, 1, 5).expand(1, 2, 4, 5)  # slope 1 image pixel per pixel
    assert diffusion_penalty(ramp, spacing=4, reduction="none").item() == pytest.approx(1.0)


def test_diffusion_penalty_per_field_against_loops():
    field = torch.randn(3, 2, 4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = []
    for b in range(3):
        dy = [(field[b, c, y + 1, x] - field[b, c, y, x]) / 2 for c in range(2) for y in range(3) for x in range(6)]
        dx = [(field[b, c, y, x + 1] - field[b, c, y, x]) / 2 for c in range(2) for y in range(4) for x in range(5)]
        expected.append(sum(d**2 for d in dy) / len(dy) + sum(d**2 for d in dx) / len(dx))
    per_field = diffusion_penalty(field, spacing=2, reduction="none")
    assert torch.allclose(per_field, torch.stack(expected))
    assert torch.allclose(diffusion_penalty(field, spacing=2), per_field.mean())  # equal-sized fields


def test_diffusion_penalty_of_a_single_row_is_finite():
    row = torch.arange(3.0).view(1, 1, 1, 3).expand(1, 2, 1, 3)  # no vertical neighbours
    assert diffusion_penalty(row).item() == pytest.approx(1.0)
    assert diffusion_penalty(row, reduction="none").tolist() == [pytest.approx(1.0)]


def test_diffusion_penalty_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"displacement must be \[B, 2, h, w\]"):
        diffusion_penalty(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="spacing must be > 0"):
        diffusion_penalty(torch.zeros(1, 2, 4, 4), spacing=0)
    with pytest.raises(ValueError, match="reduction"):
        diffusion_penalty(torch.zeros(1, 2, 4, 4), reduction="sum")
