"""l-inf PGD on any differentiable loss of the input (docs/methods.md §5), with the FARE reference's momentum.
Pure: no model state is touched; callers put the model in eval mode while attacking."""
from __future__ import annotations

from typing import Callable

import torch


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Back into the l-inf ball of radius eps around x, and into [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)


def check_attack(eps: float, steps: int, step_size: float) -> None:
    """Refuse impossible attack settings before any work (pixel units: images live in [0, 1])."""
    if not 0 <= eps <= 1:
        raise ValueError(f"attack eps {eps * 255:g}/255 is outside [0, 255]/255; eps is an l-inf radius in pixel "
                         f"values (params give it in 1/255 units, e.g. 4 for FARE^4)")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"attack steps = {steps!r}; use a whole number >= 1")
    if not step_size > 0:
        raise ValueError(f"attack step size {step_size * 255:g}/255 must be > 0")


def pgd(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float, steps: int = 10,
        step_size: float = 1 / 255, random_start: bool = True, momentum: float = 0.0,
        generator: torch.Generator | None = None, start_noise: torch.Tensor | None = None) -> torch.Tensor:
    """Maximise `loss_fn(z)` (a scalar, e.g. a batch mean) over ||z - x||_inf <= eps, z in [0, 1].

    Each step moves by `step_size` along the direction v, then projects to the ball and to [0, 1]:

        v_0 = 0,   v_t = sign(momentum * v_{t-1} + sign(grad_t))

    This is the l-inf momentum of the FARE reference code (chs20/RobustVLM `train/pgd_train.py`, `pgd`:
    `velocity = normalize_grad(momentum * velocity + normalize_grad(grad))`, where `normalize_grad` is `sign` for
    l-inf), which the FARE training uses with momentum 0.9. Because v is re-normalised every step, for any
    momentum < 1 the step equals sign(grad_t) wherever the gradient is non-zero: momentum only carries the
    previous direction on over pixels whose gradient is exactly 0 (e.g. behind a saturated ReLU, or where
    the loss is flat). So momentum 0.9 is PGD with signed gradients (Madry et al.) up to those pixels, as in
    the reference; an unnormalised velocity (sign of a decaying sum, as MI-FGSM) would be a different attack.
    The random start is x + eps * u with u uniform in [-1, 1], drawn here or given as `start_noise` (drawn
    earlier, e.g. once for a whole batch)."""
    check_attack(eps, steps, step_size)
    x = x.detach()
    if random_start:
        noise = start_noise.to(x) if start_noise is not None else torch.rand(x.shape, generator=generator).to(x) * 2 - 1
        x_adv = project(x + eps * noise, x, eps)
    else:
        x_adv = x.clone()
    velocity = torch.zeros_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = loss_fn(x_adv)
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            velocity = (momentum * velocity + grad.sign()).sign()
            x_adv = project(x_adv + step_size * velocity, x, eps)
    return x_adv.detach()
