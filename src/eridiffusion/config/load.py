"""Read a YAML job config, apply ``key=value`` overrides and validate it.

Errors are reported as one :class:`ConfigError` listing every problem with its YAML path
(``train.optimizer.type``) so a user fixes them all in one go instead of one per run.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from eridiffusion.config.aitoolkit import TranslationError, translate
from eridiffusion.config.schema import JobConfig


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the file and the YAML paths."""


class _ValueLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` as a float (YAML 1.2); PyYAML's 1.1 rules need ``3.0e-4``."""


_ValueLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


_UNION_TAGS = {"bool", "str", "int", "float", "none", "list", "dict", "tuple"}
"""Names pydantic inserts into an error location for the members of a union (``bool | str``)."""


def _format_loc(loc: Iterable[Any]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, str) and (item in _UNION_TAGS or "[" in item):
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "<root>"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Walk the schema along ``loc`` (minus the bad key) to list the keys that section allows."""
    current: Any = model
    for item in loc[:-1]:
        if isinstance(item, int):
            continue
        field = current.model_fields.get(item) if isinstance(current, type) else None
        if field is None:
            return None
        current = _model_in(field.annotation)
        if current is None:
            return None
    return sorted(current.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X``, ``X | None`` or ``list[X]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel] = JobConfig) -> str:
    lines = [f"{source}: {err.error_count()} problem(s) in the config:"]
    for e in err.errors():
        path = _format_loc(e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, tuple(e["loc"]))
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  {path}: unknown key{hint}")
        elif e["type"] == "missing":
            lines.append(f"  {path}: required key is missing")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"  {path}: {e['msg']}{shown}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``train.lr=3e-4`` -> (["train", "lr"], 0.0003); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value, e.g. train.steps=100")
    key, _, raw = text.partition("=")
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.load(raw, Loader=_ValueLoader) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    path: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    return path, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Set each dotted path in ``data`` (creating sections as needed); list items by index."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            where = _format_loc(path[: i + 1])
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    raise ConfigError(f"override {text!r}: {where} is not an existing list item")
                node = node[part]
            else:
                if not isinstance(node, dict):
                    raise ConfigError(f"override {text!r}: {where} is not a section")
                if node.get(part) is None:  # missing, or an empty section (`train:` with nothing under it)
                    node[part] = {}
                node = node[part]
        last = path[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise ConfigError(f"override {text!r}: {_format_loc(path)} is not an existing list item")
        elif not isinstance(node, dict):
            raise ConfigError(f"override {text!r}: {_format_loc(path[:-1])} is not a section")
        node[last] = value
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.y*ml"))[:5]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise ConfigError(f"'{path}' is a folder, not a config file{hint}; pass the YAML file itself")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); save the file as UTF-8 "
            "(is it a YAML file at all?)"
        ) from None
    try:
        data = yaml.load(text, Loader=_ValueLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        raise ConfigError(f"{path}: the file is empty; see configs/ for examples")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def translated_yaml(path: Path, notes: list[str] | None = None) -> dict[str, Any]:
    """The file as an eri config: ai-toolkit job files and aliases translated (see config.aitoolkit).

    ``notes`` receives one line per translated key, headed by what kind of file it was.
    """
    try:
        data, lines, foreign = translate(read_yaml(path))
    except TranslationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if notes is not None and lines:
        kind = "ai-toolkit job file" if foreign else "config aliases"
        notes.append(f"{path}: {kind} translated (other keys keep their names):")
        notes.extend(f"  {line}" for line in lines)
    return data


def load_config(path: str | Path, overrides: Iterable[str] = (), notes: list[str] | None = None) -> JobConfig:
    """Read, translate, override and validate; raise :class:`ConfigError` with every problem listed.

    Overrides use eri's key paths, also for an ai-toolkit file (they apply after its translation).
    """
    path = Path(path)
    data = apply_overrides(translated_yaml(path, notes), overrides)
    return validate_config(data, str(path))


def unsupported_settings(cfg: JobConfig) -> list[str]:
    """Settings the schema accepts (so ai-toolkit files translate) but training cannot honour as given.

    ``eri validate`` lists them and ``eri train`` refuses them before loading any weight.
    """
    problems = []
    m = cfg.model
    for key, value in (
        ("model.quantize", m.quantize),
        ("model.quantize_text_encoders", m.quantize_text_encoders),
    ):
        if value == "int4":
            problems.append(f"{key}: int4 is not available; use nf4 (4-bit NormalFloat, bitsandbytes)")
    if m.quantize != "none" or m.quantize_text_encoders != "none":
        if cfg.network is None:
            problems.append(
                "model.quantize: a quantised base is for adapter training (add a network: section); a full "
                "fine-tune trains and saves the weights themselves (model.dtype: bf16 halves frozen parts)"
            )
        if cfg.pipeline is not None:
            problems.append(
                "model.quantize: pipelines save and pass on whole models; use it in a single-stage job"
            )
        needs = {"fp8": "torchao", "int8": "torchao", "nf4": "bitsandbytes"}
        for package in sorted({needs[v] for v in (m.quantize, m.quantize_text_encoders) if v in needs}):
            if importlib.util.find_spec(package) is None:
                problems.append(f"model.quantize needs {package}: pip install {package}")
    return problems


def validate_config(data: dict[str, Any], source: str = "<config>") -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def dump_config(cfg: JobConfig) -> str:
    """The resolved config as YAML (written next to checkpoints so a run is reproducible)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def import_config(src: Path, dst: Path, force: bool = False) -> list[str]:
    """``eri config import``: write an ai-toolkit job file (or a config using aliases) as an eri config,
    validated first and written atomically; returns the translation notes and what was written."""
    notes: list[str] = []
    data = translated_yaml(src, notes)
    validate_config(data, str(src))
    if dst.exists() and not force:
        raise FileExistsError(f"'{dst}' exists; pass --force to overwrite it")
    header = f"# translated from {src} by `eri config import`; check it with `eri validate {dst}`\n"
    tmp = dst.with_name(f".tmp-{dst.name}")
    tmp.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    tmp.replace(dst)
    return [*(notes or [f"{src}: nothing to translate"]), f"wrote {dst}"]
