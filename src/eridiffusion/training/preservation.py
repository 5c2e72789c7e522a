"""Differential output preservation (ai-toolkit's ``diff_output_preservation``): learn the concept, keep
the class.

A concept adapter trained on "sks dog" also changes what the model draws for "dog": the class word and the
trigger share the same captions. For every training row, output preservation writes the caption again with
the trigger word replaced by the class word ("sks dog" -> "dog"), asks the frozen base (adapter bypassed,
no gradient) what it predicts for that caption on the row's own noisy input, and adds
``multiplier x MSE(adapter prediction, base prediction)`` for the class caption to the row's loss. At step
0 the adapter is a no-op and the term is exactly zero; after that it pulls every class-caption prediction
back to the base's, so the concept stays tied to its trigger word.

The term is computed per row inside the step's micro-batch loss, so gradient accumulation, the
out-of-memory retry in smaller pieces (``Batch.part``) and multi-process shares treat it as they treat
the main loss; it runs under the step's autocast. Captions dropped by ``caption_dropout_rate`` stay empty
(the term then preserves the unconditional prediction).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from eridiffusion.config.schema import DatasetConfig, JobConfig, StageConfig
from eridiffusion.data.cache import encoder_names
from eridiffusion.data.class_folder import class_datasets, count_images
from eridiffusion.models import Conditioning, ModelFamily
from eridiffusion.networks.adapters import adapters_disabled
from eridiffusion.training.losses import per_sample_loss


@dataclass
class OutputPreservation:
    """The settings of one adapter step and the family it runs on."""

    triggers: tuple[str, ...]
    class_word: str
    multiplier: float
    text_adapted: bool
    """A text encoder carries adapters too: the class caption is then encoded twice (base and adapted)."""
    _pattern: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        longest_first = sorted(self.triggers, key=len, reverse=True)
        words = "|".join(re.escape(t) for t in longest_first)
        self._pattern = re.compile(rf"(?<!\w)(?:{words})(?!\w)")

    @classmethod
    def for_stage(
        cls, cfg: JobConfig, stage: StageConfig, datasets: list[DatasetConfig], family: ModelFamily
    ) -> OutputPreservation | None:
        """The step's preservation, or None when it is off or the step trains no adapter (a pipeline's
        full fine-tune steps; the config refuses a job where no step could use it)."""
        t = cfg.train
        if not t.diff_output_preservation or "lora" not in stage.trainable:
            return None
        triggers = tuple(sorted({d.trigger_word for d in datasets if d.trigger_word}))
        modules = family.modules()
        _, text_names = encoder_names(family)
        adapted = any(isinstance(m, BaseTunerLayer) for n in text_names for m in modules[n].modules())
        assert t.diff_output_preservation_class is not None  # the schema requires it with the switch
        return cls(triggers, t.diff_output_preservation_class, t.diff_output_preservation_multiplier, adapted)

    def class_caption(self, caption: str) -> str:
        """``caption`` with every trigger word (as a whole word) replaced by the class word; a trigger
        removed from the front (``sks, a dog`` with class word ``''``) leaves no stray comma."""
        return " ".join(self._pattern.sub(self.class_word, caption).split()).strip(" ,")

    def per_sample(
        self,
        family: ModelFamily,
        captions: list[str],
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        extra: Conditioning,
    ) -> torch.Tensor:
        """The preservation loss of each row (B,): MSE between the adapted and the base prediction for
        the class captions on the rows' noisy inputs (``extra``: conditioning from the data, e.g. SDXL's
        size conditioning)."""
        class_captions = [self.class_caption(c) for c in captions]
        with torch.no_grad(), adapters_disabled(family):
            base_cond = {**family.encode_prompt(class_captions), **extra}
            base = family.predict(noisy, timesteps, base_cond)
        cond = {**family.encode_prompt(class_captions), **extra} if self.text_adapted else base_cond
        adapted = family.predict(noisy, timesteps, cond)
        return per_sample_loss(adapted, base.detach(), "mse") * self.multiplier


def describe(cfg: JobConfig) -> list[str]:
    """The plan's lines about prior preservation (class images) and output preservation."""
    lines = []
    steps = cfg.pipeline.steps if cfg.pipeline else []
    lists = [("datasets", cfg.datasets)]
    lists += [(f"pipeline.steps[{i}].datasets", s.datasets) for i, s in enumerate(steps) if s.datasets]
    for where, datasets in lists:
        for i, d in class_datasets(datasets):
            have = count_images(Path(str(d.folder_path)))
            todo = max(0, d.num_class_images - have)
            s = cfg.sample
            lines.append(
                f"  prior preservation: {where}[{i}] class {d.class_prompt!r} in {d.folder_path}: {have} of "
                f"{d.num_class_images} image(s) present, {todo} to draw with the base model "
                f"({s.sampler or 'family sampler'}, {s.steps} steps, guidance {s.guidance_scale:g}); "
                f"loss weight {d.loss_weight:g}"
            )
    t = cfg.train
    if t.diff_output_preservation:
        triggers = sorted({d.trigger_word for _, ds in lists for d in ds if d.trigger_word})
        lines.append(
            f"  output preservation: trigger {', '.join(map(repr, triggers))} -> "
            f"{t.diff_output_preservation_class!r}, multiplier {t.diff_output_preservation_multiplier:g} "
            "(adapter steps only)"
        )
    return lines
