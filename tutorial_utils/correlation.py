"""The correlation layer: dense sampling of the displacement space."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def correlation_unfold(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, disp_range: int) -> torch.Tensor:
    """SSD cost volume, built exactly as in the 2019 tutorial (memory hungry, for teaching).

    Args:
        feat_fixed, feat_moving: [B, C, H, W] feature maps.
        disp_range: D, odd; displacements (dy, dx) in {-r..r}^2 with r = (D-1)//2.

    Returns:
        cost volume [B, D*D, H, W]; channel ``k = i*D + j`` holds offset ``(i - r, j - r)``
        and ``sum_c (fixed[c, y, x] - moving[c, y+dy, x+dx])**2``, zero padding outside.
    """
    B, C, H, W = feat_fixed.shape
    r = (disp_range - 1) // 2
    D = disp_range
    # [B, C*D*D, H*W] -> [B, C, D*D, H*W]
    moving_unfold = F.unfold(feat_moving, (D, D), padding=r).view(B, C, D * D, H * W)
    ssd = ((feat_fixed.view(B, C, 1, H * W) - moving_unfold) ** 2).sum(1)  # [B, D*D, H*W]
    return ssd.view(B, D * D, H, W)
