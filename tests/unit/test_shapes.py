"""Synthetic shapes data: deterministic, held-out combos really held out, and a classifier that is right."""

import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from eridiffusion.data.shapes import (
    BACKGROUND,
    COLOURS,
    HELD_OUT,
    SHAPES,
    SIZE_RANGE,
    ShapeSpec,
    caption_for,
    captions_for,
    classify_image,
    held_out_prompts,
    parse_prompt,
    render_shape,
    sample_specs,
    score_images,
    write_shapes_dataset,
)

CAPTION_RE = re.compile(
    r"^a (small|large) (red|green|blue|yellow|purple|cyan) (circle|square|triangle) "
    r"(on the left|on the right|at the top|at the bottom|in the center)$"
)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _all_combo_specs(n, seed):
    """n specs cycling through every colour x shape (held-out ones included) at random places and sizes."""
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        size = rng.uniform(*SIZE_RANGE)
        cx, cy = rng.uniform(size + 0.04, 1 - size - 0.04, size=2)
        specs.append(ShapeSpec(colour, shape, cx, cy, size))
    return specs


def test_write_is_deterministic(tmp_path):
    assert write_shapes_dataset(tmp_path / "a", n=60, seed=3) == 60
    write_shapes_dataset(tmp_path / "b", n=60, seed=3)
    write_shapes_dataset(tmp_path / "c", n=60, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert len(list((tmp_path / "a").glob("*.png"))) == 60


def test_training_captions_never_contain_held_out_combos(tmp_path):
    write_shapes_dataset(tmp_path, n=300, seed=0)
    seen = set()
    for txt in tmp_path.glob("[0-9]*.txt"):
        caption = txt.read_text(encoding="utf-8").strip()
        assert CAPTION_RE.match(caption), caption
        seen.add(parse_prompt(caption))
    assert seen.isdisjoint(HELD_OUT)
    assert len(seen) == len(COLOURS) * len(SHAPES) - len(HELD_OUT)
    prompts = (tmp_path / "held_out_prompts.txt").read_text(encoding="utf-8").splitlines()
    assert prompts == held_out_prompts()
    assert {parse_prompt(p) for p in prompts} == set(HELD_OUT)
    meta = json.loads((tmp_path / "dataset.json").read_text(encoding="utf-8"))
    assert (meta["n"], meta["resolution"], meta["seed"]) == (300, 32, 0)
    assert [tuple(c) for c in meta["held_out"]] == list(HELD_OUT)


def test_sample_specs_balanced_and_held_out_only():
    specs = sample_specs(150, seed=1)
    counts = {}
    for s in specs:
        counts[(s.colour, s.shape)] = counts.get((s.colour, s.shape), 0) + 1
    assert set(counts.values()) == {10}
    held = sample_specs(30, seed=1, held_out=True)
    assert {(s.colour, s.shape) for s in held} == set(HELD_OUT)
    for s in specs + held:
        assert SIZE_RANGE[0] <= s.size <= SIZE_RANGE[1]
        assert s.size < s.cx < 1 - s.size and s.size < s.cy < 1 - s.size


@pytest.mark.parametrize(
    ("spec", "caption"),
    [
        (ShapeSpec("red", "circle", 0.3, 0.5, 0.3), "a large red circle on the left"),
        (ShapeSpec("cyan", "square", 0.72, 0.6, 0.2), "a small cyan square on the right"),
        (ShapeSpec("blue", "triangle", 0.45, 0.25, 0.2), "a small blue triangle at the top"),
        (ShapeSpec("yellow", "circle", 0.55, 0.75, 0.19), "a small yellow circle at the bottom"),
        (ShapeSpec("purple", "square", 0.55, 0.45, 0.31), "a large purple square in the center"),
    ],
)
def test_caption_for(spec, caption):
    assert caption_for(spec) == caption


def test_render_is_rgb_with_background_corners():
    img = render_shape(ShapeSpec("green", "triangle", 0.5, 0.5, 0.25), 32)
    assert img.mode == "RGB" and img.size == (32, 32)
    assert img.getpixel((0, 0)) == BACKGROUND and img.getpixel((31, 31)) == BACKGROUND
    assert img.getpixel((16, 22)) == COLOURS["green"]


@pytest.mark.parametrize("resolution", [32, 64])
def test_classifier_exact_on_clean_renders(resolution):
    specs = _all_combo_specs(216, seed=resolution)
    for spec in specs:
        pred = classify_image(render_shape(spec, resolution))
        assert (pred.colour, pred.shape) == (spec.colour, spec.shape), (spec, pred)


def test_classifier_robust_to_noise():
    rng = np.random.default_rng(0)
    specs = _all_combo_specs(216, seed=5)
    correct = 0
    for spec in specs:
        pixels = np.asarray(render_shape(spec, 32), dtype=np.float64) + rng.normal(0, 10, (32, 32, 3))
        pred = classify_image(np.clip(pixels, 0, 255).astype(np.uint8))
        correct += (pred.colour, pred.shape) == (spec.colour, spec.shape)
    assert correct / len(specs) >= 0.95


def test_classifier_ignores_speckles_and_accepts_float_arrays():
    img = np.asarray(render_shape(ShapeSpec("purple", "square", 0.6, 0.6, 0.2), 64)).copy()
    img[2, 2] = img[5, 60] = img[60, 3] = (0, 0, 0)
    pred = classify_image(img.astype(np.float32) / 255.0)
    assert (pred.colour, pred.shape) == ("purple", "square")


def test_classifier_blank_and_flooded_images():
    blank = classify_image(Image.new("RGB", (32, 32), BACKGROUND))
    assert (blank.colour, blank.shape) == (None, None)
    flooded = classify_image(Image.new("RGB", (32, 32), COLOURS["red"]))
    assert flooded.shape is None


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a red triangle", ("red", "triangle")),
        ("A large Blue SQUARE on the left", ("blue", "square")),
        ("two cyan circles", ("cyan", "circle")),
        ("a purple thing", ("purple", None)),
        ("a triangle", (None, "triangle")),
        ("reddish circular blob", (None, None)),
        ("", (None, None)),
    ],
)
def test_parse_prompt(prompt, expected):
    assert parse_prompt(prompt) == expected


