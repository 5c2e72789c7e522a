"""``eri train`` / ``eri validate`` with prior preservation (class images drawn by the base model) and
differential output preservation, on the tiny family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from eridiffusion.cli import main
from eridiffusion.config import load_config
from tests.conftest import tiny_job, write_yaml
from tests.e2e.test_oom_retry import _limit_batch

NETWORK = {"type": "lora", "linear": 4, "linear_alpha": 4}


def _class_job(tmp_path: Path, name: str) -> Path:
    job = tiny_job(tmp_path, name=name, network=NETWORK)
    job["datasets"][0]["trigger_word"] = "sks"
    job["datasets"].append(
        {
            "class_data_dir": str(tmp_path / "class"),
            "is_reg": True,
            "class_prompt": "a circle",
            "num_class_images": 6,
            "prior_loss_weight": 0.5,
            "resolution": 16,
        }
    )
    return write_yaml(tmp_path / f"{name}.yaml", job)


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}


def test_class_images_drawn_once_beside_the_users(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(folder / "mine.png")
    (folder / "mine.txt").write_text("a circle of mine", encoding="utf-8")
    Image.new("RGB", (16, 16), (10, 200, 10)).save(folder / "class_00001.png")  # the user's, no caption
    users = _snapshot(folder)

    assert main(["validate", str(_class_job(tmp_path, "first"))]) == 0
    out = capsys.readouterr().out
    assert (
        "prior preservation: datasets[1] class 'a circle'" in out
        and "2 of 6 image(s) present, 4 to draw" in out
    )
    assert not (folder / "class_00000.png").exists()  # validate draws nothing

    assert main(["train", str(_class_job(tmp_path, "first"))]) == 0
    after = _snapshot(folder)
    assert {k: after[k] for k in users} == users  # the user's files are untouched
    drawn = sorted(set(after) - set(users))
    stems = ["class_00000", "class_00002", "class_00003", "class_00004"]
    assert drawn == sorted([f"{s}.png" for s in stems] + [f"{s}.txt" for s in stems])
    for s in stems:
        assert (folder / f"{s}.txt").read_text(encoding="utf-8") == "a circle\n"
        assert Image.open(folder / f"{s}.png").size == (16, 16)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left
    parameters = Image.open(folder / "class_00003.png").info["parameters"]  # how to draw it again
    assert parameters.startswith("a circle\n") and "Seed: 3," in parameters and "Steps: 2," in parameters
    metadata = json.loads((tmp_path / "output" / "first" / "run.json").read_text())["status"]
    assert metadata == "finished"

    assert main(["train", str(_class_job(tmp_path, "second"))]) == 0  # a new run: the folder is full
    assert _snapshot(folder) == after

    (folder / "class_00003.png").unlink()
    (folder / "class_00003.txt").unlink()
    assert main(["train", str(_class_job(tmp_path, "third"))]) == 0  # the same image comes back
    assert _snapshot(folder)["class_00003.png"][1] == after["class_00003.png"][1]


def _dop_job(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    job = tiny_job(tmp_path, network=NETWORK, **extra)
    job["datasets"][0]["trigger_word"] = "sks"
    job["train"].update({"diff_output_preservation": True, "diff_output_preservation_class": "", "steps": 3})
    return job


def test_output_preservation_trains_and_is_planned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_yaml(tmp_path / "dop.yaml", _dop_job(tmp_path))
    assert main(["validate", str(config)]) == 0
    assert (
        "output preservation: trigger 'sks' -> '', multiplier 1 (adapter steps only)"
        in capsys.readouterr().out
    )
    assert main(["train", str(config)]) == 0
    rows = [
        json.loads(line) for line in (tmp_path / "output" / "t" / "metrics.jsonl").read_text().splitlines()
    ]
    logged = [r["preservation_loss"] for r in rows if "preservation_loss" in r]
    assert len(logged) == 3 and logged[0] == 0.0 and logged[-1] > 0  # zero while the adapter is a no-op
    assert (tmp_path / "output" / "t" / "t.safetensors").is_file()


def test_output_preservation_with_accumulation_and_bf16(tmp_path: Path) -> None:
    """Accumulated micro-batches under bf16 autocast: the term is logged per step, finite and positive."""
    job = _dop_job(tmp_path)
    job["train"].update({"gradient_accumulation_steps": 2, "batch_size": 4, "mixed_precision": "bf16"})
    assert main(["train", str(write_yaml(tmp_path / "acc.yaml", job))]) == 0
    rows = [
        json.loads(line) for line in (tmp_path / "output" / "t" / "metrics.jsonl").read_text().splitlines()
    ]
    logged = [r["preservation_loss"] for r in rows if "preservation_loss" in r]
    assert len(logged) == 3 and logged[0] == 0.0 and 0 < logged[-1] < 1e3


def test_output_preservation_survives_the_out_of_memory_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step redone in pieces (injected out-of-memory, as in test_oom_retry) trains the same adapter and
    logs the same preservation loss as the whole step."""

    def run(name: str) -> tuple[dict[str, torch.Tensor], list[float]]:
        job = _dop_job(tmp_path, name=name)
        job["train"].update(optimizer={"type": "sgd"}, lr=0.05, gradient_accumulation_steps=2)
        assert main(["train", str(write_yaml(tmp_path / f"{name}.yaml", job))]) == 0
        out = tmp_path / "output" / name
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        weights = load_file(out / "checkpoints" / "step_000003" / "trainable.safetensors")
        return weights, [r["preservation_loss"] for r in rows if "preservation_loss" in r]

    whole, whole_terms = run("whole")
    seen = _limit_batch(monkeypatch, limit=2)
    pieces, piece_terms = run("pieces")
    assert seen["ooms"] == 2 and whole_terms[-1] > 0
    assert piece_terms == pytest.approx(whole_terms, rel=1e-4, abs=1e-9)
    for k in whole:
        torch.testing.assert_close(pieces[k], whole[k], rtol=1e-5, atol=1e-7)


