"""What both trainers share: the cosine schedule, the loop, seeding, the CPU settings, the data, checkpoints.

References are independent: the closed form of the cosine, torch's CosineAnnealingLR, centres
of mass computed with numpy-style sums, labels compared with their own one-hot maps.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tutorial_utils.data import Dataset
from tutorial_utils.training import (
    LR_FLOOR,
    LossHistory,
    _cpu_settings,
    _prepare_training_data,
    cosine_lr,
    load_state_dict,
    pipeline_defaults,
    save_state_dict,
    seeded,
    train_loop,
)

# --------------------------------------------------------------------------- the schedule and the loop


def test_cosine_lr_closed_form():
    assert cosine_lr(1.0, 0.0) == pytest.approx(1.0)
    assert cosine_lr(1.0, 1.0) == pytest.approx(LR_FLOOR) and LR_FLOOR == 0.05
    assert cosine_lr(2.0, 0.5) == pytest.approx(2.0 * (1 + LR_FLOOR) / 2)
    assert cosine_lr(1.0, 0.25) == pytest.approx(LR_FLOOR + (1 - LR_FLOOR) * (1 + math.sqrt(0.5)) / 2)
    assert cosine_lr(1.0, -1.0) == cosine_lr(1.0, 0.0) and cosine_lr(1.0, 2.0) == cosine_lr(1.0, 1.0)


class _Quadratic(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))


def _run(monkeypatch, schedule, steps=7, lr=0.1):
    """train_loop on a toy model; returns (history, the learning rate of every Adam step, the slices drawn)."""
    rates, drawn = [], []
    adam_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    model = _Quadratic()

    def group_loss(chosen):
        drawn.append(chosen.tolist())
        return (model.weight * (1 + chosen[:1].float())).square().sum()

    history = train_loop(model, group_loss, num_slices=5, images_per_step=3, lr=lr,
                         generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), steps=steps,
                         progress=False, schedule=schedule, settings={"note": 1})
    return model, history, rates, drawn


def test_train_loop_follows_the_closed_form_schedule(monkeypatch):
    model, history, rates, drawn = _run(monkeypatch, "cosine")
    assert rates == [cosine_lr(0.1, k / 7) for k in range(7)]
    assert isinstance(history, LossHistory) and len(history) == 7 and history.pairs == 7 * 6
    assert history.pairs_per_step == 6 and history.settings == {"note": 1} and not model.training
    assert all(len(set(c)) == 3 and all(0 <= i < 5 for i in c) for c in drawn)
    assert history[-1] < history[0]


def test_train_loop_with_torch_scheduler_is_the_same_curve(monkeypatch):
    _, _, rates, _ = _run(monkeypatch, "torch", steps=20)
    optimiser = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=20, eta_min=LR_FLOOR * 0.1)
    expected = []
    for _ in range(20):
        expected.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        scheduler.step()
    assert rates == expected
    assert rates == pytest.approx([cosine_lr(0.1, k / 20) for k in range(20)], rel=1e-9)


def test_train_loop_refuses_an_unknown_schedule():
    with pytest.raises(ValueError, match="schedule"):
        train_loop(_Quadratic(), lambda c: torch.zeros(()), num_slices=3, images_per_step=2, lr=0.1,
                   generator=torch.Generator(), device=torch.device("cpu"), steps=1, schedule="linear")


def test_seeded_restores_the_global_random_state():
    state = torch.get_rng_state()
    with seeded(3, torch.device("cpu")) as generator:
        first = torch.rand(2)
        drawn = torch.rand(2, generator=generator)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, torch.rand(2, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(drawn, first)


def test_cpu_settings_are_restored():
    threads = torch.get_num_threads()
    with _cpu_settings(torch.device("cpu"), 1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads


def test_pipeline_defaults_are_those_of_register_images():
    from tutorial_utils.registration import DEFAULTS

    defaults = pipeline_defaults()
    assert defaults["alpha"] == DEFAULTS.alpha and defaults["prealign"] == DEFAULTS.prealign
    assert all(defaults["reg"][key] == getattr(DEFAULTS, key) for key in defaults["reg"])


# --------------------------------------------------------------------------- the data of a run


def _dataset_with_an_empty_slice():
    images = torch.zeros(3, 8, 12)
    images[1, 2, 3] = 1.0  # one bright pixel
    images[2, 4:6, 6:10] = 0.5  # a block right of and below the centre
    labels = torch.zeros(3, 8, 12, dtype=torch.long)
    labels[:, 1:3, 1:4] = 1
    return Dataset.from_arrays(images, labels, ["background", "organ"], train_ids=[0, 1, 2], test_ids=[])


def _centre(image):  # [H, W] -> (y, x), written out
    H, W = image.shape
    total = float(image.sum())
    y = sum(float(image[i].sum()) * i for i in range(H)) / total
    x = sum(float(image[:, j].sum()) * j for j in range(W)) / total
    return y, x


def test_com_prealignment_centres_each_slice_and_leaves_an_empty_one():
    dataset = _dataset_with_an_empty_slice()
    images, onehot = _prepare_training_data(dataset, [0, 1, 2], "com", torch.device("cpu"), stride=1)
    assert images.shape == (3, 1, 8, 12) and onehot.shape == (3, 2, 8, 12)
    empty = F.one_hot(dataset.labels[0], 2).permute(2, 0, 1).float()
    assert torch.allclose(images[0], dataset.images[0]) and torch.allclose(onehot[0], empty, atol=1e-5)  # not moved
    assert _centre(images[1, 0]) == pytest.approx((3.5, 5.5), abs=1e-5)
    assert _centre(images[2, 0]) == pytest.approx((3.5, 5.5), abs=1e-5)
    assert torch.isfinite(images).all() and torch.isfinite(onehot).all()


def test_labels_are_pooled_to_the_feature_resolution():
    dataset = _dataset_with_an_empty_slice()
    _, onehot = _prepare_training_data(dataset, [0, 2], "none", torch.device("cpu"))
    expected = F.avg_pool2d(F.one_hot(dataset.labels[[0, 2]], 2).permute(0, 3, 1, 2).float(), 4)
    assert torch.equal(onehot, expected)
    with pytest.raises(ValueError, match="prealign must be one of"):
        _prepare_training_data(dataset, [0, 2], "rigid", torch.device("cpu"))


# --------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    path = save_state_dict(model, tmp_path / "sub" / "model.pt")
    assert path.is_file() and not path.with_name(path.name + ".tmp").exists()
    loaded = load_state_dict(nn.Linear(3, 2), path)
    assert not loaded.training and torch.equal(loaded.weight, model.weight)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state_dict"):
        load_state_dict(nn.Linear(3, 2), tmp_path / "list.pt")
