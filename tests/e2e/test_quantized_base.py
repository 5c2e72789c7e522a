"""Adapter training on a quantised frozen base (fp8/int8 via torchao, nf4 via bitsandbytes) on the CPU:
the job trains, the layers are stored quantised, and the exported LoRA file works on the full-precision
base: with it, the full base predicts what the quantised base + LoRA predicts, up to the base's own
quantisation error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.config import load_config
from eridiffusion.models.quantize import quantize_module, weight_bytes
from eridiffusion.networks import apply_adapter_files, attach_network
from eridiffusion.training.loop import load_or_build
from tests.conftest import tiny_job, write_yaml


def _predict(family, seed: int = 0) -> torch.Tensor:  # noqa: ANN001
    gen = torch.Generator().manual_seed(seed)
    shape = (2, *family.latent_shape(16, 16))
    noisy = torch.randn(shape, generator=gen)
    with torch.no_grad():
        cond = family.encode_prompt(["a red circle", "a blue square"])
        return family.predict(noisy, torch.tensor([300, 700]), cond).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["int8", "fp8", "nf4"])
def test_lora_on_a_quantised_base_transfers_to_the_full_base(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    job = tiny_job(tmp_path)
    job["network"] = {"type": "lora", "linear": 4, "linear_alpha": 4}
    job["model"]["quantize"] = kind
    job["train"].update(steps=6, lr=1e-2, train_text_encoder=False)
    cfg_path = write_yaml(tmp_path / "job.yaml", job)
    with caplog.at_level("INFO"):
        assert main(["train", str(cfg_path)]) == 0
    assert f"layers quantised to {kind}" in caplog.text
    lora = tmp_path / "output" / "t" / "t.safetensors"
    cfg = load_config(cfg_path)

    full = load_or_build(cfg)  # the same random base (same seed), full precision
    quant = load_or_build(cfg)
    quantize_module(quant.modules()["denoiser"], kind)
    assert weight_bytes([quant.modules()["denoiser"]]) < weight_bytes([full.modules()["denoiser"]])
    base_error = _rel(_predict(quant), _predict(full))

    trained = load_or_build(cfg)  # quantised base + the trained adapter, as training ran it
    quantize_module(trained.modules()["denoiser"], kind)
    attach_network(trained, cfg.network.model_copy(update={"init_from": str(lora)}), False, seed=0)
    apply_adapter_files(full, [(lora, 1.0)])  # the file on the full-precision base
    transfer_error = _rel(_predict(trained), _predict(full))
    effect = _rel(_predict(full), _predict(load_or_build(cfg)))
    print(f"{kind}: base error {base_error:.2e}, transfer {transfer_error:.2e}, LoRA effect {effect:.2e}")
    assert effect > 1e-3  # the adapter changed the model
    assert transfer_error <= 1.5 * base_error + 1e-4  # what differs is the base's rounding, not the adapter


def test_quantising_a_full_fine_tune_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = tiny_job(tmp_path)
    job["model"]["quantize"] = {"weights": "int8"}
    assert main(["train", str(write_yaml(tmp_path / "job.yaml", job))]) == EXIT_USER_ERROR
    assert "a quantised base is for adapter training" in capsys.readouterr().err
    job["network"] = {"type": "lora"}
    job["model"]["quantize"] = "int4"
    assert main(["validate", str(write_yaml(tmp_path / "job.yaml", job))]) == EXIT_USER_ERROR
    assert "use nf4" in capsys.readouterr().err