def test_output_preservation_refuses_a_full_fine_tune(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _dop_job(tmp_path)
    del job["network"]
    assert main(["train", str(write_yaml(tmp_path / "full.yaml", job))]) == 2
    err = capsys.readouterr().err
    assert "train.diff_output_preservation needs adapter training" in err and "Traceback" not in err


def test_aitoolkit_output_preservation_keys_load(tmp_path: Path) -> None:
    """ai-toolkit's DOP keys are eri's own (same section, same names); its trigger word reaches the data."""
    train = {"steps": 2, "diff_output_preservation": True, "diff_output_preservation_multiplier": 0.5}
    process = {
        "type": "sd_trainer",
        "training_folder": str(tmp_path / "output"),
        "trigger_word": "p3r5on",
        "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
        "datasets": [{"folder_path": str(tmp_path / "shapes"), "resolution": [16]}],
        "train": {**train, "diff_output_preservation_class": "person"},
        "model": {"arch": "tiny"},
    }
    job = {"job": "extension", "config": {"name": "aitk", "process": [process]}}
    cfg = load_config(write_yaml(tmp_path / "aitk.yaml", job))
    t = cfg.train
    assert (t.diff_output_preservation, t.diff_output_preservation_multiplier) == (True, 0.5)
    assert t.diff_output_preservation_class == "person" and cfg.datasets[0].trigger_word == "p3r5on"


def test_pipeline_concept_step_with_both(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The quickstart's shape: a base step, then a concept LoRA step whose class images come from the
    base step's result; output preservation applies to the LoRA step only."""
    job = tiny_job(tmp_path, name="pipe")
    job["train"].update({"diff_output_preservation": True, "diff_output_preservation_class": ""})
    concept = {**job["datasets"][0], "trigger_word": "sks", "caption_dropout_rate": 0.0}
    class_set = {
        "folder_path": str(tmp_path / "class"),
        "is_reg": True,
        "class_prompt": "a red circle",
        "num_class_images": 3,
        "resolution": 16,
    }
    job["pipeline"] = {
        "steps": [
            {"name": "base", "trainable": ["denoiser", "text_encoder"], "max_steps": 2},
            {
                "name": "concept",
                "trainable": ["lora"],
                "network": NETWORK,
                "max_steps": 2,
                "datasets": [concept, class_set],
            },
        ]
    }
    config = write_yaml(tmp_path / "pipe.yaml", job)
    assert main(["validate", str(config)]) == 0
    out = capsys.readouterr().out
    assert "prior preservation: pipeline.steps[1].datasets[1] class 'a red circle'" in out
    assert "0 of 3 image(s) present, 3 to draw" in out
    assert main(["train", str(config)]) == 0
    folder = tmp_path / "class"
    assert sorted(p.name for p in folder.glob("*.png")) == [f"class_0000{k}.png" for k in range(3)]
    rows = [
        json.loads(line) for line in (tmp_path / "output" / "pipe" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["stage"] for r in rows if "preservation_loss" in r] == ["concept", "concept"]


def test_a_class_folder_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _class_job(tmp_path, "file")
    (tmp_path / "class").write_text("not a folder", encoding="utf-8")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "datasets[1].folder_path:" in err and "is a file; class images need a folder" in err


@pytest.mark.slow
def test_two_processes_draw_once_and_train_as_one(tmp_path: Path) -> None:
    """`--num-processes 2`: the main process draws the class images while the other waits, and the
    adapter trained with output preservation equals one process's with twice the batch."""
    from tests.e2e.test_distributed import assert_close, eri, weights

    def job(name: str) -> Path:
        data = _dop_job(tmp_path, name=name)
        data["train"].update(optimizer={"type": "sgd"}, lr=0.05)
        data["datasets"].append(
            {
                "folder_path": str(tmp_path / f"class_{name}"),
                "is_reg": True,
                "class_prompt": "a circle",
                "num_class_images": 4,
                "resolution": 16,
            }
        )
        return write_yaml(tmp_path / f"{name}.yaml", data)

    r1 = eri("train", str(job("one")), "train.batch_size=8", "save.every=3")
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = eri("train", "--num-processes", "2", str(job("two")), "train.batch_size=4", "save.every=3")
    assert r2.returncode == 0, r2.stderr[-3000:]
    one, two = tmp_path / "class_one", tmp_path / "class_two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert all((two / p.name).read_bytes() == p.read_bytes() for p in one.glob("*.png"))
    out = tmp_path / "output"
    assert_close(weights(out / "two", 3), weights(out / "one", 3), rtol=1e-5)
