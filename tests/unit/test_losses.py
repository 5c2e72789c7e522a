"""Per-sample regression losses and Min-SNR-gamma weights, checked against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from eridiffusion.training.losses import min_snr_weights, per_sample_loss

# two samples of shape (1, 2): residuals |pred - target| are (1, 2) and (0.05, 3)
PRED = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]])
TARGET = torch.tensor([[[0.0, 0.0]], [[0.05, -3.0]]])


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("mse", [(1.0 + 4.0) / 2, (0.0025 + 9.0) / 2]),
        ("l1", [(1.0 + 2.0) / 2, (0.05 + 3.0) / 2]),
        # delta 0.1: 0.5 r^2 below delta, delta * (r - delta / 2) above
        ("huber", [(0.1 * 0.95 + 0.1 * 1.95) / 2, (0.5 * 0.05**2 + 0.1 * 2.95) / 2]),
    ],
)
def test_per_sample_loss_values(kind: str, expected: list[float]) -> None:
    loss = per_sample_loss(PRED, TARGET, kind, huber_delta=0.1)
    assert loss.shape == (2,)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_huber_is_quadratic_below_and_linear_above_delta() -> None:
    pred = torch.tensor([[0.5], [2.0], [-3.0]])
    target = torch.zeros(3, 1)
    loss = per_sample_loss(pred, target, "huber", huber_delta=1.0)
    # 0.5 * 0.5^2 = 0.125; 1 * (2 - 0.5) = 1.5; 1 * (3 - 0.5) = 2.5
    torch.testing.assert_close(loss, torch.tensor([0.125, 1.5, 2.5]))


def test_per_sample_loss_reduces_all_but_batch_dim() -> None:
    pred = torch.zeros(3, 4, 5, 6)
    target = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 4, 5, 6)
    loss = per_sample_loss(pred, target, "mse")
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, torch.tensor([0.0, 1.0, 4.0]))


def test_per_sample_loss_computes_in_float32_for_half_inputs() -> None:
    pred = torch.tensor([[1.0, 3.0]], dtype=torch.bfloat16)
    loss = per_sample_loss(pred, torch.zeros(1, 2, dtype=torch.bfloat16), "mse")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor([5.0]))


def test_per_sample_loss_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown loss 'l2'; use mse, l1 or huber"):
        per_sample_loss(PRED, TARGET, "l2")


SNR = torch.tensor([0.5, 5.0, 20.0])


def test_min_snr_epsilon_weights() -> None:
    # min(snr, 5) / snr
    torch.testing.assert_close(min_snr_weights(SNR, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25]))


def test_min_snr_v_prediction_weights() -> None:
    # min(snr, 5) / (snr + 1)
    expected = torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 21.0])
    torch.testing.assert_close(min_snr_weights(SNR, 5.0, "v_prediction"), expected)


def test_min_snr_weights_keep_shape_and_do_not_modify_input() -> None:
    snr = SNR.clone()
    weights = min_snr_weights(snr, 1.0, "epsilon")
    assert weights.shape == (3,)
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.2, 0.05]))
    torch.testing.assert_close(snr, SNR)


def test_min_snr_unknown_prediction_type() -> None:
    with pytest.raises(ValueError, match="not 'sample'"):
        min_snr_weights(SNR, 5.0, "sample")
