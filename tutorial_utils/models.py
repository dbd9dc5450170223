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
