"""What a client can make `eri serve` open, read or spend: names confined to the configured folders (no
existence oracle, no server paths echoed), auth on every route but /health (docs included), body and
image-size limits, and no echo of unknown fields."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.config.schema import NetworkConfig
from eridiffusion.inference.generator import Generator, UnknownName, discover_models
from eridiffusion.models import build_family
from eridiffusion.networks import attach_network, export_network
from eridiffusion.serving import ServeSettings, create_app
from tests.conftest import TINY_OPTIONS

SMALL = {"width": 16, "height": 16, "steps": 2}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/a, loras/{style, sub/ink, escape -> ../outside/evil}, outside/evil (a real LoRA too) and
    controlnets/{escape -> ../outside/evil_cn}, outside/evil_cn (a ControlNet-shaped folder)."""
    root = tmp_path_factory.mktemp("security")
    build_family("tiny", TINY_OPTIONS, seed=0).save_pretrained(root / "models" / "a")
    family = build_family("tiny", TINY_OPTIONS, seed=0)
    cfg = NetworkConfig(type="lora", linear=4, linear_alpha=4)
    attach_network(family, cfg, train_text_encoder=False, seed=0)
    for folder in ("loras", "loras/sub", "outside", "controlnets", "outside/evil_cn"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    lora = root / "outside" / "evil.safetensors"
    export_network(family, cfg, lora, "kohya", "fp32", {})
    for inside in ("loras/style.safetensors", "loras/sub/ink.safetensors"):
        (root / inside).write_bytes(lora.read_bytes())
    (root / "loras" / "escape.safetensors").symlink_to(lora)
    (root / "outside" / "evil_cn" / "config.json").write_text("{}")
    (root / "controlnets" / "escape").symlink_to(root / "outside" / "evil_cn")
    return root


def _generator(root: Path) -> Generator:
    return Generator(
        discover_models([root / "models"]),
        device="cpu",
        lora_dirs=[root / "loras"],
        controlnet_dirs=[root / "controlnets"],
    )


@pytest.fixture
def client(root: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_generator(root), ServeSettings(max_width=64, max_height=64))) as c:
        yield c


def _hint() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _no_server_paths(text: str, root: Path) -> None:
    for secret in (str(root), os.getcwd(), "passwd:", "root:x"):
        assert secret not in text, text


def test_lora_names_resolve_only_inside_the_lora_folders(client: TestClient, root: Path) -> None:
    outside = str(root / "outside" / "evil.safetensors")
    cases = [
        {"loras": [{"name": outside}]},
        {"prompt": f"a <lora:{outside}:1>"},
        {"prompt": "a <lora:loras/../outside/evil.safetensors:1>"},
        {"loras": [{"name": "../outside/evil"}]},
        {"loras": [{"name": "escape"}]},  # a symlink inside the folder pointing out of it
        {"loras": [{"name": "/etc/passwd"}]},
        {"loras": [{"name": "/no/such/file.safetensors"}]},
        {"loras": [{"name": "missing"}]},
    ]
    for body in cases:
        res = client.post("/v1/generate", json={"prompt": "a", **SMALL, **body})
        assert res.status_code == 404, (body, res.text)
        detail = res.json()["detail"]
        assert detail.startswith("unknown LoRA '") and detail.count("'") == 2, detail
        _no_server_paths(detail.replace(outside, ""), root)
    # the same text for an existing and a missing file: no existence oracle
    texts = {
        client.post("/v1/generate", json={"prompt": "a", **SMALL, "loras": [{"name": n}]})
        .json()["detail"]
        .replace(n, "NAME")
        for n in ("/etc/passwd", "/no/such/file", outside, "missing")
    }
    assert texts == {"unknown LoRA 'NAME'"}
    assert [lo["name"] for lo in client.get("/sdapi/v1/loras").json()] == ["style"]  # escape is not listed
    for name in ("style", "sub/ink", "sub/ink.safetensors"):
        res = client.post("/v1/generate", json={"prompt": f"a <lora:{name}:0.5>", **SMALL})
        assert res.status_code == 200, (name, res.text)


def test_controlnet_and_checkpoint_names_resolve_only_inside_their_folders(
    client: TestClient, root: Path
) -> None:
    for model in (str(root / "outside" / "evil_cn"), "/proc/self/cwd", "../outside/evil_cn", "escape"):
        res = client.post(
            "/v1/generate", json={"prompt": "a", **SMALL, "controlnet": {"model": model, "image": _hint()}}
        )
        assert res.status_code == 404 and res.json()["detail"] == f"unknown ControlNet {model!r}", res.text
        unit = {"model": model, "image": _hint()}
        res = client.post(
            "/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
        )
        assert res.status_code == 404 and res.json()["detail"] == f"unknown ControlNet {model!r}"
    assert client.get("/controlnet/model_list").json() == {"model_list": []}
    for name in ("/etc/passwd", str(root / "models" / "a"), "../models/a", "missing"):
        for res in (
            client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name}),
            client.post(
                "/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": name}}
            ),
            client.post("/v1/generate", json={"prompt": "a", **SMALL, "model": name}),
        ):
            assert res.status_code == 404, res.text
            assert res.json()["detail"].replace(repr(name), "NAME").endswith("NAME; available: ['a']")
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("a [")


