"""The training loss with loss masks: equal to the hand-computed weighted loss for epsilon (with min-SNR),
v-prediction and flow (with its loss weighting) models, zero gradient where the weight is 0, unchanged
without masks, and split exactly by Batch.part (the out-of-memory retry)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eridiffusion.config import validate_config
from eridiffusion.data.loader import Batch, TrainingData
from eridiffusion.models import ModelFamily
from eridiffusion.training.loop import load_or_build
from eridiffusion.training.losses import min_snr_weights
from eridiffusion.training.step import diffusion_loss
from tests.conftest import tiny_job

CPU = torch.device("cpu")
CASES = {
    "epsilon_min_snr": ({"arch": "tiny"}, 16, {"min_snr_gamma": 5.0}),
    "v_prediction": ({"arch": "tiny", "options": {"prediction_type": "v_prediction"}}, 16, {}),
    "flow_cosmap": ({"arch": "sd3", "options": {"preset": "tiny", "loss_weighting": "cosmap"}}, 32, {}),
}


def _folder(root: Path, size: int) -> Path:
    """Three images: two masked (left half white, right half black), one without a mask."""
    folder = root / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    half = np.zeros((size, size), np.uint8)
    half[:, : size // 2] = 255
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"photo {name}")
        if name != "c":
            Image.fromarray(half).save(folder / f"{name}_mask.png")
    return folder


def _setup(tmp_path: Path, case: str, unmasked_weight: float = 0.0) -> tuple[ModelFamily, Any, Batch]:
    model, size, train = CASES[case]
    job = tiny_job(tmp_path)
    if model["arch"] == "tiny":
        model = {**model, "options": {**job["model"]["options"], **model.get("options", {})}}
    job["model"] = model
    job["train"].update(batch_size=3, **train)
    job["datasets"] = [
        {"folder_path": str(_folder(tmp_path, size)), "resolution": size, "unmasked_weight": unmasked_weight}
    ]
    cfg = validate_config(job)
    family = load_or_build(cfg)
    data = TrainingData(cfg.datasets, 3, cfg.train.seed, family.size_multiple())
    batch = data.batch(0)
    assert batch.loss_mask is not None and batch.loss_mask.shape[0] == 3
    return family, cfg, batch


def _loss(family: ModelFamily, cfg: Any, batch: Batch, record: dict | None = None) -> torch.Tensor:
    """diffusion_loss with fixed draws; ``record`` receives the prediction and the objective's target."""
    if record is not None:
        real_predict, real_target = family.predict, family.objective.make_target

        def predict(noisy, t, cond):  # noqa: ANN001, ANN202
            record["pred"] = real_predict(noisy, t, cond)
            record["pred"].retain_grad()
            return record["pred"]

        def make_target(x0, noise, t):  # noqa: ANN001, ANN202
            record["target"] = real_target(x0, noise, t)
            return record["target"]

        family.predict = predict  # type: ignore[method-assign]
        family.objective.make_target = make_target  # type: ignore[method-assign]
    return diffusion_loss(family, batch, cfg, torch.Generator().manual_seed(7), CPU)


@pytest.mark.parametrize("case", list(CASES))
def test_masked_loss_is_the_hand_computed_weighted_loss(tmp_path: Path, case: str) -> None:
    family, cfg, batch = _setup(tmp_path, case, unmasked_weight=0.1)
    seen: dict[str, Any] = {}
    loss = _loss(family, cfg, batch, seen)
    pred, target = seen["pred"].detach().float(), seen["target"]
    factor = batch.loss_mask.shape[-1] // pred.shape[-1]
    weights = F.avg_pool2d(batch.loss_mask, factor)  # area averaging by hand: one weight per latent element
    assert weights[:2, 0, :, : weights.shape[-1] // 2].eq(1).all()  # white: full weight
    torch.testing.assert_close(weights[:2, 0, :, -1], torch.full_like(weights[:2, 0, :, -1], 0.1))
    assert weights[2].eq(1).all()  # no mask: weight 1 everywhere
    per_sample = (weights * (pred - target.target.float()) ** 2).mean(dim=(1, 2, 3))
    if cfg.train.min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(target.snr, cfg.train.min_snr_gamma, "epsilon")
    if target.weight is not None:
        per_sample = per_sample * target.weight
    torch.testing.assert_close(loss, per_sample.mean())
    unmasked = _loss(family, cfg, dataclasses.replace(batch, loss_mask=None))
    assert not torch.allclose(loss, unmasked)  # the mask did change the loss


def test_zero_weight_region_gets_zero_gradient(tmp_path: Path) -> None:
    family, cfg, batch = _setup(tmp_path, "epsilon_min_snr")
    seen: dict[str, Any] = {}
    _loss(family, cfg, batch, seen).backward()
    grad = seen["pred"].grad
    half = grad.shape[-1] // 2
    assert grad[:2, ..., half:].eq(0).all()  # the black half of the masked images: no gradient at all
    assert grad[:2, ..., :half].ne(0).float().mean() > 0.9
    assert grad[2].ne(0).float().mean() > 0.9  # the unmasked image trains everywhere


def test_no_mask_or_all_white_mask_leaves_the_loss_bit_identical(tmp_path: Path) -> None:
    family, cfg, batch = _setup(tmp_path, "epsilon_min_snr")
    without = _loss(family, cfg, dataclasses.replace(batch, loss_mask=None))
    white = _loss(family, cfg, dataclasses.replace(batch, loss_mask=torch.ones_like(batch.loss_mask)))
    assert torch.equal(without, white)


def test_out_of_memory_pieces_add_up_to_the_masked_batch(tmp_path: Path) -> None:
    family, cfg, batch = _setup(tmp_path, "v_prediction", unmasked_weight=0.3)
    whole = _loss(family, cfg, batch)
    pieces = [_loss(family, cfg, batch.part(k, 3)) for k in range(3)]
    assert all(p.loss_mask is not None and len(p) == 1 for p in (batch.part(k, 3) for k in range(3)))
    torch.testing.assert_close(sum(pieces), whole)


def test_process_shares_average_to_the_masked_batch(tmp_path: Path) -> None:
    """Four processes' shares of three rows (one a zero-weight padding row) average back to the one-process
    loss, each share carrying its own rows of the mask."""
    family, cfg, batch = _setup(tmp_path, "epsilon_min_snr", unmasked_weight=0.2)
    whole = _loss(family, cfg, batch)
    shares = [batch.share(rank, 4) for rank in range(4)]
    assert [len(s) for s in shares] == [1, 1, 1, 1] and all(s.loss_mask is not None for s in shares)
    assert torch.equal(shares[3].loss_mask, batch.loss_mask[2:])
    torch.testing.assert_close(sum(_loss(family, cfg, s) for s in shares) / 4, whole)
