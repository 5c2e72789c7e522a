"""ai-toolkit job files run through `eri validate` as written: the Flux and SD3.5 LoRA examples from its
config/examples (verbatim but for the image folder) and an SDXL file in its documented shape, their Hub
ids served from a fake local Hugging Face cache holding tiny presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.config import load_config
from eridiffusion.data.shapes import write_shapes_dataset
from eridiffusion.models import build_family

EXAMPLES = Path(__file__).parent / "aitoolkit"
HUB_IDS = {
    "train_lora_flux_24gb.yaml": ("black-forest-labs/FLUX.1-dev", "flux"),
    "train_lora_sd35_large_24gb.yaml": ("stabilityai/stable-diffusion-3.5-large", "sd3"),
    "train_lora_sdxl.yaml": ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
}


def cache_tiny(cache: Path, repo_id: str, arch: str) -> Path:
    """A Hub cache entry as `hf download` leaves it (refs/main -> snapshots/<hash>) holding a tiny preset."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    build_family(arch, {"preset": "tiny"}).save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0123456789abcdef", encoding="utf-8")
    return snapshot


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Path:
    """The example file with its image folder pointed at synthetic shapes, its model in a fake cache."""
    name = request.param
    repo_id, arch = HUB_IDS[name]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # training_folder: "output" is relative
    cache_tiny(tmp_path / "hub", repo_id, arch)
    write_shapes_dataset(tmp_path / "shapes", n=8, resolution=32, seed=0)
    text = (
        (EXAMPLES / name)
        .read_text(encoding="utf-8")
        .replace("/path/to/images/folder", str(tmp_path / "shapes"))
    )
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("example", list(HUB_IDS), indirect=True)
def test_examples_validate_as_written(example: Path, capsys: pytest.CaptureFixture) -> None:
    """As written they name a CUDA device (and Flux, SD3.5 an 8-bit base, which translates to
    model.quantize: fp8): validate reports exactly what `eri train` would refuse here, before loading the
    model; with the device overridden the plan comes out."""
    expected = []
    if not torch.cuda.is_available():
        expected.append("train.device='cuda")
    code = main(["validate", str(example)])
    out = capsys.readouterr()
    assert out.err.count("ai-toolkit job file translated") == 1  # the mapping is printed once
    assert code == (EXIT_USER_ERROR if expected else 0)
    problems = out.err.partition("config problems:")[2].splitlines()[1:]
    assert len(problems) == len(expected), out.err
    for text in expected:
        assert sum(text in line for line in problems) == 1, (text, problems)
    overrides = ["train.device=auto"]
    if example.name.startswith("train_lora_sd35"):  # the tiny SD3 preset's position table ends at 64 px
        assert main(["validate", str(example), *overrides]) == EXIT_USER_ERROR
        assert (
            "datasets[0].resolution: height 1024 exceeds this sd3 model's maximum" in capsys.readouterr().err
        )
        overrides.append("datasets.0.resolution=64")
    assert main(["validate", str(example), *overrides]) == 0
    out = capsys.readouterr()
    repo_id, arch = HUB_IDS[example.name]
    assert f"{arch} -> output/my_first_" in out.out
    assert f"model: {repo_id}" in out.out
    assert "optimizer: adamw8bit lr 0.0001" in out.out
    assert "checkpoints every 250 steps, keeping 4" in out.out


@pytest.mark.parametrize("example", ["train_lora_flux_24gb.yaml"], indirect=True)
def test_flux_sample_settings_apply(example: Path) -> None:
    """The example's sample width/height/walk_seed are eri's own keys now: they size the sample grid."""
    from eridiffusion.config import load_config

    s = load_config(example, ["train.device=auto"]).sample
    assert (s.width, s.height, s.walk_seed) == (1024, 1024, True)


