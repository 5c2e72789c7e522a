"""Checkpoints: exact round trip, rotation, numeric ordering, atomic writes and damaged files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from eridiffusion.training.checkpoint import CheckpointManager, TrainState, atomic_write_dir


def trained_model() -> tuple[nn.Linear, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(torch.randn(4, 3)).pow(2).sum().backward()
    opt.step()
    return model, opt


def save_steps(manager: CheckpointManager, steps: list[int]) -> None:
    model, opt = trained_model()
    for step in steps:
        manager.save(TrainState(step=step), dict(model.named_parameters()), opt, None)


def names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_round_trip(tmp_path: Path) -> None:
    model, opt = trained_model()
    params = dict(model.named_parameters())
    ema = {k: v.detach() * 0.5 for k, v in params.items()}
    state = TrainState(
        step=7,
        micro_batches=14,
        epoch=1,
        ema_updates=7,
        config_hash="abc",
        last_loss=0.25,
        metrics={"adherence": 0.5},
    )
    manager = CheckpointManager(tmp_path / "ckpt", keep=3)

    path = manager.save(state, params, opt, ema)

    assert path == tmp_path / "ckpt" / "step_000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors",
        "optimizer.pt",
        "state.json",
        "trainable.safetensors",
    ]
    loaded_state, weights, opt_state, loaded_ema = CheckpointManager.load(path)
    assert loaded_state == state
    assert weights.keys() == {"weight", "bias"}
    for k, v in params.items():
        torch.testing.assert_close(weights[k], v.detach(), rtol=0, atol=0)
        torch.testing.assert_close(loaded_ema[k], ema[k], rtol=0, atol=0)

    # the optimizer state restores into a fresh AdamW and matches the original exactly
    fresh_model = nn.Linear(3, 2)
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=1.0)
    fresh.load_state_dict(opt_state)
    assert fresh.param_groups[0]["lr"] == 1e-2
    assert fresh.param_groups[0]["weight_decay"] == 0.1
    for p_old, p_new in zip(model.parameters(), fresh_model.parameters(), strict=True):
        old, new = opt.state[p_old], fresh.state[p_new]
        assert float(new["step"]) == 1.0
        torch.testing.assert_close(new["exp_avg"], old["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(new["exp_avg_sq"], old["exp_avg_sq"], rtol=0, atol=0)


def test_round_trip_without_ema(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=1)
    save_steps(manager, [3])
    state, _, _, ema = CheckpointManager.load(tmp_path / "step_000003")
    assert state.step == 3
    assert ema is None
    assert json.loads((tmp_path / "step_000003" / "state.json").read_text())["step"] == 3


def test_rotation_keeps_newest(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=2)
    save_steps(manager, [1, 2, 3, 4, 5])
    assert names(manager.list()) == ["step_000004", "step_000005"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000004", "step_000005"]


def test_rotation_keep_one(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=1)
    save_steps(manager, [10, 20])
    assert names(manager.list()) == ["step_000020"]


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    model, opt = trained_model()
    manager.save(TrainState(step=5, last_loss=1.0), dict(model.named_parameters()), opt, None)
    manager.save(TrainState(step=5, last_loss=2.0), dict(model.named_parameters()), opt, None)
    assert names(manager.list()) == ["step_000005"]
    assert CheckpointManager.load(tmp_path / "step_000005")[0].last_loss == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000005"]


def test_latest_orders_numerically(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=5)
    assert manager.latest() is None
    save_steps(manager, [10, 9])
    assert manager.latest() == tmp_path / "step_000010"
    # unpadded or wider numbers sort by value, not as strings
    for name in ("step_99", "step_100", "step_1000000"):
        (tmp_path / name).mkdir()
    assert names(manager.list()) == ["step_000009", "step_000010", "step_99", "step_100", "step_1000000"]
    assert manager.latest() == tmp_path / "step_1000000"


def test_list_ignores_other_entries(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=5)
    save_steps(manager, [2])
    (tmp_path / "step_000500_backup").mkdir()  # a user's copy must not crash the numeric sort
    (tmp_path / "step_000900").write_text("not a folder")
    (tmp_path / "notes").mkdir()
    assert names(manager.list()) == ["step_000002"]


def test_list_of_missing_dir_is_empty(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "absent", keep=2)
    assert manager.list() == []
    assert manager.latest() is None
    manager.clean_partial()  # nothing to clean, no error
    assert not (tmp_path / "absent").exists()


def test_atomic_write_dir_replaces_previous(tmp_path: Path) -> None:
    final = tmp_path / "step_000001"
    atomic_write_dir(final, lambda d: (d / "a.txt").write_text("old"))
    atomic_write_dir(final, lambda d: (d / "b.txt").write_text("new"))
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert (final / "b.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]


def test_atomic_write_dir_failure_leaves_previous_untouched(tmp_path: Path) -> None:
    final = tmp_path / "step_000001"
    atomic_write_dir(final, lambda d: (d / "a.txt").write_text("old"))

    def crash(d: Path) -> None:
        (d / "a.txt").write_text("half")
        (d / "b.txt").write_text("half")
        raise KeyboardInterrupt  # a kill mid-write (BaseException, not just Exception)

    with pytest.raises(KeyboardInterrupt):
        atomic_write_dir(final, crash)
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    assert (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]


def test_atomic_write_dir_failure_on_first_write_leaves_nothing(tmp_path: Path) -> None:
    def crash(d: Path) -> None:
        (d / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_dir(tmp_path / "ckpt" / "step_000001", crash)
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_stale_tmp_dir_ignored_then_cleaned(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    save_steps(manager, [4])
    stale = tmp_path / ".tmp-step_000008-12345"
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"partial")
    old = tmp_path / ".tmp-old-step_000004-12345"
    old.mkdir()

    assert names(manager.list()) == ["step_000004"]
    assert manager.latest() == tmp_path / "step_000004"
    manager.clean_partial()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000004"]
    assert CheckpointManager.load(tmp_path / "step_000004")[0].step == 4


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize(
    ("file", "keep"),
    [
        ("trainable.safetensors", 100),  # header promises more data than is there
        ("trainable.safetensors", 4),  # not even a header
        ("ema.safetensors", 50),
        ("optimizer.pt", 40),
        ("optimizer.pt", 0),
        ("state.json", 5),
    ],
)
def test_damaged_checkpoint_raises_naming_path(tmp_path: Path, file: str, keep: int) -> None:
    model, opt = trained_model()
    params = dict(model.named_parameters())
    path = CheckpointManager(tmp_path, keep=1).save(TrainState(step=1), params, opt, params)
    truncate(path / file, keep)
    with pytest.raises(RuntimeError) as info:
        CheckpointManager.load(path)
    assert f"checkpoint '{path}' is unreadable" in str(info.value)
    assert "delete it to resume from an older one" in str(info.value)


def test_checkpoint_missing_file_raises_naming_path(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=1)
    save_steps(manager, [1])
    path = tmp_path / "step_000001"
    (path / "optimizer.pt").unlink()
    with pytest.raises(RuntimeError, match="is unreadable"):
        CheckpointManager.load(path)
