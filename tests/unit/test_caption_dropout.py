"""Caption dropout drops each caption with probability ``caption_dropout_rate`` (not 1 - rate), with and
without the text cache, and a dropped caption becomes the prompt the sampler's unconditional branch uses.

Only the public step function is used (``diffusion_loss(family, batch, cfg, gen, device)``): a wrapper
family records what reaches the text encoder and the denoiser, so the test does not depend on how the
loop draws the dropout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from eridiffusion.config.schema import DatasetConfig, JobConfig
from eridiffusion.data.cache import prepare_caches
from eridiffusion.data.loader import TrainingData
from eridiffusion.inference.generate import GenerateRequest
from eridiffusion.models import Conditioning, ModelFamily, build_family
from eridiffusion.training.loop import diffusion_loss
from tests.conftest import TINY_OPTIONS, tiny_job
from tests.unit.imagesets import write_mixed_folder

CPU = torch.device("cpu")
RATE = 0.25
DRAWS = 250  # x 4 captions per batch x 4 batches = 4000 samples: the rate's std error is 0.007
UNCONDITIONAL = GenerateRequest(prompts=["x"]).negative_prompt
"""What the sampler encodes for the unconditional branch of classifier-free guidance by default."""


class Recording:
    """A tiny model that records prompts and conditioning and skips the denoiser (its output is unused)."""

    def __init__(self, family: ModelFamily) -> None:
        self._family = family
        self.prompts: list[str] = []
        self.contexts: list[torch.Tensor] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._family, name)

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        self.prompts += prompts
        return self._family.encode_prompt(prompts)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        self.contexts.append(cond["context"].detach())
        return torch.zeros_like(noisy)


def _run(family: Recording, data: TrainingData, cfg: JobConfig) -> int:
    """Calls the step function DRAWS times on every batch of an epoch; returns how many captions it saw."""
    seen = 0
    with torch.no_grad():
        for k in range(data.batches_per_epoch):
            batch = data.batch(k)
            for draw in range(DRAWS):
                diffusion_loss(family, batch, cfg, torch.Generator().manual_seed(1000 * k + draw), CPU)  # type: ignore[arg-type]
                seen += len(batch)
    return seen


@pytest.fixture
def setup(tmp_path: Path) -> tuple[ModelFamily, JobConfig, Path]:
    write_mixed_folder(tmp_path / "imgs", n=16, with_problems=False)
    family = build_family("tiny", TINY_OPTIONS, seed=0)
    for module in family.modules().values():
        module.eval().requires_grad_(False)
    return family, JobConfig.model_validate(tiny_job(tmp_path)), tmp_path / "imgs"


def _data(folder: Path, **options: object) -> TrainingData:
    cfg = DatasetConfig(folder_path=str(folder), resolution=16, caption_dropout_rate=RATE, **options)
    return TrainingData([cfg], batch_size=4, seed=0, size_multiple=4)


def test_dropout_rate_without_cache(setup: tuple[ModelFamily, JobConfig, Path]) -> None:
    family, cfg, folder = setup
    data = _data(folder)
    recording = Recording(family)
    seen = _run(recording, data, cfg)
    assert len(recording.prompts) == seen
    dropped = sum(p == UNCONDITIONAL for p in recording.prompts)
    assert dropped / seen == pytest.approx(RATE, abs=0.03), f"{dropped} of {seen} captions dropped"
    kept = {p for p in recording.prompts if p != UNCONDITIONAL}
    assert kept == set(data.captions[0]), "kept captions reach the text encoder unchanged"


def test_dropout_rate_with_text_cache(setup: tuple[ModelFamily, JobConfig, Path]) -> None:
    family, cfg, folder = setup
    data = _data(folder, cache_text_embeddings=True, cache_latents_to_disk=True)
    prepare_caches(data, family, CPU, progress=False)
    recording = Recording(family)
    seen = _run(recording, data, cfg)
    assert recording.prompts == [], "the cache stands in for the text encoder"
    with torch.no_grad():
        empty = family.encode_prompt([UNCONDITIONAL])["context"][0]
    rows = torch.cat(recording.contexts)
    assert len(rows) == seen
    dropped = int(((rows - empty).abs() <= 1e-5).flatten(1).all(dim=1).sum())
    assert dropped / seen == pytest.approx(RATE, abs=0.03), f"{dropped} of {seen} captions dropped"


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_dropout_rate_extremes(rate: float, setup: tuple[ModelFamily, JobConfig, Path]) -> None:
    """Rate 0 never drops and rate 1 always does (the comparison's direction, at its edges)."""
    family, cfg, folder = setup
    data = TrainingData(
        [DatasetConfig(folder_path=str(folder), resolution=16, caption_dropout_rate=rate)], 4, 0, 4
    )
    recording = Recording(family)
    with torch.no_grad():
        for draw in range(20):
            diffusion_loss(recording, data.batch(0), cfg, torch.Generator().manual_seed(draw), CPU)  # type: ignore[arg-type]
    dropped = sum(p == UNCONDITIONAL for p in recording.prompts)
    assert dropped == (len(recording.prompts) if rate == 1.0 else 0)
