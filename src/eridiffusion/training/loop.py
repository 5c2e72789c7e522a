"""The training loop: read it top to bottom.

Every job is a pipeline of stages; a config without ``pipeline`` is a one-stage pipeline. :func:`train`
prepares the run folder, resumes, and runs the stages in order; :func:`run_stage` loops optimizer steps until
the stage's transition; :func:`train_step` (in :mod:`.stages`) and :func:`optimizer_step` (in :mod:`.step`)
do one step for any stage kind; checkpoints are saved and restored in one place (:func:`save_checkpoint`,
:func:`restore`).

Determinism and exact resume come from three choices: micro-batch *k* is a pure function of (seed, k) (see
:mod:`eridiffusion.data.loader`), every step draws its noise, timesteps and caption dropout from a generator
seeded by (seed, step, micro-batch), and the LR is a pure function of the step. A checkpoint therefore only
needs the weights, the optimizers, the EMA and a few counters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eridiffusion.config.load import dump_config
from eridiffusion.config.schema import JobConfig
from eridiffusion.data.loader import ImageSource, open_sources
from eridiffusion.data.vocabulary import job_captions, warn_caption_truncation
from eridiffusion.inference.samplers import check_sampler
from eridiffusion.models import ModelFamily, build_family, load_family
from eridiffusion.networks import export_network
from eridiffusion.networks.metadata import RunCounters, model_card, training_metadata
from eridiffusion.progress import progress_bar
from eridiffusion.training.checkpoint import CheckpointManager, TrainState, atomic_write_dir
from eridiffusion.training.engine import Engine, create_engine
from eridiffusion.training.logs import RunLogger
from eridiffusion.training.pipeline import (
    StagePlan,
    changed_paths,
    pipeline_snapshot,
    plan_stages,
    stage_datasets,
)
from eridiffusion.training.preflight import check_before_loading
from eridiffusion.training.runs import Loaded, find_resume, is_finished, mark_finished, open_run
from eridiffusion.training.samples import ema_weights, save_samples
from eridiffusion.training.stages import (
    LiveStage,
    OptimizerSet,
    evaluate_stage,
    finish_stage,
    setup_stage,
    single_stage_plan,
    train_step,
    trainable_parameters,
    transition_done,
)
from eridiffusion.training.step import NonFiniteLossError, diffusion_loss, step_generator
from eridiffusion.training.stop import StopRequest, TrainingStopped

__all__ = [
    "NonFiniteLossError",
    "TrainResult",
    "TrainState",
    "diffusion_loss",
    "step_generator",
    "train",
    "trainable_parameters",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    output: Path
    """The final model folder, or the adapter file for network runs."""
    last_loss: float | None
    resumed_from: Path | None
    already_finished: bool = False
    """The run had finished with this config before; nothing was trained or written."""


@dataclass
class Run:
    """What every part of the loop shares for one job: its config, engine, checkpoints and logger."""

    cfg: JobConfig
    engine: Engine
    ckpts: CheckpointManager
    log: RunLogger
    on_step: Callable[[TrainState], None] | None = None
    stop: StopRequest = field(default_factory=StopRequest)
    run_id: str = ""
    started: float = field(default_factory=time.time)


def config_fingerprint(cfg: JobConfig) -> str:
    """Hash of the settings that change the weights a run produces (not steps, saving, sampling, logging)."""
    data = cfg.model_dump(mode="json", exclude={"save", "sample", "logging", "eval", "output_dir", "name"})
    for key in ("steps", "num_workers", "distributed"):  # same batches for any worker/process layout
        data["train"].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def result_fingerprint(cfg: JobConfig) -> str:
    """What a finished run's output is the result of: the weights' settings and its length."""
    extra = json.dumps(pipeline_snapshot(cfg), sort_keys=True) if cfg.pipeline else str(cfg.train.steps)
    return hashlib.sha256(f"{config_fingerprint(cfg)}:{extra}".encode()).hexdigest()[:16]


def load_or_build(cfg: JobConfig) -> ModelFamily:
    if cfg.model.name_or_path:  # load_family refuses model.options for families that only build with them
        return load_family(cfg.model.name_or_path, cfg.model)
    if cfg.model.arch is None:
        raise ValueError("set model.arch to build a model from scratch, or model.name_or_path to load one")
    options = dict(cfg.model.options)
    if cfg.model.prediction_type is not None:  # the override applies to models built from scratch too
        options["prediction_type"] = cfg.model.prediction_type
    # the tokenizer of a from-scratch model learns the job's caption words (the same captions, the same one)
    return build_family(cfg.model.arch, options, seed=cfg.train.seed, captions=job_captions(cfg))


def train(cfg: JobConfig, on_step: Callable[[TrainState], None] | None = None) -> TrainResult:
    """Run (or resume) the job described by ``cfg``; returns where the final model was written."""
    check_before_loading(cfg)  # every weight-free problem before a model loads
    engine = create_engine(cfg.train)
    run_dir = cfg.run_dir
    with engine.main_first():  # scan first: a bad path fails before a model loads; main generates data
        sources = open_sources(cfg.datasets)
    info = engine.broadcast(
        open_run(run_dir, cfg.save.resume, _adapter_name(cfg)) if engine.is_main else None
    )
    fingerprint = result_fingerprint(cfg)
    if is_finished(info, fingerprint, run_dir):
        logger.info("%s already finished with this config: %s (nothing to do)", cfg.name, info.output)
        return TrainResult(run_dir, info.final_step, run_dir / info.output, None, None, already_finished=True)
    if engine.is_main:
        (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")

    ckpts = CheckpointManager(run_dir / "checkpoints", cfg.save.keep, info.run_id)
    with engine.main_first():  # only the main process renames damaged checkpoints aside
        resume = find_resume(ckpts, cfg.save.resume, engine.is_main)
    state = _initial_state(cfg, info.run_id, engine, resume)
    family: ModelFamily | None = load_or_build(cfg)
    plans = _plan(cfg, family)
    if engine.is_main:  # once per job: captions the text encoders would cut
        warn_caption_truncation(family, job_captions(cfg))
    if state.stage > 0:  # resuming a later pipeline step: it starts from the previous step's saved model
        family = None
    log = RunLogger(cfg, engine.is_main, info.run_id)
    run = Run(cfg, engine, ckpts, log, on_step, run_id=info.run_id)
    status = "failed"
    if engine.is_main:
        info.set(run_dir, "running", state.step)
    try:
        with run.stop.installed():
            output = _run_stages(run, plans, family, state, resume, sources)
        status = "finished"
    except (TrainingStopped, KeyboardInterrupt):
        status = "interrupted"
        raise
    except BaseException as exc:
        if engine.is_main:
            info.set(run_dir, "failed", state.step, f"{type(exc).__name__}: {exc}"[:1000])
        raise
    finally:
        log.close()
        if engine.is_main and status == "interrupted":
            info.set(run_dir, "interrupted", state.step)
    if engine.is_main:
        mark_finished(run_dir, info, fingerprint, state.step, output)
    engine.barrier()
    return TrainResult(run_dir, state.step, output, state.last_loss, resume[0] if resume else None)


def _run_stages(
    run: Run,
    plans: list[StagePlan],
    family: ModelFamily | None,
    state: TrainState,
    resume: tuple[Path, Loaded] | None,
    sources: list[ImageSource],
) -> Path:
    """Every stage from the state's on, then the pipeline's final model; returns the run's output."""
    cfg, engine, run_dir = run.cfg, run.engine, run.cfg.run_dir
    output = run_dir
    for plan in plans[state.stage :]:
        if family is None:
            family = _model_at_stage(cfg, plans, plan.index)
        out_dir = run_dir if plan.single else run_dir / "stages" / f"{plan.index}-{plan.config.name}"
        live = setup_stage(cfg, family, plan, engine, out_dir, sources if plan.single else None)
        if resume is not None and state.stage == plan.index and state.stage_step > 0:
            restore(live, resume, engine, state)
            logger.info("resumed %s at its step %d", plan.config.name, state.stage_step)
        state.stage_name = plan.config.name
        started = time.perf_counter()
        metrics = run_stage(run, family, live, state)
        output = _end_stage(run, family, live, state, metrics, started)
        family = None if not plan.single and plan.index + 1 < len(plans) else family
    if family is None:  # every stage had finished before this resume: the last one's model
        family = _model_at_stage(cfg, plans, len(plans))
    if not plans[0].single:
        output = run_dir / "model"
        if engine.is_main:
            atomic_write_dir(output, family.save_pretrained)
            summary = json.dumps(state.stages_done, indent=1)
            (run_dir / "pipeline_summary.json").write_text(summary, encoding="utf-8")
    return output


