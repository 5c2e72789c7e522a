"""`eri train` with ``train.weights_dtype: bf16``: a full fine-tune whose trained weights live in bf16
trains, samples, saves a bf16 model, and resumes after a crash to the same bits as an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.training import loop
from tests.conftest import tiny_job, write_yaml
from tests.e2e.test_pipeline import pipeline_job
from tests.e2e.test_train_cli import _weights

BF16 = ["train.weights_dtype=bf16", "train.steps=5", "save.every=2", "save.keep=5"]


def test_bf16_full_fine_tune_trains_saves_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = tiny_job(tmp_path)
    job["sample"] = {"prompts": ["a red circle"], "steps": 2, "images_per_prompt": 1}
    whole = write_yaml(tmp_path / "whole.yaml", {**job, "name": "whole"})
    assert main(["train", str(whole), *BF16]) == 0
    run = tmp_path / "output" / "whole"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 5 and all(0 < m["loss"] < 10 for m in metrics)
    assert (run / "samples" / "step_000005.png").is_file()
    saved = {
        k: v for f in (run / "model").rglob("*.safetensors") for k, v in load_file(f).items()
    }  # the trained components (denoiser, text encoder) were saved as they trained: in bf16
    assert saved and {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.bfloat16}
    state = torch.load(run / "checkpoints" / "step_000005" / "optimizer.pt", weights_only=True)
    assert state["model"]["bf16_weights"]["rounding"] == "stochastic"
    assert {v.dtype for s in state["model"]["state"].values() for k, v in s.items() if k != "step"} == {
        torch.float32
    }

    crash = write_yaml(tmp_path / "crash.yaml", {**job, "name": "crash"})

    def die_at_2(state: loop.TrainState) -> None:
        if state.step == 2:
            raise KeyboardInterrupt

    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda cfg: real_train(cfg, on_step=die_at_2))
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(crash), *BF16])
    monkeypatch.setattr(loop, "train", real_train)
    assert main(["train", str(crash), *BF16]) == 0
    w1, w2 = _weights(run, 5), _weights(tmp_path / "output" / "crash", 5)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_bf16_weights_with_an_adapter_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path, network={"type": "lora", "linear": 4}))
    assert main(["train", str(cfg), "train.weights_dtype=bf16"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "train.weights_dtype bf16 is for full fine-tunes" in err and "Traceback" not in err


def test_a_pipeline_trains_its_full_step_in_bf16_and_its_lora_step_as_usual(tmp_path: Path) -> None:
    """Each trained component of a full step gets its own bf16 optimizer group; the later LoRA step on the
    same model trains its fp32 adapter on top."""
    steps = [
        {"name": "full", "trainable": ["denoiser", "text_encoder"], "max_steps": 2},
        {"name": "concept", "trainable": ["lora"], "network": {"type": "lora", "linear": 2}, "max_steps": 2},
    ]
    job = pipeline_job(tmp_path, steps=steps, defaults={"optimizers": {"default": {"lr": 1e-3}}})
    cfg = write_yaml(tmp_path / "p.yaml", job)
    assert main(["train", str(cfg), "train.weights_dtype=bf16"]) == 0
    run = tmp_path / "output" / "p"
    unet = load_file(next((run / "stages" / "0-full" / "model" / "unet").glob("*.safetensors")))
    assert {v.dtype for v in unet.values()} == {torch.bfloat16}
    assert (run / "stages" / "1-concept" / "concept.safetensors").is_file()