def test_score_images():
    specs = [ShapeSpec("red", "circle", 0.5, 0.5, 0.25), ShapeSpec("blue", "square", 0.5, 0.5, 0.25)]
    images = [render_shape(s, 32) for s in specs]
    result = score_images(images, ["a red circle", "a blue triangle"])
    assert result["n"] == 2
    assert result["colour_accuracy"] == 1.0
    assert result["shape_accuracy"] == 0.5
    assert result["both_accuracy"] == 0.5
    assert result["per_prompt"][1]["pred_shape"] == "square"
    assert score_images(images, ["circle", "square"])["colour_accuracy"] is None
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        score_images(images, ["a red circle"])


def test_write_is_idempotent_and_refuses_to_clobber(tmp_path):
    out = tmp_path / "shapes"
    write_shapes_dataset(out, n=20)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert write_shapes_dataset(out, n=20) == 20
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    write_shapes_dataset(out, n=30)
    assert len(list(out.glob("*.png"))) == 30
    with pytest.raises(FileExistsError, match="00010.png"):
        write_shapes_dataset(out, n=10)

    user = tmp_path / "photos"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="holiday.jpg"):
        write_shapes_dataset(user, n=5)
    assert (user / "holiday.jpg").read_bytes() == b"not ours"
    assert sorted(p.name for p in user.iterdir()) == ["holiday.jpg"]


