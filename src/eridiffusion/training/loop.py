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

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from eridiffusion.config.load import dump_config
from eridiffusion.config.schema import VAL_METRIC, JobConfig
from eridiffusion.data.class_folder import missing_class_images
from eridiffusion.data.loader import ImageSource, open_sources
from eridiffusion.data.vocabulary import job_captions, warn_caption_truncation
from eridiffusion.inference.samplers import check_sampler
from eridiffusion.models import ModelFamily, build_family, load_family
from eridiffusion.networks.metadata import model_card
from eridiffusion.progress import progress_bar
from eridiffusion.training.block_swap import swap_problem
from eridiffusion.training.checkpoint import CheckpointManager, TrainState, atomic_write_dir
from eridiffusion.training.engine import Engine, create_engine
from eridiffusion.training.logs import RunLogger
from eridiffusion.training.pipeline import (
    StagePlan,
    plan_stages,
)
from eridiffusion.training.preflight import check_before_loading
from eridiffusion.training.resume import (
    adapter_name,
    counters,
    export_info,
    initial_state,
    restore,
    result_fingerprint,
    save_checkpoint,
)
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
from eridiffusion.training.validation import rank_best

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
        # class folders still to fill (prior preservation) are read once the model has drawn them
        sources = None if any(map(missing_class_images, cfg.datasets)) else open_sources(cfg.datasets)
    info = engine.broadcast(open_run(run_dir, cfg.save.resume, adapter_name(cfg)) if engine.is_main else None)
    fingerprint = result_fingerprint(cfg)
    if is_finished(info, fingerprint, run_dir):
        logger.info("%s already finished with this config: %s (nothing to do)", cfg.name, info.output)
        return TrainResult(run_dir, info.final_step, run_dir / info.output, None, None, already_finished=True)
    if engine.is_main:
        (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")

    ckpts = CheckpointManager(run_dir / "checkpoints", cfg.save.keep, info.run_id)
    with engine.main_first():  # only the main process renames damaged checkpoints aside
        resume = find_resume(ckpts, cfg.save.resume, engine.is_main)
    state = initial_state(cfg, info.run_id, engine, resume)
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
    sources: list[ImageSource] | None,
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
        live.end()
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


def _plan(cfg: JobConfig, family: ModelFamily) -> list[StagePlan]:
    """The stages to run, after the checks that would otherwise fail only later (sampler, image sizes)."""
    if cfg.sample.prompts and cfg.sample.sampler:  # else it would fail only at the first sample grid
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
    swap = swap_problem(family, cfg.train.blocks_to_swap)
    if swap:
        raise ValueError(swap)
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
            every = cfg.validation.every
            due = every is not None and state.step % every == 0
            validated = due and _validate(run, family, live, metrics)
            done = transition_done(plan, state, metrics, live.data)
            if done and not validated:  # the end of every stage is scored too
                _validate(run, family, live, metrics)
            if VAL_METRIC in metrics:
                _record_validation(run, family, live, state, metrics[VAL_METRIC], group)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(metrics.items())[:3]}, refresh=False)
            if state.stage_step % cfg.logging.log_every == 0 or done:
                rate = (state.stage_step - started_step) / max(1e-9, time.perf_counter() - started)
                extra = {"steps_per_s": rate, "epoch": state.epoch}
                if not plan.single:
                    extra["stage_step"] = state.stage_step
                trained = {k: v for k, v in metrics.items() if k != VAL_METRIC}  # val/loss: its own row
                run.log.log(state.step, {**trained, **extra}, group=group)
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


def _validate(run: Run, family: ModelFamily, live: LiveStage, metrics: dict[str, float]) -> bool:
    """Score the validation set into ``metrics[val/loss]`` (every process: FSDP needs them all); False when
    the stage has none. The EMA's weights when EMA is on and ``validation.use_ema``."""
    if live.validator is None:
        return False
    ema = live.ema if run.cfg.validation.use_ema else None
    with ema_weights(ema, live.ema_params()), live.eval_weights(), live.offload.restored():
        loss = live.validator.evaluate(family, run.engine)
    # the main process's value everywhere: keep-best and transition decisions must agree across processes
    metrics[VAL_METRIC] = run.engine.broadcast(loss)
    return True


def _record_validation(
    run: Run, family: ModelFamily, live: LiveStage, state: TrainState, loss: float, group: str
) -> None:
    """Log and print ``val/loss``; a checkpoint among the ``save.keep_best`` lowest is kept under best/."""
    run.log.log_validation(state.step, loss, group)
    if run.engine.is_main:
        images = live.validator.images if live.validator else 0
        logger.info("step %d: val/loss %.6g (%d images)", state.step, loss, images)
    ranked = rank_best(state.best, state.step, state.stage, loss, run.cfg.save.keep_best)
    if ranked is not None:
        state.best = ranked
        save_checkpoint(run, family, live, state, best=True)


def _samples(run: Run, family: ModelFamily, live: LiveStage, state: TrainState, group: str) -> None:
    """A sample grid (main process; under FSDP every process runs the sharded model, the main one saves)."""
    cfg, engine = run.cfg, run.engine
    if live.plan.config.kind != "diffusion" or not (engine.is_main or engine.strategy == "fsdp"):
        return
    with ema_weights(live.ema, live.ema_params()), live.eval_weights(), live.offload.restored():
        path = save_samples(family, cfg, state.step, engine.device, write=engine.is_main)
    if path is not None:
        run.log.image(state.step, path, group)


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
        card = model_card(cfg, family.arch, counters(run, live, state)) if plan.single else None
        with live.eval_weights(), engine.gathered(family.modules().values()):
            output = finish_stage(cfg, family, live, engine, export_info(run, family, live, state), card)
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
