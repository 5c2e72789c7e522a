"""Multi-stage pipelines: validation, a 3-step run, loss-threshold transitions, mid-stage resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from eridiffusion.cli import EXIT_USER_ERROR, main, print_pipeline_summary
from eridiffusion.training import loop
from tests.conftest import TINY_OPTIONS, tiny_job, write_yaml


def pipeline_job(root: Path, name: str = "p", **pipeline: Any) -> dict[str, Any]:
    job = tiny_job(root, name=name)
    job["model"]["options"] = {**TINY_OPTIONS, "latent": "autoencoder", "vae_channels": [16, 32]}
    job["train"]["ema"] = {"enabled": False}
    job["save"] = {"every": 2, "keep": 10}
    job["pipeline"] = pipeline or {
        "defaults": {"optimizers": {"default": {"lr": 1e-3, "lr_scheduler": "cosine"}}},
        "steps": [
            {
                "name": "ae",
                "kind": "autoencoder",
                "trainable": ["vae", "discriminator"],
                "max_steps": 3,
                "autoencoder": {"discriminator": True, "disc_start": 1},
                "optimizers": {"discriminator": {"lr": 2e-4}},
            },
            {
                "name": "diffusion",
                "trainable": ["denoiser", "text_encoder"],
                "frozen": ["vae"],
                "n_epochs": 1,
                "transition": {"type": "epoch"},
            },
            {
                "name": "concept",
                "trainable": ["lora"],
                "network": {"type": "lora", "linear": 2},
                "max_steps": 3,
            },
        ],
    }
    return job


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved component folder (diffusers and transformers name their files differently)."""
    (file,) = folder.glob("*.safetensors")
    return load_file(file)


def _model_weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("unet", "vae", "text_encoder"):
        out.update({f"{part}.{k}": v for k, v in _weights(run / "model" / part).items()})
    return out


