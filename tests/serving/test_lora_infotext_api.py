"""The A1111 surface with LoRA tags: the PNG infotext names the LoRA (tag in the prompt, ``Lora hashes``)
and /sdapi/v1/png-info reads it back; a tag it cannot apply is a 422 naming the tag."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from eridiffusion.config.schema import NetworkConfig
from eridiffusion.inference.generator import Generator, discover_models
from eridiffusion.models import build_family
from eridiffusion.networks import attach_network, export_network
from eridiffusion.serving import ServeSettings, create_app
from tests.conftest import TINY_OPTIONS

SMALL = {"width": 16, "height": 16, "steps": 2}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    build_family("tiny", TINY_OPTIONS, seed=0).save_pretrained(tmp_path / "models" / "a")
    family = build_family("tiny", TINY_OPTIONS, seed=0)
    cfg = NetworkConfig(type="lora", linear=2, linear_alpha=2)
    attach_network(family, cfg, train_text_encoder=True)
    export_network(family, cfg, tmp_path / "loras" / "style.safetensors", "kohya", "fp32", {})
    generator = Generator(
        discover_models([tmp_path / "models"]), device="cpu", lora_dirs=[tmp_path / "loras"]
    )
    with TestClient(create_app(generator, ServeSettings())) as c:
        yield c


def test_txt2img_infotext_names_the_lora_and_png_info_reads_it(client: TestClient) -> None:
    prompt = "a red circle <lora:style:0.7:0.5>"
    out = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, **SMALL, "seed": 2})
    assert out.status_code == 200, out.text
    image = "data:image/png;base64," + out.json()["images"][0]
    info = client.post("/sdapi/v1/png-info", json={"image": image}).json()
    assert info["parameters"]["Prompt"] == prompt
    assert re.fullmatch(r"style: [0-9a-f]{12}", info["parameters"]["Lora hashes"])
    assert 'Lora hashes: "style: ' in info["info"]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [("x <lora:style:lbw=OUTALL>", "block weights"), ("x <lora:style:0.5:high>", "'high' is not a number")],
)
def test_unusable_tags_are_422(client: TestClient, prompt: str, message: str) -> None:
    out = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, **SMALL})
    assert out.status_code == 422 and message in out.json()["detail"]
