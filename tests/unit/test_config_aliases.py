"""Familiar key names (older README, kohya/ai-toolkit habits) load as aliases, each one reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from eridiffusion.config import ConfigError, load_config
from tests.conftest import tiny_job, write_yaml


def test_aliases_translate_and_are_reported(tmp_path: Path) -> None:
    job = tiny_job(tmp_path)
    job["model"] = {
        "name_or_path": None,
        "arch": "tiny",
        "is_sdxl": False,
        "dtype": "float16",
        "quantize": False,
    }
    job["train"] = {
        "learning_rate": 3e-4,
        "max_train_steps": 7,
        "gradient_accumulation": 2,
        "optimizer": "AdamW8bit",
        "optimizer_params": {"weight_decay": 0.02, "percentile_clipping": 90},
    }
    job["save"] = {"save_every": 5, "max_step_saves_to_keep": 2, "dtype": "bfloat16"}
    job["sample"] = {"sampler": "flowmatch", "sample_every": 3, "neg": "blurry", "sample_steps": 4}
    notes: list[str] = []
    cfg = load_config(write_yaml(tmp_path / "job.yaml", job), notes=notes)
    assert (cfg.train.lr, cfg.train.steps, cfg.train.gradient_accumulation_steps) == (3e-4, 7, 2)
    assert cfg.train.optimizer.type == "adamw8bit" and cfg.train.optimizer.weight_decay == 0.02
    assert cfg.train.optimizer.params == {"percentile_clipping": 90}
    assert (cfg.save.every, cfg.save.keep, cfg.save.dtype) == (5, 2, "bf16")
    assert (cfg.sample.sampler, cfg.sample.every, cfg.sample.negative_prompt) == ("flow_euler", 3, "blurry")
    assert cfg.model.dtype == "fp16" and cfg.model.quantize == "none" and cfg.model.arch == "tiny"
    assert notes[0].endswith("config aliases translated (other keys keep their names):")
    assert "  train.learning_rate -> train.lr = 0.0003" in notes
    assert "  train.gradient_accumulation -> train.gradient_accumulation_steps = 2" in notes
    assert "  model.is_sdxl: not applied (false says nothing about the family)" in notes


@pytest.mark.parametrize(
    ("flag", "arch"), [("is_sdxl", "sdxl"), ("is_xl", "sdxl"), ("is_flux", "flux"), ("is_v3", "sd3")]
)
def test_family_flags(flag: str, arch: str, tmp_path: Path) -> None:
    job = tiny_job(tmp_path, model={"name_or_path": "somewhere", flag: True})
    assert load_config(write_yaml(tmp_path / "job.yaml", job)).model.arch == arch


@pytest.mark.parametrize(
    ("quantize", "expected"),
    [
        ({"quantize": True}, "fp8"),
        ({"quantize": True, "qtype": "qint8"}, "int8"),
        ({"quantize": "nf4"}, "nf4"),
    ],
)
def test_quantize_spellings(quantize: dict, expected: str, tmp_path: Path) -> None:
    job = tiny_job(tmp_path, model={"arch": "tiny", **quantize})
    assert load_config(write_yaml(tmp_path / "job.yaml", job)).model.quantize == expected


def test_alias_and_canonical_key_together_is_an_error(tmp_path: Path) -> None:
    job = tiny_job(tmp_path)
    job["train"]["learning_rate"] = 1.0
    with pytest.raises(ConfigError, match=r"train.learning_rate: sets train.lr, as train.lr does; keep one"):
        load_config(write_yaml(tmp_path / "job.yaml", job))


def test_bad_alias_value_names_the_key(tmp_path: Path) -> None:
    job = tiny_job(tmp_path)
    job["train"]["optimizer"] = "adamw4bit"
    job["save"]["dtype"] = "float8"
    with pytest.raises(ConfigError) as err:
        load_config(write_yaml(tmp_path / "job.yaml", job))
    assert "train.optimizer: optimizer 'adamw4bit' is not known; use one of" in str(err.value)
    assert "save.dtype: dtype 'float8' is not known" in str(err.value)


def test_unknown_native_key_still_reported_by_the_schema(tmp_path: Path) -> None:
    job = tiny_job(tmp_path)
    job["train"]["learning_rat"] = 1.0
    with pytest.raises(ConfigError, match=r"train.learning_rat: unknown key; allowed keys here"):
        load_config(write_yaml(tmp_path / "job.yaml", job))


def test_translated_option_merges_with_written_options(tmp_path: Path) -> None:
    job = tiny_job(tmp_path)
    job["model"] = {"arch": "flux", "options": {"preset": "tiny"}}
    job["train"]["timestep_type"] = "sigmoid"
    cfg = load_config(write_yaml(tmp_path / "job.yaml", job))
    assert cfg.model.options == {"preset": "tiny", "timestep_sampling": "logit_normal"}
    job["model"]["options"]["timestep_sampling"] = "mode"
    with pytest.raises(
        ConfigError, match=r"train.timestep_type: sets model.options.timestep_sampling, as another key"
    ):
        load_config(write_yaml(tmp_path / "job.yaml", job))


def test_kohya_and_onetrainer_bf16_weight_flags(tmp_path: Path) -> None:
    """kohya's ``full_bf16`` and OneTrainer's ``stochastic_rounding`` switch eri's bf16 trained weights."""
    job = tiny_job(tmp_path)
    job["train"] = {"full_bf16": True, "stochastic_rounding": False}
    notes: list[str] = []
    cfg = load_config(write_yaml(tmp_path / "job.yaml", job), notes=notes)
    assert (cfg.train.weights_dtype, cfg.train.weights_rounding) == ("bf16", "nearest")
    assert "  train.full_bf16 -> train.weights_dtype = 'bf16'" in notes
    job["train"] = {"full_bf16": "yes"}
    with pytest.raises(ConfigError, match="full_bf16 takes true or false"):
        load_config(write_yaml(tmp_path / "job.yaml", job))
