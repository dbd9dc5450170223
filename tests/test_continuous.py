"""The continuous baseline: the displacement U-Net, its training loop, registration and CLI.

References are independent: closed forms (a constant flow head, a known translation),
label losses written out per label, warping twice instead of composing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from blob_data import blob_dataset
from torch import nn

from tutorial_utils.continuous import (
    UNET_CHECKPOINT,
    load_unet,
    main,
    register_unet,
    save_unet,
    train_unet,
    unet_loss,
)
from tutorial_utils.data import Dataset
from tutorial_utils.models import DisplacementUNet
from tutorial_utils.prealign import prealign_displacement
from tutorial_utils.training import LossHistory
from tutorial_utils.transform import warp

# --------------------------------------------------------------------------- the model


def test_unet_shapes_and_identity_start():
    torch.manual_seed(0)
    model = DisplacementUNet()
    fixed, moving = torch.rand(3, 1, 32, 48), torch.rand(3, 1, 32, 48)
    displacement = model(fixed, moving)
    assert displacement.shape == (3, 2, 32, 48)
    assert torch.equal(displacement, torch.zeros_like(displacement))  # zero-initialised flow head
    assert model.total_stride == 16
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert size < 500_000


def test_unet_flow_is_in_image_pixels():
    """A constant output of the flow head (c in pixels at 1/4 resolution) is 4c image pixels."""
    model = DisplacementUNet(flow_level=2)
    with torch.no_grad():
        model.flow.bias.copy_(torch.tensor([1.0, -0.5]))
    displacement = model(torch.rand(2, 1, 32, 48), torch.rand(2, 1, 32, 48))
    assert torch.allclose(displacement[:, 0], torch.full((2, 32, 48), 4.0))
    assert torch.allclose(displacement[:, 1], torch.full((2, 32, 48), -2.0))


def test_unet_gets_gradients_and_smaller_variants_work():
    model = DisplacementUNet(channels=(8, 8, 8), flow_level=1)
    nn.init.normal_(model.flow.weight, std=0.01)
    model(torch.rand(1, 1, 16, 24), torch.rand(1, 1, 16, 24)).square().sum().backward()
    # every parameter is in the graph and moves the output (a detached branch would give None or 0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_unet_rejects_bad_input():
    model = DisplacementUNet()
    with pytest.raises(ValueError, match="total stride 16"):
        model(torch.rand(1, 1, 40, 48), torch.rand(1, 1, 40, 48))
    with pytest.raises(ValueError, match="same shape"):
        model(torch.rand(1, 1, 32, 48), torch.rand(2, 1, 32, 48))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        model(torch.rand(1, 2, 32, 48), torch.rand(1, 2, 32, 48))
    with pytest.raises(ValueError, match="flow_level"):
        DisplacementUNet(channels=(8, 8), flow_level=3)
    with pytest.raises(ValueError, match="channels"):
        DisplacementUNet(channels=())


# --------------------------------------------------------------------------- training


def _small_dataset(seed=0):
    return blob_dataset(size=(32, 48), seed=seed, parts=5)


def _shifted_dataset(n=8, H=32, W=48, seed=0):
    """Two discs at fixed places, each slice shifted by up to 4 pixels: a translation to learn."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    images, labels = [], []
    for _ in range(n):
        dy, dx = (torch.rand(2, generator=generator) * 8 - 4).tolist()
        lab, img = torch.zeros(H, W, dtype=torch.long), torch.full((H, W), 0.2)
        for label, (cy, cx) in enumerate([(12, 14), (20, 32)], 1):
            disc = (yy - cy - dy) ** 2 + (xx - cx - dx) ** 2 < 36
            lab[disc], img[disc] = label, 0.4 + 0.3 * label
        images.append(img)
        labels.append(lab)
    return Dataset.from_arrays(torch.stack(images), torch.stack(labels), ["background", "a", "b"],
                               train_ids=list(range(n - 2)), test_ids=[n - 2, n - 1])


def test_train_unet_lowers_the_loss():
    dataset = _shifted_dataset()
    ids = list(dataset.train_ids)
    images, onehot = dataset.images[ids], F.one_hot(dataset.labels[ids], 3).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        before = unet_loss(DisplacementUNet(), images, onehot).item()  # the identity, on all 30 pairs
    model, history = train_unet(dataset, num_pairs=1200, progress=False, prealign="none", device="cpu",
                                diffusion_weight=0.0)
    assert isinstance(history, LossHistory) and len(history) == 100 and history.pairs == 1200
    assert history.seconds > 0 and history.pairs_per_second == pytest.approx(history.pairs / history.seconds)
    assert not model.training
    with torch.no_grad():
        after = unet_loss(model, images, onehot).item()
    assert after < 0.5 * before, (before, after)


