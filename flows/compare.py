"""`twostage compare`: the pipeline runs of an experiment side by side, and a figure of them; a sweep's comparison:
its points, with the swept keys as columns (mean ± std over seeds when `seed` is swept)."""

from __future__ import annotations

import datetime
import statistics
from pathlib import Path

from configs.errors import UserError
from configs.sweeps import Sweep
from tasks import plots, tracking

TEST_METRICS = ("test/acc", "test/loss", "test/f1_macro")


def compare(experiment: str, metric: str, last: int | None, out: Path) -> str:
    """The comparison table as text; writes `out/compare.png`. No runs: a one-line message, no figure."""
    runs = tracking.pipeline_runs(experiment, last)
    if not runs:
        return f"no finished pipeline runs in experiment {experiment!r} at {tracking.tracking_uri()}"
    check_metric(runs, metric, experiment)
    runs.sort(key=lambda run: _sort_value(run.metrics, metric), reverse=not _lower_is_better(metric))
    keys = sorted({key for run in runs for key in run.params if not key.startswith("parameters/")})  # config only
    differing = [key for key in keys if len({run.params.get(key) for run in runs}) > 1]
    model_name = runs[0].params.get("evaluate.registered_model", "None")
    champion = tracking.champion_pipeline_run(experiment if model_name == "None" else model_name)

    names = [run.name for run in runs]  # the same config twice has the same name: add the run id's start
    labels = [f"{run.name} {run.run_id[:6]}" if names.count(run.name) > 1 else run.name for run in runs]
    header = ["run", "started", *differing, *TEST_METRICS, "seconds", "champion"]
    rows = [
        [
            label,
            datetime.datetime.fromtimestamp(run.start_time_ms / 1000).strftime("%Y-%m-%d %H:%M"),
            *(run.params.get(key, "") for key in differing),
            *(f"{run.metrics[name]:.4f}" if name in run.metrics else "" for name in TEST_METRICS),
            f"{run.metrics.get('time/total_s', float('nan')):.1f}",
            "*" if run.run_id == champion else "",
        ]
        for label, run in zip(labels, runs)
    ]
    curves = {label: validation_curve(run) for label, run in zip(labels, runs)}
    values = {label: run.metrics[metric] for label, run in zip(labels, runs) if metric in run.metrics}
    out.mkdir(parents=True, exist_ok=True)
    plots.comparison(curves, values, metric).savefig(out / "compare.png")
    return "\n".join([*table(header, rows), "", _sorted_by(metric, out / "compare.png")])


def compare_sweep(sweep: Sweep, runs: dict[str, tracking.PipelineRunRecord], metric: str, out: Path):
    """(text, figure) comparing the sweep's completed points (`runs`: by config hash), best first; writes
    `out/compare.png`. With `seed` swept, a row is a setting of the other swept keys: mean ± std over its seeds."""
    records = [(point, runs[point.config_hash]) for point in sweep.points if point.config_hash in runs]
    check_metric([run for _, run in records], metric, sweep.experiment)
    seeds = {point.values.get("seed") for point, _ in records}
    columns = [key for key in sweep.keys if key != "seed"] if "seed" in sweep.keys and len(seeds) > 1 else sweep.keys
    groups: dict[tuple, list[tracking.PipelineRunRecord]] = {}
    for point, run in records:
        groups.setdefault(tuple(_cell(point.values.get(key)) for key in columns), []).append(run)
    averaged = any(len(group) > 1 for group in groups.values())

    def mean(group, name):
        values = [run.metrics[name] for run in group if name in run.metrics]
        return statistics.mean(values) if values else None

    order = sorted(groups, key=lambda values: _sort_value({metric: mean(groups[values], metric)}, metric),
                   reverse=not _lower_is_better(metric))
    header = [*columns, *(["seeds"] if averaged else []), *TEST_METRICS, "seconds"]
    rows = []
    for values in order:
        group = groups[values]
        cells = [_mean_std([run.metrics[name] for run in group if name in run.metrics]) for name in TEST_METRICS]
        seconds = mean(group, "time/total_s")
        rows.append([*values, *([str(len(group))] if averaged else []), *cells,
                     f"{seconds:.1f}" if seconds is not None else ""])
    labels = {values: " ".join(f"{key}={value}" for key, value in zip(columns, values)) or "(base)" for values in order}
    curves = {labels[values]: _mean_curve([validation_curve(run) for run in groups[values]]) for values in order}
    heights = {labels[values]: mean(groups[values], metric) for values in order if mean(groups[values], metric) is not None}
    errors = {labels[values]: _std([run.metrics[metric] for run in groups[values] if metric in run.metrics])
              for values in order} if averaged else None
    figure = plots.comparison(curves, heights, metric, errors)
    out.mkdir(parents=True, exist_ok=True)
    figure.savefig(out / "compare.png")
    over = f"; mean ± std over seeds {', '.join(str(seed) for seed in sorted(seeds))}" if averaged else ""
    return "\n".join([*table(header, rows), "", _sorted_by(metric, out / "compare.png") + over]), figure


def check_metric(runs: list[tracking.PipelineRunRecord], metric: str, experiment: str) -> None:
    if not any(metric in run.metrics for run in runs):
        known = sorted({name for run in runs for name in run.metrics if name.startswith(("test/", "time/"))})
        raise UserError(f"--metric {metric}: no run of {experiment!r} has it; e.g. {', '.join(known)}")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *rows]]


def validation_curve(run: tracking.PipelineRunRecord) -> list[tuple[int, float]]:
    """acc/val of the head phase, then of the finetune phase, on one epoch axis."""
    curve: list[tuple[int, float]] = []
    for phase in ("head", "finetune"):
        run_id = tracking.phase_run_id(run, phase)
        offset = curve[-1][0] if curve else 0
        curve += [(offset + step, value) for step, value in (tracking.metric_history(run_id, "acc/val") if run_id else [])]
    return curve


def _lower_is_better(metric: str) -> bool:
    return "loss" in metric


def _sort_value(metrics: dict[str, float | None], metric: str) -> float:
    value = metrics.get(metric)
    worst = float("inf") if _lower_is_better(metric) else float("-inf")
    return worst if value is None else value


def _sorted_by(metric: str, figure: Path) -> str:
    return f"sorted by {metric} ({'lower' if _lower_is_better(metric) else 'higher'} is better); figure: {figure}"


def _cell(value) -> str:
    return "" if value is None else str(value)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    return f"{statistics.mean(values):.4f} ± {_std(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def _mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The mean of curves over the epochs they all have."""
    length = min(len(curve) for curve in curves)
    return [(curves[0][index][0], statistics.mean(curve[index][1] for curve in curves)) for index in range(length)]
