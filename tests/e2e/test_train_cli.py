"""`eri train` / `eri generate` / `eri eval` through the CLI entry point on a very small tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from eridiffusion.cli import EXIT_NONFINITE, EXIT_USER_ERROR, main
from eridiffusion.config import load_config
from eridiffusion.training import loop, stages
from tests.conftest import tiny_job, write_yaml


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:06d}" / "trainable.safetensors")


def test_train_writes_checkpoints_samples_logs_and_model(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job = tiny_job(tmp_path)
    job["sample"] = {
        "every": 2,
        "prompts": ["a red circle", "a blue square"],
        "steps": 2,
        "images_per_prompt": 2,
    }
    cfg = write_yaml(tmp_path / "job.yaml", job)
    assert main(["train", str(cfg), "train.steps=5"]) == 0
    run = tmp_path / "output" / "t"
    assert "trained t: 5 steps" in capsys.readouterr().out
    # keep=2: steps 4 and 5 survive, step 2 was rotated out; no temp folders left behind
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000004", "step_000005"]
    for name in ("trainable.safetensors", "ema.safetensors", "optimizer.pt", "state.json"):
        assert (run / "checkpoints" / "step_000005" / name).is_file()
    state = json.loads((run / "checkpoints" / "step_000005" / "state.json").read_text())
    assert state["step"] == 5 and state["micro_batches"] == 5
    # 48 images / batch 8 = 6 batches per epoch, so 5 micro-batches stay in epoch 0
    assert state["epoch"] == 0
    grid = Image.open(run / "samples" / "step_000002.png")
    assert grid.size == (2 * 128, 2 * 128)  # 2 images per prompt x 2 prompts, 16 px blown up to 128
    assert (run / "samples" / "step_000005.png").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert all(m["loss"] > 0 and m["lr"] > 0 for m in metrics)
    assert list((run / "logs").glob("events.out.tfevents.*"))
    assert (run / "model" / "eri_family.json").is_file()
    assert load_config(run / "config.yaml").train.steps == 5


def test_same_config_and_seed_give_identical_weights(tmp_path: Path) -> None:
    a = write_yaml(tmp_path / "a.yaml", tiny_job(tmp_path, name="a"))
    b = write_yaml(tmp_path / "b.yaml", tiny_job(tmp_path, name="b"))
    assert main(["train", str(a)]) == 0
    assert main(["train", str(b)]) == 0
    wa, wb = _weights(tmp_path / "output" / "a", 4), _weights(tmp_path / "output" / "b", 4)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_crash_is_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill the run right after the step-4 checkpoint, resume, and compare with an uninterrupted run."""
    steps = ["train.steps=7", "save.every=2", "save.keep=5", "train.gradient_accumulation_steps=2"]
    whole = write_yaml(tmp_path / "whole.yaml", tiny_job(tmp_path, name="whole"))
    assert main(["train", str(whole), *steps]) == 0

    crash = write_yaml(tmp_path / "crash.yaml", tiny_job(tmp_path, name="crash"))

    def die_at_4(state: loop.TrainState) -> None:
        if state.step == 4:
            raise KeyboardInterrupt

    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda cfg: real_train(cfg, on_step=die_at_4))
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(crash), *steps])
    run = tmp_path / "output" / "crash"
    assert (run / "checkpoints" / "step_000004").is_dir()
    assert not (run / "checkpoints" / "step_000006").exists()
    monkeypatch.setattr(loop, "train", real_train)
    assert main(["train", str(crash), *steps]) == 0

    w1, w2 = _weights(tmp_path / "output" / "whole", 7), _weights(run, 7)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    e1 = load_file(tmp_path / "output" / "whole" / "checkpoints" / "step_000007" / "ema.safetensors")
    e2 = load_file(run / "checkpoints" / "step_000007" / "ema.safetensors")
    assert all(torch.equal(e1[k], e2[k]) for k in e1)
    losses = [
        [
            json.loads(x)["loss"]
            for x in (tmp_path / "output" / name / "metrics.jsonl").read_text().splitlines()
        ]
        for name in ("whole", "crash")
    ]
    assert len(losses[0]) == 7 and losses[0] == losses[1]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real_loss = stages.diffusion_loss
    calls = {"n": 0}

    def nan_on_third(*args, **kwargs):  # noqa: ANN002, ANN003
        calls["n"] += 1
        out = real_loss(*args, **kwargs)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(stages, "diffusion_loss", nan_on_third)  # where the step looks it up
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path))
    assert main(["train", str(cfg)]) == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "loss is nan at step 3" in err and "step_000002" in err
    ckpts = tmp_path / "output" / "t" / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step_000002"]
    assert not (tmp_path / "output" / "t" / "model").exists()


