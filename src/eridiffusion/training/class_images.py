"""DreamBooth prior preservation with class images drawn by the model being fine-tuned (Ruiz et al. 2023).

A regularisation dataset (``is_reg: true``) with ``class_prompt`` is filled at the start of its training
step: when its folder holds fewer than ``num_class_images`` images, the step's base model, with any
adapter bypassed, draws the missing ones from ``class_prompt`` and they are written beside the user's
images with the prompt as caption (see :mod:`eridiffusion.data.class_folder` for the naming and the
never-overwrite rule). Training then draws them as any regularisation set, weighted by the set's
``loss_weight`` (diffusers' ``prior_loss_weight``), so the adapter learns the concept without forgetting
what the class looked like before.

The draw uses the ``sample`` section's sampler, steps, guidance and negative prompt at the dataset's first
resolution; image ``class_NNNNN`` is drawn with seed ``sample.seed + NNNNN``, so the folder's content does
not depend on how many images a run generated at once, and a second run finds the folder full and draws
nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from eridiffusion.config.schema import DatasetConfig, JobConfig
from eridiffusion.data.class_folder import (
    class_datasets,
    free_indices,
    missing_class_images,
    write_class_example,
)
from eridiffusion.inference.generate import GenerateRequest, a1111_parameters, png_info, sample, to_pil
from eridiffusion.inference.samplers import default_sampler
from eridiffusion.models import ModelFamily
from eridiffusion.networks.adapters import adapters_disabled
from eridiffusion.progress import progress_bar
from eridiffusion.training.engine import Engine

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _on_device_for_inference(family: ModelFamily, device: torch.device) -> Iterator[None]:
    """Every module on ``device`` in eval mode for the block, then back where and as it was: placement
    for training (:func:`eridiffusion.training.stages._place`) orders the moves to keep the peak low."""
    modules = family.modules()
    where = {n: next((p.device for p in m.parameters()), device) for n, m in modules.items()}
    modes = {n: m.training for n, m in modules.items()}
    for m in modules.values():
        m.to(device)
        m.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), adapters_disabled(family):
            yield
    finally:
        for n, m in modules.items():
            m.to(where[n])
            m.train(modes[n])


def _draw(family: ModelFamily, cfg: JobConfig, d: DatasetConfig, where: str, device: torch.device) -> int:
    """Generate the missing images of one class dataset; returns how many were written. Each PNG carries
    A1111's ``parameters`` text (prompt, sampler, steps, guidance, seed), so any image can be redrawn."""
    folder, s = Path(str(d.folder_path)), cfg.sample
    assert d.class_prompt is not None
    indices = free_indices(folder, missing_class_images(d), d.caption_ext)
    size = d.resolutions[0]
    sampler = s.sampler or default_sampler(family.objective.prediction_type)
    logger.info(
        "%s: drawing %d class image(s) of %r into %s (%s, %d steps, guidance %g, %d px)",
        where, len(indices), d.class_prompt, folder, sampler, s.steps, s.guidance_scale, size,
    )  # fmt: skip
    batch = s.images_per_prompt  # what the user's sample grid already fits on the device
    bar = progress_bar(len(indices), f"class images {where}", cfg.logging.progress)
    for start in range(0, len(indices), batch):
        chunk = indices[start : start + batch]
        req = GenerateRequest(
            prompts=[d.class_prompt],
            negative_prompt=s.negative_prompt,
            steps=s.steps,
            guidance_scale=s.guidance_scale,
            sampler=sampler,
            images_per_prompt=len(chunk),
            seeds=[s.seed + k for k in chunk],
            width=size,
            height=size,
        )
        for k, image in zip(chunk, to_pil(sample(family, req, device)), strict=True):
            info = png_info(a1111_parameters(req, d.class_prompt, s.seed + k, size, size))
            write_class_example(folder, k, image, d.class_prompt, d.caption_ext, info)
        bar.update(len(chunk))
    bar.close()
    return len(indices)


def fill_class_images(
    cfg: JobConfig, family: ModelFamily, datasets: list[DatasetConfig], engine: Engine, where: str
) -> int:
    """Draw every missing class image of ``datasets`` (the main process; the others wait and then read
    the folder); returns how many this process wrote. ``where`` names the datasets list in messages.

    Whether to wait is decided from the config alone, the same in every process: a process that looked at
    the folder itself could find it already filled and skip the barrier the main process waits at."""
    if not any(class_datasets(datasets)):
        return 0
    written = 0
    with engine.main_first():
        pending = [(i, d) for i, d in class_datasets(datasets) if missing_class_images(d)]
        if engine.is_main and pending:
            with _on_device_for_inference(family, engine.device):
                for i, d in pending:
                    try:
                        written += _draw(family, cfg, d, f"{where}[{i}]", engine.device)
                    except ValueError as exc:  # a sampler or size the model refuses
                        raise ValueError(f"{where}[{i}].class_prompt: {exc}") from None
    return written
