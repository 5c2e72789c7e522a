"""`eri validate` reports what `eri train` would refuse before reading any weight, naming YAML paths;
models built from scratch are planned on the meta device, so a full-size preset validates in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eridiffusion import __version__
from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.config.schema import NetworkConfig
from eridiffusion.models import build_family, load_family
from eridiffusion.networks import attach_network, export_network
from tests.conftest import TINY_OPTIONS, tiny_job, write_yaml


def validate(
    tmp_path: Path, job: dict, capsys: pytest.CaptureFixture, *overrides: str
) -> tuple[int, str, str]:
    code = main(["validate", str(write_yaml(tmp_path / "job.yaml", job)), *overrides])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"eri (eridiffusion) {__version__}"


def test_flow_model_settings_refused_without_reading_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # a Flux folder with no weights at all: the family is told from model_index.json, nothing else is read
    model = tmp_path / "flux"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}), encoding="utf-8")
    job = tiny_job(tmp_path, model={"name_or_path": str(model)})
    job["train"]["min_snr_gamma"] = 5.0
    job["sample"] = {"prompts": ["a red circle"], "sampler": "euler"}
    code, _, err = validate(tmp_path, job, capsys)
    assert code == EXIT_USER_ERROR
    assert "  train.min_snr_gamma: min-SNR weighting is defined for epsilon and v_prediction models" in err
    assert "  sample.sampler: sampler 'euler' (Euler) is for epsilon/v-prediction models" in err
    assert "safetensors" not in err and "model:" not in err  # no load was attempted


def test_batch_larger_than_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = tiny_job(tmp_path)
    job["datasets"][0]["synthetic"]["n"] = 6
    code, _, err = validate(tmp_path, job, capsys, "train.batch_size=16")
    assert code == EXIT_USER_ERROR
    assert "train.batch_size: 16 is larger than the 6 image(s) per epoch of the datasets; set " in err


def test_text_cache_with_trained_text_encoder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = tiny_job(tmp_path)
    job["datasets"][0]["cache_text_embeddings"] = True
    code, _, err = validate(tmp_path, job, capsys)
    assert code == EXIT_USER_ERROR
    assert "datasets[0].cache_text_embeddings: the text encoder is trained" in err
    assert validate(tmp_path, job, capsys, "train.train_text_encoder=false")[0] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = validate(tmp_path, tiny_job(tmp_path), capsys, "train.device=cuda")
    assert code == EXIT_USER_ERROR and "train.device='cuda' but no CUDA device is available" in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.name_or_path=nowhere/at-all.safetensors"],
            "  model.name_or_path: model path 'nowhere/at-all",
        ),
        (
            ["model.name_or_path=some-org/some-model"],
            "  model.name_or_path: 'some-org/some-model' is not a local",
        ),
        (["datasets.0.resolution=-64"], "  datasets[0].resolution: Value error, must be >= 8"),
        (["model.arch=null"], "  model.arch: set it to build a model from scratch"),
    ],
)
def test_errors_name_the_yaml_path(
    overrides: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code, _, err = validate(tmp_path, tiny_job(tmp_path), capsys, *overrides)
    assert code == EXIT_USER_ERROR
    assert message in err


def test_full_size_preset_is_planned_on_the_meta_device(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job = tiny_job(tmp_path, model={"arch": "flux", "options": {"preset": "dev"}})
    job["datasets"][0]["resolution"] = 32
    job["datasets"][0]["synthetic"]["resolution"] = 32
    code, out, err = validate(tmp_path, job, capsys, "train.ema.enabled=false")
    assert code == 0, err
    denoiser = next(line for line in out.splitlines() if "denoiser:" in line)
    assert int(denoiser.split(":")[1].split("params")[0].replace(",", "")) > 11_000_000_000  # Flux.1-dev size


@pytest.mark.parametrize(
    ("arch", "layout"), [("tiny", "folder"), ("sd15", "folder"), ("sdxl", "single"), ("sd3", "single")]
)
def test_loaded_models_plan_with_their_real_shapes(
    arch: str, layout: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Folders are planned from their config files on the meta device; single files are read; either way
    the plan counts what loading for training gives."""
    family = build_family(arch, dict(TINY_OPTIONS) if arch == "tiny" else {"preset": "tiny"})
    model = tmp_path / ("model" if layout == "folder" else "model.safetensors")
    family.save_pretrained(model) if layout == "folder" else family.save_single_file(model)
    job = tiny_job(tmp_path, model={"name_or_path": str(model)})
    job["datasets"][0]["resolution"] = 32
    code, out, err = validate(tmp_path, job, capsys)
    assert code == 0 and "translated" not in err, err
    loaded = load_family(model)
    for name, module in loaded.modules().items():
        assert f"    {name}: {sum(p.numel() for p in module.parameters()):,} params" in out
    assert f"objective {loaded.objective.prediction_type}" in out


def test_network_is_planned_on_meta_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The adapter is attached to the meta model: its size is reported, and targets matching no layer or an
    init_from file of another rank are found before training."""
    job = tiny_job(tmp_path, network={"type": "lora", "linear": 4, "linear_alpha": 4})
    code, out, err = validate(tmp_path, job, capsys)
    assert code == 0, err
    family = build_family("tiny", dict(TINY_OPTIONS))
    attached = attach_network(family, NetworkConfig(type="lora", linear=4, linear_alpha=4), True)
    assert (
        f"  network: lora rank 4 (alpha 4): {sum(p.numel() for p in attached.values()):,} params trained"
        in out
    )
    assert "    denoiser: " in out and "(adapted)" in out

    lora = export_network(family, NetworkConfig(linear=4), tmp_path / "r4.safetensors", "kohya", "fp32", {})
    job["network"] = {"type": "lora", "linear": 8, "init_from": str(lora)}
    code, _, err = validate(tmp_path, job, capsys)
    assert code == EXIT_USER_ERROR and f"network.init_from: '{lora}' does not fit this network config" in err
    job["network"] = {"type": "lora", "only_if_contains": ["no_such_layer"]}
    code, _, err = validate(tmp_path, job, capsys)
    assert code == EXIT_USER_ERROR and "network: no layer of the tiny denoiser matches" in err
