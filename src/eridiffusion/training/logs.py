"""Where a run reports: ``metrics.jsonl`` (read by tests and scripts), TensorBoard and Weights & Biases.

Only the main process of a multi-process run logs; the others get a :class:`RunLogger` that drops
everything, so the loop needs no ``if rank == 0`` around each call.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from eridiffusion.config.schema import JobConfig

logger = logging.getLogger(__name__)


class RunLogger:
    """Scalars per step (grouped by pipeline step) and sample grids, to every configured sink."""

    def __init__(self, cfg: JobConfig, enabled: bool = True, run_id: str = "") -> None:
        self.jsonl = None
        self.tb = None
        self.wandb: Any = None
        if not enabled:
            return
        run_dir = cfg.run_dir
        self.jsonl = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "logs"))
        if cfg.logging.wandb is not None and cfg.logging.wandb.mode != "disabled":
            self.wandb = _start_wandb(cfg, run_id)

    def log(self, step: int, values: dict[str, float], group: str = "train") -> None:
        """``group`` prefixes TensorBoard/W&B tags (pipelines log each step under its own name)."""
        if self.jsonl is not None:
            stage = {"stage": group} if group != "train" else {}
            self.jsonl.write(json.dumps({"step": step, **stage, **values}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{group}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{group}/{k}": v for k, v in values.items()}, step=step)

    def log_validation(self, step: int, loss: float, group: str = "train") -> None:
        """``val/loss``: its own key in ``metrics.jsonl`` (never confused with the training ``loss``) and
        the tag ``val/loss`` (``STEP/val/loss`` for a pipeline step) in TensorBoard and W&B."""
        tag = "val/loss" if group == "train" else f"{group}/val/loss"
        if self.jsonl is not None:
            stage = {"stage": group} if group != "train" else {}
            self.jsonl.write(json.dumps({"step": step, **stage, "val/loss": loss}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            self.tb.add_scalar(tag, loss, step)
        if self.wandb is not None:
            self.wandb.log({tag: loss}, step=step)

    def image(self, step: int, path: Path, group: str = "train") -> None:
        """A sample grid written to ``path``: TensorBoard and W&B get it too."""
        if self.tb is not None:
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                self.tb.add_image(f"{group}/samples", np.asarray(im.convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({f"{group}/samples": wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(cfg: JobConfig, run_id: str) -> Any:
    """One W&B run per training run: a resumed run continues the same W&B run (its id is the run's)."""
    w = cfg.logging.wandb
    assert w is not None
    try:
        import wandb
    except ImportError:
        raise ValueError(
            "logging.wandb is set but the wandb package is not installed: pip install wandb "
            "(or remove logging.wandb)"
        ) from None
    return wandb.init(
        project=w.project,
        entity=w.entity,
        mode=w.mode,
        name=w.run_name or cfg.name,
        tags=w.tags or None,
        dir=str(cfg.run_dir),
        config=cfg.model_dump(mode="json"),
        id=f"{cfg.name}-{run_id}" if run_id else None,
        resume="allow" if run_id else None,
    )
