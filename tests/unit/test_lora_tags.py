"""A1111's ``<lora:...>`` tag forms: one multiplier, separate text-encoder/UNet ones, named ones; refusals."""

from __future__ import annotations

import pytest

from eridiffusion.inference.lora_tags import LoraTag, parse_lora_tag, split_lora_tags


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("<lora:x>", LoraTag("x", unet=1.0, te=1.0)),
        ("<lora:x:0.7>", LoraTag("x", unet=0.7, te=0.7)),
        ("<lora:x:0.7:0.5>", LoraTag("x", unet=0.5, te=0.7)),  # A1111: te first, then unet
        ("<lora:x:te=0.7:unet=0.5>", LoraTag("x", unet=0.5, te=0.7)),
        ("<lora:x:unet=0.5>", LoraTag("x", unet=0.5, te=1.0)),
        ("<lora:x:te=0.25>", LoraTag("x", unet=0.25, te=0.25)),  # unet follows te unless given
        ("<lora:x:0.8:unet=0.2>", LoraTag("x", unet=0.2, te=0.8)),
        ("<lora:my style v2:-1>", LoraTag("my style v2", unet=-1.0, te=-1.0)),
    ],
)
def test_a1111_tag_forms(tag: str, expected: LoraTag) -> None:
    assert parse_lora_tag(tag) == expected
    assert parse_lora_tag(expected.text()) == expected  # what the infotext writes reads back the same


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ("<lora:x:lbw=OUTALL>", "block weights .* are not supported"),
        ("<lora:x:1:lbw=1,0,0>", "block weights"),
        ("<lora:x:dyn=16>", "dyn= .* not supported"),
        ("<lora:x:abc>", "'abc' is not a number"),
        ("<lora:x:te=>", "'' is not a number"),
        ("<lora:x:1:0.5:0.2>", "has 3 numbers"),
        ("<lora:x:start=3>", "unknown argument 'start'"),
        ("<lora::0.5>", "names no LoRA"),
    ],
)
def test_unreadable_tags_are_errors_naming_the_tag(tag: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        split_lora_tags(f"a cat {tag}")
    assert tag in str(info.value) and "<lora:NAME:TE:UNET>" in str(info.value)


def test_split_keeps_the_prompt_and_every_tag() -> None:
    clean, tags = split_lora_tags("a <lora:x:0.5> cat <lora:y>  on <lora:z:1:0>a mat")
    assert clean == "a cat on a mat"
    assert tags == [LoraTag("x", 0.5, 0.5), LoraTag("y"), LoraTag("z", unet=0.0, te=1.0)]
    assert split_lora_tags("no tags <hypernet:h:1>") == ("no tags <hypernet:h:1>", [])
