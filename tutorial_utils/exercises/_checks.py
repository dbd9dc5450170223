"""What every exercise checker uses: comparing tensors, calling the learner's function, random inputs.

Shared by the checkers of notebooks 02 (:mod:`.correlation`, :mod:`.correlation_batch`) and
03 (:mod:`.regularisation`, :mod:`.mean_field`).
"""

from __future__ import annotations

from typing import Callable

import torch

from ._core import Incorrect


def close(a, b: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """``a`` is a tensor of the shape of ``b`` and equal to it within ``rtol``, ``atol`` (in float64)."""
    return (isinstance(a, torch.Tensor) and a.shape == b.shape
            and torch.allclose(a.detach().double(), b.detach().double(), rtol=rtol, atol=atol))


def random_cost(batch: int, disp_range: int, height: int, width: int, seed: int, requires_grad=False):
    """A random cost volume [batch, D*D, height, width] in [0, 1), float32 like SSD costs."""
    generator = torch.Generator().manual_seed(seed)
    cost = torch.rand(batch, disp_range**2, height, width, generator=generator)
    return cost.requires_grad_(requires_grad)


def call_answer(answer, *args, explain: Callable[[RuntimeError], str | None] | None = None) -> torch.Tensor:
    """``answer(*args)``, which must be a tensor (else :class:`Incorrect`).

    ``NotImplementedError`` passes through (not attempted yet); a ``RuntimeError`` for which
    ``explain`` returns a message becomes :class:`Incorrect` with that message, any other passes.
    """
    try:
        out = answer(*args)
    except NotImplementedError:
        raise
    except RuntimeError as exc:
        message = None if explain is None else explain(exc)
        if message is None:
            raise
        raise Incorrect(message) from None
    if not isinstance(out, torch.Tensor):
        raise Incorrect(f"Your function should return a torch.Tensor, it returned {type(out).__name__}.")
    return out


def pooling_failed(exc: RuntimeError) -> bool:
    """Whether PyTorch refused a pooling because its input was too small (padding lost or too small)."""
    return "too small" in str(exc) or "negative" in str(exc).lower()


def worst_entry(out: torch.Tensor, expected: torch.Tensor) -> list[int]:
    """The index of (the first of) the largest differences between ``out`` and ``expected``."""
    error = (out.detach().double() - expected).abs()
    return torch.nonzero(error == error.max())[0].tolist()


def check_cost_gradient(out: torch.Tensor, cost: torch.Tensor, reference: Callable, weights=None) -> None:
    """Incorrect unless ``out``, the learner's output for ``cost`` (which requires gradients), has
    the gradient of ``reference(cost)``, both summed with ``weights`` (default: all ones)."""
    if out.grad_fn is None:
        raise Incorrect("Not differentiable: the output has no gradient (grad_fn is None). Avoid .detach(), "
                        "torch.no_grad() and NumPy; use torch operations on the input.")
    weights = torch.ones_like(out) if weights is None else weights
    (grad,) = torch.autograd.grad((out * weights).sum(), cost)
    ref_cost = cost.detach().clone().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad((reference(ref_cost) * weights).sum(), ref_cost)
    if not close(grad, grad_ref):
        raise Incorrect("The values are right but the gradient is not: something in your function is not "
                        "differentiable (an in-place change or a detached copy?).")
