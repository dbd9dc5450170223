"""The feature CNN of the 2019 tutorial (the "MIND-net" architecture)."""

from __future__ import annotations

import torch
from torch import nn

from .checks import check_finite, check_image, check_int, check_same, check_tensor


class FeatureCNN(nn.Sequential):
    """Maps an image [B, 1, H, W] to features [B, 24, H/4, W/4] in (0, 1).

    Exactly the layer sequence of the 2019 tutorial, so its pretrained weights load by
    position: Conv(1->32, k5, stride 2, pad 4, dilation 2) BN PReLU, Conv(32->32, k3, pad 1)
    BN PReLU, Conv(32->64, k3, stride 2, pad 1) BN PReLU, Conv(64->24, k1), Sigmoid.
    H and W must be divisible by 4.
    """

    stride = 4

    def __init__(self, in_channels: int = 1, hidden: int = 32, out_channels: int = 24) -> None:
        in_channels = check_int("in_channels", in_channels, minimum=1)
        hidden = check_int("hidden", hidden, minimum=1)
        out_channels = check_int("out_channels", out_channels, minimum=1)
        super().__init__(
            nn.Conv2d(in_channels, hidden, 5, stride=2, padding=4, dilation=2),
            nn.BatchNorm2d(hidden),
            nn.PReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.PReLU(),
            nn.Conv2d(hidden, 2 * hidden, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * hidden),
            nn.PReLU(),
            nn.Conv2d(2 * hidden, out_channels, 1),
            nn.Sigmoid(),
        )
        self.out_channels = out_channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # [B,1,H,W] -> [B,24,H/4,W/4]
        channels = self[0].in_channels
        check_tensor("image", image, dims=4, layout=f"FeatureCNN's input [B, {channels}, H, W]", channels=channels,
                     floating=True, device=self[0].weight.device, finite=True)
        if image.shape[-2] % 4 or image.shape[-1] % 4:
            raise ValueError(f"H and W must be divisible by 4, got {tuple(image.shape[-2:])}")
        return super().forward(image)


MINDNET_ALLOWED_CLASSES = (nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.PReLU, nn.Sigmoid)
"""The only classes a pickled MIND-net file may contain."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds something other than what is allowed; it was not loaded."""