def test_train_unet_is_deterministic_and_leaves_global_state_alone():
    dataset = _small_dataset(seed=2)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    runs = [train_unet(dataset, num_pairs=12, seed=3, progress=False, device="cpu", images_per_step=3)
            for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    for (name, a), (_, b) in zip(runs[0][0].state_dict().items(), runs[1][0].state_dict().items()):
        assert torch.equal(a, b), name
    assert list(runs[0][1]) == list(runs[1][1]) and len(runs[0][1]) == 2
    other, _ = train_unet(dataset, num_pairs=12, seed=4, progress=False, device="cpu", images_per_step=3)
    assert not torch.equal(other.encoder[0][0].weight, runs[0][0].encoder[0][0].weight)


def test_train_unet_stops_at_a_time_budget():
    dataset = _small_dataset(seed=3)
    _, history = train_unet(dataset, seconds=0.3, progress=False, device="cpu", loss="dice")
    assert history.pairs >= 12 and history.pairs == 12 * len(history)
    assert 0.3 <= history.seconds < 5
    assert history.settings["num_pairs"] is None and history.settings["seconds"] == 0.3


def test_train_unet_validates_its_arguments():
    dataset = _small_dataset()
    for kwargs, match in [(dict(num_pairs=0), "num_pairs"), (dict(seconds=-1), "seconds"),
                          (dict(images_per_step=1), "images_per_step"), (dict(loss="l1"), "loss"),
                          (dict(train_ids=[0]), "at least 2"), (dict(lr=0.0), "lr")]:
        with pytest.raises(ValueError, match=match):
            train_unet(dataset, progress=False, **kwargs)
    odd = Dataset.from_arrays(torch.rand(4, 36, 48), torch.zeros(4, 36, 48, dtype=torch.long), ["bg", "organ"],
                              train_ids=[0, 1, 2], test_ids=[3])
    with pytest.raises(ValueError, match="total stride"):
        train_unet(odd, num_pairs=2, progress=False)


# --------------------------------------------------------------------------- registration


class _ConstantField(nn.Module):
    """A stand-in for the U-Net: returns a fixed smooth displacement, records its inputs."""

    def __init__(self, field):
        super().__init__()
        self.field = field
        self.scale = nn.Parameter(torch.ones(()))
        self.inputs = None

    def forward(self, image_fixed, image_moving):
        self.inputs = (image_fixed, image_moving)
        return self.field.expand(image_fixed.shape[0], -1, -1, -1) * self.scale


def _smooth_images(B, H, W, seed):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(B, 1, H // 8, W // 8, generator=generator)
    return F.interpolate(noise, size=(H, W), mode="bicubic", align_corners=False).clamp(0, 1)


@pytest.mark.parametrize("prealign", ["moments", "none"])
def test_register_unet_composes_the_prealignment(prealign):
    H, W = 48, 64
    fixed, moving = _smooth_images(2, H, W, 0), _smooth_images(2, H, W, 1)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    field = torch.stack([1.5 * torch.sin(xs / 9), 1.0 * torch.cos(ys / 7)])[None]  # [1, 2, H, W]
    model = _ConstantField(field).train()
    displacement = register_unet(model, fixed, moving, prealign=prealign)
    assert displacement.shape == (2, 2, H, W) and not model.training
    pre = prealign_displacement(fixed, moving, prealign)
    twice = warp(warp(moving, pre), field.expand(2, -1, -1, -1))  # pre-align, then the network's field
    assert torch.allclose(model.inputs[1], warp(moving, pre), atol=1e-5)  # it saw the pre-aligned image
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    assert (warp(moving, displacement) - twice)[inner].abs().max() < 0.02
    if prealign == "moments":  # and the pre-alignment really did something
        assert (pre.abs().amax() > 0.5) and not torch.allclose(displacement, field.expand(2, -1, -1, -1))


def test_register_unet_under_grad_mode_returns_no_graph():
    model = DisplacementUNet()
    out = register_unet(model, torch.rand(1, 1, 32, 48), torch.rand(1, 1, 32, 48))
    assert not out.requires_grad and out.shape == (1, 2, 32, 48)
    with pytest.raises(ValueError, match="differ in shape"):
        register_unet(model, torch.rand(1, 1, 32, 48), torch.rand(1, 1, 32, 32))


# --------------------------------------------------------------------------- weights on disk and the CLI


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DisplacementUNet()
    nn.init.normal_(model.flow.weight, std=0.01)
    path = save_unet(model, tmp_path / "sub" / "unet.pt")
    loaded = load_unet(path)
    fixed, moving = torch.rand(1, 1, 32, 48), torch.rand(1, 1, 32, 48)
    with torch.no_grad():
        assert torch.equal(loaded(fixed, moving), model(fixed, moving))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state_dict"):
        load_unet(tmp_path / "list.pt")


def test_shipped_checkpoint_is_a_small_state_dict():
    assert UNET_CHECKPOINT.is_file(), "the U-Net checkpoint must ship with the package"
    assert UNET_CHECKPOINT.stat().st_size < 1_000_000
    state = torch.load(UNET_CHECKPOINT, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    model = load_unet()
    assert isinstance(model, DisplacementUNet) and not model.training
    assert model.flow.weight.abs().sum() > 0  # trained, not the identity


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_command_line(tmp_path, monkeypatch, capsys, phantom_cache):
    monkeypatch.setenv("L2R_DATA_DIR", str(phantom_cache))
    out = tmp_path / "unet.pt"
    common = ["--source", "synthetic", "--no-progress", "--device", "cpu", "--images-per-step", "2"]
    assert main(["--pairs", "2", "--out", str(out), *common]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_unet(out).training is False
    assert main(["--measure-budget", "100", "--measure-pairs", "2", "--measure-repeats", "1", *common]) == 0
    printed = capsys.readouterr().out
    assert "pairs/s" in printed and "--pairs" in printed
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        main(["--pairs", "2", *common])
    assert "--out" in capsys.readouterr().err  # the missing argument is named
