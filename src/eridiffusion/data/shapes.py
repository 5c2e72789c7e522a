"""Synthetic coloured-shapes dataset and the pixel-statistics classifier that scores generated images.

No pretrained weights can be downloaded here, so the quickstart trains from scratch on data the package
generates itself. Flat shapes on a flat background are learnable by a tiny model in minutes on a CPU, and
they can be checked without a learned judge: colour and shape fall out of simple pixel statistics. A few
colour x shape combinations are never written to the training folder, so prompting for them measures
compositional generalisation rather than memorisation.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 50, 190),
    "cyan": (30, 190, 200),
}
CONCEPT_COLOURS: dict[str, tuple[int, int, int]] = {"black": (30, 30, 30)}
"""Colours the default dataset never shows: a dataset of them teaches a trained model a new concept (the
quickstart's LoRA step). Black sits far from every base colour and from the background."""
ALL_COLOURS = {**COLOURS, **CONCEPT_COLOURS}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (235, 235, 235)
HELD_OUT: tuple[tuple[str, str], ...] = (("red", "triangle"), ("green", "circle"), ("blue", "square"))

# Half-extent as a fraction of the image side: big enough to be unmistakable at 32 px, small enough that
# the position words in the captions mean something.
SIZE_RANGE = (0.18, 0.32)
# Kept clear of the border so a drawn shape never touches it; classify_image uses that to reject images
# that are one big blob instead of a shape.
EDGE_MARGIN = 0.04
CENTER_RADIUS = 0.12
SUPERSAMPLE = 4

FG_THRESHOLD = 60.0
MIN_FG_FRACTION = 0.02
# Decision thresholds sit midway between the ideal feature values (fill: triangle 0.5, circle 0.785,
# square 1.0; skew: triangle -0.57, others 0). Rendered images at 24-128 px with gaussian noise up to
# sigma 20/255 measured fill 0.51-0.65 / 0.75-0.83 / 0.92-1.02 and triangle skew -0.47..-0.63.
TRIANGLE_MAX_SKEW = -0.3
TRIANGLE_MAX_FILL = 0.64
SQUARE_MIN_FILL = 0.89

DATASET_FORMAT = "eridiffusion-shapes"
DATASET_VERSION = 1
PROMPTS_FILE = "held_out_prompts.txt"
META_FILE = "dataset.json"


@dataclass(frozen=True)
class ShapeSpec:
    """One image's content; centre and half-extent are fractions of the image side so any resolution works."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float


def render_shape(spec: ShapeSpec, resolution: int) -> Image.Image:
    """Draw one filled shape; supersampled then box-filtered so edges are anti-aliased like real photos."""
    side = resolution * SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(img)
    x0, y0 = (spec.cx - spec.size) * side, (spec.cy - spec.size) * side
    x1, y1 = (spec.cx + spec.size) * side, (spec.cy + spec.size) * side
    fill = ALL_COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif spec.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([(spec.cx * side, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")
    return img.resize((resolution, resolution), Image.Resampling.BOX)


def _size_word(size: float) -> str:
    return "large" if size >= sum(SIZE_RANGE) / 2 else "small"


def _position_words(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if abs(dx) < CENTER_RADIUS and abs(dy) < CENTER_RADIUS:
        return "in the center"
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


CAPTION_STYLES = ("full", "varied")
"""``full``: every caption names size, colour, shape and position. ``varied``: each image's caption names
colour and shape, and size and position each only half of the time (``a red circle``, ``a large red circle``,
``a red circle on the left``, ``a large red circle on the left``, drawn evenly), as real captions vary in
detail. A model trained on full captions only has never seen a short prompt such as ``a red triangle``, and
follows it worst (the quickstart measured 0 of 24 right before, 21 of 24 after)."""


def caption_for(spec: ShapeSpec, size: bool = True, position: bool = True) -> str:
    """Caption in the one fixed grammar a tiny text encoder can learn: 'a large red circle on the left',
    with the size and position words left out when asked."""
    words = ["a", _size_word(spec.size)] if size else ["a"]
    words += [spec.colour, spec.shape]
    if position:
        words.append(_position_words(spec.cx, spec.cy))
    return " ".join(words)


def captions_for(specs: Sequence[ShapeSpec], style: str, seed: int) -> list[str]:
    """The captions of ``specs`` in ``style`` (see CAPTION_STYLES). ``varied`` draws its choices from a
    stream of its own, so the images are the same whichever style is chosen."""
    if style not in CAPTION_STYLES:
        raise ValueError(f"captions: {style!r} is not one of {list(CAPTION_STYLES)}")
    if style == "full":
        return [caption_for(spec) for spec in specs]
    choices = np.random.default_rng([seed, 1]).integers(0, 2, size=(len(specs), 2)).astype(bool)
    return [caption_for(spec, bool(s), bool(p)) for spec, (s, p) in zip(specs, choices, strict=True)]


def training_combos(
    colours: Sequence[str] | None = None, excluded: Sequence[tuple[str, str]] = HELD_OUT
) -> list[tuple[str, str]]:
    """Every colour x shape pair that may appear in training data (all but the excluded ones)."""
    return [(c, s) for c in (colours or COLOURS) for s in SHAPES if (c, s) not in excluded]


def parse_combos(pairs: Sequence[str], where: str = "held_out") -> list[tuple[str, str]]:
    """'colour shape' strings (as in the YAML / CLI) to pairs; unknown words are an error naming them."""
    out = []
    for pair in pairs:
        words = pair.split()
        if len(words) != 2 or words[0] not in ALL_COLOURS or words[1] not in SHAPES:
            raise ValueError(
                f"{where}: {pair!r} is not '<colour> <shape>' with colour in {sorted(ALL_COLOURS)} and "
                f"shape in {list(SHAPES)}"
            )
        out.append((words[0], words[1]))
    return out


def check_colours(colours: Sequence[str]) -> None:
    unknown = sorted(set(colours) - set(ALL_COLOURS))
    if unknown or not colours:
        raise ValueError(f"colours: unknown {unknown or 'none given'}; choose from {sorted(ALL_COLOURS)}")


def sample_specs(
    n: int,
    seed: int,
    held_out: bool = False,
    colours: Sequence[str] | None = None,
    excluded: Sequence[tuple[str, str]] = HELD_OUT,
) -> list[ShapeSpec]:
    """Draw n specs, balanced over the allowed combinations so no colour or shape is under-represented.

    The combinations are cycled through, reshuffled each cycle, which keeps counts within one of each other
    while still mixing the order a sequential loader sees. ``held_out`` draws only the excluded ones.
    """
    rng = np.random.default_rng(seed)
    combos = list(excluded) if held_out else training_combos(colours, excluded)
    if not combos:
        raise ValueError("no colour x shape combination is left to draw; hold out fewer")
    specs: list[ShapeSpec] = []
    while len(specs) < n:
        for k in rng.permutation(len(combos)):
            if len(specs) == n:
                break
            colour, shape = combos[k]
            size = float(rng.uniform(*SIZE_RANGE))
            lo, hi = size + EDGE_MARGIN, 1.0 - size - EDGE_MARGIN
            cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
            specs.append(ShapeSpec(colour, shape, cx, cy, size))
    return specs


def held_out_prompts(combos: Sequence[tuple[str, str]] = HELD_OUT) -> list[str]:
    """Evaluation prompts for the held-out combinations: the bare phrase plus fixed size/position variants."""
    prompts: list[str] = []
    for colour, shape in combos:
        prompts += [
            f"a {colour} {shape}",
            f"a large {colour} {shape} in the center",
            f"a small {colour} {shape} on the left",
            f"a large {colour} {shape} at the bottom",
        ]
    return prompts


def _dataset_meta(
    n: int,
    resolution: int,
    seed: int,
    colours: Sequence[str],
    held: Sequence[tuple[str, str]],
    captions: str = "full",
) -> dict[str, Any]:
    # folders written before the option existed stay valid
    extra = {} if captions == "full" else {"captions": captions}
    return {
        **extra,
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "resolution": resolution,
        "n": n,
        "seed": seed,
        "colours": {k: list(ALL_COLOURS[k]) for k in colours},
        "shapes": list(SHAPES),
        "held_out": [list(c) for c in held],
    }


def _read_meta(path: Path) -> dict[str, Any] | None:
    """dataset.json's content, or None when it is unreadable (an interrupted write is simply redone)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_shapes_dataset(
    out_dir: Path,
    n: int = 2000,
    resolution: int = 32,
    seed: int = 0,
    colours: Sequence[str] | None = None,
    held_out: Sequence[str] | None = None,
    captions: str = "full",
) -> int:
    """Write the training folder (NNNNN.png + NNNNN.txt), the evaluation prompts and dataset.json.

    ``colours`` restricts the dataset (e.g. ``["black"]`` for a new-concept set); ``held_out`` lists the
    'colour shape' pairs never drawn (default: HELD_OUT's pairs of those colours). The prompts file holds the
    held-out pairs, or every pair of the dataset when none is held out, so it always says what to check.

    Refuses to write into a folder holding anything else, so a mistyped path never mixes shapes into (or
    overwrites) a user's own data. dataset.json is written last: its presence with identical content means
    a previous call finished, and the call returns at once.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8, got {resolution}")
    names = list(colours or COLOURS)
    check_colours(names)
    if held_out is None:
        held = [c for c in HELD_OUT if c[0] in names]
    else:
        held = parse_combos(held_out)
        stray = [f"{c} {s}" for c, s in held if c not in names]
        if stray:
            raise ValueError(f"held_out: {stray} use colours this dataset does not draw ({names})")
    out_dir = Path(out_dir)
    if captions not in CAPTION_STYLES:
        raise ValueError(f"captions: {captions!r} is not one of {list(CAPTION_STYLES)}")
    meta = _dataset_meta(n, resolution, seed, names, held, captions)
    stems = [f"{i:05d}" for i in range(n)]
    expected = {f"{s}{ext}" for s in stems for ext in (".png", ".txt")} | {PROMPTS_FILE, META_FILE}
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"'{out_dir}' exists and is not a directory; choose another output path")
        present = {p.name for p in out_dir.iterdir()}
        foreign = sorted(present - expected)
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise FileExistsError(
                f"'{out_dir}' already contains files this dataset would not write ({shown}); "
                "refusing to mix or overwrite them. Use an empty or new directory."
            )
        if present == expected and _read_meta(out_dir / META_FILE) == meta:
            logger.info("shapes dataset already present in %s", out_dir)
            return n
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)
    specs = sample_specs(n, seed, colours=names, excluded=held)
    for stem, spec, caption in zip(stems, specs, captions_for(specs, captions, seed), strict=True):
        render_shape(spec, resolution).save(out_dir / f"{stem}.png", compress_level=1)
        (out_dir / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    prompts = held_out_prompts(held or training_combos(names, held))
    (out_dir / PROMPTS_FILE).write_text("\n".join(prompts) + "\n", encoding="utf-8")
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %d shapes images (%d px) to %s", n, resolution, out_dir)
    return n


def _singular(word: str) -> str:
    return word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word


def parse_prompt(prompt: str) -> tuple[str | None, str | None]:
    """The (colour, shape) a prompt asks for, by whole-word match; None where the prompt names none."""
    words = [_singular(w) for w in re.findall(r"[a-z]+", prompt.lower())]
    colour = next((w for w in words if w in ALL_COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return colour, shape


@dataclass
class Prediction:
    """What classify_image saw; the features behind the decision are kept so failures can be diagnosed."""

    colour: str | None
    shape: str | None
    fg_fraction: float
    fill_ratio: float
    skew: float = 0.0


def _to_rgb_array(img: Image.Image | np.ndarray) -> np.ndarray:
    """HxWx3 float array in 0..255 from a PIL image or an HxWx(3|4) array (uint8, or float in 0..1)."""
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), dtype=np.float64)
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 or HxWx4 array, got shape {arr.shape}")
    arr = arr[..., :3].astype(np.float64)
    return arr * 255.0 if np.issubdtype(np.asarray(img).dtype, np.floating) else arr


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected region of a boolean mask.

    Label propagation with pointer jumping: every foreground pixel starts labelled with its own flat index,
    repeatedly takes the smallest label among its neighbours, then jumps to its label's label. Converges in
    a handful of vectorised passes on the small images this is used for, with no scipy dependency.
    """
    h, w = mask.shape
    sentinel = h * w
    flat = mask.ravel()
    labels = np.where(flat, np.arange(h * w), sentinel)
    while True:
        grid = np.pad(labels.reshape(h, w), 1, constant_values=sentinel)
        neighbours = np.minimum.reduce(
            [grid[1:-1, 1:-1], grid[:-2, 1:-1], grid[2:, 1:-1], grid[1:-1, :-2], grid[1:-1, 2:]]
        ).ravel()
        new = np.where(flat, neighbours, sentinel)
        jump = np.append(new, sentinel)
        new = jump[jump[new]]
        if np.array_equal(new, labels):
            break
        labels = new
    counts = np.bincount(labels[flat], minlength=sentinel)
    return (labels == counts.argmax()).reshape(h, w)


