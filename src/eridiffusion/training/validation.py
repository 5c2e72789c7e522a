"""Validation loss: the trained model's loss on images it never trains on, measured the same way each time.

Every evaluation scores the same images (see :mod:`eridiffusion.data.validation`) at the same timesteps
with the same noise: ``validation.timesteps`` evenly spaced quantiles of the family's training timestep
density (the objective's :meth:`fixed_timesteps`) and noise from a generator seeded by
(``validation.seed``, batch, timestep). A training loss jumps with every draw of noise and timesteps; this
one moves only when the weights do, which is what a curve, a ``loss_threshold`` transition or "keep the
best checkpoint" needs. Models are put in eval mode (no dropout) under ``torch.no_grad``, the global random
state is left as it was (so a run with validation trains the same weights as one without), and with EMA on
the EMA weights are scored by default (``validation.use_ema``), as they are what samples and the final
export use.

The loss is the plain ``train.loss`` (mse, l1 or huber) between prediction and target, averaged over images
and timesteps: no min-SNR, flow loss weighting or ``datasets[].loss_weight``, so its value does not change
meaning with those settings. Autoencoder steps are not validated.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from eridiffusion.config.schema import DatasetConfig, JobConfig, StageConfig
from eridiffusion.data.cache import encoder_names
from eridiffusion.data.loader import TrainingData
from eridiffusion.data.validation import Split, held_out_count, split_problem
from eridiffusion.models import ModelFamily
from eridiffusion.training.engine import Engine
from eridiffusion.training.losses import per_sample_loss
from eridiffusion.training.pipeline import folder_images, generated_folders
from eridiffusion.training.step import draw_noise

logger = logging.getLogger(__name__)


def has_validation_set(datasets: list[DatasetConfig]) -> bool:
    return any(d.is_val or d.validation_split for d in datasets)


def validation_problems(cfg: JobConfig) -> list[str]:
    """Weight-free problems of a pipeline step watching ``val/loss`` (each names its YAML path)."""
    problems = []
    for i, stage in enumerate(cfg.pipeline.steps if cfg.pipeline else []):
        if not stage.transition.watches_validation:
            continue
        where = f"pipeline.steps[{i}].transition.metric"
        if stage.kind != "diffusion":
            problems.append(f"{where}: val/loss is measured for diffusion steps only, not {stage.kind}")
        elif not has_validation_set(stage.datasets or cfg.datasets):
            problems.append(
                f"{where}: val/loss needs held-out images in this step's datasets (validation_split or a "
                "dataset with is_val: true)"
            )
        elif cfg.validation.every is None:
            problems.append(f"{where}: val/loss is watched between evaluations; set validation.every")
    return problems


def planned_validation(cfg: JobConfig) -> tuple[list[str], list[str]]:
    """(plan lines, problems) of the job's validation sets, from file names alone (``eri validate`` and
    the checks ``eri train`` makes before loading weights): a split that holds out no image or every
    image is refused naming its ``validation_split``."""
    steps = cfg.pipeline.steps if cfg.pipeline else []
    lists = [("datasets", cfg.datasets)]
    lists += [(f"pipeline.steps[{i}].datasets", s.datasets) for i, s in enumerate(steps) if s.datasets]
    generated = generated_folders(cfg)
    parts, problems = [], validation_problems(cfg)
    for where, datasets in lists:
        for i, d in enumerate(datasets):
            n = folder_images(d, generated)
            if d.is_val:
                parts.append(f"{where}[{i}] is_val: {'streamed' if n is None else n} images")
            elif d.validation_split and n:  # n == 0: the folder's own problem is reported already
                problem = split_problem(n, d.validation_split, f"{where}[{i}]")
                if problem:
                    problems.append(problem)
                else:
                    held = held_out_count(n, d.validation_split)
                    parts.append(f"{where}[{i}] holds out {held} of {n} images")
    if not parts:
        return [], problems
    v = cfg.validation
    when = f"every {v.every} steps and" if v.every else "only"
    end = "the end of each pipeline step" if steps else "the end"
    weights = "EMA weights" if cfg.train.ema.enabled and v.use_ema else "trained weights"
    lines = [
        f"  validation: {'; '.join(parts)}; val/loss {when} at {end}, "
        f"{v.timesteps} fixed timesteps per image, {weights}"
    ]
    if cfg.save.keep_best:
        lines.append(f"  keeps the {cfg.save.keep_best} checkpoint(s) of lowest val/loss in checkpoints/best")
    return lines, problems


def _noise_seed(seed: int, batch: int, k: int) -> int:
    return (seed * 1_000_003 + batch * 7919 + k) % (2**63)


@dataclass
class Validator:
    """The validation images of one stage and how they are scored."""

    data: TrainingData
    names: list[str]
    timesteps: int
    seed: int
    loss: str
    huber_delta: float
    latents: dict[int, torch.Tensor] = field(default_factory=dict)
    """Encoded images by batch, kept while no image encoder trains (they cannot change then)."""

    @classmethod
    def build(cls, cfg: JobConfig, stage: StageConfig, split: Split, size_multiple: int) -> Validator | None:
        """The stage's validator, or None when it has no validation images or is not a diffusion stage."""
        if not split.val or stage.kind != "diffusion":
            return None
        v, t = cfg.validation, cfg.train
        seed = t.seed if v.seed is None else v.seed
        data = TrainingData(split.val, v.batch_size or t.batch_size, seed, size_multiple, split.val_sources)
        logger.info("validation set: %s; %d images", ", ".join(split.val_names), data.samples_per_epoch)
        return cls(data, split.val_names, v.timesteps, seed, t.loss, t.huber_delta)

    @property
    def images(self) -> int:
        return self.data.samples_per_epoch

    @torch.no_grad()
    def evaluate(self, family: ModelFamily, engine: Engine) -> float:
        """The mean loss over every validation image and fixed timestep (the caller picks the weights)."""
        modules = family.modules()
        modes = {name: m.training for name, m in modules.items()}
        image_names, _ = encoder_names(family)
        memo = not any(p.requires_grad for n in image_names for p in modules[n].parameters())
        devices = [engine.device] if engine.device.type == "cuda" else []
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        with torch.random.fork_rng(devices=devices):
            for m in modules.values():
                m.eval()
            try:
                for b in range(self.data.batches_per_epoch):
                    with engine.autocast():
                        losses = self._batch_losses(family, engine, b, memo)
                    total += losses.double().sum().cpu()
                    count += losses.numel()
            finally:
                for name, m in modules.items():
                    m.train(modes[name])
        return float(total / max(1, count))

    def _batch_losses(self, family: ModelFamily, engine: Engine, b: int, memo: bool) -> torch.Tensor:
        """Per-(image, timestep) losses of validation batch ``b``."""
        device = engine.device
        batch = self.data.batch(b)
        x0 = self.latents.get(b)
        if x0 is None:
            assert batch.pixels is not None
            x0 = family.encode_images(batch.pixels.to(device))
            if memo:
                self.latents[b] = x0.detach().cpu()
        x0 = x0.to(device)
        cond = family.encode_prompt(batch.captions)
        size_cond = batch.size_conditioning()
        if size_cond is not None:
            cond["size_conditioning"] = size_cond.to(device)
        n = x0.shape[0]
        out = []
        for k, t in enumerate(family.objective.fixed_timesteps(self.timesteps, tuple(x0.shape[1:]))):
            gen = torch.Generator().manual_seed(_noise_seed(self.seed, b, k))
            noise = draw_noise(tuple(x0.shape), gen, device)
            timesteps = t.repeat(n).to(device)
            target = family.objective.make_target(x0, noise.to(x0.dtype), timesteps)
            pred = family.predict(target.noisy, timesteps, cond)
            out.append(per_sample_loss(pred, target.target, self.loss, self.huber_delta))
        return torch.cat(out)


def rank_best(
    best: list[dict[str, Any]], step: int, stage: int, loss: float, keep: int
) -> list[dict[str, Any]] | None:
    """The keep-best list with this evaluation in it, or None when it does not make the list: per pipeline
    stage (losses of different stages do not compare) the ``keep`` lowest, a tie going to the earlier one,
    so a kept checkpoint is only ever replaced by a strictly better one; a non-finite loss never ranks."""
    if keep < 1 or not math.isfinite(loss) or any(int(e["step"]) == step for e in best):
        return None
    same = [e for e in best if int(e["stage"]) == stage]
    if len(same) >= keep and loss >= max(float(e["val_loss"]) for e in same):
        return None
    entry = {"step": step, "stage": stage, "val_loss": loss}
    ranked = sorted([*same, entry], key=lambda e: (float(e["val_loss"]), int(e["step"])))[:keep]
    return [e for e in best if int(e["stage"]) != stage] + ranked