@pytest.mark.parametrize("example", ["train_lora_flux_24gb.yaml"], indirect=True)
def test_flux_mapping_is_printed(example: Path, capsys: pytest.CaptureFixture) -> None:
    main(["validate", str(example), "model.quantize=none", "train.device=auto"])
    err = capsys.readouterr().err
    for line in (
        "config.process[0].save.save_every -> save.every = 250",
        "config.process[0].save.max_step_saves_to_keep -> save.keep = 4",
        "config.process[0].save.dtype -> save.dtype = 'fp16'",
        "config.process[0].train.optimizer -> train.optimizer.type = 'adamw8bit'",
        "config.process[0].train.dtype -> train.mixed_precision = 'bf16'",
        "config.process[0].train.ema_config.use_ema -> train.ema.enabled = True",
        "config.process[0].model.is_flux -> model.arch = 'flux'",
        "config.process[0].model.quantize -> model.quantize = 'fp8'",
        "config.process[0].sample.sampler -> sample.sampler = 'flow_euler'",
        "config.process[0].sample.neg -> sample.negative_prompt = ''",
        "config.process[0].train.train_unet: True is what eri does anyway",
        "meta.name -> save.metadata.name = 'my_first_flux_lora_v1'",
    ):
        assert line in err, line


@pytest.mark.parametrize("example", ["train_lora_sdxl.yaml"], indirect=True)
def test_ui_trainer_keys_translate(example: Path) -> None:
    cfg = load_config(example)
    assert cfg.model.arch == "sdxl" and cfg.model.quantize == "none"
    assert cfg.train.gradient_accumulation_steps == 1 and cfg.train.optimizer.weight_decay == 1e-4
    assert cfg.datasets[0].trigger_word == "p3r5on"  # the process-level trigger word reaches each dataset
    assert cfg.sample.prompts[0].startswith("[trigger] holding a sign") and cfg.sample.images_per_prompt == 1
    assert cfg.network is not None and cfg.network.linear == 32 and cfg.network.ignore_if_contains == []
    assert cfg.save.metadata == {"name": "my_first_sdxl_lora_v1", "version": "1.0"}


