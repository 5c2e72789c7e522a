"""Aspect-ratio buckets: area-preserving, multiples of the model's factor, nearest aspect, no-upscale."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from eridiffusion.data.buckets import assign_bucket, bucket_sizes, format_bucket_counts, nearest_bucket


@pytest.mark.parametrize(("resolution", "step"), [(512, 64), (1024, 64), (1024, 16), (32, 8), (16, 4)])
def test_bucket_sizes_are_multiples_within_area_and_aspect(resolution: int, step: int) -> None:
    sizes = bucket_sizes(resolution, step)
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution * resolution
        assert max(w / h, h / w) <= 4
        assert (h, w) in sizes  # portrait and landscape alike


def test_kohya_buckets_at_512() -> None:
    sizes = set(bucket_sizes(512, 64))
    assert {(512, 512), (448, 576), (384, 640), (320, 768), (256, 1024), (768, 320), (1024, 256)} <= sizes


def test_nearest_bucket_follows_the_aspect_ratio() -> None:
    buckets = bucket_sizes(512, 64)
    assert nearest_bucket(1920, 1080, buckets) == (640, 384)  # 16:9 -> 5:3
    assert nearest_bucket(1080, 1920, buckets) == (384, 640)
    assert nearest_bucket(999, 1000, buckets) == (512, 512)
    assert nearest_bucket(100, 10_000, buckets) == (256, 1024)  # extreme ratios clamp to 1:4
    for w, h in [(3000, 2000), (640, 480), (1200, 1600)]:
        bw, bh = nearest_bucket(w, h, buckets)
        assert abs(math.log((bw / bh) / (w / h))) < 0.2


def test_no_upscale_keeps_small_images_small_and_can_leave_none() -> None:
    assert assign_bucket(300, 200, 512, 64) == (640, 384)  # enlarged to the bucket
    assert assign_bucket(300, 200, 512, 64, no_upscale=True) == (256, 192)  # rounded down, never enlarged
    assert assign_bucket(2048, 1024, 512, 64, no_upscale=True) == (704, 320)  # large: area scaled to 512^2
    w, h = assign_bucket(2048, 1024, 512, 64, no_upscale=True)
    assert w * h <= 512 * 512
    assert assign_bucket(60, 300, 512, 64, no_upscale=True) is None  # narrower than one 64 px step


def test_bucket_report_lines() -> None:
    lines = format_bucket_counts(Counter({(16, 16): 3, (20, 12): 2, (12, 20): 1}))
    assert lines == ["  20x12 (5:3): 2", "  16x16 (1:1): 3", "  12x20 (3:5): 1"]