def _nearest_colour(rgb: np.ndarray) -> str:
    """Colour whose ray from BACKGROUND passes closest to rgb.

    Comparing against rays rather than points makes paler (blended with background) or darker versions of
    a colour still count as that colour, which is what a viewer would say about a washed-out sample.
    """
    bg = np.asarray(BACKGROUND, dtype=np.float64)
    offset = rgb - bg
    best, best_dist = "", np.inf
    for name, value in ALL_COLOURS.items():
        direction = np.asarray(value, dtype=np.float64) - bg
        t = max(0.0, float(offset @ direction) / float(direction @ direction))
        dist = float(np.linalg.norm(offset - t * direction))
        if dist < best_dist:
            best, best_dist = name, dist
    return best


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _shape_features(rgb: np.ndarray, component: np.ndarray) -> tuple[float, float]:
    """Soft fill ratio and vertical skewness of one object.

    Each pixel near the object gets a coverage in [0, 1] (how far it lies from the background towards the
    object's own median colour), so anti-aliased or noisy edge pixels count fractionally instead of
    flipping whole rows in or out of a thresholded mask. Fill = area / (widest row * tallest column):
    square 1, circle pi/4, triangle 1/2. Skewness of the row mass is 0 for the symmetric shapes and about
    -0.57 for an upward triangle (mass piles up at the base); neither needs a bounding box.
    """
    bg = np.asarray(BACKGROUND, dtype=np.float64)
    direction = np.median(rgb[component], axis=0) - bg
    coverage = np.clip(((rgb - bg) @ direction) / max(float(direction @ direction), 1e-6), 0.0, 1.0)
    coverage = coverage * _dilate(component)
    area = float(coverage.sum())
    fill = area / max(float(coverage.sum(axis=1).max() * coverage.sum(axis=0).max()), 1e-6)
    rows = coverage.sum(axis=1)
    y = np.arange(len(rows), dtype=np.float64)
    mean = float(rows @ y) / area
    var = float(rows @ (y - mean) ** 2) / area
    skew = float(rows @ (y - mean) ** 3) / area / max(var, 1e-6) ** 1.5
    return fill, skew


