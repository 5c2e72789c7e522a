"""TrainingData: buckets, weights, regularisation balance, multi-resolution, deterministic resumable order,
worker-count independence, caption transforms, metadata.jsonl and the empty-bucket error."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from eridiffusion.config.schema import DatasetConfig
from eridiffusion.data import loader
from eridiffusion.data.folder import DatasetError, scan_folder
from eridiffusion.data.loader import Batch, TrainingData
from tests.unit.imagesets import SIZES, write_mixed_folder

STEP = 4  # the tiny test model's size multiple: patch 2 x 2^(2 levels - 1)


def _data(datasets: list[dict[str, Any]], batch_size: int = 4, seed: int = 0) -> TrainingData:
    return TrainingData([DatasetConfig(**d) for d in datasets], batch_size, seed, STEP)


def _same(a: Batch, b: Batch) -> bool:
    return (
        a.captions == b.captions
        and a.epoch == b.epoch
        and torch.equal(a.pixels, b.pixels)
        and torch.equal(a.loss_weights, b.loss_weights)
    )


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mixed")
    write_mixed_folder(folder)
    return folder


def test_buckets_group_sizes_and_every_image_trains_once_per_epoch(mixed: Path, caplog) -> None:
    with caplog.at_level(logging.INFO):
        data = _data([{"folder_path": str(mixed), "resolution": 16}])
    assert data.skipped == 2  # the corrupt and the zero-byte file
    assert len(data) == len(SIZES) + 4 == data.samples_per_epoch
    for epoch in range(2):
        seen = Counter(v for batch in data.plan(epoch) for v in batch)
        assert set(seen.values()) == {1} and len(seen) == len(data)
        for batch in data.plan(epoch):
            assert len({(data.views[v].width, data.views[v].height) for v in batch}) == 1
            assert 1 <= len(batch) <= 4
    sizes = {(v.width, v.height) for v in data.views}
    assert all(w % STEP == 0 and h % STEP == 0 and w * h <= 256 for w, h in sizes)
    assert {(16, 16), (20, 12), (12, 20)} <= sizes  # square, landscape and portrait buckets
    exif = next(v for v in data.views if "zz_exif" in data.label(data.views.index(v)))
    assert exif.height > exif.width  # bucketed by its displayed (rotated) shape
    for k in range(data.batches_per_epoch):
        batch = data.batch(k)
        view = data.views[data.plan(0)[k][0]]
        assert batch.pixels.shape[1:] == (3, view.height, view.width)
        assert batch.pixels.min() >= -1 and batch.pixels.max() <= 1
    report = caplog.text
    assert "datasets[0]" in report and "16x16 (1:1):" in report and "20x12 (5:3):" in report
    assert "skipped: 2 unreadable" in report


def test_batch_k_is_a_pure_function_of_seed_and_k(mixed: Path) -> None:
    config = [{"folder_path": str(mixed), "resolution": 16, "flip_x": True, "crop": "random"}]
    a, b = _data(config, seed=5), _data(config, seed=5)
    ks = list(range(3 * a.batches_per_epoch))
    forward = [a.batch(k) for k in ks]
    backward = {k: b.batch(k) for k in reversed(ks)}  # other order, other epochs in between
    assert all(_same(forward[k], backward[k]) for k in ks)
    assert [batch.epoch for batch in forward] == [k // a.batches_per_epoch for k in ks]
    assert a.plan(0) != a.plan(1)
    other = _data(config, seed=6)
    assert other.plan(0) != a.plan(0)


def test_worker_count_does_not_change_the_batches(mixed: Path) -> None:
    data = _data([{"folder_path": str(mixed), "resolution": [8, 16], "flip_x": True}], batch_size=3)
    stop = data.batches_per_epoch + 3
    inline = list(data.iterate(2, stop, num_workers=0))
    parallel = list(data.iterate(2, stop, num_workers=2))
    assert len(inline) == len(parallel) == stop - 2
    assert all(_same(x, y) for x, y in zip(inline, parallel, strict=True))


def test_weights_repeats_and_regularisation_balance(tmp_path: Path) -> None:
    for name, n in (("a", 6), ("b", 4), ("reg", 3)):
        write_mixed_folder(tmp_path / name, n=n, with_problems=False)
    data = _data(
        [
            {"folder_path": str(tmp_path / "a"), "resolution": 16, "num_repeats": 2},
            {"folder_path": str(tmp_path / "b"), "resolution": 16, "weight": 0.5},
            {"folder_path": str(tmp_path / "reg"), "resolution": 16, "is_reg": True, "loss_weight": 0.5},
        ]
    )

    def per_dataset(epoch: int) -> Counter:
        return Counter(data.views[v].dataset for batch in data.plan(epoch) for v in batch)

    counts = [per_dataset(epoch) for epoch in range(4)]
    for c in counts:
        assert c[0] == 12  # 6 images x 2 repeats
        assert c[1] == 2  # 4 images x weight 0.5
        assert c[2] == 14  # regularisation matches the 14 training samples
    b_subsets = [{v for batch in data.plan(e) for v in batch if data.views[v].dataset == 1} for e in range(4)]
    assert len({frozenset(s) for s in b_subsets}) > 1  # a different half each epoch
    # a fractional weight can change the bucket counts, so epochs are located by counting their batches
    assert not data.constant_epochs
    flat = [(e, b) for e in range(4) for b in range(len(data.plan(e)))]
    assert [data.position(k) for k in range(len(flat))] == flat
    assert [data.epoch_start(e) for e in range(4)] == [flat.index((e, 0)) for e in range(4)]
    fresh = _data(
        [
            {"folder_path": str(tmp_path / "a"), "resolution": 16, "num_repeats": 2},
            {"folder_path": str(tmp_path / "b"), "resolution": 16, "weight": 0.5},
            {"folder_path": str(tmp_path / "reg"), "resolution": 16, "is_reg": True, "loss_weight": 0.5},
        ]
    )
    assert fresh.position(len(flat) - 1) == flat[-1]  # resume deep into a run without replaying it
    weights = torch.cat([data.batch(k).loss_weights for k in range(len(data.plan(0)))])
    assert sorted(set(weights.tolist())) == [0.5, 1.0] and (weights == 0.5).sum() == 14


def test_multi_resolution_and_square_crops(mixed: Path) -> None:
    multi = _data([{"folder_path": str(mixed), "resolution": [8, 16]}])
    assert len(multi.views) == 2 * len(multi.sources[0])
    assert {v.resolution for v in multi.views} == {8, 16}
    square = _data([{"folder_path": str(mixed), "resolution": 16, "enable_buckets": False}])
    assert {(v.width, v.height) for v in square.views} == {(16, 16)}
    coarse = _data([{"folder_path": str(mixed), "resolution": 16, "bucket_step": 8}])
    assert {(v.width, v.height) for v in coarse.views} <= {(8, 32), (16, 16), (24, 8), (32, 8), (8, 24)}
    with pytest.raises(DatasetError, match=r"datasets\[0\].bucket_step: 6 must be a multiple of .* 4"):
        _data([{"folder_path": str(mixed), "resolution": 16, "bucket_step": 6}])


def test_no_upscale_skips_too_small_images_and_errors_when_none_is_left(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "small"
    write_mixed_folder(folder, n=3, with_problems=False)
    Image.new("RGB", (3, 40), (1, 2, 3)).save(folder / "thin.png")
    with caplog.at_level(logging.WARNING):
        data = _data([{"folder_path": str(folder), "resolution": 16, "bucket_no_upscale": True}])
    assert data.unusable == 1 and "thin.png" in caplog.text and "bucket_no_upscale" in caplog.text
    for view in data.views:  # never enlarged
        w, h = data.sources[0].sizes[view.item]
        assert view.width <= w and view.height <= h

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    for i in range(2):
        Image.new("RGB", (3, 3), (i, 0, 0)).save(tiny / f"{i}.png")
    with pytest.raises(DatasetError) as info:
        _data([{"folder_path": str(tiny), "resolution": 16, "bucket_no_upscale": True}])
    message = str(info.value)
    assert "datasets[0]" in message and str(tiny) in message and "no usable image" in message
    assert "bucket_no_upscale: false" in message


def test_trigger_word_and_tag_shuffle_per_epoch(mixed: Path, caplog) -> None:
    config = {"folder_path": str(mixed), "resolution": 16, "trigger_word": "ohwx"}
    data = _data([{**config, "shuffle_tokens": True, "keep_tokens": 1}])
    v = next(i for i, view in enumerate(data.views) if data.label(i).endswith("img01.png"))
    captions = [data.caption(v, epoch) for epoch in range(8)]
    assert all(c.startswith("ohwx, ") for c in captions)
    assert len(set(captions)) > 1
    assert all(sorted(c.split(", ")) == sorted(captions[0].split(", ")) for c in captions)
    assert data.caption(v, 3) == _data([{**config, "shuffle_tokens": True, "keep_tokens": 1}]).caption(v, 3)
    plain = _data([config])
    assert plain.caption(v, 0) == "ohwx, img1, blue, green, round"
    nocaption = next(i for i in range(len(plain.views)) if plain.label(i).endswith("zz_nocaption.png"))
    assert plain.caption(nocaption, 0) == "ohwx"


def test_random_crop_and_flip_vary_by_epoch_only(tmp_path: Path) -> None:
    folder = tmp_path / "wide"
    folder.mkdir()
    gradient = torch.arange(64, dtype=torch.uint8).repeat(16, 1) * 4
    Image.fromarray(gradient.numpy()).convert("RGB").save(folder / "wide.png")
    data = _data(
        [{"folder_path": str(folder), "resolution": 16, "enable_buckets": False, "crop": "random"}], 1
    )
    crops = [data.batch(k).pixels for k in range(12)]
    assert len({c[0, 0, 0, 0].item() for c in crops}) > 3  # different windows of the gradient
    again = _data(
        [{"folder_path": str(folder), "resolution": 16, "enable_buckets": False, "crop": "random"}], 1
    )
    assert all(torch.equal(c, again.batch(k).pixels) for k, c in enumerate(crops))
    flipped = _data([{"folder_path": str(folder), "resolution": 16, "flip_x": True}], 1)
    pattern = [flipped.flips(0, epoch) for epoch in range(12)]
    assert any(pattern) and not all(pattern)
    for epoch, flip in enumerate(pattern):
        first, last = flipped.batch(epoch).pixels[0, 0, 0, 0], flipped.batch(epoch).pixels[0, 0, 0, -1]
        assert (first > last) == flip


def test_metadata_jsonl_captions(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "meta"
    write_mixed_folder(folder, n=3, with_problems=False)
    (folder / "sub").mkdir()
    Image.new("RGB", (20, 20), (5, 5, 5)).save(folder / "sub" / "deep.png")
    lines = [
        {"file_name": "img00.jpg", "text": "from metadata"},
        {"file_name": "sub/deep.png", "text": "in a subfolder"},
        {"file_name": "gone.png", "text": "missing"},
    ]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    with caplog.at_level(logging.WARNING):
        scan = scan_folder(folder)
    captions = {p.relative_to(folder).as_posix(): c for p, c in scan.items}
    assert captions == {
        "img00.jpg": "from metadata",
        "img01.png": "",
        "img02.png": "",
        "sub/deep.png": "in a subfolder",
    }
    assert "gone.png" in caplog.text and "metadata.jsonl" in caplog.text
    assert len(scan.missing_captions) == 2  # metadata wins over .txt files: unlisted images are uncaptioned

    (folder / "photo.heic").write_bytes(b"not decodable here")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        scan_folder(folder)
    assert "ignoring 1 file(s)" in caplog.text and "photo.heic" in caplog.text  # reported, not silently lost

    (folder / "metadata.jsonl").write_text('{"file_name": "img00.jpg", "text": "ok"}\n{"file_name": oops}\n')
    with pytest.raises(DatasetError, match=r"metadata.jsonl:2: not valid JSON"):
        scan_folder(folder)


def test_unreadable_file_at_batch_time_is_left_out(tmp_path: Path, monkeypatch, caplog) -> None:
    folder = tmp_path / "f"
    write_mixed_folder(folder, n=4, with_problems=False)
    monkeypatch.setattr(loader, "PRELOAD_BYTES", 0)  # read per batch, as large datasets are
    data = _data([{"folder_path": str(folder), "resolution": 16, "enable_buckets": False}], batch_size=4)
    (folder / "img01.png").write_bytes(b"")  # broken after the scan
    with caplog.at_level(logging.WARNING):
        batch = data.batch(0)
    assert len(batch) == 3 and "img01.png" in caplog.text