@pytest.mark.parametrize("example", ["train_lora_sd35_large_24gb.yaml"], indirect=True)
def test_config_import_writes_the_same_job(
    example: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "eri.yaml"
    assert main(["config", "import", str(example), "--to", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "config.process[0].train.timestep_type -> model.options.timestep_sampling = 'uniform'" in printed
    assert f"wrote {out}" in printed
    written = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert "job" not in written and written["model"]["arch"] == "sd3"
    assert load_config(out) == load_config(example)
    assert (
        main(["config", "import", str(example), "--to", str(out)]) == EXIT_USER_ERROR
    )  # no silent overwrite
    assert "pass --force" in capsys.readouterr().err


@pytest.mark.parametrize("example", ["train_lora_flux_24gb.yaml"], indirect=True)
def test_keys_without_equivalent_are_errors_naming_them(example: Path, capsys: pytest.CaptureFixture) -> None:
    text = example.read_text(encoding="utf-8")
    text = text.replace("        lr: 1e-4\n", "        lr: 1e-4\n        max_denoising_steps: 900\n")
    text = text.replace("push_to_hub: false", "push_to_hub: true")
    text = text.replace("walk_seed: true", "walk_seed: true\n        num_frames: 16")
    example.write_text(text, encoding="utf-8")
    assert main(["validate", str(example)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "3 key(s) of this ai-toolkit job file have no equivalent in eri:" in err
    assert "config.process[0].train.max_denoising_steps: no equivalent in eri's train section" in err
    assert "config.process[0].save.push_to_hub: eri never uploads; set push_to_hub: false" in err
    assert "config.process[0].sample.num_frames: video sampling is not supported; set num_frames: 1" in err


def test_train_refuses_int4_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.conftest import tiny_job, write_yaml

    job = tiny_job(tmp_path)
    job["network"] = {"type": "lora"}
    job["model"]["quantize"] = "int4"  # ai-toolkit's qint4: no CPU/GPU kernel here, nf4 is the 4-bit option
    assert main(["train", str(write_yaml(tmp_path / "job.yaml", job))]) == EXIT_USER_ERROR
    assert "model.quantize: int4 is not available; use nf4" in capsys.readouterr().err
    assert not (tmp_path / "output").exists()  # refused before anything ran


def tiny_job_file(tmp_path: Path) -> dict:
    """An ai-toolkit LoRA job file for the tiny family (built from scratch, on the CPU), 2 steps."""
    from tests.conftest import TINY_OPTIONS

    return {
        "job": "extension",
        "config": {
            "name": "aitk_tiny",
            "process": [
                {
                    "type": "sd_trainer",
                    "training_folder": str(tmp_path / "output"),
                    "device": "cpu",
                    "trigger_word": "p3r5on",
                    "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
                    "save": {"dtype": "float16", "save_every": 2, "max_step_saves_to_keep": 1},
                    "datasets": [
                        {
                            "folder_path": str(tmp_path / "shapes"),
                            "caption_ext": "txt",
                            "resolution": [16],
                            "synthetic": {"kind": "shapes", "n": 8, "resolution": 16},
                        }
                    ],
                    "train": {
                        "batch_size": 4,
                        "steps": 2,
                        "gradient_accumulation": 1,
                        "train_unet": True,
                        "optimizer": "AdamW",
                        "lr": 1e-3,
                        "ema_config": {"use_ema": False},
                        "dtype": "fp32",
                    },
                    "model": {"arch": "tiny", "options": TINY_OPTIONS, "quantize": False},
                    "sample": {"sampler": "ddim", "sample_every": 100, "prompts": [], "sample_steps": 2},
                    "logging": {"log_every": 1, "use_wandb": False},
                }
            ],
        },
        "meta": {"name": "[name]", "version": "1.0"},
    }


def test_train_runs_an_aitoolkit_job_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`eri train` takes the job file itself."""
    path = tmp_path / "aitk.yaml"
    path.write_text(yaml.safe_dump(tiny_job_file(tmp_path)), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr()
    assert "config.process[0].train.optimizer -> train.optimizer.type = 'adamw'" in out.err
    assert "trained aitk_tiny: 2 steps" in out.out
    assert (tmp_path / "output" / "aitk_tiny" / "aitk_tiny.safetensors").is_file()


def test_text_encoders_are_left_alone_unless_asked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """ai-toolkit trains no text encoder unless ``train_text_encoder: true`` (eri's own default is on): a job
    file without the key must give a LoRA without text-encoder weights, and say so."""
    path = tmp_path / "aitk.yaml"
    path.write_text(yaml.safe_dump(tiny_job_file(tmp_path)), encoding="utf-8")
    assert load_config(path).train.train_text_encoder is False
    assert main(["train", str(path)]) == 0
    assert "train.train_text_encoder: unset, so False as in ai-toolkit (eri" in capsys.readouterr().err
    keys = load_file(tmp_path / "output" / "aitk_tiny" / "aitk_tiny.safetensors").keys()
    assert keys and not any(k.startswith("lora_te") for k in keys)
    job = tiny_job_file(tmp_path)
    job["config"]["process"][0]["train"]["train_text_encoder"] = True
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    assert load_config(path).train.train_text_encoder is True


def test_train_unet_false_trains_a_text_encoder_adapter(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """ai-toolkit's ``train_unet: false`` + ``train_text_encoder: true`` is eri's
    ``network.components: [text_encoder]``: the saved LoRA has text-encoder weights only."""
    job = tiny_job_file(tmp_path)
    job["config"]["process"][0]["train"].update(train_unet=False, train_text_encoder=True)
    path = tmp_path / "aitk.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    assert load_config(path).network.components == ["text_encoder"]
    assert main(["train", str(path)]) == 0
    assert "train.train_unet -> network.components = ['text_encoder']" in capsys.readouterr().err
    keys = load_file(tmp_path / "output" / "aitk_tiny" / "aitk_tiny.safetensors").keys()
    assert keys and all(k.startswith("lora_te") for k in keys)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train_unet": False}, "train_text_encoder unset or false would train nothing"),  # ai-toolkit: off
        ({"train_unet": False, "train_text_encoder": False}, "set train_text_encoder: true"),
        ({"train_unet": "no"}, "takes true or false, got 'no'"),
    ],
)
def test_train_unet_false_that_would_train_nothing_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, change: dict, message: str
) -> None:
    job = tiny_job_file(tmp_path)
    job["config"]["process"][0]["train"].update(change)
    path = tmp_path / "aitk.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    assert main(["validate", str(path)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "config.process[0].train.train_unet: " in err and message in err


def test_train_unet_false_without_an_adapter_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job = tiny_job_file(tmp_path)
    del job["config"]["process"][0]["network"]
    job["config"]["process"][0]["train"].update(train_unet=False, train_text_encoder=True)
    path = tmp_path / "aitk.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    assert main(["validate", str(path)]) == EXIT_USER_ERROR
    assert "train_unet: false trains only the text encoders, which eri does with an adapter" in (
        capsys.readouterr().err
    )
