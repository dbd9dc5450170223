"""The feature CNN's training: the loss of a group of slices, the training loop on any dataset, its CLI.

References are independent: every ordered pair computed separately with the reference
regulariser and the unfold correlation and label warp, areas counted by hand.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from blob_data import blob_dataset
from cli_helpers import exits_with_usage

from tutorial_utils.correlation import correlation_unfold
from tutorial_utils.evaluation import evaluate_registration
from tutorial_utils.losses import label_onehot, nonlocal_label_warp_unfold
from tutorial_utils.models import FeatureCNN
from tutorial_utils.registration import DEFAULTS as REGISTRATION_DEFAULTS
from tutorial_utils.registration import register_images
from tutorial_utils.regularisation import normalise_cost, regularise
from tutorial_utils.train import (
    CHECKPOINT,
    load_features,
    main,
    pair_loss,
    save_features,
    train_features,
)
from tutorial_utils.training import LossHistory


def _labels(B, H, W, L, seed):
    return torch.randint(0, L, (B, H, W), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the training loss of a group


def _per_pair_reference(model, images, onehot, disp_range):
    """Every ordered pair separately, as register_images builds it: replication-padded unfold
    correlation, normalised, the reference regulariser with register_images' settings, the
    softmax, the unfold warp; then the mean over the pairs."""
    settings = REGISTRATION_DEFAULTS
    reg = {k: getattr(settings, k) for k in ("min_kernel", "avg_kernel", "meanfield_kernel", "meanfield_iterations",
                                    "meanfield_passes")}
    r = (disp_range - 1) // 2
    features = model(images)
    h, w = features.shape[-2:]
    padded = F.pad(features, (r, r, r, r), mode="replicate")
    losses = []
    n = images.shape[0]
    for m in range(n):
        for f in range(n):
            if f == m:
                continue
            cost = correlation_unfold(padded[f:f + 1], padded[m:m + 1], disp_range)[..., r:r + h, r:r + w]
            cost = normalise_cost(cost)
            probabilities = torch.softmax(-settings.alpha * regularise(cost, disp_range, **reg), dim=1)
            warped = nonlocal_label_warp_unfold(probabilities, onehot[m:m + 1])
            losses.append(((warped - onehot[f:f + 1]) ** 2).sum(1).mean())
    return torch.stack(losses).mean()


def test_pair_loss_equals_the_per_pair_pipeline():
    torch.manual_seed(0)
    model = FeatureCNN().double().eval()  # eval: BatchNorm does not depend on the batch
    images = torch.rand(3, 1, 32, 24, dtype=torch.float64)
    onehot = label_onehot(_labels(3, 32, 24, 3, 18), 3, dtype=torch.float64)
    loss = pair_loss(model, images, onehot, disp_range=5, chunk_pairs=1)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = _per_pair_reference(model, images, onehot, 5)
    grads_ref = torch.autograd.grad(expected, list(model.parameters()))
    assert torch.allclose(loss, expected)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.allclose(g, g_ref, rtol=1e-6, atol=1e-9)


def test_pair_loss_without_a_gradient_has_the_same_value():
    torch.manual_seed(0)
    model = FeatureCNN().double().eval()
    images = torch.rand(3, 1, 32, 24, dtype=torch.float64)
    onehot = label_onehot(_labels(3, 32, 24, 3, 19), 3, dtype=torch.float64)
    with_gradient = pair_loss(model, images, onehot, disp_range=5, diffusion_weight=0.5, chunk_pairs=2)
    with torch.no_grad():
        without = pair_loss(model, images, onehot, disp_range=5, diffusion_weight=0.5, chunk_pairs=2)
    assert with_gradient.requires_grad and not without.requires_grad
    assert torch.allclose(with_gradient.detach(), without)


# --------------------------------------------------------------------------- training on any dataset


def test_train_on_custom_dataset_with_three_labels():
    dataset = blob_dataset(num_labels=3, size=(48, 64))
    model, history = train_features(dataset, num_pairs=12, progress=False, images_per_step=3, device="cpu")
    assert isinstance(history, LossHistory)
    assert len(history) == 2 and history.pairs == 12 and all(math.isfinite(v) for v in history)
    assert history.seconds > 0 and history.pairs_per_second == pytest.approx(history.pairs / history.seconds)
    assert not model.training
    with torch.no_grad():
        displacement = register_images(dataset.images[:2], dataset.images[2:4], model)
    assert displacement.shape == (2, 2, 48, 64)
    assert torch.isfinite(displacement).all()
    result = evaluate_registration(dataset, model)
    assert result["dice"].shape == (2, 3) and result["mean_dice"].shape == (2,)


def test_balanced_label_weights_are_inverse_areas_counted_by_hand(monkeypatch):
    """"balanced": w_l = 1 / area_l, normalised so that sum_l w_l * area_l = 1, i.e.
    w_l = N / (n_l * P) for n_l pixels of label l among the N training pixels and P labels
    present; 0 for a label absent from the training slices."""
    import tutorial_utils.train as train_module

    dataset = blob_dataset(num_labels=4, size=(32, 40), shift=3, seed=1)
    labels = dataset.labels.clone()
    train_ids = list(dataset.train_ids)
    labels[train_ids] = torch.where(labels[train_ids] == 3, 0, labels[train_ids])  # label 3 only in test slices
    dataset = type(dataset).from_arrays(dataset.images[:, 0], labels, dataset.label_names,
                                        train_ids=train_ids, test_ids=list(dataset.test_ids))
    counts = [0] * 4
    for i in train_ids:
        for value in dataset.labels[i].reshape(-1).tolist():
            counts[value] += 1
    total, present = sum(counts), sum(n > 0 for n in counts)
    assert counts[3] == 0 and present == 3
    expected = [total / (n * present) if n else 0.0 for n in counts]

    seen = []
    real_pair_loss = train_module.pair_loss

    def spy(*args, **kwargs):  # records the weights train_features hands to the loss
        seen.append(inspect.signature(real_pair_loss).bind(*args, **kwargs).arguments["label_weights"])
        return real_pair_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "pair_loss", spy)
    _, history = train_features(dataset, num_pairs=4, progress=False, images_per_step=2, prealign="none",
                                label_weights="balanced", diffusion_weight=0.1, disp_range=5)
    assert len(history) == 2 and history.settings["label_weights"] == "balanced"
    assert len(seen) == 2
    for weights in seen:
        assert weights.tolist() == pytest.approx(expected, rel=1e-5)


def test_training_is_deterministic_on_the_cpu():
    dataset = blob_dataset(num_labels=3, size=(32, 48), seed=2)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    runs = [train_features(dataset, num_pairs=12, seed=3, progress=False, images_per_step=3, device="cpu")
            for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is untouched
    assert torch.get_num_threads() == threads  # and so is the number of threads
    for (name, a), (_, b) in zip(runs[0][0].state_dict().items(), runs[1][0].state_dict().items()):
        assert torch.equal(a, b), name
    assert list(runs[0][1]) == list(runs[1][1])
    other, _ = train_features(dataset, num_pairs=12, seed=4, progress=False, images_per_step=3, device="cpu")
    assert not torch.equal(other[0].weight, runs[0][0][0].weight)


def test_training_learns_on_an_easy_problem():
    dataset = blob_dataset(num_labels=3, size=(32, 48), n=8, seed=5)
    _, history = train_features(dataset, num_pairs=30 * 6, progress=False, images_per_step=3, lr=5e-3)
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5


def test_train_features_validates_its_arguments():
    dataset = blob_dataset()
    with pytest.raises(ValueError, match="num_pairs"):
        train_features(dataset, num_pairs=0, progress=False)
    with pytest.raises(ValueError, match="disp_range"):
        train_features(dataset, disp_range=4, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        train_features(dataset, train_ids=[0], progress=False)
    with pytest.raises(ValueError, match="images_per_step"):
        train_features(dataset, images_per_step=1, progress=False)
    with pytest.raises(ValueError, match="label_weights"):
        train_features(dataset, num_pairs=2, label_weights="rare", progress=False)



# --------------------------------------------------------------------------- weights on disk


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = FeatureCNN()
    path = save_features(model, tmp_path / "sub" / "cnn.pt")
    state = torch.load(path, weights_only=True)
    assert set(state) == set(model.state_dict())
    loaded = load_features(path)
    image = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(image), model.eval()(image))


def test_shipped_checkpoint_is_a_small_state_dict():
    assert CHECKPOINT.is_file(), "the pretrained checkpoint must ship with the package"
    assert CHECKPOINT.stat().st_size < 1_000_000
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    model = load_features()
    assert isinstance(model, FeatureCNN) and not model.training


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    """A data cache shared by the tests that load the synthetic set (built once)."""
    return tmp_path_factory.mktemp("cache")


def test_command_line_writes_a_loadable_state_dict(tmp_path, monkeypatch, capsys, phantom_cache):
    monkeypatch.setenv("L2R_DATA_DIR", str(phantom_cache))
    out = tmp_path / "cnn.pt"
    assert main(["--pairs", "2", "--images-per-step", "2", "--out", str(out), "--source", "synthetic",
                 "--no-progress", "--device", "cpu"]) == 0
    assert "wrote" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    FeatureCNN().load_state_dict(state)
    assert load_features(out).training is False


def test_command_line_trains_on_a_folder_of_scans(tmp_path, capsys):
    from tutorial_utils.phantom import WINDOW_HU, make_phantom

    images, labels = make_phantom(num_slices=4, seed=0, shape=(48, 64))  # uint8 [4, 48, 64] each
    folder = tmp_path / "scans"
    folder.mkdir()
    low, high = WINDOW_HU
    for k in range(4):  # one-slice scans of 1.5 mm pixels, in HU
        hu = low + images[k].float().numpy() * (high - low) / 255
        for data, name in ((hu, f"case_{k}.nii.gz"), (labels[k].numpy(), f"case_{k}_seg.nii.gz")):
            nib.save(nib.Nifti1Image(data.T[:, :, None].astype(np.float32), np.diag([-1.5, -1.5, 3.0, 1.0])),
                     folder / name)
    out = tmp_path / "own.pt"
    assert main(["--scans", str(folder), "--test-scans", "2", "--evaluate", "--pairs", "2", "--images-per-step", "2",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "slices=4, size=48x64" in printed and "train=2, test=2" in printed and "test pairs: mean Dice" in printed
    assert load_features(out).training is False
    for argv, message in ((["--source", "synthetic"], "--scans and --source"), (["--evaluate"], "at least 2 held-out"),
                          (["--test-scans", "4"], "num_test must be")):
        exits_with_usage(main, ["--scans", str(folder), "--out", str(out), *argv], message, capsys)


@pytest.mark.parametrize("disable, shown", [(None, True), ("1", False)])
def test_the_progress_bar_honours_tqdm_disable(disable, shown):
    """``./tutorial.sh store`` sets TQDM_DISABLE=1 so that no bar is stored; progress=True must not override it.
    tqdm reads the variable when it is imported, hence a fresh process."""
    script = ("import sys; sys.path.insert(0, 'tests')\n"
              "from blob_data import blob_dataset\n"
              "from tutorial_utils.train import train_features\n"
              "train_features(blob_dataset(num_labels=3, size=(32, 48), seed=2), num_pairs=2, progress=True,\n"
              "               images_per_step=2, prealign='none', device='cpu')\n")
    env = {key: value for key, value in os.environ.items() if key != "TQDM_DISABLE"}
    if disable is not None:
        env["TQDM_DISABLE"] = disable
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ("pairs/s" in done.stderr) == shown
