"""A1111-style long prompts (opt-in) on SD1.5 and SDXL: short prompts encode exactly as without chunking,
long ones keep their words past the window, and every prompt of a batch gets the same number of chunks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from eridiffusion.cli import main
from eridiffusion.inference.generate import GenerateRequest, encode_prompts, sample
from eridiffusion.models import ModelFamily, build_family
from eridiffusion.models.prompt_chunks import ChunkedPrompts
from eridiffusion.models.prompts import find_truncations
from tests.conftest import TINY_OPTIONS


def _family(arch: str) -> ModelFamily:
    family = build_family(arch, {"preset": "tiny"}, seed=0)
    for module in family.modules().values():
        module.eval()
    return family


def _window(family: ModelFamily) -> int:
    return min(limit.max_length for limit in family.prompt_limits())  # type: ignore[attr-defined]


def _long(family: ModelFamily, last: str) -> str:
    """A prompt whose last word sits past the window (``red`` is one token)."""
    return " ".join(["red"] * _window(family)) + f" {last}"


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_short_prompts_encode_exactly_as_without_chunks(arch: str) -> None:
    family = _family(arch)
    assert isinstance(family, ChunkedPrompts)
    prompts = ["a red circle", "", "a blue square on the left"]
    with torch.no_grad():
        plain = family.encode_prompt(prompts)
        with family.chunked_prompts():
            chunked = family.encode_prompt(prompts)
    assert plain.keys() == chunked.keys()
    for key in plain:
        torch.testing.assert_close(chunked[key], plain[key], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_long_prompts_keep_words_past_the_window(arch: str) -> None:
    family = _family(arch)
    length = _window(family)
    circle, square = _long(family, "circle"), _long(family, "square")
    with torch.no_grad():
        plain = family.encode_prompt([circle, square])
        with family.chunked_prompts():
            assert find_truncations(family, [circle]) == []  # nothing is cut while chunking
            chunked = family.encode_prompt([circle, square])
    torch.testing.assert_close(plain["context"][0], plain["context"][1])  # cut: the same prompt
    assert chunked["context"].shape[1] == 2 * length
    assert not torch.allclose(chunked["context"][0], chunked["context"][1])
    # the first chunk is the truncating encoding; SDXL's pooled output is the first chunk's
    torch.testing.assert_close(chunked["context"][:, :length], plain["context"], rtol=1e-5, atol=1e-6)
    if "pooled" in plain:
        torch.testing.assert_close(chunked["pooled"], plain["pooled"], rtol=1e-5, atol=1e-6)


def test_a_batch_pads_short_prompts_with_empty_chunks() -> None:
    family = _family("sd15")
    length, prompt = _window(family), _long(family, "circle")
    with torch.no_grad():
        with family.chunked_prompts():
            both = family.encode_prompt(["a red circle", prompt])["context"]
        short = family.encode_prompt(["a red circle"])["context"]
        empty = family.encode_prompt([""])["context"]
    assert both.shape[1] == 2 * length
    torch.testing.assert_close(both[0, :length], short[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[0, length:], empty[0], rtol=1e-5, atol=1e-6)


def test_generate_chunks_on_request_and_warns_when_it_cuts(caplog: pytest.LogCaptureFixture) -> None:
    family = _family("sd15")
    circle, square = _long(family, "circle"), _long(family, "square")
    base = {
        "steps": 2,
        "guidance_scale": 3.0,
        "negative_prompt": "blurry",
        "seeds": [1, 1],  # the same noise for both prompts
        "height": 32,
        "width": 32,
    }
    cond = encode_prompts(family, [circle], "blurry", "chunk")
    assert cond["context"].shape[0] == 2  # the prompt and its negative, with the same chunk count
    with caplog.at_level(logging.WARNING):
        cut = sample(family, GenerateRequest(prompts=[circle, square], **base))  # type: ignore[arg-type]
    assert "prompts cut: 2 of 2 prompts are longer than" in caplog.text
    torch.testing.assert_close(cut[0], cut[1])  # nothing past the window reached the model
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        chunked = sample(
            family,
            GenerateRequest(prompts=[circle, square], long_prompts="chunk", **base),  # type: ignore[arg-type]
        )
    assert "cut" not in caplog.text
    assert not torch.allclose(chunked[0], chunked[1])


def test_chunking_is_refused_where_it_does_not_apply(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tiny = build_family("tiny", TINY_OPTIONS, seed=0)
    with pytest.raises(ValueError, match="long_prompts chunk is for SD1.5/SDXL"):
        encode_prompts(tiny, ["a red circle"], None, "chunk")
    tiny.save_pretrained(tmp_path / "tiny")
    args = ["generate", "--model", str(tmp_path / "tiny"), "--prompt", "a red circle", "--steps", "2"]
    assert main([*args, "--long-prompts", "chunk", "--out", str(tmp_path / "g")]) == 2
    assert "long_prompts chunk is for SD1.5/SDXL" in capsys.readouterr().err

    sd = _family("sd15")
    sd.save_pretrained(tmp_path / "sd")
    args = ["generate", "--model", str(tmp_path / "sd"), "--prompt", _long(sd, "circle"), "--steps", "2"]
    assert (
        main(
            [
                *args,
                "--long-prompts",
                "chunk",
                "--width",
                "32",
                "--height",
                "32",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "s").glob("*.png"))) == 1
