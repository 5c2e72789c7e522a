"""Weights & Biases beside TensorBoard: the same scalars, the sample grids and the config."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.training import logs
from tests.conftest import tiny_job, write_yaml


class Recorder:
    """Stands in for a wandb run: keeps what the trainer logs."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, Any]]] = []
        self.finished = False

    def log(self, values: dict[str, Any], step: int) -> None:
        self.rows.append((step, values))

    def finish(self) -> None:
        self.finished = True


def _job(tmp_path: Path) -> dict[str, Any]:
    job = tiny_job(tmp_path)
    job["train"]["steps"] = 3
    job["sample"] = {"every": 2, "prompts": ["a red circle"], "steps": 2, "images_per_prompt": 1}
    job["logging"]["wandb"] = {"project": "eri-test", "mode": "offline", "tags": ["ci"]}
    return job


def test_wandb_gets_the_scalars_of_metrics_jsonl_and_the_sample_grids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder()
    started: dict[str, Any] = {}

    def start(cfg, run_id):  # noqa: ANN001, ANN202
        started.update(cfg=cfg, run_id=run_id)
        return rec

    monkeypatch.setattr(logs, "_start_wandb", start)
    assert main(["train", str(write_yaml(tmp_path / "job.yaml", _job(tmp_path)))]) == 0
    run = tmp_path / "output" / "t"
    jsonl = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    scalars = [(s, v) for s, v in rec.rows if "train/samples" not in v]
    assert [s for s, _ in scalars] == [m["step"] for m in jsonl] == [1, 2, 3]
    for (_, values), m in zip(scalars, jsonl, strict=True):
        assert values == {f"train/{k}": v for k, v in m.items() if k != "step"}
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(scalars[0][1])
    grids = [s for s, v in rec.rows if "train/samples" in v]
    assert grids == [2, 3]  # every 2 steps, and the final grid
    assert rec.finished and started["run_id"] == json.loads((run / "run.json").read_text())["run_id"]


def test_offline_wandb_run_is_written_into_the_run_folder(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    assert main(["train", str(write_yaml(tmp_path / "job.yaml", _job(tmp_path)))]) == 0
    (log,) = (tmp_path / "output" / "t" / "wandb").glob("offline-run-*/run-*.wandb")
    keys = (b"train/loss", b"train/lr", b"train/grad_norm", b"train/samples", b"eri-test")
    deadline = time.monotonic() + 30  # wandb's service process may still be flushing the record log
    while not all(k in log.read_bytes() for k in keys) and time.monotonic() < deadline:
        time.sleep(0.2)
    data = log.read_bytes()  # the run's record log: every logged key and the config are in it
    for key in keys:
        assert key in data, key


def test_wandb_without_the_package_is_a_clear_error(tmp_path: Path, monkeypatch, capsys) -> None:
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    assert main(["train", str(write_yaml(tmp_path / "job.yaml", _job(tmp_path)))]) == EXIT_USER_ERROR
    assert "pip install wandb" in capsys.readouterr().err