def _touches_all_borders(component: np.ndarray) -> bool:
    """A drawn shape always sits inside the frame, so a region spanning it is background, not a shape."""
    return bool(
        component[0].any() and component[-1].any() and component[:, 0].any() and component[:, -1].any()
    )


def classify_image(img: Image.Image | np.ndarray) -> Prediction:
    """Colour and shape of the main object, or None for what is not there (deterministic, no learned model).

    Only the largest 4-connected foreground region is judged, so speckles a sampler leaves behind do not
    drag the statistics; too little foreground means the model drew nothing and both answers are None.
    """
    rgb = _to_rgb_array(img)
    distance = np.linalg.norm(rgb - np.asarray(BACKGROUND, dtype=np.float64), axis=2)
    foreground = distance > FG_THRESHOLD
    fg_fraction = float(foreground.mean())
    if fg_fraction < MIN_FG_FRACTION:
        return Prediction(None, None, fg_fraction, 0.0, 0.0)
    component = _largest_component(foreground)
    if component.mean() < MIN_FG_FRACTION:
        return Prediction(None, None, fg_fraction, 0.0, 0.0)
    colour = _nearest_colour(np.median(rgb[component], axis=0))
    fill, skew = _shape_features(rgb, component)
    if _touches_all_borders(component):
        shape = None
    elif skew < TRIANGLE_MAX_SKEW or fill < TRIANGLE_MAX_FILL:
        shape = "triangle"
    else:
        shape = "square" if fill > SQUARE_MIN_FILL else "circle"
    return Prediction(colour, shape, fg_fraction, fill, skew)


