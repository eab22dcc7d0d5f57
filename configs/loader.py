"""Read a YAML config, apply `--set key=value` overrides, validate into a `PipelineConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from configs.errors import UserError
from configs.schema import PipelineConfig


def load_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    """Load `path`, merge the dotted `KEY=VALUE` overrides into it, then validate.

    Raises:
        UserError: unreadable YAML, a malformed override, or a key or value the schema rejects.
    """
    raw = read_raw_config(path)
    for override in overrides:
        apply_override(raw, override)
    return validate_config(raw, source=str(path))


def read_raw_config(path: str | Path) -> dict[str, Any]:
    """The config file's mapping, not yet validated.

    Raises:
        UserError: a missing, unreadable or empty file, or a top level that is not a mapping.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise UserError(f"{path}: cannot read config ({error.strerror}); pass an existing file with -c") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise UserError(f"{path}:{line} is not valid YAML ({getattr(error, 'problem', error)})") from None
    if raw is None:
        raise UserError(f"{path}: the config file is empty; start from configs/quickstart.yaml (every key has a default)")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys such as data:, pretrain:, head:")
    return raw


def validate_config(raw: dict[str, Any], source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise UserError(f"{source}: {describe_validation_error(error)}") from None


def describe_validation_error(error: ValidationError) -> str:
    """One line for the first problem: the dotted key, what is wrong, and how to fix it."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        known = ", ".join(_known_keys(first["loc"][:-1]))
        message = f"unknown key '{key}'; valid keys here: {known}"
    else:
        message = f"invalid value for '{key}': {first['msg']} (got {first.get('input')!r})"
    more = len(error.errors()) - 1
    return message + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def _known_keys(location: tuple) -> list[str]:
    model: type[BaseModel] = PipelineConfig
    for part in location:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return list(model.model_fields)


def apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise UserError(f"--set {override!r}: expected KEY=VALUE, e.g. --set finetune.epochs=3")
    set_value(raw, key, parse_value(text, f"--set {override!r}"), f"--set {override!r}")


def parse_value(text: str, where: str) -> Any:
    """A command-line value as YAML reads it: 3 is an int, [256,128] a list, true a bool; "" stays ""."""
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError as error:
        raise UserError(
            f"{where}: {text!r} is not a YAML value ({getattr(error, 'problem', None) or 'unreadable'}); "
            "quote it whole in the shell, e.g. --set 'model.encoder_widths=[256,128]'"
        ) from None


def set_value(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set the dotted `key` (e.g. finetune.optimizer.lr) in the raw config, making sections on the way."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{where}: '{part}' is a value, not a section")
        node = child
    node[leaf] = value


def to_yaml(config: PipelineConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten(config: BaseModel) -> dict[str, str]:
    """The whole config as dotted keys, e.g. {'finetune.optimizer.lr': '0.001'}: MLflow params."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                walk(f"{prefix}.{name}" if prefix else name, item)
        else:
            flat[prefix] = str(value)

    walk("", config.model_dump(mode="json"))
    return flat