def _adapter_name(cfg: JobConfig) -> str:
    return f"{cfg.name}.safetensors"


def _initial_state(
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


def _plan(cfg: JobConfig, family: ModelFamily) -> list[StagePlan]:
    """The stages to run, after the checks that would otherwise fail only later (sampler, image sizes)."""
    if cfg.sample.prompts:  # a wrong sampler would otherwise only fail at the first sample grid
        try:
            check_sampler(cfg.sample.sampler, family.objective.prediction_type)
        except ValueError as exc:
            raise ValueError(f"sample.sampler: {exc}") from None
    for i, d in enumerate(cfg.datasets):
        for resolution in d.resolutions:
            try:
                family.check_size(resolution, resolution)
            except ValueError as exc:
                raise ValueError(f"datasets[{i}].resolution: {exc}") from None
    if cfg.pipeline is None:
        return [single_stage_plan(cfg, family)]
    plans, problems = plan_stages(cfg, family)
    if problems:
        raise ValueError("pipeline problems:\n" + "\n".join(f"  {p}" for p in problems))
    return plans


def _model_at_stage(cfg: JobConfig, plans: list[StagePlan], index: int) -> ModelFamily:
    """The model a stage starts from: the job's base for the first, the previous stage's output after."""
    if index == 0:
        return load_or_build(cfg)
    previous = cfg.run_dir / "stages" / f"{plans[index - 1].index}-{plans[index - 1].config.name}" / "model"
    if not previous.is_dir():
        raise RuntimeError(
            f"cannot resume stage {index}: the output of the previous stage ({previous}) is "
            "missing; delete the checkpoints to restart the pipeline"
        )
    return load_family(previous, cfg.model.model_copy(update={"name_or_path": str(previous), "options": {}}))


def run_stage(run: Run, family: ModelFamily, live: LiveStage, state: TrainState) -> dict[str, float]:
    """Optimizer steps until the stage's transition fires; returns the last step's metrics."""
    cfg, engine = run.cfg, run.engine
    plan = live.plan
    group = "train" if plan.single else plan.config.name
    label = cfg.name if plan.single else f"{cfg.name}/{plan.config.name}"
    bar = progress_bar(plan.steps, label, cfg.logging.progress and engine.is_main, state.stage_step)
    metrics: dict[str, float] = {}
    started, started_step = time.perf_counter(), state.stage_step
    done = state.stage_step >= plan.steps
    per_step = 1 if plan.config.kind == "autoencoder" else cfg.train.gradient_accumulation_steps
    pin = engine.device.type == "cuda"
    live.open_batches(state.stage_micro_batches, cfg.train.num_workers, pin, per_step)
    try:
        while not done:
            where = (
                f"at step {state.step + 1}"
                if plan.single
                else f"in pipeline step {plan.config.name!r} at its step {state.stage_step + 1}"
            )
            try:
                metrics = train_step(cfg, family, live, state, engine, where)
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(
                    f"{exc}. Last good checkpoint: {run.ckpts.latest() or 'none'}. Try a lower train.lr, "
                    "train.max_grad_norm, or mixed_precision: no"
                ) from None
            state.stage_step += 1
            state.step += 1
            state.last_loss = metrics.get("loss", state.last_loss)
            done = transition_done(plan, state, metrics, live.data)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(metrics.items())[:3]}, refresh=False)
            if state.stage_step % cfg.logging.log_every == 0 or done:
                rate = (state.stage_step - started_step) / max(1e-9, time.perf_counter() - started)
                extra = {"steps_per_s": rate, "epoch": state.epoch}
                if not plan.single:
                    extra["stage_step"] = state.stage_step
                run.log.log(state.step, {**metrics, **extra}, group=group)
            if cfg.sample.every and state.step % cfg.sample.every == 0 and not done:
                _samples(run, family, live, state, group)
            saved = (state.step % cfg.save.every == 0 and not done) or (done and plan.single)
            if saved:
                save_checkpoint(run, family, live, state)
            if run.on_step is not None:
                run.on_step(state)
            if not done and run.stop.agreed(engine.world, engine.device):
                if not saved:
                    save_checkpoint(run, family, live, state)
                raise TrainingStopped(
                    f"stopped at step {state.step} ({run.stop.signal_name or 'on request'}); checkpoint "
                    f"{run.ckpts.latest()}. Run the same command to resume"
                )
    finally:
        live.close()
        bar.close()
    return metrics


