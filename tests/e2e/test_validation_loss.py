"""Validation loss on held-out images: fixed noise and timesteps, logged, a transition's signal, and the
keep-best checkpoints, through `eri train` / `eri validate` on the tiny family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.config.schema import JobConfig
from eridiffusion.data.loader import open_sources
from eridiffusion.data.validation import split_datasets
from eridiffusion.models import build_family
from eridiffusion.training import logs, loop
from eridiffusion.training.checkpoint import CheckpointManager
from eridiffusion.training.engine import Engine
from eridiffusion.training.pipeline import stage_datasets
from eridiffusion.training.stages import setup_stage, single_stage_plan
from eridiffusion.training.validation import Validator
from tests.conftest import TINY_OPTIONS, tiny_job, write_yaml


def val_job(root: Path, name: str = "v", every: int | None = 2, **save: Any) -> dict[str, Any]:
    """48 shapes, 6 of them held out (0.125)."""
    job = tiny_job(root, name=name)
    job["datasets"][0]["validation_split"] = 0.125
    job["train"]["steps"] = 8
    if every is not None:
        job["validation"] = {"every": every, "timesteps": 4}
    job["save"] = {"every": 2, "keep": 2, **save}
    return job


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_val_loss_is_logged_falls_and_leaves_the_trained_weights_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.e2e.test_wandb import Recorder

    rec = Recorder()
    monkeypatch.setattr(logs, "_start_wandb", lambda cfg, run_id: rec)
    job = val_job(tmp_path)
    job["logging"]["wandb"] = {"mode": "offline"}
    with caplog.at_level("INFO"):
        assert main(["train", str(write_yaml(tmp_path / "v.yaml", job))]) == 0
    assert "step 8: val/loss" in caplog.text
    assert [s for s, values in rec.rows if "val/loss" in values] == [2, 4, 6, 8]
    run = tmp_path / "output" / "v"
    rows = _rows(run)
    val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    assert [s for s, _ in val] == [2, 4, 6, 8]
    assert val[-1][1] < val[0][1]  # the model learns, on images it never saw
    assert all("val/loss" not in r for r in rows if "loss" in r)  # rows of their own
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4, 6, 8]
    # the same job validated only at its end trains bit-identical weights
    assert main(["train", str(write_yaml(tmp_path / "e.yaml", val_job(tmp_path, "e", every=None)))]) == 0
    a = load_file(run / "checkpoints" / "step_000008" / "trainable.safetensors")
    b = load_file(tmp_path / "output" / "e" / "checkpoints" / "step_000008" / "trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _rows(tmp_path / "output" / "e") if "val/loss" in r] == [8]


def test_val_loss_is_identical_when_evaluated_twice_on_the_same_weights(tmp_path: Path) -> None:
    cfg = JobConfig.model_validate(val_job(tmp_path))
    datasets = stage_datasets(cfg, single_stage_plan(cfg, build_family("tiny", TINY_OPTIONS)).config)
    split = split_datasets(datasets, open_sources(datasets), cfg.train.seed)
    family = build_family("tiny", TINY_OPTIONS, seed=1)
    family.modules()["denoiser"].train(True)
    stage = single_stage_plan(cfg, family).config
    validator = Validator.build(cfg, stage, split, family.size_multiple())
    assert validator is not None and validator.images == 6
    engine = Engine(torch.device("cpu"), None)
    rng = torch.get_rng_state()
    first = validator.evaluate(family, engine)
    assert validator.evaluate(family, engine) == first
    assert torch.equal(torch.get_rng_state(), rng)  # training's random streams are untouched
    assert family.modules()["denoiser"].training  # train mode restored
    with torch.no_grad():
        next(family.modules()["denoiser"].parameters()).add_(0.05)
    assert validator.evaluate(family, engine) != first  # it moves when the weights do


def _best(run: Path) -> list[dict[str, Any]]:
    return json.loads((run / "checkpoints" / "best" / "best.json").read_text())


def test_keep_best_survives_rotation_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = val_job(tmp_path, "whole", every=1, keep=1, keep_best=2)
    whole["train"]["lr"] = 2e-2  # a noisy curve: the best are not simply the last steps
    assert main(["train", str(write_yaml(tmp_path / "w.yaml", whole))]) == 0
    run = tmp_path / "output" / "whole"
    val = sorted((r["val/loss"], r["step"]) for r in _rows(run) if "val/loss" in r)
    lowest = sorted(step for _, step in val[:2])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "step_000008"]
    on_disk = sorted(p.name for p in (run / "checkpoints" / "best").iterdir() if p.is_dir())
    assert on_disk == [f"step_{s:06d}" for s in lowest]
    assert sorted(e["step"] for e in _best(run)) == lowest
    state = json.loads((run / "checkpoints" / "step_000008" / "state.json").read_text())
    assert sorted(e["step"] for e in state["best"]) == lowest
    assert (run / "model").is_dir()  # the final export is the run's own, as without keep_best
    kept, *_ = CheckpointManager.load(run / "checkpoints" / "best" / on_disk[0])  # whole and resumable
    assert kept.step == lowest[0]

    crash = {**whole, "name": "crash"}

    def die_at_5(state: loop.TrainState) -> None:
        if state.step == 5:
            raise KeyboardInterrupt

    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda cfg: real_train(cfg, on_step=die_at_5))
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(write_yaml(tmp_path / "c.yaml", crash))])
    monkeypatch.setattr(loop, "train", real_train)
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    resumed = tmp_path / "output" / "crash"
    assert _best(resumed) == _best(run)
    names = sorted(p.name for p in (resumed / "checkpoints" / "best").iterdir() if p.is_dir())
    assert names == on_disk


def test_loss_threshold_on_val_loss_ends_a_pipeline_step(tmp_path: Path) -> None:
    job = val_job(tmp_path, "p", every=2)
    job["pipeline"] = {
        "steps": [
            {
                "name": "base",
                "trainable": ["denoiser"],
                "max_steps": 20,
                "transition": {
                    "type": "loss_threshold",
                    "metric": "val/loss",
                    "threshold": 100.0,
                    "patience": 2,
                    "smoothing": 0.0,
                },
            },
            {"name": "more", "trainable": ["denoiser"], "max_steps": 1},
        ]
    }
    assert main(["train", str(write_yaml(tmp_path / "p.yaml", job))]) == 0
    run = tmp_path / "output" / "p"
    summary = json.loads((run / "pipeline_summary.json").read_text())
    assert summary["base"]["steps"] == 4  # two evaluations below the bound: steps 2 and 4
    assert summary["more"]["steps"] == 1
    staged = [r for r in _rows(run) if "val/loss" in r]
    assert [(r["stage"], r["step"]) for r in staged] == [("base", 2), ("base", 4), ("more", 5)]


def test_validate_shows_the_validation_set_and_refuses_bad_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job = val_job(tmp_path, keep_best=1)
    assert main(["validate", str(write_yaml(tmp_path / "ok.yaml", job))]) == 0
    out = capsys.readouterr().out
    assert "validation: datasets[0] holds out 6 of 48 images" in out and "every 2 steps" in out
    assert "steps: 8 x 8 images = 1.5 epochs" in out  # 42 training images
    assert "1 checkpoint(s) of lowest val/loss" in out
    job["datasets"][0]["validation_split"] = 0.005
    assert main(["validate", str(write_yaml(tmp_path / "small.yaml", job))]) == EXIT_USER_ERROR
    assert "datasets[0].validation_split: 0.005 of 48 image(s) holds out none" in capsys.readouterr().err
    job["datasets"][0]["validation_split"] = 0.1
    job["pipeline"] = {
        "steps": [
            {
                "name": "a",
                "trainable": ["denoiser"],
                "max_steps": 4,
                "transition": {"type": "loss_threshold", "metric": "val/loss", "threshold": 1.0},
            }
        ]
    }
    job["validation"] = {"timesteps": 4}
    job["save"] = {"every": 2}
    assert main(["validate", str(write_yaml(tmp_path / "p.yaml", job))]) == EXIT_USER_ERROR
    assert "pipeline.steps[0].transition.metric: val/loss is watched" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_validate_alike_and_keep_one_best_list(tmp_path: Path, strategy: str) -> None:
    """Every process scores the validation set (FSDP needs them all) and takes the main one's value, so
    keep-best saves and transitions agree; only the main process logs."""
    from tests.e2e.test_distributed import eri

    job = val_job(tmp_path, every=1, keep=1, keep_best=1)
    job["train"].update(steps=3, batch_size=4, ema={"enabled": False}, distributed={"strategy": strategy})
    r = eri("train", "--num-processes", "2", str(write_yaml(tmp_path / "j.yaml", job)))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "output" / "v"
    assert [row["step"] for row in _rows(run) if "val/loss" in row] == [1, 2, 3]
    assert len(_best(run)) == 1
    assert len([p for p in (run / "checkpoints" / "best").iterdir() if p.is_dir()]) == 1


def test_held_out_files_never_reach_the_training_data(tmp_path: Path) -> None:
    cfg = JobConfig.model_validate(val_job(tmp_path))
    family = build_family("tiny", TINY_OPTIONS)
    plan = single_stage_plan(cfg, family)
    live = setup_stage(cfg, family, plan, Engine(torch.device("cpu"), None), tmp_path / "out")
    assert live.validator is not None
    trained = {str(p) for p in live.data.sources[0].paths}  # type: ignore[attr-defined]
    held = {str(p) for p in live.validator.data.sources[0].paths}  # type: ignore[attr-defined]
    assert len(trained) == 42 and len(held) == 6 and not trained & held
    assert live.data.samples_per_epoch == 42


@pytest.mark.parametrize("case", ["flux_lora", "tiny_cached_latents"])
def test_validation_with_flow_lora_and_with_a_latent_cache(tmp_path: Path, case: str) -> None:
    if case == "flux_lora":
        from tests.e2e.test_flow_cli import flow_job

        job = flow_job(tmp_path, "flux")
        job["network"] = {"type": "lora", "linear": 2}
        job["sample"]["prompts"] = []
    else:
        job = tiny_job(tmp_path, name="flux")
        job["train"]["steps"] = 3
        job["datasets"][0].update(cache_latents_to_disk=True, flip_x=True)
    job["datasets"][0]["validation_split"] = 0.25
    job["validation"] = {"every": 1, "timesteps": 3}
    assert main(["train", str(write_yaml(tmp_path / "j.yaml", job))]) == 0
    val = [r["val/loss"] for r in _rows(tmp_path / "output" / "flux") if "val/loss" in r]
    assert len(val) == 3 and all(0 < v < 10 for v in val)
