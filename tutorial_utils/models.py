"""The feature CNN of the 2019 tutorial (the "MIND-net" architecture)."""

from __future__ import annotations

import torch
from torch import nn


class FeatureCNN(nn.Sequential):
    """Maps an image [B, 1, H, W] to features [B, 24, H/4, W/4] in (0, 1).

    Exactly the layer sequence of the 2019 tutorial, so its pretrained weights load by
    position: Conv(1->32, k5, stride 2, pad 4, dilation 2) BN PReLU, Conv(32->32, k3, pad 1)
    BN PReLU, Conv(32->64, k3, stride 2, pad 1) BN PReLU, Conv(64->24, k1), Sigmoid.
    H and W must be divisible by 4.
    """

    stride = 4

    def __init__(self, in_channels: int = 1, hidden: int = 32, out_channels: int = 24) -> None:
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
        if image.dim() != 4 or image.shape[1] != self[0].in_channels:
            raise ValueError(
                f"FeatureCNN expects images [B, {self[0].in_channels}, H, W], got {tuple(image.shape)}"
            )
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