def _samples(run: Run, family: ModelFamily, live: LiveStage, state: TrainState, group: str) -> None:
    """A sample grid (main process; under FSDP every process runs the sharded model, the main one saves)."""
    cfg, engine = run.cfg, run.engine
    if live.plan.config.kind != "diffusion" or not (engine.is_main or engine.strategy == "fsdp"):
        return
    with ema_weights(live.ema, live.ema_params()), live.eval_weights(), live.offload.restored():
        path = save_samples(family, cfg, state.step, engine.device, write=engine.is_main)
    if path is not None:
        run.log.image(state.step, path, group)


def _counters(run: Run, live: LiveStage, state: TrainState) -> RunCounters:
    """What the exported file's training metadata needs beyond the config."""
    session = int(run.run_id[:8], 16) if run.run_id else 0  # kohya's ss_session_id, stable across resume
    data = live.data
    return RunCounters(
        state.step, state.epoch, data.batches_per_epoch, data.captions, session, run.started, time.time()
    )


def _export_info(run: Run, family: ModelFamily, live: LiveStage, state: TrainState) -> dict[str, str]:
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
    meta = training_metadata(cfg, family.arch, family.objective.prediction_type, _counters(run, live, state))
    return {**meta, **ours}


def save_checkpoint(run: Run, family: ModelFamily, live: LiveStage, state: TrainState) -> None:
    """The one place a resumable checkpoint is written (main process): weights being trained, optimizers,
    EMA and counters, plus the usable adapter file of a single-stage LoRA run."""
    cfg, engine = run.cfg, run.engine
    weights = {k: engine.full_tensor(p).detach().float() for k, p in live.params().items()}
    optimizers = engine.optimizer_state(live.optimizers())
    if engine.is_main:
        extra = None
        if live.plan.single and cfg.network is not None:
            net, info = cfg.network, _export_info(run, family, live, state)

            def extra(folder: Path) -> None:
                with live.eval_weights():  # schedule-free: the averaged weights are the usable ones
                    export_network(
                        family, net, folder / _adapter_name(cfg), cfg.save.format, cfg.save.dtype, info
                    )

        ema = live.ema.state_dict() if live.ema is not None else None
        run.ckpts.save(state, weights, optimizers, ema, extra=extra)
    engine.barrier()


