"""Adapter files carry kohya's ss_* training keys and ModelSpec keys; `eri convert` keeps them and
refreshes the weight hashes for the bytes it writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from eridiffusion.cli import main
from eridiffusion.config import validate_config
from eridiffusion.models import build_family
from eridiffusion.networks import attach_network, export_network
from eridiffusion.networks.metadata import (
    RunCounters,
    model_card,
    modelspec_architecture,
    tag_frequency,
    training_metadata,
)
from tests.conftest import TINY_OPTIONS, tiny_job

CAPTIONS = [["p3r5on, a red circle", "p3r5on, a blue square"], ["a photo of a person"]]


def job(tmp_path: Path) -> dict:
    j = tiny_job(tmp_path, network={"type": "lora", "linear": 4, "linear_alpha": 2, "conv": 2})
    j["datasets"] = [
        {"folder_path": str(tmp_path / "me"), "resolution": 16, "trigger_word": "p3r5on", "num_repeats": 3},
        {"folder_path": str(tmp_path / "people"), "resolution": 16, "is_reg": True, "loss_weight": 0.5},
    ]
    j["save"]["metadata"] = {
        "title": "My person",
        "training_comment": "first try",
        "license": "MIT",
        "x": "y",
    }
    return j


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def data_hash(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()


def test_metadata_keys(tmp_path: Path) -> None:
    cfg = validate_config(job(tmp_path))
    counters = RunCounters(7, 1, 2, CAPTIONS, session_id=1234, started_at=1.7e9, finished_at=1.7e9 + 60)
    meta = training_metadata(cfg, "tiny", "epsilon", counters)
    assert meta["ss_session_id"] == "1234" and meta["ss_output_name"] == "t"
    assert (meta["ss_steps"], meta["ss_epoch"], meta["ss_max_train_steps"], meta["ss_num_epochs"]) == (
        "7",
        "2",
        "4",
        "2",
    )
    assert meta["ss_base_model_version"] == "eri_tiny" and meta["ss_resolution"] == "(16, 16)"
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"], meta["ss_prior_loss_weight"]) == (
        "6",
        "1",
        "0.5",
    )
    assert json.loads(meta["ss_tag_frequency"]) == {
        "me": {"p3r5on": 2, "a red circle": 1, "a blue square": 1}
    }
    assert json.loads(meta["ss_dataset_dirs"]) == {"me": {"n_repeats": 3, "img_count": 2}}
    assert json.loads(meta["ss_network_args"])["conv_dim"] == 2
    assert meta["ss_training_comment"] == "first try" and meta["ss_optimizer"].startswith(
        "adamw(weight_decay=0.01"
    )
    assert meta["modelspec.architecture"] == "eri-tiny/lora" and meta["modelspec.title"] == "My person"
    assert meta["modelspec.resolution"] == "16x16" and meta["modelspec.date"] == "2023-11-14T22:14:20+00:00"
    assert meta["modelspec.trigger_phrase"] == "p3r5on" and meta["modelspec.license"] == "MIT"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["x"] == "y"
    assert all(isinstance(v, str) for v in meta.values())


@pytest.mark.parametrize(
    ("arch", "name", "expected"),
    [
        ("flux", "black-forest-labs/FLUX.1-dev", "flux-1-dev/lora"),
        ("flux", "/models/flux1-schnell.safetensors", "flux-1-schnell/lora"),
        ("sd3", "stabilityai/stable-diffusion-3.5-large", "stable-diffusion-3-5-large/lora"),
        ("sdxl", "x.safetensors", "stable-diffusion-xl-v1-base/lora"),
        ("sd15", None, "stable-diffusion-v1/lora"),
    ],
)
def test_modelspec_architecture(arch: str, name: str | None, expected: str, tmp_path: Path) -> None:
    j = job(tmp_path)
    j["model"] = {"arch": arch, "name_or_path": name}
    assert modelspec_architecture(validate_config(j), arch) == expected


def test_tag_frequency_strips_and_skips_empty_tags() -> None:
    assert tag_frequency(["a, b,, a ", ""]) == {"a": 2, "b": 1}


def test_export_then_convert_keeps_the_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = validate_config(job(tmp_path))
    family = build_family("tiny", dict(TINY_OPTIONS), seed=0)
    base = tmp_path / "base"
    family.save_pretrained(base)
    assert cfg.network is not None
    attach_network(family, cfg.network, train_text_encoder=True, seed=0)
    info = training_metadata(
        cfg, family.arch, family.objective.prediction_type, RunCounters(4, 0, 2, CAPTIONS, 9, 1e9)
    )
    lora = export_network(family, cfg.network, tmp_path / "t.safetensors", "kohya", "fp16", info)
    written = header(lora)
    assert {k: written[k] for k in info} == info
    assert written["sshs_model_hash"] == data_hash(lora) and len(written["sshs_legacy_hash"]) == 8
    assert written["modelspec.hash_sha256"] == f"0x{data_hash(lora)}"

    for fmt, dtype in (("diffusers", "fp32"), ("kohya", "bf16")):
        out = tmp_path / f"{fmt}.safetensors"
        assert (
            main(["convert", str(lora), str(out), "--model", str(base), "--to", fmt, "--dtype", dtype]) == 0
        )
        converted = header(out)
        kept = {k: v for k, v in written.items() if k.startswith(("ss_", "modelspec.")) and "hash" not in k}
        assert {k: converted[k] for k in kept} == kept
        assert converted["sshs_model_hash"] == data_hash(out) != written["sshs_model_hash"]
        assert converted["eri_format"] == fmt
    capsys.readouterr()


def test_model_card_for_full_saves(tmp_path: Path) -> None:
    j = job(tmp_path)
    j["model"] = {"name_or_path": "black-forest-labs/FLUX.1-dev"}
    card = model_card(validate_config(j), "flux", RunCounters(4, 0, 2, CAPTIONS, 9, 1e9))
    assert card.startswith("---\nlibrary_name: diffusers\ntags: [eridiffusion, text-to-image, flux]\n")
    assert "base_model: black-forest-labs/FLUX.1-dev\n---\n\n# My person\n" in card
    assert (
        "- steps: 4 of 4 (epoch 1)" in card and "- data: 2 training image(s) in 2 dataset(s) at 16 px" in card
    )
    assert "- trigger word(s): p3r5on" in card
