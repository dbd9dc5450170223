"""Brute-force references of the label losses: loops over pairs, labels, pixels and offsets."""

import math

import torch


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
    """The non-local label loss: mean over pairs and pixels of the squared difference summed over labels."""
    fixed = onehot_loops(labels_fixed, num_labels, stride)
    warped = warp_loops(probabilities, onehot_loops(labels_moving, num_labels, stride))
    B, L, h, w = fixed.shape
    total = 0.0
    for b in range(B):
        for y in range(h):
            for x in range(w):
                total += sum((warped[b, c, y, x] - fixed[b, c, y, x]) ** 2 for c in range(L))
    return torch.tensor(float(total) / (B * h * w), dtype=torch.float64)