def _end_stage(
    run: Run,
    family: ModelFamily,
    live: LiveStage,
    state: TrainState,
    metrics: dict[str, float],
    started: float,
) -> Path:
    """Make the stage's result permanent: the EMA becomes the weights, the adapter or model is written,
    samples and eval scores are taken; a pipeline step then saves the boundary checkpoint."""
    cfg, engine, plan = run.cfg, run.engine, live.plan
    seconds = round(time.perf_counter() - started, 2)
    if live.ema is not None:  # the average is the step's result: what is saved, sampled and passed on
        live.ema.swap_into(live.ema_params())
    with live.offload.restored():
        card = model_card(cfg, family.arch, _counters(run, live, state)) if plan.single else None
        with live.eval_weights(), engine.gathered(family.modules().values()):
            output = finish_stage(cfg, family, live, engine, _export_info(run, family, live, state), card)
        _samples(run, family, live, state, "train" if plan.single else plan.config.name)
        with live.eval_weights():
            scores = evaluate_stage(cfg, family, live, engine) if plan.config.eval and engine.is_main else {}
    if plan.single:
        return output
    state.stages_done[plan.config.name] = {
        "steps": state.stage_step,
        "seconds": seconds,
        "finish_seconds": round(time.perf_counter() - started - seconds, 2),
        **{f"final_{k}": v for k, v in metrics.items()},
        **scores,
    }
    state.stage, state.stage_step, state.stage_micro_batches, state.watch = plan.index + 1, 0, 0, {}
    state.ema_updates = 0
    if engine.is_main:  # a stage boundary: the next stage starts fresh from this one's saved model
        run.ckpts.save(state, {}, OptimizerSet([]), None)
    engine.barrier()
    return output


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
