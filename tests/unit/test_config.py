"""Config schema, YAML reading and ``key=value`` overrides: every error names the file and the YAML path."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from eridiffusion.config import (
    ConfigError,
    JobConfig,
    apply_overrides,
    dump_config,
    load_config,
    validate_config,
)
from eridiffusion.config.load import parse_override

CONFIGS = Path(__file__).parents[2] / "configs"
EXAMPLE_CONFIGS = sorted([*CONFIGS.rglob("*.yaml"), *CONFIGS.rglob("*.yml")])

MINIMAL: dict[str, Any] = {"name": "job", "datasets": [{"folder_path": "data/x"}]}


def minimal(**sections: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    data.update(sections)
    return data


def error_of(data: dict[str, Any], source: str = "<config>") -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(data, source)
    return str(info.value)


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- schema errors -------------------------------------------------------------------------------------


def test_minimal_config_fills_defaults() -> None:
    cfg = validate_config(minimal())
    assert cfg.name == "job"
    assert cfg.train.lr == 1e-4
    assert cfg.train.optimizer.type == "adamw"
    assert cfg.datasets[0].resolution == 512
    assert cfg.run_dir == Path("output") / "job"


@pytest.mark.parametrize(
    ("data", "path", "allowed"),
    [
        (
            minimal(bogus=1),
            "bogus",
            "datasets, eval, logging, model, name, network, output_dir, pipeline, sample, save, train",
        ),
        (
            minimal(train={"learning_rate": 1e-4}),
            "train.learning_rate",
            "batch_size, blocks_to_swap, device, diff_output_preservation, diff_output_preservation_class, "
            "diff_output_preservation_multiplier, distributed, ema,",
        ),
        (
            minimal(train={"optimizer": {"typ": "sgd"}}),
            "train.optimizer.typ",
            "betas, eps, params, type, weight_decay",
        ),
        (minimal(train={"ema": {"decy": 0.9}}), "train.ema.decy", "decay, enabled, warmup"),
        (
            minimal(datasets=[{"folder_path": "a", "resolutoin": 64}]),
            "datasets[0].resolutoin",
            "alpha_mask, bucket_no_upscale, bucket_step, cache_dir, cache_latents_to_disk, "
            "cache_text_embeddings, caption_dropout_rate, caption_ext, class_prompt, crop, "
            "enable_buckets, flip_x, folder_path, is_reg, is_val, keep_tokens, loss_weight, mask_path, "
            "normalize_masked_area_loss, num_class_images, num_repeats, resolution, shards, "
            "shuffle_tokens, synthetic, trigger_word, unmasked_weight, validation_split, weight",
        ),
        (
            minimal(datasets=[{"folder_path": "a"}, {"folder_path": "b", "synthetic": {"knd": "shapes"}}]),
            "datasets[1].synthetic.knd",
            "captions, colours, held_out, kind, n, resolution, seed",
        ),
    ],
    ids=["top", "train", "optimizer", "ema", "dataset", "synthetic"],
)
def test_unknown_key_names_yaml_path_and_allowed_keys(data: dict[str, Any], path: str, allowed: str) -> None:
    msg = error_of(data)
    assert f"  {path}: unknown key; allowed keys here: {allowed}" in msg
    assert "1 problem(s)" in msg


def test_model_options_accept_family_specific_keys() -> None:
    # model.options is validated by the family, so the schema must not reject its keys
    cfg = validate_config(minimal(model={"arch": "tiny", "options": {"channels": [8, 16], "anything": 1}}))
    assert cfg.model.options == {"channels": [8, 16], "anything": 1}


def test_bad_literal_lists_allowed_values() -> None:
    msg = error_of(minimal(train={"optimizer": {"type": "adam"}}))
    assert "train.optimizer.type: Input should be 'adamw', 'adamw8bit', 'sgd', 'prodigy', " in msg
    assert "'adamw_schedulefree' or 'came' (got 'adam')" in msg


def test_bad_literal_in_list_item_names_index() -> None:
    msg = error_of(minimal(datasets=[{"folder_path": "a", "synthetic": {"kind": "blobs"}}]))
    assert "datasets[0].synthetic.kind: Input should be 'shapes' (got 'blobs')" in msg


def test_out_of_range_number_shows_value() -> None:
    msg = error_of(minimal(train={"lr": -1}))
    assert "train.lr: Input should be greater than 0 (got -1)" in msg


def test_missing_required_keys_are_named() -> None:
    msg = error_of({})
    assert msg.splitlines() == [
        "<config>: 2 problem(s) in the config:",
        "  name: required key is missing",
        "  datasets: required key is missing",
    ]


def test_dataset_needs_a_folder_or_shards() -> None:
    msg = error_of(minimal(datasets=[{"resolution": 64}]))
    assert "datasets[0]: Value error, set exactly one of folder_path" in msg and "shards" in msg
    msg = error_of(minimal(datasets=[{"folder_path": "a", "shards": "b.tar"}]))
    assert "datasets[0]: Value error, set exactly one of folder_path" in msg


def test_empty_datasets_list_rejected() -> None:
    msg = error_of(minimal(datasets=[]))
    assert "  datasets: List should have at least 1 item" in msg


def test_all_problems_reported_at_once() -> None:
    data = minimal(
        bogus=1,
        train={"lr": 0, "loss": "l3", "optimizer": {"typ": "sgd"}},
        datasets=[{"folder_path": "a", "resolutoin": 3}],
    )
    msg = error_of(data, "job.yaml")
    lines = msg.splitlines()
    assert lines[0] == "job.yaml: 5 problem(s) in the config:"
    assert len(lines) == 6
    for path in ("bogus", "train.lr", "train.loss", "train.optimizer.typ", "datasets[0].resolutoin"):
        assert any(line.startswith(f"  {path}: ") for line in lines[1:]), path


def test_mixed_and_multiple_resolutions_accepted() -> None:
    datasets = [{"folder_path": "a", "resolution": 64}, {"folder_path": "b", "resolution": [32, 64]}]
    cfg = JobConfig.model_validate(minimal(datasets=datasets))
    assert [d.resolutions for d in cfg.datasets] == [[64], [32, 64]]
    assert "datasets[0].resolution: Value error, lists a size more than once" in error_of(
        minimal(datasets=[{"folder_path": "a", "resolution": [32, 32]}])
    )
    msg = error_of(minimal(datasets=[{"folder_path": "a", "resolution": [4]}]))
    assert "datasets[0].resolution: Value error, must be >= 8" in msg


def test_negative_resolution_names_its_yaml_path() -> None:
    msg = error_of(minimal(datasets=[{"folder_path": "a"}, {"folder_path": "b", "resolution": -512}]))
    assert (
        "  datasets[1].resolution: Value error, must be >= 8 (or a non-empty list of such) (got -512)\n"
        in msg + "\n"
    )


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ({"crop": "random", "cache_latents_to_disk": True}, "crop: random gives a new crop every epoch"),
        ({"shuffle_tokens": True, "cache_text_embeddings": True}, "turn off one of shuffle_tokens"),
        ({"bucket_no_upscale": True, "enable_buckets": False}, "bucket_step need enable_buckets"),
        ({"crop": "middle"}, "datasets[0].crop: Input should be 'center' or 'random'"),
        ({"weight": 0}, "datasets[0].weight: Input should be greater than 0"),
    ],
)
def test_incoherent_dataset_settings_rejected(dataset: dict[str, Any], expected: str) -> None:
    assert expected in error_of(minimal(datasets=[{"folder_path": "a", **dataset}]))


def test_shards_cannot_be_cached_and_reg_sets_need_a_training_set() -> None:
    msg = error_of(minimal(datasets=[{"shards": "d/{0..3}.tar", "cache_latents_to_disk": True}]))
    assert "tar shards are streamed and never cached" in msg
    msg = error_of(minimal(datasets=[{"folder_path": "a", "is_reg": True}]))
    assert "every dataset has is_reg: true" in msg


def test_invalid_name_pattern() -> None:
    msg = error_of(minimal(name="my job/1"))
    assert "  name: String should match pattern" in msg
    assert "(got 'my job/1')" in msg


def test_assignment_is_validated_too() -> None:
    cfg = validate_config(minimal())
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        cfg.train.steps = 0


# --- reading files -------------------------------------------------------------------------------------


def test_error_message_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "name: job\ndatasets:\n  - folder_path: a\ntrain:\n  optimizer:\n    typ: sgd\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: 1 problem(s) in the config:")
    assert "train.optimizer.typ: unknown key" in msg


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("name: a\ntrain:\n  lr: [1, 2\n  steps: 3\n", "line 4, column 8: expected ',' or ']', but got ':'"),
        ("name: a\n  bad: indent\n", "line 2, column 6: mapping values are not allowed here"),
    ],
)
def test_invalid_yaml_reports_line_and_column(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: invalid YAML at {where}"


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="the file is empty"):
        load_config(path)


def test_top_level_list_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "- name: a\n- name: b\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: the top level must be a mapping of sections, got list"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"config file '{path}' does not exist"


# --- overrides -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("train.lr=3e-4", ["train", "lr"], 3e-4),
        ("train.lr=1.5e-3", ["train", "lr"], 1.5e-3),
        ("train.steps=100", ["train", "steps"], 100),
        ("train.ema.enabled=true", ["train", "ema", "enabled"], True),
        ("sample.prompts=[a, b]", ["sample", "prompts"], ["a", "b"]),
        ("datasets.0.folder_path=x", ["datasets", 0, "folder_path"], "x"),
        ("train.max_grad_norm=null", ["train", "max_grad_norm"], None),
        ("sample.negative_prompt=", ["sample", "negative_prompt"], ""),
        ("name=a=b", ["name"], "a=b"),
    ],
    ids=["sci-float", "float", "int", "bool", "list", "list-index", "null", "empty", "equals-in-value"],
)
def test_parse_override_values(text: str, path: list[str | int], value: Any) -> None:
    got_path, got_value = parse_override(text)
    assert got_path == path
    assert got_value == value
    assert type(got_value) is type(value)


def test_override_scientific_notation_is_float_not_string() -> None:
    # PyYAML's YAML 1.1 rules would read 3e-4 as the string "3e-4"
    assert parse_override("model.options.beta_start=1e-4") == (["model", "options", "beta_start"], 1e-4)


def test_overrides_applied_by_load_config(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(minimal(train={"lr": 1.0e-3})))
    cfg = load_config(
        path,
        [
            "train.lr=3e-4",
            "train.ema.enabled=true",
            "sample.prompts=[a red circle, b]",
            "datasets.0.folder_path=x",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.ema.enabled is True
    assert cfg.sample.prompts == ["a red circle", "b"]
    assert cfg.datasets[0].folder_path == "x"


def test_override_creates_missing_sections() -> None:
    data = minimal()
    apply_overrides(data, ["train.optimizer.weight_decay=0.5"])
    assert data["train"] == {"optimizer": {"weight_decay": 0.5}}
    assert validate_config(data).train.optimizer.weight_decay == 0.5


def test_override_fills_empty_section() -> None:
    # `train:` with every key commented out loads as None; the override must still land
    data = minimal(train=None)
    apply_overrides(data, ["train.lr=0.5"])
    assert data["train"] == {"lr": 0.5}


def test_override_keeps_sibling_keys() -> None:
    data = minimal(train={"lr": 0.1, "steps": 7})
    apply_overrides(data, ["train.lr=0.2"])
    assert data["train"] == {"lr": 0.2, "steps": 7}


def test_override_replaces_whole_list_item_value() -> None:
    data = minimal(datasets=[{"folder_path": "a"}, {"folder_path": "b"}])
    apply_overrides(data, ["datasets.1={folder_path: c, resolution: 64}"])
    assert data["datasets"] == [{"folder_path": "a"}, {"folder_path": "c", "resolution": 64}]


def test_unknown_key_via_override_is_still_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(minimal()))
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load_config(path, ["train.learning_rate=1e-4"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("noequals", "override 'noequals' must look like key.path=value"),
        ("=3", "override '=3' has an empty key"),
        ("train.lr=[1", "override 'train.lr=[1': value is not valid YAML"),
        (
            "datasets.5.folder_path=x",
            "override 'datasets.5.folder_path=x': datasets[5] is not an existing list item",
        ),
        ("datasets.3=x", "override 'datasets.3=x': datasets[3] is not an existing list item"),
        ("name.first=x", "override 'name.first=x': name is not a section"),
        ("train.lr.value=1", "override 'train.lr.value=1': train.lr is not a section"),
        ("train.0=1", "override 'train.0=1': train[0] is not an existing list item"),
    ],
    ids=[
        "noequals",
        "empty-key",
        "bad-yaml",
        "index-mid",
        "index-last",
        "scalar-top",
        "scalar-nested",
        "dict-idx",
    ],
)
def test_override_errors(text: str, message: str) -> None:
    data = minimal(train={"lr": 0.1})
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_overrides(data, [text])


# --- dump / examples -----------------------------------------------------------------------------------


def test_dump_config_round_trips() -> None:
    cfg = validate_config(
        minimal(
            train={
                "lr": 3e-4,
                "optimizer": {"betas": [0.8, 0.9]},
                "max_grad_norm": None,
                "min_snr_gamma": 5.0,
            },
            save={"resume": "output/job/checkpoints/step_000010"},
            sample={"prompts": ["a red circle"], "every": 5},
            datasets=[{"folder_path": "d", "resolution": 32, "synthetic": {"n": 10, "resolution": 32}}],
        )
    )
    text = dump_config(cfg)
    again = validate_config(yaml.safe_load(text))
    assert again == cfg
    assert isinstance(again, JobConfig)
    assert again.train.optimizer.betas == (0.8, 0.9)
    assert again.save.resume == "output/job/checkpoints/step_000010"
    assert dump_config(again) == text


def test_example_configs_exist() -> None:
    assert EXAMPLE_CONFIGS, f"no example configs found under {CONFIGS}"


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_example_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name
    assert validate_config(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize("name", [".", "..", "..."])
def test_a_run_name_of_dots_is_refused(name: str) -> None:
    """The run folder is output_dir/name: '.' or '..' would be output_dir itself or its parent."""
    with pytest.raises(ConfigError, match="names no folder of its own"):
        validate_config({"name": name, "datasets": [{"folder_path": "data"}]})