def test_validate_prints_each_step_with_its_trainable_parameters(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = write_yaml(tmp_path / "p.yaml", pipeline_job(tmp_path))
    assert main(["validate", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "pipeline of 3 step(s)" in out
    assert "[0] ae (autoencoder)" in out and "trains discriminator:" in out
    assert "[1] diffusion (diffusion): 48 images, batch 8, up to 6 steps; ends after 1 epoch(s)" in out
    assert "trains lora: " in out and "frozen: denoiser, text_encoder, vae" in out
    assert not (tmp_path / "output").exists()


def test_validate_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = pipeline_job(tmp_path)
    job["model"]["options"] = dict(TINY_OPTIONS)  # no autoencoder in this model
    job["pipeline"]["steps"][1]["trainable"] = ["denoiser", "unet"]
    assert main(["validate", str(write_yaml(tmp_path / "p.yaml", job))]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "pipeline.steps[0] (ae): unknown component 'vae'" in err
    assert "kind autoencoder needs a model with a vae" in err
    assert "pipeline.steps[1] (diffusion): unknown component 'unet'" in err

    bad = pipeline_job(tmp_path)
    bad["pipeline"]["steps"][2].pop("network")
    bad["pipeline"]["steps"][1]["max_steps"] = 3
    bad["pipeline"]["steps"][0]["optimizers"]["denoiser"] = {"lr": 1}
    cached = pipeline_job(tmp_path)
    cached["datasets"][0]["cache_text_embeddings"] = True  # the diffusion step trains the text encoder
    cached["pipeline"]["steps"][1]["trainable"] = ["denoiser", "text_encoder", "vae"]
    cached["pipeline"]["steps"][1]["frozen"] = []
    cached["datasets"][0]["cache_latents_to_disk"] = True
    assert main(["validate", str(write_yaml(tmp_path / "c.yaml", cached))]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "pipeline.steps[1] (diffusion): cache_latents_to_disk needs a frozen vae" in err
    assert "pipeline.steps[1] (diffusion): cache_text_embeddings needs frozen text encoders" in err
    assert "steps[0]" not in err and "steps[2]" not in err  # autoencoder reads pixels; lora freezes all
    assert main(["validate", str(write_yaml(tmp_path / "b.yaml", bad))]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    assert "pipeline.steps[0]" in err and "optimizers for components this step does not train" in err
    assert "pipeline.steps[1]" in err and "exactly one of max_steps or n_epochs" in err
    assert "pipeline.steps[2]" in err and "`lora` trainable component and a `network` section" in err


def test_three_step_pipeline_writes_each_stage_and_a_summary(tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path / "p.yaml", pipeline_job(tmp_path))
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "output" / "p"
    summary = json.loads((run / "pipeline_summary.json").read_text())
    assert [summary[s]["steps"] for s in ("ae", "diffusion", "concept")] == [3, 6, 3]
    assert "final_d_loss" in summary["ae"] and "final_loss" in summary["diffusion"]
    for stage in ("0-ae", "1-diffusion", "2-concept"):
        assert (run / "stages" / stage / "model" / "eri_family.json").is_file()
    assert (run / "stages" / "2-concept" / "concept.safetensors").is_file()
    # the autoencoder step calibrated the latent scale; later steps kept the vae frozen
    vae_cfg = json.loads((run / "stages" / "0-ae" / "model" / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] != 1.0
    ae_vae = _weights(run / "stages" / "0-ae" / "model" / "vae")
    final_vae = _weights(run / "model" / "vae")
    assert all(torch.equal(ae_vae[k], final_vae[k]) for k in ae_vae)
    stages = [json.loads(x).get("stage") for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert stages[:3] == ["ae"] * 3 and stages[-1] == "concept"


def test_loss_threshold_ends_a_step_early(tmp_path: Path) -> None:
    job = pipeline_job(
        tmp_path,
        steps=[
            {
                "name": "d",
                "trainable": ["denoiser"],
                "max_steps": 50,
                "transition": {"type": "loss_threshold", "threshold": 10.0, "patience": 2, "min_steps": 3},
            },
        ],
    )
    job["model"]["options"] = dict(TINY_OPTIONS)
    assert main(["train", str(write_yaml(tmp_path / "p.yaml", job))]) == 0
    summary = json.loads((tmp_path / "output" / "p" / "pipeline_summary.json").read_text())
    assert summary["d"]["steps"] == 4  # below 10 from the start; counted from step 3, twice -> ends at 4


def ema_cached_job(root: Path, name: str) -> dict[str, Any]:
    """EMA on every step and latents cached for the steps after the autoencoder's."""
    job = pipeline_job(root, name=name)
    job["train"]["ema"] = {"enabled": True, "decay": 0.9}
    job["datasets"][0]["cache_latents_to_disk"] = True
    return job


def test_kill_mid_stage_then_resume_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    whole = write_yaml(tmp_path / "w.yaml", ema_cached_job(tmp_path, name="whole"))
    assert main(["train", str(whole)]) == 0

    crash = write_yaml(tmp_path / "c.yaml", ema_cached_job(tmp_path, name="crash"))

    def die(state: loop.TrainState) -> None:
        if state.step == 7:  # inside the diffusion step (3 ae + 4 of 6); last checkpoint at step 6
            raise KeyboardInterrupt

    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda cfg: real_train(cfg, on_step=die))
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(crash)])
    state = json.loads(
        (tmp_path / "output" / "crash" / "checkpoints" / "step_000006" / "state.json").read_text()
    )
    assert (state["stage"], state["stage_name"], state["stage_step"]) == (1, "diffusion", 3)
    assert (tmp_path / "output" / "crash" / "checkpoints" / "step_000006" / "ema.safetensors").is_file()
    monkeypatch.setattr(loop, "train", real_train)
    assert main(["train", str(crash)]) == 0

    a, b = _model_weights(tmp_path / "output" / "whole"), _model_weights(tmp_path / "output" / "crash")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lora_a = load_file(tmp_path / "output" / "whole" / "stages" / "2-concept" / "concept.safetensors")
    lora_b = load_file(tmp_path / "output" / "crash" / "stages" / "2-concept" / "concept.safetensors")
    assert all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)

    changed = ema_cached_job(tmp_path, name="crash")
    changed["pipeline"]["steps"][1]["n_epochs"] = 2
    assert main(["train", str(write_yaml(tmp_path / "c2.yaml", changed))]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "pipeline config changed" in err and "steps[1].n_epochs" in err


def test_ema_is_the_steps_result_and_caches_follow_the_trained_autoencoder(tmp_path: Path) -> None:
    """With EMA the saved stage model is the average, not the last weights; the latent cache of the
    diffusion step is computed with the autoencoder the first step trained (its own model id)."""
    job = ema_cached_job(tmp_path, name="e")
    job["pipeline"]["steps"] = job["pipeline"]["steps"][:2]
    job["pipeline"]["steps"][1]["ema"] = {"enabled": True, "decay": 0.5, "warmup": False}
    assert main(["train", str(write_yaml(tmp_path / "e.yaml", job))]) == 0
    plain = pipeline_job(tmp_path, name="plain")
    plain["pipeline"]["steps"] = plain["pipeline"]["steps"][:2]
    assert main(["train", str(write_yaml(tmp_path / "plain.yaml", plain))]) == 0
    e, p = tmp_path / "output" / "e", tmp_path / "output" / "plain"
    # the autoencoder step's EMA (decay 0.9) changes its result; the discriminator has no EMA and no output
    ae_e = _weights(e / "stages" / "0-ae" / "model" / "vae")
    ae_p = _weights(p / "stages" / "0-ae" / "model" / "vae")
    assert any(not torch.equal(ae_e[k], ae_p[k]) for k in ae_e)
    unet_e, unet_p = _weights(e / "model" / "unet"), _weights(p / "model" / "unet")
    assert any(not torch.equal(unet_e[k], unet_p[k]) for k in unet_e)
    (latents,) = (tmp_path / "shapes").rglob("latents")
    assert len(list(latents.iterdir())) == 1  # one model id: the trained autoencoder's
    assert len(list(latents.rglob("*.safetensors"))) == 48


def test_a_concept_step_on_its_own_dataset_is_scored_into_the_summary(tmp_path: Path) -> None:
    """A LoRA step on a generated new-concept set, evaluated on the pair that set held out."""
    job = pipeline_job(tmp_path, name="c")
    concept = job["pipeline"]["steps"][2]
    concept["datasets"] = [
        {
            "folder_path": str(tmp_path / "black"),
            "resolution": 16,
            "synthetic": {"n": 16, "resolution": 16, "colours": ["black"], "held_out": ["black triangle"]},
        }
    ]
    # regularisation images from the folder the job's dataset generates: no need to repeat `synthetic`
    concept["datasets"].append({"folder_path": str(tmp_path / "shapes"), "resolution": 16, "is_reg": True})
    concept["eval"] = {"images_per_prompt": 1, "steps": 2}
    assert not (tmp_path / "shapes").exists()
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", job))]) == 0
    run = tmp_path / "output" / "c"
    summary = json.loads((run / "pipeline_summary.json").read_text())
    assert {"eval_colour", "eval_shape", "eval_both"} <= set(summary["concept"])
    assert "eval_colour" not in summary["diffusion"]
    report = json.loads((run / "stages" / "2-concept" / "eval.json").read_text())
    assert report["n"] == 4 and {r["target_colour"] for r in report["per_prompt"]} == {"black"}
    assert (run / "stages" / "2-concept" / "eval_grid.png").is_file()
    captions = {p.read_text().split()[3] for p in (tmp_path / "black").glob("[0-9]*.txt")}
    assert captions <= {"circle", "square"}


def test_a_bad_concept_dataset_is_an_error_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job = pipeline_job(tmp_path, name="bad")
    job["datasets"][0]["folder_path"] = str(tmp_path / "mauve")
    job["datasets"][0]["synthetic"]["colours"] = ["mauve"]
    assert main(["train", str(write_yaml(tmp_path / "b.yaml", job))]) == EXIT_USER_ERROR
    assert "datasets[0].synthetic.colours: unknown ['mauve']" in capsys.readouterr().err


def test_an_epoch_step_runs_the_epochs_the_loader_counts(tmp_path: Path) -> None:
    """`eri validate` estimates from file counts; training lasts the epochs the loader really serves (a
    dataset weight of 2 doubles them), with the LR schedule over that length."""
    job = pipeline_job(tmp_path, name="w")
    job["datasets"][0]["weight"] = 2.0
    job["pipeline"]["steps"] = [job["pipeline"]["steps"][1]]
    assert main(["train", str(write_yaml(tmp_path / "w.yaml", job))]) == 0
    summary = json.loads((tmp_path / "output" / "w" / "pipeline_summary.json").read_text())
    assert summary["diffusion"]["steps"] == 12  # 48 images x 2 / batch 8


def test_a_text_encoder_only_lora_step_changes_the_text_encoder_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``network.components: [text_encoder]`` in a pipeline step: the plan counts its parameters, the
    exported file holds text-encoder adapters only, and merging it changes the text encoder alone."""
    job = pipeline_job(tmp_path, name="te")
    job["pipeline"]["steps"][2]["network"]["components"] = ["text_encoder"]
    config = write_yaml(tmp_path / "te.yaml", job)
    assert main(["validate", str(config)]) == 0
    planned = capsys.readouterr().out
    assert main(["train", str(config)]) == 0
    run = tmp_path / "output" / "te"
    (adapter,) = (run / "stages" / "2-concept").glob("*.safetensors")
    tensors = load_file(adapter)
    assert tensors and all(k.startswith("lora_te") for k in tensors), list(tensors)[:3]
    trained = sum(v.numel() for k, v in tensors.items() if not k.endswith(".alpha"))
    assert f"trains lora: {trained:,} params" in planned
    before = {
        f"{part}.{k}": v
        for part in ("unet", "vae", "text_encoder")
        for k, v in _weights(run / "stages" / "1-diffusion" / "model" / part).items()
    }
    after = _model_weights(run)
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"text_encoder"}


def test_cached_text_embeddings_with_a_text_encoder_adapter_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job = pipeline_job(tmp_path, name="tc")
    concept = job["pipeline"]["steps"][2]
    concept["network"]["components"] = ["text_encoder"]
    concept["datasets"] = [{**job["datasets"][0], "cache_text_embeddings": True}]
    assert main(["validate", str(write_yaml(tmp_path / "tc.yaml", job))]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "pipeline.steps[2].datasets[0].cache_text_embeddings" in err
    assert "pipeline.steps[2].network.components adapts the text encoders" in err


def test_an_autoencoder_steps_eval_scores_its_reconstructions_against_the_captions(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A codec that draws one colour as another fails every later prompt for it; the step's eval shows it
    before any diffusion training, next to the same classifier's score on the source images."""
    job = pipeline_job(
        tmp_path,
        steps=[
            {
                "name": "ae",
                "kind": "autoencoder",
                "trainable": ["vae"],
                "max_steps": 2,
                "eval": {"images_per_prompt": 1},
            }
        ],
    )
    assert main(["train", str(write_yaml(tmp_path / "p.yaml", job))]) == 0
    run = tmp_path / "output" / "p"
    report = json.loads((run / "stages" / "0-ae" / "eval.json").read_text())
    assert report["n"] == 48  # the whole 48-image set (up to 96 are scored)
    captions = {f.read_text(encoding="utf-8").strip() for f in (tmp_path / "shapes").glob("*.txt")}
    assert {r["prompt"] for r in report["per_prompt"]} <= captions
    assert report["source_images"]["colour"] > 0.9  # the classifier reads the sources; the codec is the test
    assert 0 <= report["colour_accuracy"] <= 1 and report["mse"] > 0
    assert (run / "stages" / "0-ae" / "eval_grid.png").is_file()
    summary = json.loads((run / "pipeline_summary.json").read_text())
    assert summary["ae"]["recon_colour"] == report["colour_accuracy"]
    assert not any(k.startswith("eval_") for k in summary["ae"])  # not prompt adherence: nothing generated
    capsys.readouterr()
    print_pipeline_summary(run)
    assert "reconstructions against captions" in capsys.readouterr().out
