"""The non-local label loss, the fast regulariser used in training, the training loop and its CLI.

References are independent: brute-force loops over pairs, labels, pixels and offsets,
torch.autograd.gradcheck, and the reference regulariser of tutorial_utils.regularisation.
"""

from __future__ import annotations

import inspect
import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from blob_data import blob_dataset

from tutorial_utils.correlation import correlation_unfold
from tutorial_utils.models import FeatureCNN
from tutorial_utils.registration import DEFAULTS as REGISTRATION_DEFAULTS
from tutorial_utils.registration import register_images
from tutorial_utils.regularisation import normalise_cost, regularise
from tutorial_utils.train import (
    CHECKPOINT,
    LossHistory,
    diffusion_penalty,
    evaluate_registration,
    label_onehot,
    load_features,
    loss_2019,
    main,
    nonlocal_label_loss,
    nonlocal_label_loss_reference,
    nonlocal_label_warp,
    nonlocal_label_warp_unfold,
    pair_loss,
    regularise_fast,
    save_features,
    train_features,
    train_features_2019,
)

# --------------------------------------------------------------------------- brute-force references


def warp_loops(probabilities: torch.Tensor, onehot_moving: torch.Tensor) -> torch.Tensor:
    """warped[b, l, y, x] = sum_k p[b, k, y, x] * onehot[b, l, y + dy_k, x + dx_k], zero outside."""
    B, K, h, w = probabilities.shape
    L = onehot_moving.shape[1]
    D = math.isqrt(K)
    r = (D - 1) // 2
    out = torch.zeros(B, L, h, w, dtype=torch.float64)
    for b in range(B):
        for y in range(h):
            for x in range(w):
                for k in range(K):
                    yy, xx = y + k // D - r, x + k % D - r
                    if 0 <= yy < h and 0 <= xx < w:
                        out[b, :, y, x] += probabilities[b, k, y, x] * onehot_moving[b, :, yy, xx]
    return out


def onehot_loops(labels: torch.Tensor, num_labels: int, stride: int) -> torch.Tensor:
    """Fraction of each stride x stride block covered by each label: [B, L, H/s, W/s]."""
    B, H, W = labels.shape
    out = torch.zeros(B, num_labels, H // stride, W // stride, dtype=torch.float64)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                out[b, labels[b, y, x], y // stride, x // stride] += 1.0 / stride**2
    return out


def loss_loops(probabilities, labels_fixed, labels_moving, num_labels, stride=4) -> torch.Tensor:
    fixed = onehot_loops(labels_fixed, num_labels, stride)
    warped = warp_loops(probabilities, onehot_loops(labels_moving, num_labels, stride))
    B, L, h, w = fixed.shape
    total = 0.0
    for b in range(B):
        for y in range(h):
            for x in range(w):
                total += sum((warped[b, c, y, x] - fixed[b, c, y, x]) ** 2 for c in range(L))
    return torch.tensor(float(total) / (B * h * w), dtype=torch.float64)


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


# --------------------------------------------------------------------------- the loss


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


def test_diffusion_penalty():
    constant = torch.ones(1, 2, 4, 5)
    assert diffusion_penalty(constant).item() == 0.0
    ramp = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 2, 4, 5)  # slope 1 along x
    assert diffusion_penalty(ramp).item() == pytest.approx(1.0)


# --------------------------------------------------------------------------- the fast regulariser


@pytest.mark.parametrize("settings", [
    dict(disp_range=9),
    dict(disp_range=5, min_kernel=1, avg_kernel=3, meanfield_kernel=3, meanfield_iterations=2),
    dict(disp_range=7, avg_kernel=3),
    dict(disp_range=3),
    dict(disp_range=5, min_kernel=5),  # falls back to the reference min-convolution
    dict(disp_range=5, meanfield_iterations=0),
])
def test_regularise_fast_matches_reference(settings):
    D = settings["disp_range"]
    cost = torch.rand(2, D * D, 7, 6, generator=torch.Generator().manual_seed(D), dtype=torch.float64)
    rest = {k: v for k, v in settings.items() if k != "disp_range"}
    assert torch.allclose(regularise_fast(cost, D, **rest), regularise(cost, D, **rest), atol=1e-12)


