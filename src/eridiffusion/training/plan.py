"""``eri validate``: check what a run needs and describe it, without training."""

from __future__ import annotations

from pathlib import Path

from eridiffusion.config.load import ConfigError
from eridiffusion.config.schema import JobConfig
from eridiffusion.data.folder import IMAGE_EXTENSIONS
from eridiffusion.inference.samplers import resolve_sampler
from eridiffusion.training.loop import load_or_build


def _count_images(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def describe_plan(cfg: JobConfig) -> str:
    """The plan as text; raises ConfigError listing every problem found."""
    problems: list[str] = []
    images = 0
    for i, d in enumerate(cfg.datasets):
        folder = Path(d.folder_path)
        if folder.is_dir():
            found = _count_images(folder)
            if not found and d.synthetic is None:
                problems.append(f"datasets[{i}].folder_path: no images in '{folder}'")
            images += found * d.num_repeats
        elif d.synthetic is not None:
            images += d.synthetic.n * d.num_repeats
        else:
            problems.append(f"datasets[{i}].folder_path: '{folder}' does not exist")
    for where, name in (("sample.sampler", cfg.sample.sampler), ("eval.sampler", cfg.eval.sampler)):
        try:
            resolve_sampler(name)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    family = None
    try:
        family = load_or_build(cfg)
    except (ValueError, FileNotFoundError) as exc:
        problems.append(f"model: {exc}")
    if problems:
        raise ConfigError("config problems:\n" + "\n".join(f"  {p}" for p in problems))

    t = cfg.train
    trainable = family.trainable_modules(t.train_text_encoder)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in family.modules().items()}
    per_step = t.batch_size * t.gradient_accumulation_steps
    lines = [
        f"job {cfg.name}: {family.arch} -> {cfg.run_dir}",
        f"  model: {cfg.model.name_or_path or 'built from scratch'}; objective "
        f"{family.objective.prediction_type}",
    ]
    for name, n in counts.items():
        lines.append(f"    {name}: {n:,} params ({'trained' if name in trainable else 'frozen'})")
    lines += [
        f"  data: {images} images per epoch in {len(cfg.datasets)} dataset(s)",
        f"  steps: {t.steps} x {per_step} images = {t.steps * per_step / max(1, images):.1f} epochs",
        f"  optimizer: {t.optimizer.type} lr {t.lr:g}, {t.lr_scheduler} schedule, warmup {t.lr_warmup_steps}",
        f"  checkpoints every {cfg.save.every} steps, keeping {cfg.save.keep}",
    ]
    return "\n".join(lines)
