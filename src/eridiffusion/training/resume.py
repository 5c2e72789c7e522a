"""What a run keeps and reads back: the one place checkpoints are written and restored, the fingerprints
that say whether a checkpoint or a finished output belongs to a config, and the header of exported files."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from eridiffusion.config.schema import JobConfig
from eridiffusion.models import ModelFamily
from eridiffusion.networks import export_network
from eridiffusion.networks.metadata import RunCounters, training_metadata
from eridiffusion.training.checkpoint import TrainState
from eridiffusion.training.engine import Engine
from eridiffusion.training.pipeline import changed_paths, pipeline_snapshot, stage_datasets
from eridiffusion.training.runs import Loaded
from eridiffusion.training.stages import LiveStage

if TYPE_CHECKING:
    from eridiffusion.training.loop import Run

logger = logging.getLogger(__name__)


def adapter_name(cfg: JobConfig) -> str:
    """The adapter file a single-stage adapter job writes (beside the run, and in each checkpoint)."""
    return f"{cfg.name}.safetensors"


def config_fingerprint(cfg: JobConfig) -> str:
    """Hash of the settings that change the weights a run produces (not steps, saving, sampling, logging)."""
    # validation only reads the weights (it leaves every random stream as it was)
    skip = {"save", "sample", "logging", "eval", "validation", "output_dir", "name"}
    data = cfg.model_dump(mode="json", exclude=skip)
    for key in ("steps", "num_workers", "distributed"):  # same batches for any worker/process layout
        data["train"].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def result_fingerprint(cfg: JobConfig) -> str:
    """What a finished run's output is the result of: the weights' settings and its length."""
    extra = json.dumps(pipeline_snapshot(cfg), sort_keys=True) if cfg.pipeline else str(cfg.train.steps)
    return hashlib.sha256(f"{config_fingerprint(cfg)}:{extra}".encode()).hexdigest()[:16]


def initial_state(
    cfg: JobConfig, run_id: str, engine: Engine, resume: tuple[Path, Loaded] | None
) -> TrainState:
    """A fresh state, or the checkpoint's after checking it belongs to this config."""
    snapshot = pipeline_snapshot(cfg) if cfg.pipeline else {}
    fresh = TrainState(config_hash=config_fingerprint(cfg), run_id=run_id, world_size=engine.world)
    fresh.pipeline = snapshot
    if resume is None:
        return fresh
    path, (saved, *_) = resume
    if cfg.pipeline is not None:
        changed = changed_paths(saved.pipeline, snapshot)
        if changed:
            raise ValueError(
                f"the pipeline config changed since checkpoint {path}: {', '.join(changed[:8])}"
                "; restore it, or train into a new output folder (change `name`)"
            )
    elif saved.config_hash != fresh.config_hash:
        logger.warning(
            "resuming %s with a changed config (fingerprint %s -> %s); results will differ from "
            "an uninterrupted run",
            path,
            saved.config_hash,
            fresh.config_hash,
        )
    saved.run_id, saved.config_hash = run_id, fresh.config_hash
    return saved


def counters(run: Run, live: LiveStage, state: TrainState) -> RunCounters:
    """What the exported file's training metadata needs beyond the config."""
    session = int(run.run_id[:8], 16) if run.run_id else 0  # kohya's ss_session_id, stable across resume
    data = live.data
    return RunCounters(
        state.step, state.epoch, data.batches_per_epoch, data.captions, session, run.started, time.time()
    )


def export_info(run: Run, family: ModelFamily, live: LiveStage, state: TrainState) -> dict[str, str]:
    """The adapter file's header: ours, plus kohya's ss_* and modelspec.* keys that tools read."""
    cfg = run.cfg
    ours = {
        "eri_base_model": cfg.model.name_or_path or f"scratch:{family.arch}",
        "eri_config_hash": config_fingerprint(cfg),
        "eri_steps": str(state.step),
    }
    if not live.plan.single:  # the step's own datasets and network describe what it trained
        stage = live.plan.config
        ours = {"eri_stage": stage.name, "eri_base_model": "previous pipeline step"}
        cfg = cfg.model_copy(update={"datasets": stage_datasets(cfg, stage), "network": stage.network})
    meta = training_metadata(cfg, family.arch, family.objective.prediction_type, counters(run, live, state))
    return {**meta, **ours}


def save_checkpoint(
    run: Run, family: ModelFamily, live: LiveStage, state: TrainState, best: bool = False
) -> None:
    """The one place a resumable checkpoint is written (main process): weights being trained, optimizers,
    EMA and counters, plus the usable adapter file of a single-stage LoRA run. ``best``: a keep-best
    checkpoint (``save.keep_best``), kept apart from the rotating ones."""
    cfg, engine = run.cfg, run.engine
    weights = {k: engine.full_tensor(p).detach().float() for k, p in live.params().items()}
    optimizers = engine.optimizer_state(live.optimizers())
    if engine.is_main:
        extra = None
        if live.plan.single and cfg.network is not None:
            net, info = cfg.network, export_info(run, family, live, state)

            def extra(folder: Path) -> None:
                with live.eval_weights():  # schedule-free: the averaged weights are the usable ones
                    export_network(
                        family, net, folder / adapter_name(cfg), cfg.save.format, cfg.save.dtype, info
                    )

        ema = live.ema.state_dict() if live.ema is not None else None
        run.ckpts.save(state, weights, optimizers, ema, extra=extra, best=best)
    engine.barrier()


def restore(live: LiveStage, resume: tuple[Path, Loaded], engine: Engine, state: TrainState) -> None:
    """Load a checkpoint's weights, optimizer states and EMA into the running stage."""
    path, (saved, weights, opt_state, ema_state) = resume
    missing = set(live.params()) - set(weights)
    if missing:
        raise ValueError(
            f"checkpoint '{path}' does not match this model: {len(missing)} trainable tensors "
            f"missing, e.g. {sorted(missing)[:3]}; restore the config it was trained with, or change `name`"
        )
    reshaped = [(k, tuple(weights[k].shape), tuple(p.shape)) for k, p in live.params().items()]
    reshaped = [r for r in reshaped if r[1] != r[2]]
    if reshaped:
        name, saved_shape, shape = reshaped[0]
        raise ValueError(
            f"checkpoint '{path}' does not match this model: {len(reshaped)} tensors changed shape (e.g. "
            f"{name}: {saved_shape} saved, {shape} now). Did model.options, the network rank or (for a model "
            "built from scratch, whose tokenizer learns them) the captions change? Restore them, or change "
            "`name` to start a new run"
        )
    with torch.no_grad():
        for name, p in live.params().items():
            engine.load_into(p, weights[name])
    engine.load_optimizer_state(live.optimizers(), opt_state)
    if live.ema is not None:
        if ema_state is None:
            raise RuntimeError(f"checkpoint '{path}' has no EMA weights but this run uses EMA")
        live.ema.load_state_dict(ema_state, saved.ema_updates)
    if saved.world_size != engine.world:
        # the global batch (per-process batch x processes) changed, so the old micro-batch count means
        # other batches: start the epoch the checkpoint was in again
        state.stage_micro_batches = live.data.epoch_start(saved.epoch)
        logger.warning(
            "resuming a %d-process checkpoint with %d processes: the data order restarts at the beginning "
            "of epoch %d",
            saved.world_size,
            engine.world,
            saved.epoch,
        )
        state.world_size = engine.world