def test_regularise_fast_gradients():
    cost = torch.rand(2, 25, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda c: regularise_fast(c, 5), (cost.requires_grad_(True),))
    # random costs have no ties, so the gradient equals the reference's exactly
    weights = torch.randn(2, 25, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (fast,) = torch.autograd.grad((regularise_fast(cost, 5) * weights).sum(), cost)
    (ref,) = torch.autograd.grad((regularise(cost, 5) * weights).sum(), cost)
    assert torch.allclose(fast, ref)


def test_regularise_fast_float32_large():
    cost = torch.rand(1, 81, 16, 20, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(regularise_fast(cost, 9), regularise(cost, 9), atol=1e-5)


# --------------------------------------------------------------------------- the training loss of a group


def _per_pair_reference(model, images, onehot, disp_range):
    """Every ordered pair separately, as register_images builds it: replication-padded unfold
    correlation, normalised, the reference regulariser with register_images' settings, the
    softmax, the unfold warp; then the mean over the pairs."""
    settings = REGISTRATION_DEFAULTS
    reg = {k: settings[k] for k in ("min_kernel", "avg_kernel", "meanfield_kernel", "meanfield_iterations",
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
            probabilities = torch.softmax(-settings["alpha"] * regularise(cost, disp_range, **reg), dim=1)
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


def test_the_2019_loop_runs():
    dataset = blob_dataset(num_labels=3, size=(32, 48))
    model, history = train_features_2019(dataset, num_pairs=3, progress=False, device="cpu")
    assert len(history) == 3 and not model.training
    loss = loss_2019(model.train(), dataset.images[:1], dataset.images[1:2], dataset.labels[:1],
                     dataset.labels[1:2], dataset.num_labels)
    assert loss.dim() == 0 and loss.requires_grad


class _ZeroFeatures(torch.nn.Module):
    """Features that are 0 everywhere: every cost is 0 (the zero padding too), so the softmax is uniform."""

    def forward(self, image):
        return torch.zeros(image.shape[0], 3, image.shape[2] // 4, image.shape[3] // 4)


@pytest.mark.parametrize("D", [3, 5])
def test_loss_2019_with_uniform_probabilities_matches_loops(D):
    """Labels constant on 4 x 4 blocks (so bilinear downsampling is exact), zero features:
    p = 1 / D^2 for every displacement, and loss_2019 is the loop loss of those probabilities."""
    generator = torch.Generator().manual_seed(D)
    h, w, L = 4, 5, 3
    blocks = torch.randint(0, L, (2, 1, h, w), generator=generator)
    fixed, moving = (b.repeat_interleave(4, 1).repeat_interleave(4, 2) for b in blocks)  # [1, 16, 20]
    uniform = torch.full((1, D * D, h, w), 1.0 / D**2, dtype=torch.float64)
    expected = loss_loops(uniform, fixed, moving, L)
    images = torch.rand(2, 1, 4 * h, 4 * w, generator=generator)
    loss = loss_2019(_ZeroFeatures(), images[:1], images[1:], fixed, moving, L, disp_range=D)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() > 0.1  # the labels differ: the check is not 0 == 0


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
        with pytest.raises(SystemExit):
            main(["--scans", str(folder), "--out", str(out), *argv])
        assert message in capsys.readouterr().err


def test_training_benchmark_runs_and_formats(monkeypatch, phantom_cache):
    from tutorial_utils.benchmark import BENCHMARKS, format_training_table, run_training_benchmark

    monkeypatch.setenv("L2R_DATA_DIR", str(phantom_cache))
    result = run_training_benchmark(pairs=2, pairs_2019=1, repeats=1, images_per_step=2, device="cpu")
    loops = [row["loop"] for row in result["rows"]]
    assert loops[0] == "2019 loop" and len(loops) == 4
    assert all(row["pairs_per_second"] > 0 for row in result["rows"])
    assert result["speedup"] == result["rows"][1]["speedup"]
    assert "2019 loop" in format_training_table(result)
    assert "training" in BENCHMARKS
