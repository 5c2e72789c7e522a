"""The captions a job trains on, for the two things that must see all of them before training starts: the
vocabulary a from-scratch model's tokenizer learns, and the check that no caption is cut silently.

A job's captions are those of every dataset it names (the top-level ``datasets`` and each pipeline step's),
after trigger words are applied, each dataset counted once however many steps reuse it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from eridiffusion.config.schema import DatasetConfig, JobConfig
from eridiffusion.data.captions import apply_trigger
from eridiffusion.data.class_folder import count_images, missing_class_images
from eridiffusion.data.loader import open_sources
from eridiffusion.models.prompts import Truncation, find_truncations

logger = logging.getLogger(__name__)


def job_datasets(cfg: JobConfig) -> list[DatasetConfig]:
    """Every dataset of the job once; entries that generate their folder (``synthetic``) first, so a step
    that reads a generated folder without repeating ``synthetic`` finds it written."""
    lists = [cfg.datasets, *(s.datasets or [] for s in (cfg.pipeline.steps if cfg.pipeline else []))]
    unique: dict[tuple[str, str | None, str], DatasetConfig] = {}
    for datasets in lists:
        for d in datasets:
            where = d.folder_path if d.folder_path is not None else d.shards
            key = (str(where), d.trigger_word, d.caption_ext)
            if key not in unique or (unique[key].synthetic is None and d.synthetic is not None):
                unique[key] = d
    return sorted(unique.values(), key=lambda d: d.synthetic is None)


def dataset_captions(configs: Sequence[DatasetConfig]) -> list[str]:
    """The captions of ``configs`` as training reads them (trigger word applied), one per image; scanning
    generates synthetic datasets that are not written yet, as training would. A class folder that the
    model has yet to fill (prior preservation) counts with its ``class_prompt``, the caption it will get."""
    readable = [c for c in configs if not missing_class_images(c) or count_images(Path(str(c.folder_path)))]
    sources = open_sources(readable)
    pending = [cfg.class_prompt for cfg in configs if missing_class_images(cfg) and cfg.class_prompt]
    return pending + [
        apply_trigger(caption, cfg.trigger_word)
        for cfg, source in zip(readable, sources, strict=True)
        for caption in source.captions
    ]


def job_captions(cfg: JobConfig) -> list[str]:
    """All captions of the job (see the module docstring): what a from-scratch tokenizer learns from."""
    return dataset_captions(job_datasets(cfg))


def warn_caption_truncation(family: object, captions: Sequence[str]) -> list[Truncation]:
    """Log one warning per text encoder that would cut some of ``captions``; returns what was found."""
    found = find_truncations(family, captions)
    for truncation in found:
        logger.warning("training captions: %s", truncation.message("distinct captions"))
    return found
