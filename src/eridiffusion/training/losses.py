"""Regression losses and per-timestep weights for diffusion training."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    huber_delta: float = 0.1,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over all but the batch dimension, so timestep weights can be applied per sample.

    ``huber`` is the smooth L1 of Huber (1964): quadratic below ``huber_delta``, linear above, which keeps
    the rare large residuals of high-noise steps from dominating the gradient. ``weights`` (broadcastable
    to the elements, e.g. a (B, 1, h, w) loss mask) multiply each element before the plain mean, as kohya
    and OneTrainer weight masked losses; normalising by the mask's area is the mask's own business.
    """
    pred, target = pred.float(), target.float()
    if kind == "mse":
        elem = F.mse_loss(pred, target, reduction="none")
    elif kind == "l1":
        elem = F.l1_loss(pred, target, reduction="none")
    elif kind == "huber":
        elem = F.huber_loss(pred, target, reduction="none", delta=huber_delta)
    else:
        raise ValueError(f"unknown loss {kind!r}; use mse, l1 or huber")
    if weights is not None:
        elem = elem * weights.to(elem.device, elem.dtype)
    return elem.flatten(1).mean(dim=1)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting").

    The x0-space weight min(SNR, gamma) is converted to the space the model predicts in:
    divided by SNR for epsilon targets and by SNR + 1 for v targets.
    """
    problem = min_snr_problem(prediction_type)
    if problem:
        raise ValueError(problem)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)


def min_snr_problem(prediction_type: str) -> str | None:
    """Why min-SNR weighting cannot apply to this objective, or None (``eri validate`` asks up front)."""
    if prediction_type in ("epsilon", "v_prediction"):
        return None
    return (
        f"train.min_snr_gamma: min-SNR weighting is defined for epsilon and v_prediction models, not "
        f"{prediction_type!r}; remove it (flow-matching models weight timesteps with "
        "model.options.timestep_sampling and model.options.loss_weighting instead)"
    )