def test_cli_generator_still_takes_paths_and_a_server_refuses_one(root: Path) -> None:
    cli = Generator(discover_models([root / "models"]), device="cpu", allow_paths=True)
    assert cli.resolve_lora(str(root / "outside" / "evil.safetensors")).name == "evil.safetensors"
    with pytest.raises(UnknownName):
        _generator(root).resolve_lora(str(root / "outside" / "evil.safetensors"))
    with pytest.raises(ValueError, match="allow_paths=False"):
        create_app(cli)


def test_docs_need_the_key_unless_public(root: Path) -> None:
    key = {"X-API-Key": "k"}
    with TestClient(create_app(_generator(root), ServeSettings(api_key="k"))) as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            res = c.get(path)
            assert res.status_code == 401 and res.headers["WWW-Authenticate"].startswith("Basic")
            assert c.get(path, headers=key).status_code == 200
        assert "/sdapi/v1/txt2img" in c.get("/openapi.json", headers=key).json()["paths"]
        # Basic auth: the password is the key, the user name is ignored
        assert c.get("/v1/models", auth=("anyone", "k")).status_code == 200
        assert c.get("/v1/models", auth=("k", "wrong")).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Basic %%%"}).status_code == 401
        assert c.get("/health").status_code == 200
    public = ServeSettings(api_key="k", public_docs=True)
    with TestClient(create_app(_generator(root), public)) as c:
        assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200
        assert c.get("/v1/models").status_code == 401


def test_an_empty_api_key_is_refused(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="API key is empty"):
        ServeSettings(api_key="")
    code = main(["serve", "--model", str(root / "models"), "--api-key", ""])
    assert code == EXIT_USER_ERROR and "API key is empty" in capsys.readouterr().err


def _png_header_only(width: int, height: int) -> str:
    """A valid PNG header declaring ``width`` x ``height`` with almost no data: a decompression bomb's
    first bytes, enough for Pillow to read the size without decoding anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return base64.b64encode(png + chunk(b"IEND", b"")).decode()


def test_body_and_image_size_limits(root: Path) -> None:
    settings = ServeSettings(max_body_bytes=4096, max_image_pixels=32 * 32)
    with TestClient(create_app(_generator(root), settings)) as c:
        big = json.dumps({"prompt": "a", "junk": "x" * 5000})
        res = c.post("/sdapi/v1/txt2img", content=big, headers={"content-type": "application/json"})
        assert res.status_code == 413 and "4096 bytes" in res.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        res = c.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
        assert res.status_code == 413
        for data in (_png_header_only(15000, 15000), _png_header_only(33, 32)):
            res = c.post("/sdapi/v1/png-info", json={"image": data})
            assert res.status_code == 422 and "above the limit of 1024 pixels" in res.json()["detail"]
            res = c.post("/v1/generate", json={"prompt": "a", **SMALL, "init_image": data})
            assert res.status_code == 422 and res.json()["detail"].startswith("init image is")
        assert c.get("/health").status_code == 200
    with TestClient(create_app(_generator(root))) as c:  # default limits: Pillow's own bomb check is no 500
        res = c.post("/sdapi/v1/png-info", json={"image": _png_header_only(15000, 15000)})
        assert res.status_code == 422


def test_unknown_a1111_fields_are_not_echoed(client: TestClient) -> None:
    res = client.post("/sdapi/v1/txt2img", json={**SMALL, "junk": "x" * 10000, "prompt": "a"})
    assert res.status_code == 200 and "junk" not in res.json()["parameters"]
    assert res.json()["parameters"]["prompt"] == "a" and len(res.text) < 20000


def test_validation_errors_do_not_echo_the_input(client: TestClient) -> None:
    res = client.post("/v1/generate", json={"prompt": "a", "steps": "x" * 10000})
    assert res.status_code == 422 and "xxxx" not in res.text


def test_serve_flags_reach_the_app(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    served: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.setenv("ERI_API_KEY", "from-env")
    args = ["serve", "--model", str(root / "models"), "--lora-dir", str(root / "loras"), "--public-docs"]
    assert main([*args, "--max-body-mb", "1.5", "--max-image-mp", "2"]) == 0
    server = served["app"].state.server
    settings = server.settings
    assert (settings.api_key, settings.public_docs) == ("from-env", True)
    assert (settings.max_body_bytes, settings.max_image_pixels) == (int(1.5 * 2**20), 2_000_000)
    assert server.generator.model_roots == [root / "models"] and not server.generator.allow_paths
