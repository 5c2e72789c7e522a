"""Aspect-ratio buckets: train each image near its own shape instead of centre-cropping it to a square.

A bucket is a (width, height) whose sides are multiples of the model's size multiple and whose area is at
most resolution^2, so every bucket costs about the same memory as the square it replaces. The bucket list
follows kohya's sd-scripts (sides from resolution/2 to 2 x resolution, i.e. aspect ratios up to 4:1); an
image goes to the bucket with the nearest aspect ratio, is scaled to cover it and cropped. With
``bucket_no_upscale`` (also kohya's) an image is never enlarged: one smaller than resolution^2 gets a bucket
of its own size rounded down to the multiple, which can leave an image with no usable bucket at all.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable


def _down(value: float, step: int) -> int:
    return int(value // step) * step


def bucket_sizes(resolution: int, step: int) -> list[tuple[int, int]]:
    """All (width, height) buckets for a target resolution, sorted; each side a multiple of ``step``."""
    if step < 1 or resolution < step:
        raise ValueError(f"resolution {resolution} must be at least the size multiple {step}")
    area = resolution * resolution
    low = max(step, _down(resolution / 2, step))
    high = 2 * resolution
    square = _down(resolution, step)
    sizes = {(square, square)}
    for width in range(low, high + 1, step):
        height = min(high, _down(area / width, step))
        if height >= low:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def nearest_bucket(width: int, height: int, buckets: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space, so 2:1 and 1:2 are
    symmetric); ties go to the larger bucket, which crops less."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def assign_bucket(
    width: int, height: int, resolution: int, step: int, no_upscale: bool = False
) -> tuple[int, int] | None:
    """The training size of a width x height image at ``resolution``; None when no_upscale leaves none.

    Without no_upscale this is :func:`nearest_bucket` over :func:`bucket_sizes`. With it, an image whose
    area exceeds resolution^2 is scaled down to that area and its sides rounded down to ``step``; a smaller
    image keeps its size rounded down. The crop that rounding implies is at most ``step - 1`` pixels a side.
    """
    if not no_upscale:
        return nearest_bucket(width, height, bucket_sizes(resolution, step))
    scale = min(1.0, math.sqrt(resolution * resolution / (width * height)))
    bucket = (_down(width * scale, step), _down(height * scale, step))
    return bucket if min(bucket) >= step else None


def aspect_label(width: int, height: int) -> str:
    """'3:2'-style label of a bucket for reports (exact ratio reduced by the gcd)."""
    g = math.gcd(width, height)
    return f"{width // g}:{height // g}"


def format_bucket_counts(counts: Counter[tuple[int, int]], indent: str = "  ") -> list[str]:
    """Report lines 'WxH (w:h): n', widest first so the table reads from landscape to portrait."""
    lines = []
    for (w, h), n in sorted(counts.items(), key=lambda item: (-item[0][0] / item[0][1], item[0])):
        lines.append(f"{indent}{w}x{h} ({aspect_label(w, h)}): {n}")
    return lines
