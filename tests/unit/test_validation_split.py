"""Held-out validation images: the split, its refusals, the fixed timesteps and the keep-best ranking."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from eridiffusion.config.schema import DatasetConfig, JobConfig
from eridiffusion.data.folder import DatasetError
from eridiffusion.data.loader import open_sources
from eridiffusion.data.shapes import write_shapes_dataset
from eridiffusion.data.validation import held_out_items, split_datasets, split_problem
from eridiffusion.models.objectives import DDPMObjective, FlowMatchObjective
from eridiffusion.training.pipeline import changed_paths, pipeline_snapshot
from eridiffusion.training.validation import rank_best
from tests.conftest import tiny_job


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("val") / "shapes"
    write_shapes_dataset(folder, 40, 16, 0)
    return folder


def _split(folder: Path, seed: int, **extra: Any) -> tuple[set[str], set[str]]:
    cfg = DatasetConfig(folder_path=str(folder), resolution=16, validation_split=0.25, **extra)
    split = split_datasets([cfg], open_sources([cfg]), seed)
    train = {str(p) for p in split.train_sources[0].paths}  # type: ignore[attr-defined]
    val = {str(p) for p in split.val_sources[0].paths}  # type: ignore[attr-defined]
    return train, val


def test_split_is_disjoint_complete_and_deterministic(shapes: Path) -> None:
    train, val = _split(shapes, seed=3)
    everything = {str(p) for p in open_sources([DatasetConfig(folder_path=str(shapes))])[0].paths}
    assert len(val) == 10 and not train & val and train | val == everything
    assert _split(shapes, seed=3) == (train, val)
    assert _split(shapes, seed=4)[1] != val  # the run seed chooses


def test_split_follows_file_names_not_folder_location(shapes: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere"
    shutil.copytree(shapes, moved)
    assert {Path(p).name for p in _split(moved, 3)[1]} == {Path(p).name for p in _split(shapes, 3)[1]}
    names = [f"img_{i:03d}.png" for i in range(50)]
    held = {names[i] for i in held_out_items(names, 0.2, seed=7)}
    grown = [*names, "zz_new.png"]
    assert len(held & {grown[i] for i in held_out_items(grown, 0.2, seed=7)}) >= 9  # one image moves at most


def test_validation_set_is_read_without_augmentation(shapes: Path) -> None:
    cfg = DatasetConfig(
        folder_path=str(shapes),
        resolution=16,
        validation_split=0.25,
        flip_x=True,
        caption_dropout_rate=0.5,
        num_repeats=3,
        shuffle_tokens=True,
    )
    split = split_datasets([cfg], open_sources([cfg]), 0)
    val = split.val[0]
    assert (val.flip_x, val.caption_dropout_rate, val.num_repeats, val.shuffle_tokens) == (False, 0, 1, False)
    assert split.train[0] == cfg  # training keeps every setting


def test_is_val_dataset_is_validation_only(shapes: Path) -> None:
    train_cfg = DatasetConfig(folder_path=str(shapes), resolution=16)
    val_cfg = DatasetConfig(folder_path=str(shapes), resolution=16, validation_concept=True)
    assert val_cfg.is_val
    split = split_datasets([train_cfg, val_cfg], open_sources([train_cfg, val_cfg]), 0)
    assert len(split.train) == 1 and len(split.val) == 1 and "is_val" in split.val_names[0]


def test_too_small_or_too_large_splits_are_refused() -> None:
    assert split_problem(5, 0.05, "datasets[0]") is not None
    assert "datasets[0].validation_split" in str(split_problem(5, 0.05, "datasets[0]"))
    assert "leaving none" in str(split_problem(2, 0.9, "datasets[1]"))
    assert split_problem(10, 0.1, "datasets[0]") is None


def test_split_of_too_few_images_fails_at_train_time_naming_the_field(tmp_path: Path) -> None:
    folder = tmp_path / "few"
    write_shapes_dataset(folder, 3, 16, 0)
    cfg = DatasetConfig(folder_path=str(folder), resolution=16, validation_split=0.1)
    with pytest.raises(DatasetError, match=r"datasets\[0\].validation_split"):
        split_datasets([cfg], open_sources([cfg]), 0)


def _job(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    return tiny_job(tmp_path, **sections)


def test_schema_refusals_name_the_key(tmp_path: Path) -> None:
    base = _job(tmp_path)
    d = base["datasets"][0]
    split = [{**d, "validation_split": 0.1}]
    cases = [
        ({**base, "save": {"keep_best": 2}}, "keep_best"),
        ({**base, "validation": {"every": 5}}, "validation"),
        ({**base, "datasets": [{**d, "is_val": True}]}, "is_val"),
        ({**base, "datasets": [{**d, "is_val": True, "is_reg": True}]}, "is_val"),
        ({**base, "datasets": [{**d, "validation_split": 1.0}]}, "validation_split"),
        ({**base, "datasets": [{"shards": "x/{0..1}.tar", "validation_split": 0.1}]}, "validation_split"),
        ({**base, "datasets": split, "save": {"keep_best": 1}}, "validation.every"),
        ({**base, "validation": {"every": 5, "validate_every_n_steps": 5}}, "every"),
    ]
    for data, word in cases:
        with pytest.raises(ValidationError, match=word):
            JobConfig.model_validate(data)


def test_aliases_of_kohya_and_simpletuner(tmp_path: Path) -> None:
    base = _job(tmp_path)
    base["datasets"][0]["validation_split"] = 0.1
    base["validation"] = {"validate_every_n_steps": 5, "validation_seed": 9, "eval_timesteps": 4}
    cfg = JobConfig.model_validate(base)
    assert (cfg.validation.every, cfg.validation.seed, cfg.validation.timesteps) == (5, 9, 4)


@pytest.mark.parametrize(
    "objective",
    [
        DDPMObjective(),
        FlowMatchObjective(),
        FlowMatchObjective(timestep_sampling="uniform", shift=3.0),
        FlowMatchObjective(timestep_sampling="mode"),
    ],
)
def test_fixed_timesteps_are_fixed_and_spread_over_the_schedule(objective: Any) -> None:
    a = objective.fixed_timesteps(8, (4, 8, 8))
    assert torch.equal(a, objective.fixed_timesteps(8, (4, 8, 8)))
    assert len(a) == 8 and bool((a[1:] > a[:-1]).all())  # distinct, ordered
    n = objective.num_train_timesteps
    assert float(a.min()) >= 0 and float(a.max()) <= n
    assert float(a.min()) < 0.3 * n and float(a.max()) > 0.7 * n  # covers low and high noise


def test_keep_best_ranking_keeps_the_lowest_and_replaces_only_with_better() -> None:
    best: list[dict[str, Any]] = []
    for step, loss in [(10, 0.5), (20, 0.4), (30, 0.6)]:
        best = rank_best(best, step, 0, loss, keep=2) or best
    assert [e["step"] for e in best] == [20, 10]
    assert rank_best(best, 40, 0, 0.5, keep=2) is None  # a tie does not replace
    best = rank_best(best, 50, 0, 0.1, keep=2) or best
    assert [e["step"] for e in best] == [50, 20]
    # another pipeline stage ranks on its own
    best = rank_best(best, 60, 1, 0.9, keep=2) or best
    assert {e["step"] for e in best} == {50, 20, 60}
    assert rank_best(best, 70, 0, 0.3, keep=0) is None
    assert rank_best(best, 80, 0, float("nan"), keep=2) is None  # a diverged model is never "best"


def test_a_pipeline_ending_on_val_loss_resumes_only_with_the_same_validation(tmp_path: Path) -> None:
    job = _job(tmp_path)
    job["datasets"][0]["validation_split"] = 0.1
    job["validation"] = {"every": 2}
    rule = {"type": "loss_threshold", "metric": "val/loss", "threshold": 1.0}
    step = {"name": "a", "trainable": ["denoiser"], "max_steps": 4, "transition": rule}
    job["pipeline"] = {"steps": [step]}
    before = pipeline_snapshot(JobConfig.model_validate(job))
    job["validation"] = {"every": 3}
    assert changed_paths(before, pipeline_snapshot(JobConfig.model_validate(job))) == ["validation.every"]
    job["pipeline"]["steps"][0]["transition"] = {"type": "steps"}
    assert "validation" not in pipeline_snapshot(JobConfig.model_validate(job))  # older checkpoints still fit
