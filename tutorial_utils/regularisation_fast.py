"""The regularisation used in training: the same values as ``regularisation.regularise``, fast to train through.

Taught in ``notebooks/04_training.ipynb`` (the speed of the training loop). Training back-
propagates through the regulariser of :func:`~tutorial_utils.regularisation.regularise` (the
min-convolution over the displacements, then the mean field over the pixels) thousands of
times; :func:`regularise_fast` gives the same values, computed without blowing the D x D
grid up to (D + 2p) x (D + 2p) and without autograd through sliding-window views (which is
what makes training through the reference slow on the CPU):

* everything after the min-pooling is linear and separable, so replication padding plus
  repeated mean-pooling along one axis is one small matrix A [n, n] (built once by pushing
  the identity through the same pads and pools) and ``pool(x) = A_rows @ x @ A_cols^T``;
* padding by p and min-pooling by k equals padding by (k-1)/2, min-pooling, and padding
  the result by p - (k-1)/2, so the min-pool runs on the D x D grid itself and the rest
  of the padding folds into A;
* the min-pool by 3 has a hand-written gradient (:class:`_WindowMin3`).

A min-pool other than 1 or 3 falls back to the reference
:func:`~tutorial_utils.regularisation.min_convolution`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_int, check_odd
from .regularisation import min_convolution

__all__ = ["REG_KEYS", "regularise_fast"]

REG_KEYS = ("min_kernel", "avg_kernel", "meanfield_kernel", "meanfield_iterations", "meanfield_passes")
"""The settings of the regularisation: the keyword arguments of :func:`regularise_fast` (and of
:func:`~tutorial_utils.regularisation.regularise`), in the order :func:`_check_reg` takes them."""

_MATRICES: dict = {}


def _pool_matrix(size: int, kernel: int, passes: int, pad: int, device, dtype) -> torch.Tensor:
    """A [size, size] with ``A @ x`` = ``passes`` mean-pools (``kernel``, stride 1) of ``x``
    replication-padded by ``pad`` along its first axis (pad = passes * (kernel - 1) / 2)."""
    key = (size, kernel, passes, pad, str(device), dtype)
    if key not in _MATRICES:
        basis = torch.eye(size, dtype=torch.float64)[:, None, :]  # [size, 1, size]: one column each
        basis = F.pad(basis, (pad, pad), mode="replicate") if pad else basis
        for _ in range(passes):
            basis = F.avg_pool1d(basis, kernel, stride=1)
        _MATRICES[key] = basis[:, 0, :].T.contiguous().to(device=device, dtype=dtype)  # [out, in]
    return _MATRICES[key]


class _WindowMin3(torch.autograd.Function):
    """Min over each element and its two neighbours along ``dim`` (replication padding: at
    the ends the window just has two elements). The gradient of every output goes to the
    minimum of its window: the centre if it is one, else the lower neighbour, else the upper."""

    @staticmethod
    def forward(ctx, x, dim):
        n = x.shape[dim]
        out = x.clone()
        if n > 1:
            upper, lower = out.narrow(dim, 1, n - 1), out.narrow(dim, 0, n - 1)
            torch.minimum(upper, x.narrow(dim, 0, n - 1), out=upper)  # with the neighbour below
            torch.minimum(lower, x.narrow(dim, 1, n - 1), out=lower)  # with the neighbour above
        ctx.save_for_backward(x, out)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, out = ctx.saved_tensors
        dim, n = ctx.dim, x.shape[ctx.dim]
        centre = x == out
        grad = grad_out * centre
        if n == 1:
            return grad, None
        rest = grad_out - grad  # not yet routed
        below = (x.narrow(dim, 0, n - 1) == out.narrow(dim, 1, n - 1)) & ~centre.narrow(dim, 1, n - 1)
        to_below = rest.narrow(dim, 1, n - 1) * below
        grad.narrow(dim, 0, n - 1).add_(to_below)
        rest.narrow(dim, 1, n - 1).sub_(to_below)
        grad.narrow(dim, 1, n - 1).add_(rest.narrow(dim, 0, n - 1))  # what is left: the neighbour above
        return grad, None


def _window_min(grid: torch.Tensor, dim: int) -> torch.Tensor:
    """Min-pooling by 3 (replication padded, size kept) along dim 1 or 2 of [B, n, n, m]."""
    return _WindowMin3.apply(grid, dim)


def _along(matrix: torch.Tensor, grid: torch.Tensor, dim: int) -> torch.Tensor:
    """Apply ``matrix`` [n, n] along dim 1 or 2 of ``grid`` [B, a, b, m] (that dim has size n)."""
    B, a, b, m = grid.shape
    if dim == 1:
        return torch.matmul(matrix, grid.reshape(B, a, b * m)).reshape(B, a, b, m)
    return torch.matmul(matrix, grid.reshape(B * a, b, m)).reshape(B, a, b, m)


def _min_convolution_matrices(D: int, avg_kernel: int, device, dtype):
    """(A_mid [D, D], first [D], last [D]): two mean-pools of the sequence
    ``[x_0]*q + y + [x_D-1]*q`` (q = avg_kernel - 1) are ``A_mid @ y + first * x_0 + last * x_D-1``."""
    key = ("minconv", D, avg_kernel, str(device), dtype)
    if key not in _MATRICES:
        q = avg_kernel - 1
        full = _pool_matrix(D + 2 * q, avg_kernel, 2, 0, "cpu", torch.float64)  # [D, D+2q], valid pools
        _MATRICES[key] = tuple(t.contiguous().to(device=device, dtype=dtype)
                               for t in (full[:, q:q + D], full[:, :q].sum(1), full[:, q + D:].sum(1)))
    return _MATRICES[key]


def _min_convolution_fast(cost: torch.Tensor, D: int, min_kernel: int, avg_kernel: int) -> torch.Tensor:
    """Exactly ``regularisation.min_convolution(cost, D, min_kernel, avg_kernel)``, for min_kernel 1 or 3.

    Along one axis, padding by p = 1 + q (q = avg_kernel - 1) and min-pooling by 3 give
    ``[x_0]*q + minpool(x) + [x_D-1]*q`` (the windows beyond the edge see only the edge
    value), so the axis becomes ``A_mid @ minpool(x) + first * x_0 + last * x_D-1``. In the
    reference's order (min over dy, min over dx, then the linear pools over both) this is::

        inner = A_mid @_dx minpool_dx(minpool_dy(x)) + first_dx * rows[.., 0] + last_dx * rows[.., D-1]
        out   = A_mid @_dy inner + first_dy * edge(x[0, :]) + last_dy * edge(x[D-1, :])

    with ``rows = minpool_dy(x)`` and ``edge(v) = A_mid @ minpool(v) + first * v_0 + last * v_D-1``:
    two small matrix products on the whole grid, the rest on its first and last rows only.
    """
    B, K, h, w = cost.shape
    x = cost.reshape(B, D, D, h * w)  # [B, dy, dx, hw]
    if min_kernel == 1:
        A = _pool_matrix(D, avg_kernel, 2, avg_kernel - 1, cost.device, cost.dtype)
        return _along(A, _along(A, x, 2), 1).reshape(B, K, h, w)
    mid, first, last = _min_convolution_matrices(D, avg_kernel, cost.device, cost.dtype)
    rows = _window_min(x, 1)  # min over dy: [B, D, D, hw]
    inner = _along(mid, _window_min(rows, 2), 2)  # then over dx, pooled over dx
    inner = inner + first.view(1, 1, D, 1) * rows[:, :, :1] + last.view(1, 1, D, 1) * rows[:, :, -1:]
    ends = x[:, [0, D - 1]]  # [B, 2, D, hw]: the dy rows that the padding replicates
    ends = (_along(mid, _window_min(ends, 2), 2) + first.view(1, 1, D, 1) * ends[:, :, :1]
            + last.view(1, 1, D, 1) * ends[:, :, -1:])
    out = _along(mid, inner, 1) + first.view(1, D, 1, 1) * ends[:, :1] + last.view(1, D, 1, 1) * ends[:, 1:]
    return out.reshape(B, K, h, w)


def _mean_field_fast(cost: torch.Tensor, kernel: int, passes: int) -> torch.Tensor:
    B, K, h, w = cost.shape
    pad = passes * (kernel - 1) // 2
    A_h = _pool_matrix(h, kernel, passes, pad, cost.device, cost.dtype)  # [h, h]
    A_w = _pool_matrix(w, kernel, passes, pad, cost.device, cost.dtype)  # [w, w]
    out = torch.matmul(cost.reshape(B * K, h, w), A_w.T)  # along x
    return torch.matmul(A_h, out).reshape(B, K, h, w)  # along y


def _check_reg(min_kernel: int, avg_kernel: int, meanfield_kernel: int, meanfield_iterations: int,
               meanfield_passes: int) -> tuple[int, int, int, int, int]:
    """The regularisation's kernels (odd integers >= 1) and repetitions (integers >= 0), as ints."""
    return (check_odd("min_kernel", min_kernel), check_odd("avg_kernel", avg_kernel),
            check_odd("meanfield_kernel", meanfield_kernel),
            check_int("meanfield_iterations", meanfield_iterations, minimum=0),
            check_int("meanfield_passes", meanfield_passes, minimum=0))