def score_images(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[str]) -> dict[str, Any]:
    """Prompt adherence: how often the classified colour/shape match what each prompt asked for.

    An accuracy only counts prompts that name the attribute; it is None when no prompt does, so a missing
    measurement is never reported as 0 % or 100 %.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    per_prompt: list[dict[str, Any]] = []
    for image, prompt in zip(images, prompts, strict=True):
        want_colour, want_shape = parse_prompt(prompt)
        pred = classify_image(image)
        per_prompt.append(
            {
                "prompt": prompt,
                "target_colour": want_colour,
                "target_shape": want_shape,
                "pred_colour": pred.colour,
                "pred_shape": pred.shape,
                "colour_ok": None if want_colour is None else pred.colour == want_colour,
                "shape_ok": None if want_shape is None else pred.shape == want_shape,
                "fg_fraction": round(pred.fg_fraction, 4),
                "fill_ratio": round(pred.fill_ratio, 4),
            }
        )

    def accuracy(oks: list[bool]) -> float | None:
        return sum(oks) / len(oks) if oks else None

    colour_oks = [r["colour_ok"] for r in per_prompt if r["colour_ok"] is not None]
    shape_oks = [r["shape_ok"] for r in per_prompt if r["shape_ok"] is not None]
    both_oks = [
        r["colour_ok"] and r["shape_ok"]
        for r in per_prompt
        if r["colour_ok"] is not None and r["shape_ok"] is not None
    ]
    return {
        "n": len(per_prompt),
        "colour_accuracy": accuracy(colour_oks),
        "shape_accuracy": accuracy(shape_oks),
        "both_accuracy": accuracy(both_oks),
        "per_prompt": per_prompt,
    }