def test_concept_dataset_draws_only_its_colours_and_prompts_for_what_it_holds_out(tmp_path):
    write_shapes_dataset(tmp_path / "c", n=40, seed=1, colours=["black"], held_out=["black triangle"])
    seen = {parse_prompt(t.read_text(encoding="utf-8")) for t in (tmp_path / "c").glob("[0-9]*.txt")}
    assert seen == {("black", "circle"), ("black", "square")}
    prompts = (tmp_path / "c" / "held_out_prompts.txt").read_text(encoding="utf-8").splitlines()
    assert {parse_prompt(p) for p in prompts} == {("black", "triangle")}
    # nothing held out: the prompts say what the set teaches
    write_shapes_dataset(tmp_path / "all", n=9, seed=1, colours=["black"], held_out=[])
    prompts = (tmp_path / "all" / "held_out_prompts.txt").read_text(encoding="utf-8").splitlines()
    assert {parse_prompt(p) for p in prompts} == {("black", s) for s in SHAPES}
    # the classifier knows the concept colour
    img = render_shape(ShapeSpec("black", "square", 0.5, 0.5, 0.3), 32)
    assert (classify_image(img).colour, classify_image(img).shape) == ("black", "square")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"colours": ["mauve"]}, "unknown ['mauve']"),
        ({"colours": ["black"], "held_out": ["red circle"]}, "colours this dataset does not draw"),
        ({"held_out": ["red blob"]}, "is not '<colour> <shape>'"),
        ({"colours": ["black"], "held_out": [f"black {s}" for s in SHAPES]}, "no colour x shape"),
    ],
)
def test_concept_dataset_errors_name_the_problem(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        write_shapes_dataset(tmp_path / "x", n=5, **kwargs)


def test_varied_captions_keep_the_images_and_cover_every_level_of_detail(tmp_path):
    """``captions: varied`` changes only the .txt files: the same images, each caption naming colour and
    shape, and all four levels of detail present in roughly equal numbers (a model trained on full captions
    only never sees a bare prompt like 'a red triangle')."""
    full, varied = tmp_path / "full", tmp_path / "varied"
    write_shapes_dataset(full, n=200, resolution=16, seed=3)
    write_shapes_dataset(varied, n=200, resolution=16, seed=3, captions="varied")
    for png in full.glob("*.png"):
        assert png.read_bytes() == (varied / png.name).read_bytes()
    forms = {"bare": 0, "size": 0, "position": 0, "full": 0}
    for txt in sorted(varied.glob("[0-9]*.txt")):
        text = txt.read_text(encoding="utf-8").strip()
        assert parse_prompt(text) == parse_prompt((full / txt.name).read_text(encoding="utf-8"))
        size = text.split()[1] in ("small", "large")
        position = any(w in text for w in ("left", "right", "top", "bottom", "center"))
        forms[
            {(False, False): "bare", (True, False): "size", (False, True): "position"}.get(
                (size, position), "full"
            )
        ] += 1
        if size and position:
            assert CAPTION_RE.match(text)
    assert all(30 <= count <= 70 for count in forms.values()), forms
    # deterministic, and a rewrite with the other style is noticed through dataset.json
    assert captions_for(sample_specs(20, 3), "varied", 3) == captions_for(sample_specs(20, 3), "varied", 3)
    assert json.loads((varied / "dataset.json").read_text(encoding="utf-8"))["captions"] == "varied"
    assert "captions" not in json.loads((full / "dataset.json").read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="captions: 'terse'"):
        write_shapes_dataset(tmp_path / "bad", n=5, captions="terse")
    assert not (tmp_path / "bad").exists()


def test_caption_for_leaves_out_size_and_position_on_request():
    spec = ShapeSpec("red", "circle", 0.25, 0.5, 0.3)
    assert caption_for(spec) == "a large red circle on the left"
    assert caption_for(spec, size=False) == "a red circle on the left"
    assert caption_for(spec, position=False) == "a large red circle"
    assert caption_for(spec, size=False, position=False) == "a red circle"
