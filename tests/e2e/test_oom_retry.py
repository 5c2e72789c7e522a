"""Out of device memory in a training step: the step is redone in smaller pieces (same samples, same noise,
so the same step), and a batch of one that still does not fit ends with advice. The allocator error is
injected on the CPU: the UNet refuses inputs of more than ``limit`` images, as a full GPU would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.models import tiny
from tests.conftest import tiny_job, write_yaml


def _limit_batch(monkeypatch: pytest.MonkeyPatch, limit: int) -> dict[str, int]:
    real = tiny.TinyFamily.predict
    seen = {"ooms": 0}

    def predict(self, noisy, timesteps, cond):  # noqa: ANN001, ANN202
        if noisy.shape[0] > limit:
            seen["ooms"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(self, noisy, timesteps, cond)

    monkeypatch.setattr(tiny.TinyFamily, "predict", predict)
    return seen


def _job(tmp_path: Path, name: str) -> Path:
    job = tiny_job(tmp_path, name=name)
    # SGD: the pieces' gradients add up to the whole batch's up to float rounding, which Adam would blow up
    # on weights whose true gradient is zero (see test_distributed)
    job["train"].update(steps=3, optimizer={"type": "sgd"}, lr=0.05, gradient_accumulation_steps=2)
    return write_yaml(tmp_path / f"{name}.yaml", job)


def test_an_out_of_memory_step_is_redone_in_pieces_with_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert main(["train", str(_job(tmp_path, "whole"))]) == 0
    seen = _limit_batch(monkeypatch, limit=2)  # batch 8 -> 2 pieces (4 rows) -> 4 pieces (2 rows) fit
    with caplog.at_level("WARNING"):
        assert main(["train", str(_job(tmp_path, "pieces"))]) == 0
    assert seen["ooms"] == 2  # once at 8 rows, once at 4; the piece count then stays for the run
    assert "redoing the step with each micro-batch in 4 pieces" in caplog.text
    out = tmp_path / "output"
    a = load_file(out / "whole" / "checkpoints" / "step_000003" / "trainable.safetensors")
    b = load_file(out / "pieces" / "checkpoints" / "step_000003" / "trainable.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    la = [json.loads(x)["loss"] for x in (out / "whole" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (out / "pieces" / "metrics.jsonl").read_text().splitlines()]
    assert lb == pytest.approx(la, rel=1e-5)


def test_out_of_memory_with_one_image_per_piece_ends_with_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _limit_batch(monkeypatch, limit=0)
    assert main(["train", str(_job(tmp_path, "t"))]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "out of memory at step 1 even with 8 piece(s)" in err
    assert "gradient_checkpointing" in err and "--memory" in err and "Traceback" not in err
