"""`eri train` with ``train.blocks_to_swap`` on the tiny Flux preset trains the same LoRA as without it (the
mechanism's own checks are in tests/unit/test_block_swap.py); `eri validate` and `eri plan` read the same
key and refuse what it cannot do, naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eridiffusion.cli import EXIT_USER_ERROR, main
from tests.conftest import write_yaml
from tests.e2e.test_flow_cli import flow_job


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_with_block_swap_gives_the_same_lora(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runs = {}
    for swap in (0, 1):  # the tiny preset's 3 blocks: all take turns in 2 places
        job = flow_job(tmp_path, "flux")
        job["name"] = f"swap{swap}"
        job["network"] = {"type": "lora", "linear": 4, "linear_alpha": 4}
        job["train"].update(train_text_encoder=False, gradient_checkpointing=True, blocks_to_swap=swap)
        with caplog.at_level("INFO"):
            assert main(["train", str(write_yaml(tmp_path / f"job{swap}.yaml", job))]) == 0
        runs[swap] = tmp_path / "output" / f"swap{swap}"
    assert "block swap: the last 3 blocks" in caplog.text
    assert (runs[1] / "samples" / "step_000003.png").is_file()  # sampling ran through the swapped blocks
    assert _losses(runs[1]) == pytest.approx(_losses(runs[0]), rel=1e-5)
    plain, swapped = load_file(runs[0] / "swap0.safetensors"), load_file(runs[1] / "swap1.safetensors")
    assert plain.keys() == swapped.keys()
    assert all(torch.allclose(plain[k].float(), swapped[k].float(), rtol=1e-3, atol=1e-5) for k in plain)


def test_validate_refuses_what_block_swap_cannot_do(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = flow_job(tmp_path, "flux")
    job["network"] = {"type": "lora", "linear": 4}
    job["train"].update(train_text_encoder=False, blocks_to_swap=1)
    path = str(write_yaml(tmp_path / "job.yaml", job))
    assert main(["validate", path]) == 0
    assert "block swap: the last 3 denoiser blocks take turns in 2 places" in capsys.readouterr().out
    cases = {
        "train.blocks_to_swap=2": "train.blocks_to_swap: 2 would leave fewer than two of the denoiser's 3",
        "train.blocks_to_swap=-1": "train.blocks_to_swap",
        "model.arch=sdxl": "train.blocks_to_swap: sdxl has no list of repeated transformer blocks",
        "network=null": "train.blocks_to_swap: only frozen base weights are swapped",
    }
    for override, message in cases.items():
        extra = ["datasets.0.resolution=64", "model.options.preset=tiny"] if "sdxl" in override else []
        assert main(["validate", path, override, *extra]) == EXIT_USER_ERROR, override
        assert message in capsys.readouterr().err
    assert main(["train", path, "train.blocks_to_swap=2"]) == EXIT_USER_ERROR
    assert "(one runs while the next arrives); at most 1" in capsys.readouterr().err
    assert not (tmp_path / "output" / "flux" / "checkpoints").exists()


def test_plan_reads_blocks_to_swap_from_the_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = flow_job(tmp_path, "flux")
    job["network"] = {"type": "lora", "linear": 4}
    job["train"].update(train_text_encoder=False, blocks_to_swap=1)
    path = str(write_yaml(tmp_path / "job.yaml", job))
    assert main(["plan", path, "--json"]) == 0
    swapped = json.loads(capsys.readouterr().out)
    assert main(["plan", path, "--json", "--blocks-to-swap", "0"]) == 0  # the option overrides the key
    whole = json.loads(capsys.readouterr().out)
    assert swapped["blocks_to_swap"] == 1 and whole["blocks_to_swap"] == 0
    assert swapped["weights"] < whole["weights"] and "1 fewer blocks on the device" in " ".join(
        swapped["notes"]
    )
