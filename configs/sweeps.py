"""A sweep's points: the configs `twostage sweep` runs, every one validated before any is run.

A sweep is a base config (`-c`), overrides for every point (`--set`), and the points: every combination of the
grid's values (`--grid KEY=V1,V2,...`, or `grid:` in a sweep file), crossed with each override set of the sweep
file's `points:` list when there is one (for grids that are not a product, e.g. one set per method):

    # sweep.yaml: twostage sweep -c configs/quickstart.yaml --file sweep.yaml
    grid: {data.label_fraction: [0.1, 0.5, 1.0], seed: [0, 1, 2]}
    points:                                   # optional
      - {pretrain.objective: denoising}
      - {pretrain.objective: autoencoder, pretrain.epochs: 5}
    set: {finetune.epochs: 10}                # optional, as --set

The sweep's id is a digest of its points' configs: the same command gives the same id, which is how running it
again finds the points that completed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from configs.errors import UserError
from configs.loader import apply_override, describe_validation_error, parse_value, read_raw_config, set_value
from configs.schema import PipelineConfig, config_hash, fingerprint

FILE_KEYS = ("grid", "points", "set")


@dataclass(frozen=True)
class SweepPoint:
    values: dict[str, Any]  # the swept keys and this point's value of each
    config: PipelineConfig

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    @property
    def label(self) -> str:
        return label(self.values)

    @property
    def run_name(self) -> str:
        """The point's name in Prefect and in MLflow (the parent run's name): config name and hash."""
        return f"{self.config.name}-{self.config_hash[:7]}"


@dataclass
class Sweep:
    config_path: str
    points: list[SweepPoint]
    keys: list[str] = field(default_factory=list)  # the keys whose value differs between points, in the order given

    @property
    def id(self) -> str:
        return fingerprint(*sorted(point.config_hash for point in self.points))[:10]

    @property
    def experiment(self) -> str:
        return self.points[0].config.name


def parse_grid(text: str) -> tuple[str, list[Any]]:
    """`KEY=V1,V2,...` as (key, values); commas inside [...] or {...} belong to the value: `model.encoder_widths=
    [64,32],[128,64]` sweeps two lists."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise UserError(f"--grid {text!r}: expected KEY=V1,V2,..., e.g. --grid data.label_fraction=0.1,0.5,1.0")
    parts, depth, start = [], 0, 0
    for index, char in enumerate(values):
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(values[start:index])
            start = index + 1
    parts.append(values[start:])
    if any(not part.strip() for part in parts):
        raise UserError(f"--grid {text!r}: an empty value; separate values with single commas")
    return key, [parse_value(part.strip(), f"--grid {text!r}") for part in parts]


def read_sweep_file(path: str | Path) -> tuple[dict[str, list[Any]], list[dict[str, Any]], dict[str, Any]]:
    """(grid, points, set) of a sweep file; one line naming the file and key for anything else in it."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise UserError(f"{path}: cannot read the sweep file ({error.strerror}); pass an existing file with --file") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path}: a sweep file is a mapping with {', '.join(FILE_KEYS)}; see configs/sweeps.py")
    unknown = sorted(set(raw) - set(FILE_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key '{unknown[0]}'; a sweep file has {', '.join(FILE_KEYS)}")
    grid, points, common = raw.get("grid") or {}, raw.get("points") or [], raw.get("set") or {}
    if not isinstance(grid, dict) or not all(isinstance(values, list) and values for values in grid.values()):
        raise UserError(f"{path}: grid: must map each key to a non-empty list of values, e.g. seed: [0, 1, 2]")
    if not isinstance(points, list) or not all(isinstance(point, dict) and point for point in points):
        raise UserError(f"{path}: points: must be a list of mappings of keys to values, e.g. - {{seed: 0}}")
    if not isinstance(common, dict):
        raise UserError(f"{path}: set: must map keys to values, e.g. finetune.epochs: 10")
    return grid, points, common


def build_sweep(config_path: str, overrides: list[str], grids: list[str], sweep_file: str | None = None) -> Sweep:
    """Every point of the sweep, validated.

    Raises:
        UserError: a malformed --grid, a bad sweep file, no point to run, a point the schema rejects (naming the
            point), two points with the same config, or a swept `name` (a sweep's points share one experiment).
    """
    grid, point_sets, common = read_sweep_file(sweep_file) if sweep_file else ({}, [], {})
    for text in grids:
        key, values = parse_grid(text)
        if key in grid:
            raise UserError(f"--grid {text!r}: {key} is swept twice; give its values once")
        grid[key] = values
    if not grid and not point_sets:
        raise UserError("a sweep needs points: --grid KEY=V1,V2 (repeatable) or --file SWEEP.yaml with grid: or points:")
    keys = list(dict.fromkeys([*(key for point in point_sets for key in point), *grid]))
    if "name" in keys:
        raise UserError("name can't be swept: a sweep's points share one MLflow experiment; set it with --set name=...")

    base = read_raw_config(config_path)
    points: list[SweepPoint] = []
    for point_set in point_sets or [{}]:
        for combination in itertools.product(*grid.values()):
            values = {**point_set, **dict(zip(grid, combination))}
            points.append(_validated_point(base, config_path, overrides, common, values, len(points) + 1))
    varying = [key for key in keys if len({repr(point.values.get(key)) for point in points}) > 1] or keys
    points = [SweepPoint({key: value for key, value in point.values.items() if key in varying}, point.config)
              for point in points]  # a key with one value for every point is part of the base, not swept
    seen: dict[str, SweepPoint] = {}
    for point in points:
        if point.config_hash in seen:
            raise UserError(f"sweep points {seen[point.config_hash].label!r} and {point.label!r} are the same config; "
                            "drop one")
        seen[point.config_hash] = point
    return Sweep(config_path, points, varying)


def _validated_point(base: dict[str, Any], config_path: str, overrides: list[str], common: dict[str, Any],
                     values: dict[str, Any], number: int) -> SweepPoint:
    raw = yaml.safe_load(yaml.safe_dump(base))  # a copy
    where = f"sweep point {number} ({label(values)})"
    for key, value in common.items():
        set_value(raw, str(key), value, f"set: {key}")
    for override in overrides:
        apply_override(raw, override)
    for key, value in values.items():
        set_value(raw, str(key), value, where)
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise UserError(f"{config_path}, {where}: {describe_validation_error(error)}") from None
    return SweepPoint({str(key): value for key, value in values.items()}, config)


def label(values: dict[str, Any]) -> str:
    """A point's swept values as `key=value ...`, values in YAML's flow style: `model.encoder_widths=[64, 32]`."""
    return " ".join(f"{key}={_show(value)}" for key, value in values.items())


def _show(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