def regularise_fast(cost: torch.Tensor, disp_range: int, min_kernel: int = 3, avg_kernel: int = 5,
                    meanfield_kernel: int = 5, meanfield_iterations: int = 1,
                    meanfield_passes: int = 3) -> torch.Tensor:
    """:func:`~tutorial_utils.regularisation.regularise` with the same values, faster to train through.

    Min-convolution over the displacements (min-pool ``min_kernel``, two mean-pools
    ``avg_kernel``, replication padding) and mean field over space (``meanfield_passes``
    mean-pools of ``meanfield_kernel``), ``meanfield_iterations`` times, exactly as there;
    only the implementation differs (the linear pools as small matrix products, no padded
    (D + 2p) x (D + 2p) grid, no autograd through sliding-window views; at ties of the
    min-pool the gradient goes to one minimum instead of being split).

    Args:
        cost: [B, D*D, h, w] float. disp_range: D.

    Returns:
        [B, D*D, h, w].
    """
    D = check_odd("disp_range", disp_range)
    if not isinstance(cost, torch.Tensor) or cost.dim() != 4 or cost.shape[1] != D * D:
        raise ValueError(f"cost must be [B, D*D={D * D}, h, w], got {getattr(cost, 'shape', cost)}")
    min_kernel, avg_kernel, meanfield_kernel, meanfield_iterations, meanfield_passes = _check_reg(
        min_kernel, avg_kernel, meanfield_kernel, meanfield_iterations, meanfield_passes)
    belief = cost.contiguous()
    for _ in range(meanfield_iterations):  # each round applies both again, as the reference does
        if min_kernel in (1, 3):
            belief = _min_convolution_fast(belief.contiguous(), D, min_kernel, avg_kernel)
        else:
            belief = min_convolution(belief, D, min_kernel, avg_kernel)
        belief = _mean_field_fast(belief, meanfield_kernel, meanfield_passes)
    return belief
