"""Tar shards: brace patterns, indexing (cached), shard-local deterministic order per (seed, epoch),
resumable by position, corrupt members left out."""

from __future__ import annotations

import gzip
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from eridiffusion.config.schema import DatasetConfig
from eridiffusion.data import shards as shards_module
from eridiffusion.data.folder import DatasetError
from eridiffusion.data.loader import TrainingData, open_sources
from eridiffusion.data.shards import expand_braces, resolve_shards
from tests.unit.imagesets import write_mixed_folder, write_shards


def _data(spec: object, batch_size: int = 3, seed: int = 0, **extra: object) -> TrainingData:
    return TrainingData([DatasetConfig(shards=spec, resolution=16, **extra)], batch_size, seed, 4)


def test_expand_braces() -> None:
    assert expand_braces("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_missing_and_compressed_shards_are_clear_errors(tmp_path: Path) -> None:
    write_shards(tmp_path, 2, 2)
    with pytest.raises(DatasetError, match=r"1 of 3 shard files do not exist: .*shard-002.tar"):
        resolve_shards(str(tmp_path / "shard-{000..002}.tar"))
    (tmp_path / "z.tar").write_bytes(gzip.compress((tmp_path / "shard-000.tar").read_bytes()))
    with pytest.raises(DatasetError, match=r"datasets\[0\].shards: .*gzip-compressed"):
        open_sources([DatasetConfig(shards=str(tmp_path / "z.tar"))])


def test_shard_order_is_local_deterministic_and_resumable(tmp_path: Path, monkeypatch) -> None:
    write_shards(tmp_path, 3, 6)
    spec = str(tmp_path / "shard-{000..002}.tar")
    data = _data(spec, enable_buckets=False)
    assert len(data) == 18 and data.sources[0].streamed
    shard_of = [data.sources[0].stream_position(v.item)[0] for v in data.views]
    orders = []
    for epoch in range(3):
        plan = data.plan(epoch)
        assert Counter(v for b in plan for v in b) == Counter(range(18))  # every sample once
        assert all(len({shard_of[v] for v in batch}) == 1 for batch in plan)  # a batch reads one shard
        shards_in_order = [shard_of[b[0]] for b in plan]
        assert shards_in_order == sorted(shards_in_order, key=shards_in_order.index)  # shard by shard
        orders.append(plan)
    assert orders[0] != orders[1]

    def no_reindex(*args: object) -> None:
        raise AssertionError("the shard index should come from the cache")

    monkeypatch.setattr(shards_module, "index_shard", no_reindex)
    again = _data(spec, enable_buckets=False)  # a resumed run: same index, same batches by position
    for k in reversed(range(3 * data.batches_per_epoch)):
        a, b = data.batch(k), again.batch(k)
        assert a.captions == b.captions and torch.equal(a.pixels, b.pixels)
    inline = list(data.iterate(4, 12, num_workers=0))
    parallel = list(again.iterate(4, 12, num_workers=2))  # each worker opens its own shard handles
    assert all(torch.equal(x.pixels, y.pixels) for x, y in zip(inline, parallel, strict=True))


def test_shards_mix_with_folders_and_buckets(tmp_path: Path) -> None:
    paths = write_shards(tmp_path / "s", 2, 5)
    write_mixed_folder(tmp_path / "f", n=4, with_problems=False)
    configs = [
        DatasetConfig(shards=[str(p) for p in paths], resolution=16),
        DatasetConfig(folder_path=str(tmp_path / "f"), resolution=16, weight=2),
    ]
    data = TrainingData(configs, 4, 1, 4)
    plan = data.plan(0)
    assert Counter(data.views[v].dataset for b in plan for v in b) == {0: 10, 1: 8}
    for k in range(data.batches_per_epoch):
        batch = data.batch(k)
        assert len({tuple(p.shape) for p in batch.pixels}) == 1


def test_corrupt_member_is_left_out_with_a_warning(tmp_path: Path, caplog) -> None:
    write_shards(tmp_path, 1, 4, corrupt_member=True)
    data = _data(str(tmp_path / "shard-000.tar"), batch_size=4, enable_buckets=False)
    with caplog.at_level(logging.WARNING):
        batch = data.batch(0)
    assert len(batch) == 3 and "s0/k0000.png" in caplog.text