def test_missing_dataset_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = tiny_job(tmp_path)
    job["datasets"] = [{"folder_path": str(tmp_path / "nope"), "resolution": 16}]
    assert main(["train", str(write_yaml(tmp_path / "job.yaml", job))]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "datasets[0].folder_path" in err and "nope" in err and "does not exist" in err


def test_empty_dataset_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    job = tiny_job(tmp_path)
    job["datasets"] = [{"folder_path": str(tmp_path / "empty"), "resolution": 16}]
    assert main(["train", str(write_yaml(tmp_path / "job.yaml", job))]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "datasets[0].folder_path" in err and "empty" in err


def test_unreadable_images_are_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["data", "shapes", str(tmp_path / "shapes"), "--n", "16", "--resolution", "16"]) == 0
    (tmp_path / "shapes" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (tmp_path / "shapes" / "broken.txt").write_text("a broken image")
    (tmp_path / "shapes" / "zero.jpg").write_bytes(b"")
    job = tiny_job(tmp_path)
    job["datasets"] = [{"folder_path": str(tmp_path / "shapes"), "resolution": 16}]
    job["train"]["steps"] = 2
    with caplog.at_level("WARNING"):
        assert main(["train", str(write_yaml(tmp_path / "job.yaml", job))]) == 0
    text = caplog.text
    assert "broken.png" in text and "zero.jpg" in text
    assert "2 unreadable image(s) skipped; training on 16" in text


def test_bad_yaml_and_unknown_key_exit_with_the_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: [unclosed\n")
    assert main(["train", str(bad)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "invalid YAML" in err and "line" in err

    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path))
    assert main(["train", str(cfg), "train.learning_rate=1"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "train.learning_rate: unknown key" in err and "lr" in err

    opts = tiny_job(tmp_path)
    opts["model"]["options"]["chanels"] = [8]
    assert main(["train", str(write_yaml(tmp_path / "o.yaml", opts))]) == EXIT_USER_ERROR
    assert "model.options.chanels: unknown key" in capsys.readouterr().err


def test_validate_prints_plan_without_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path))
    assert main(["validate", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "denoiser" in out and "trained" in out and "steps: 4 x 8 images" in out
    assert not (tmp_path / "output").exists()


def test_generate_and_eval_from_trained_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path))
    assert main(["train", str(cfg), "train.steps=2"]) == 0
    model = tmp_path / "output" / "t" / "model"
    out = tmp_path / "gen"
    args = [
        "generate",
        "--model",
        str(model),
        "--prompt",
        "a red circle",
        "--n",
        "2",
        "--steps",
        "3",
        "--seed",
        "7",
        "--out",
        str(out),
    ]
    assert main([*args, "--sampler", "Euler a"]) == 0
    first = sorted(out.iterdir())
    assert [p.name for p in first] == ["0000-7.png", "0001-8.png"]
    img = Image.open(first[0])
    assert img.size == (16, 16)
    params = img.text["parameters"]
    assert params.startswith("a red circle\n") and "Sampler: Euler a" in params and "Seed: 7" in params
    again = tmp_path / "gen2"
    assert main([*args[:-1], str(again), "--sampler", "Euler a"]) == 0
    assert Image.open(again / "0000-7.png").tobytes() == img.tobytes()  # same seed, same image

    assert main(["generate", "--model", str(model), "--prompt", "x", "--width", "18", "--out", str(out)]) == 2
    assert "width 18 must be a positive multiple of 4" in capsys.readouterr().err

    assert main(["eval", str(cfg), "--json"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    scores = json.loads(line)
    assert scores["n"] == 12 and 0 <= scores["colour_accuracy"] <= 1
    assert (tmp_path / "output" / "t" / "eval.json").is_file()


def test_continue_training_from_a_saved_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first = write_yaml(tmp_path / "a.yaml", tiny_job(tmp_path, name="a"))
    assert main(["train", str(first), "train.steps=2"]) == 0
    job = tiny_job(tmp_path, name="b")
    job["model"] = {"name_or_path": str(tmp_path / "output" / "a" / "model")}  # arch detected from the folder
    assert main(["train", str(write_yaml(tmp_path / "b.yaml", job)), "train.steps=2"]) == 0
    assert (tmp_path / "output" / "b" / "model" / "eri_family.json").is_file()

    (tmp_path / "junk").mkdir()
    job["model"] = {"name_or_path": str(tmp_path / "junk")}
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", job))]) == EXIT_USER_ERROR
    assert "cannot tell which model family" in capsys.readouterr().err


def test_adamw8bit_trains_and_resumes(tmp_path: Path) -> None:
    """bitsandbytes' 8-bit AdamW (CPU kernels too): its state is checkpointed and the run resumes."""
    pytest.importorskip("bitsandbytes")
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path))
    assert main(["train", str(cfg), "train.optimizer.type=adamw8bit", "train.steps=3", "save.every=2"]) == 0
    opt = torch.load(
        tmp_path / "output" / "t" / "checkpoints" / "step_000003" / "optimizer.pt", weights_only=True
    )
    # bitsandbytes' own state layout was checkpointed (it keeps large tensors in 8 bits while training);
    # optimizer.pt holds one state dict per parameter group, "model" for a single-stage job
    assert any("__bnb_optimizer_quant_state__" in state for state in opt["model"]["state"].values())
    assert main(["train", str(cfg), "train.optimizer.type=adamw8bit", "train.steps=5", "save.every=2"]) == 0
    losses = [
        json.loads(x)["loss"] for x in (tmp_path / "output" / "t" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 5 and all(np.isfinite(losses))


def test_data_shapes_cli_writes_a_concept_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "black"
    args = ["data", "shapes", str(out), "--n", "8", "--resolution", "16", "--colours", "black"]
    assert main([*args, "--held-out", "black triangle"]) == 0
    captions = [p.read_text().split() for p in out.glob("[0-9]*.txt")]
    assert {c[2] for c in captions} == {"black"} and {c[3] for c in captions} == {"circle", "square"}
    assert "a black triangle" in (out / "held_out_prompts.txt").read_text().splitlines()
    assert main(["data", "shapes", str(tmp_path / "bad"), "--colours", "mauve"]) == EXIT_USER_ERROR
    assert "unknown ['mauve']" in capsys.readouterr().err
    short = tmp_path / "short"
    args = ["data", "shapes", str(short), "--n", "40", "--resolution", "16", "--captions", "varied"]
    assert main(args) == 0
    lengths = {len(p.read_text().split()) for p in short.glob("[0-9]*.txt")}
    assert 3 in lengths and 7 in lengths  # 'a red circle' beside 'a large red circle on the left'


def test_trained_lora_files_carry_kohya_and_modelspec_metadata(tmp_path: Path) -> None:
    """What A1111/Forge/kohya tools read from a LoRA: the real step count, epochs, session id (the same
    after a resume), dataset tags, architecture; the checkpoint copy and the final file alike."""
    from safetensors import safe_open

    job = tiny_job(tmp_path)
    job["network"] = {"type": "lora", "linear": 2, "linear_alpha": 1}
    cfg = write_yaml(tmp_path / "job.yaml", job)
    assert main(["train", str(cfg), "train.steps=2"]) == 0
    assert main(["train", str(cfg), "train.steps=3"]) == 0  # resumed
    run = tmp_path / "output" / "t"

    def header(path: Path) -> dict[str, str]:
        with safe_open(path, "pt") as f:
            return f.metadata()

    final, ckpt2 = (
        header(run / "t.safetensors"),
        header(run / "checkpoints" / "step_000002" / "t.safetensors"),
    )
    assert (final["ss_steps"], ckpt2["ss_steps"]) == ("3", "2")
    assert final["ss_max_train_steps"] == "3" and final["ss_network_dim"] == "2"
    assert final["ss_session_id"] == ckpt2["ss_session_id"] != "0"
    assert final["modelspec.architecture"].startswith("eri-tiny") and "modelspec.date" in final
    tags = json.loads(final["ss_tag_frequency"])
    assert any("circle" in t for counts in tags.values() for t in counts)


def test_a_full_fine_tune_writes_a_model_card(tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path))
    assert main(["train", str(cfg), "train.steps=2"]) == 0
    card = (tmp_path / "output" / "t" / "model" / "README.md").read_text()
    assert card.startswith("---") and "steps" in card.lower()
