"""Hub ids as model.name_or_path resolve from the local Hugging Face cache only, never the network."""

from __future__ import annotations

from pathlib import Path

import pytest

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.models import load_family
from eridiffusion.models.hub import hub_cache_dir, looks_like_hub_id, resolve_model_path
from tests.conftest import tiny_job, write_yaml
from tests.e2e.test_aitoolkit_configs import cache_tiny


def test_cache_dir_follows_the_environment_at_call_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == tmp_path / "cache"


@pytest.mark.parametrize(
    ("text", "is_id"),
    [
        ("black-forest-labs/FLUX.1-dev", True),
        ("stabilityai/stable-diffusion-xl-base-1.0", True),
        ("models/sdxl.safetensors", False),
        ("/abs/path", False),
        ("./rel/model", False),
        ("a/b/c", False),
    ],
)
def test_hub_id_shape(text: str, is_id: bool) -> None:
    assert looks_like_hub_id(text) is is_id


def test_cached_snapshot_loads_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cache_tiny(tmp_path / "hub", "black-forest-labs/FLUX.1-dev", "flux")
    assert resolve_model_path("black-forest-labs/FLUX.1-dev") == snapshot
    assert load_family("black-forest-labs/FLUX.1-dev").arch == "flux"


def test_missing_hub_id_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    job = tiny_job(tmp_path, model={"name_or_path": "black-forest-labs/FLUX.1-dev"})
    assert main(["validate", str(write_yaml(tmp_path / "job.yaml", job))]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert (
        "model.name_or_path: 'black-forest-labs/FLUX.1-dev' is not a local file or folder; it looks like "
        in err
    )
    assert f"not in the local Hugging Face cache ({tmp_path / 'empty'}). eri runs offline" in err
    assert "`hf download black-forest-labs/FLUX.1-dev`" in err
    assert "or point model.name_or_path at a local diffusers folder or single .safetensors file" in err


def test_missing_local_path_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"^--model: model path '.*nowhere.safetensors' does not exist"
    ):
        load_family(tmp_path / "nowhere.safetensors", where="--model")
