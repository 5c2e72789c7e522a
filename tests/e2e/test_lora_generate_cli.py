"""`eri generate` with LoRA prompt tags: --lora-dir (default: the --lora folders), A1111's te/unet tag
forms, and the PNG ``parameters`` naming the LoRA as A1111 does, read back by our png-info parser."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from eridiffusion.cli import EXIT_USER_ERROR, main
from eridiffusion.config.schema import NetworkConfig
from eridiffusion.models import build_family, load_family
from eridiffusion.networks import AdapterSpec, apply_adapter_files, attach_network, export_network
from eridiffusion.serving.a1111_compat import parse_parameters


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1.5 model and a LoRA on its UNet and text encoder in loras/style.safetensors."""
    root = tmp_path_factory.mktemp("lora_gen")
    build_family("sd15", {"preset": "tiny"}, seed=0).save_pretrained(root / "model")
    trained = load_family(root / "model")
    cfg = NetworkConfig(type="lora", linear=4, linear_alpha=4)
    params = attach_network(trained, cfg, train_text_encoder=True, seed=2)
    with torch.no_grad():
        for p in params.values():
            p.normal_(0, 0.2)
    export_network(trained, cfg, root / "loras" / "style.safetensors", "kohya", "fp32", {})
    return root


def _generate(root: Path, prompt: str, out: str, *extra: str) -> int:
    args = ["generate", "--model", str(root / "model"), "--prompt", prompt, "--steps", "2", "--seed", "3"]
    return main([*args, *extra, "--out", str(root / out)])


def _image(root: Path, out: str) -> tuple[np.ndarray, str]:
    img = Image.open(root / out / "0000-3.png")
    return np.asarray(img).astype(int), img.info["parameters"]


def _addnet_shorthash(path: Path) -> str:
    """sd-scripts/A1111's LoRA hash, computed here independently: sha256 after the safetensors header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()[:12]


def test_tag_resolves_in_lora_dir_and_png_names_the_lora(setup: Path) -> None:
    root = setup
    loras = ["--lora-dir", str(root / "loras")]
    assert _generate(root, "a red circle <lora:style:0.7>", "tag", *loras) == 0
    assert _generate(root, "a red circle", "plain") == 0
    assert (
        _generate(root, "a red circle", "file", "--lora", f"{root / 'loras' / 'style.safetensors'}:0.7") == 0
    )
    tagged, text = _image(root, "tag")
    plain, plain_text = _image(root, "plain")
    from_file, file_text = _image(root, "file")
    assert np.abs(tagged - plain).max() > 0 and np.array_equal(tagged, from_file)

    fields = parse_parameters(text)
    shorthash = _addnet_shorthash(root / "loras" / "style.safetensors")
    assert fields["Prompt"] == "a red circle <lora:style:0.7>"  # A1111 keeps the tag in the prompt
    assert fields["Lora hashes"] == f"style: {shorthash}"
    assert f'Lora hashes: "style: {shorthash}"' in text
    assert "Lora hashes" not in parse_parameters(plain_text)
    # a --lora file is written as the tag A1111 needs to reproduce the image
    assert parse_parameters(file_text)["Prompt"] == "a red circle <lora:style:0.7>"
    assert parse_parameters(file_text)["Lora hashes"] == f"style: {shorthash}"


def test_lora_dir_defaults_to_the_lora_files_folder(setup: Path) -> None:
    """``--lora other.safetensors`` makes its folder the one tags are looked up in."""
    root = setup
    other = root / "loras" / "other.safetensors"
    save_file(load_file(root / "loras" / "style.safetensors"), other)
    assert _generate(root, "a red circle <lora:style:0.5>", "both", "--lora", f"{other}:0.5") == 0
    _, text = _image(root, "both")
    fields = parse_parameters(text)
    assert fields["Prompt"] == "a red circle <lora:style:0.5> <lora:other:0.5>"
    assert re.fullmatch(r"style: [0-9a-f]{12}, other: [0-9a-f]{12}", fields["Lora hashes"])


def test_separate_text_encoder_and_unet_multipliers(setup: Path, tmp_path: Path) -> None:
    """``<lora:style:te=0:unet=1>`` and ``<lora:style:0:1>`` apply the UNet part only: the same image as
    a file holding only the UNet tensors; ``<lora:style:1:0>`` only the text encoder's."""
    root = setup
    full = root / "loras" / "style.safetensors"
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in load_file(full).items() if k.startswith("lora_unet_")}, unet_only)
    loras = ["--lora-dir", str(root / "loras")]
    assert _generate(root, "a red circle <lora:style:te=0:unet=1>", "named", *loras) == 0
    assert _generate(root, "a red circle <lora:style:0:1>", "positional", *loras) == 0
    assert _generate(root, "a red circle <lora:style:1:0>", "te_only", *loras) == 0
    assert _generate(root, "a red circle", "unet_file", "--lora", str(unet_only)) == 0
    named, text = _image(root, "named")
    assert np.array_equal(named, _image(root, "positional")[0])
    assert np.array_equal(named, _image(root, "unet_file")[0])
    assert not np.array_equal(_image(root, "te_only")[0], named)
    assert parse_parameters(text)["Prompt"] == "a red circle <lora:style:te=0:unet=1>"

    te_only = load_family(root / "model")
    apply_adapter_files(te_only, [AdapterSpec(full, 0.0, 1.0)])
    base = load_family(root / "model")
    same = {
        c: all(torch.equal(v, base.modules()[c].state_dict()[k]) for k, v in m.state_dict().items())
        for c, m in te_only.modules().items()
    }
    assert same == {"denoiser": True, "text_encoder": False, "vae": True}


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a <lora:style:lbw=OUTALL>", "block weights .* not supported"),
        ("a <lora:style:strong>", "'strong' is not a number"),
        ("a <lora:missing:1>", "unknown LoRA 'missing'"),
    ],
)
def test_bad_tags_exit_2_with_the_reason(
    setup: Path, prompt: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    assert _generate(setup, prompt, "bad", "--lora-dir", str(setup / "loras")) == EXIT_USER_ERROR
    assert re.search(message, capsys.readouterr().err)


def test_missing_lora_dir_is_named(setup: Path, capsys: pytest.CaptureFixture) -> None:
    assert _generate(setup, "a <lora:style>", "x", "--lora-dir", str(setup / "nope")) == EXIT_USER_ERROR
    assert "--lora-dir" in capsys.readouterr().err