def load_mindnet(path) -> FeatureCNN:
    """Load the 2019 tutorial's pretrained ``mindnet_cnn_pancreas.pth`` safely.

    The file is a whole pickled ``nn.Sequential``. It is unpickled with ``weights_only=True``
    and an allowlist of exactly the torch.nn classes of that architecture
    (:data:`MINDNET_ALLOWED_CLASSES`), so no other code can run; its weights are then copied
    into a fresh :class:`FeatureCNN`. Anything else raises :class:`UnsafeCheckpointError`.
    """
    try:
        with torch.serialization.safe_globals(list(MINDNET_ALLOWED_CLASSES)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # the unpickler refused a global, or the file is not a checkpoint
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpointError(
            f"refused to load {path}: it is not a pickled MIND-net made only of "
            f"{', '.join(c.__name__ for c in MINDNET_ALLOWED_CLASSES)} ({first_line})"
        ) from exc
    model = FeatureCNN()
    if isinstance(obj, dict):  # a plain state_dict is fine too
        state = obj
    elif isinstance(obj, nn.Sequential):
        got = [type(m).__name__ for m in obj]
        want = [type(m).__name__ for m in model]
        if got != want:
            raise UnsafeCheckpointError(f"{path} holds layers {got}, expected the MIND-net layers {want}")
        state = obj.state_dict()
    else:
        raise UnsafeCheckpointError(f"{path} holds a {type(obj).__name__}, expected an nn.Sequential MIND-net")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UnsafeCheckpointError(f"{path}: weights do not fit the MIND-net architecture ({exc})") from exc
    return model.eval()


class DisplacementUNet(nn.Module):
    """A compact U-Net of the VoxelMorph family: an image pair -> a dense displacement.

    ``model(image_fixed, image_moving)`` with both [B, 1, H, W] (they are concatenated to
    [B, 2, H, W], fixed first) returns the displacement [B, 2, H, W], channels (dy, dx) in
    image pixels, with the convention of the whole project:
    ``warped[y, x] = moving[y + dy, x + dx]``.

    Architecture (no normalisation layers, so a pair's result never depends on the batch):

    * encoder: ``len(channels)`` levels, each a 3x3 convolution with stride 2 and a
      LeakyReLU(0.2) (the first level already works at 1/2 resolution), then a second 3x3
      convolution at that level; level k is at 1/2^(k+1) of the image;
    * decoder: from the coarsest level up to 1/2^``flow_level``: bilinear x2 upsampling,
      concatenation with the encoder features of that level (the skip connection), two 3x3
      convolutions with LeakyReLU;
    * flow head: a 3x3 convolution to 2 channels at 1/2^``flow_level`` resolution, its
      weights and bias zero-initialised (the untrained model returns the identity, zero
      displacement), read in pixels of that resolution and upsampled bilinearly
      (``align_corners=False``) to H x W with the values multiplied by 2^``flow_level``
      (as :func:`~tutorial_utils.transform.upsample_displacement` does).

    H and W must be divisible by :attr:`total_stride` = 2^len(channels).

    Args:
        channels: feature channels of the encoder levels (coarse levels last).
        flow_level: resolution of the flow head, 1/2^flow_level (1 <= flow_level <= len(channels)).
        decoder_channels: channels of the decoder convolutions (default: those of the
            encoder level they sit on).
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 32, 32), flow_level: int = 2,
                 decoder_channels: int | None = None) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty tuple of positive integers, got {channels!r}")
        flow_level = check_int("flow_level", flow_level, minimum=1, maximum=len(channels))
        self.channels, self.flow_level = channels, flow_level
        self.total_stride = 2 ** len(channels)

        def block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(c_out, c_out, 3, padding=1), nn.LeakyReLU(0.2))

        self.encoder = nn.ModuleList()
        c_in = 2
        for c in channels:
            self.encoder.append(block(c_in, c, stride=2))
            c_in = c
        self.decoder = nn.ModuleList()
        # decoder level k (k = len-2 down to flow_level-1) merges the upsampled coarser map with encoder level k
        for k in range(len(channels) - 2, flow_level - 2, -1):
            c_out = decoder_channels or channels[k]
            self.decoder.append(block(c_in + channels[k], c_out))
            c_in = c_out
        self.flow = nn.Conv2d(c_in, 2, 3, padding=1)
        nn.init.zeros_(self.flow.weight)
        nn.init.zeros_(self.flow.bias)

    def forward(self, image_fixed: torch.Tensor, image_moving: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] x 2 -> displacement [B, 2, H, W] (dy, dx) in image pixels."""
        for name, image in (("image_fixed", image_fixed), ("image_moving", image_moving)):
            check_image(name, image, finite=False)
        check_same("image_fixed", image_fixed, "image_moving", image_moving, shape=True, device=True)
        check_tensor("image_fixed", image_fixed, device=self.flow.weight.device)  # where the model is
        check_finite("image_fixed", image_fixed)  # after the device checks: a NaN test cannot run on "meta"
        check_finite("image_moving", image_moving)
        H, W = image_fixed.shape[-2:]
        if H % self.total_stride or W % self.total_stride:
            raise ValueError(f"H and W must be divisible by the U-Net's total stride {self.total_stride} "
                             f"(2^{len(self.channels)} levels), got {(H, W)}")
        x = torch.cat([image_fixed, image_moving], 1)  # [B, 2, H, W]
        skips = []
        for level in self.encoder:
            x = level(x)  # level k: [B, channels[k], H/2^(k+1), W/2^(k+1)]
            skips.append(x)
        for i, level in enumerate(self.decoder):
            skip = skips[len(self.channels) - 2 - i]
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = level(torch.cat([x, skip], 1))
        scale = 2 ** self.flow_level
        flow = self.flow(x) * scale  # [B, 2, H/scale, W/scale], now in image pixels
        return nn.functional.interpolate(flow, size=(H, W), mode="bilinear", align_corners=False)
