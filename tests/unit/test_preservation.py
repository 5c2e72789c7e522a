"""Prior preservation's class folder and differential output preservation's loss term, on the tiny family.

The output-preservation term compares the model with its adapter on and off for the class caption on the
row's own noisy input: zero while the adapter is a no-op, a pull back towards the base once it is not,
and the same whether a micro-batch is computed whole or in out-of-memory pieces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from eridiffusion.config.schema import DatasetConfig, JobConfig
from eridiffusion.data.class_folder import free_indices, missing_class_images, write_class_example
from eridiffusion.data.loader import TrainingData
from eridiffusion.data.vocabulary import job_captions
from eridiffusion.models import ModelFamily, build_family
from eridiffusion.networks.adapters import adapter_parameters, adapters_disabled
from eridiffusion.training.preservation import OutputPreservation
from eridiffusion.training.stages import single_stage_plan, trainable_parameters
from eridiffusion.training.step import diffusion_loss, step_generator
from tests.conftest import TINY_OPTIONS, tiny_job

CPU = torch.device("cpu")
LR = 1.0
CLASS_PROMPTS = ["a red circle", "a blue square", "a red circle", ""]
"""The training captions below with the trigger word "sks" removed (class word "")."""


def _job(tmp_path: Path, **train: Any) -> JobConfig:
    job = tiny_job(tmp_path, network={"type": "lora", "linear": 4, "linear_alpha": 4})
    job["datasets"][0]["trigger_word"] = "sks"
    job["train"].update({"diff_output_preservation": True, "diff_output_preservation_class": "", **train})
    return JobConfig.model_validate(job)


def _adapted(cfg: JobConfig) -> tuple[ModelFamily, dict[str, torch.nn.Parameter], OutputPreservation]:
    family = build_family("tiny", dict(TINY_OPTIONS), seed=0, captions=["sks a red circle", "a blue square"])
    params = trainable_parameters(family, cfg)
    plan = single_stage_plan(cfg, family)
    dop = OutputPreservation.for_stage(cfg, plan.config, cfg.datasets, family)
    assert dop is not None and dop.text_adapted  # train_text_encoder defaults to true: both encoded
    return family, params, dop


def _inputs(family: ModelFamily) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn((4, *family.latent_shape(16, 16)), generator=gen)
    return noisy, torch.tensor([100, 300, 600, 900])


def _perturb(params: dict[str, torch.nn.Parameter]) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in params.items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def test_class_caption_replaces_whole_trigger_words(tmp_path: Path) -> None:
    dop = OutputPreservation(("sks",), "dog", 1.0, False)
    assert dop.class_caption("a photo of sks, sks dog") == "a photo of dog, dog dog"
    assert dop.class_caption("asks for sksx") == "asks for sksx"
    removed = OutputPreservation(("sks",), "", 1.0, False)
    assert removed.class_caption("a sks circle") == "a circle"
    assert removed.class_caption("sks, a black circle") == "a black circle"


def test_term_is_zero_at_step_zero_and_pulls_towards_the_base(tmp_path: Path) -> None:
    family, params, dop = _adapted(_job(tmp_path))
    noisy, t = _inputs(family)
    captions = ["sks a red circle", "a blue square", "sks a red circle", ""]
    assert torch.equal(dop.per_sample(family, captions, noisy, t, {}), torch.zeros(4))

    _perturb(params)
    grads = {k: p.requires_grad for k, p in adapter_parameters(family).items()}
    term = dop.per_sample(family, captions, noisy, t, {}).mean()
    assert term.item() > 1e-4
    assert {k: p.requires_grad for k, p in adapter_parameters(family).items()} == grads  # restored
    term.backward()
    class_prompts = family.encode_prompt(CLASS_PROMPTS)
    with torch.no_grad():
        with adapters_disabled(family):
            truth = family.predict(noisy, t, family.encode_prompt(CLASS_PROMPTS))
        before = (family.predict(noisy, t, class_prompts) - truth).pow(2).mean().item()
        for p in params.values():
            if p.grad is not None:
                p -= LR * p.grad  # one step down the term's gradient
        class_prompts = family.encode_prompt(CLASS_PROMPTS)
        after = (family.predict(noisy, t, class_prompts) - truth).pow(2).mean().item()
    assert after < 0.9 * before  # the class-caption prediction moved towards the base's


def test_preservation_adds_nothing_at_step_zero_and_splits_like_the_loss(tmp_path: Path) -> None:
    cfg = _job(tmp_path, diff_output_preservation_multiplier=2.0)
    family, params, dop = _adapted(cfg)
    data = TrainingData(cfg.datasets, 8, 0, family.size_multiple())
    batch = data.batch(0)

    def loss(b: Any, preservation: OutputPreservation | None, metrics: dict | None = None) -> torch.Tensor:
        return diffusion_loss(family, b, cfg, torch.Generator().manual_seed(5), CPU, preservation, metrics)

    metrics: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        assert torch.equal(loss(batch, dop, metrics), loss(batch, None))
    assert metrics["preservation_loss"].item() == 0.0

    _perturb(params)
    with torch.no_grad():
        whole, plain = loss(batch, dop, metrics), loss(batch, None)
        pieces = [loss(batch.part(k, 4), dop) for k in range(4)]
    assert metrics["preservation_loss"].item() > 0
    assert whole.item() == pytest.approx(plain.item() + metrics["preservation_loss"].item(), rel=1e-5)
    assert sum(p.item() for p in pieces) == pytest.approx(whole.item(), rel=1e-4)


def test_preservation_config_errors(tmp_path: Path) -> None:
    full = tiny_job(tmp_path)
    full["train"].update({"diff_output_preservation": True, "diff_output_preservation_class": "person"})
    with pytest.raises(ValidationError, match="train.diff_output_preservation needs adapter training"):
        JobConfig.model_validate(full)
    no_trigger = tiny_job(tmp_path, network={"type": "lora"})
    no_trigger["train"].update({"diff_output_preservation": True, "diff_output_preservation_class": "x"})
    with pytest.raises(ValidationError, match="set datasets\\[\\].trigger_word"):
        JobConfig.model_validate(no_trigger)
    no_class = tiny_job(tmp_path, network={"type": "lora"})
    no_class["train"]["diff_output_preservation"] = True
    with pytest.raises(ValidationError, match="needs train.diff_output_preservation_class"):
        JobConfig.model_validate(no_class)


def test_class_dataset_names_and_errors(tmp_path: Path) -> None:
    d = DatasetConfig.model_validate(
        {"class_data_dir": str(tmp_path / "c"), "is_reg": True, "class_prompt": "a circle",
         "num_class_images": 5, "prior_loss_weight": 0.5}
    )  # fmt: skip
    assert (d.folder_path, d.loss_weight, missing_class_images(d)) == (str(tmp_path / "c"), 0.5, 5)
    with pytest.raises(ValidationError, match="class_prompt generates regularisation images"):
        DatasetConfig(folder_path=str(tmp_path), class_prompt="a circle")
    with pytest.raises(ValidationError, match="class_data_dir and folder_path name the same setting"):
        DatasetConfig.model_validate({"folder_path": "a", "class_data_dir": "b"})


def test_class_files_never_replace_a_users_file(tmp_path: Path) -> None:
    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "class_00000.jpg")
    (folder / "class_00002.txt").write_text("the user's caption", encoding="utf-8")
    assert free_indices(folder, 3, "txt") == [1, 3, 4]
    image = Image.new("RGB", (8, 8), (9, 9, 9))
    path = write_class_example(folder, 1, image, "a circle", "txt")
    assert path.name == "class_00001.png" and (folder / "class_00001.txt").read_text() == "a circle\n"
    with pytest.raises(FileExistsError):
        write_class_example(folder, 2, image, "a circle", "txt")
    assert (folder / "class_00002.txt").read_text() == "the user's caption"

    class Broken:
        def save(self, *args: object, **kwargs: object) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_class_example(folder, 5, Broken(), "a circle", "txt")  # type: ignore[arg-type]
    assert not (folder / "class_00005.png").exists()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # the temporary file is gone
    (folder / "class_00005.txt").unlink()  # the caption went first: an orphan, never an uncaptioned image
    assert sorted(p.name for p in folder.iterdir()) == [
        "class_00000.jpg", "class_00001.png", "class_00001.txt", "class_00002.txt"
    ]  # fmt: skip


def _concept_lora(tmp_path: Path, preserve: bool) -> tuple[float, float]:
    """Train a rank-4 LoRA for 30 steps on black shapes captioned ``sks, a black ...`` from the same random
    tiny base; (how far its predictions moved on prompts without the trigger, ... with it)."""
    job = tiny_job(tmp_path, network={"type": "lora", "linear": 4, "linear_alpha": 4})
    job["datasets"][0].update(trigger_word="sks", caption_dropout_rate=0.0, folder_path=str(tmp_path / "k"))
    job["datasets"][0]["synthetic"].update(colours=["black"], held_out=[])
    job["train"].update(diff_output_preservation=preserve, diff_output_preservation_class="")
    cfg = JobConfig.model_validate(job)
    family = build_family("tiny", dict(TINY_OPTIONS), seed=0, captions=job_captions(cfg) + LEAK_PROMPTS)
    params = trainable_parameters(family, cfg)
    dop = OutputPreservation.for_stage(cfg, single_stage_plan(cfg, family).config, cfg.datasets, family)
    optimizer = torch.optim.AdamW(params.values(), lr=5e-3, weight_decay=0)
    data = TrainingData(cfg.datasets, 8, 0, family.size_multiple())
    for step in range(30):
        loss = diffusion_loss(family, data.batch(step), cfg, step_generator(0, step, 0), CPU, dop)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    noisy = torch.randn((4, *family.latent_shape(16, 16)), generator=torch.Generator().manual_seed(7))
    t = torch.tensor([50, 300, 600, 900])

    def moved(prompts: list[str]) -> float:
        with torch.no_grad():
            adapted = family.predict(noisy, t, family.encode_prompt(prompts))
            with adapters_disabled(family):
                base = family.predict(noisy, t, family.encode_prompt(prompts))
        return (adapted - base).pow(2).mean().item()

    return moved(LEAK_PROMPTS), moved([f"sks, {p}" for p in LEAK_PROMPTS[:2]] * 2)


LEAK_PROMPTS = ["a black circle", "a black square", "a red circle", "a blue triangle"]


def test_output_preservation_keeps_prompts_without_the_trigger(tmp_path: Path) -> None:
    leak, _ = _concept_lora(tmp_path, preserve=False)
    kept, concept = _concept_lora(tmp_path, preserve=True)
    # measured: 0.078 without, 0.0034 with (23x less); the trigger prompts still moved by 0.021
    assert kept < 0.25 * leak
    assert concept > 3 * kept  # the adapter still learned something for its trigger word
