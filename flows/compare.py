"""`twostage compare`: the pipeline runs of an experiment side by side, and a figure of them."""

from __future__ import annotations

import datetime
from pathlib import Path

from configs.errors import UserError
from tasks import plots, tracking

TEST_METRICS = ("test/acc", "test/loss", "test/f1_macro")


def compare(experiment: str, metric: str, last: int | None, out: Path) -> str:
    """The comparison table as text; writes `out/compare.png`. No runs: a one-line message, no figure."""
    runs = tracking.pipeline_runs(experiment, last)
    if not runs:
        return f"no finished pipeline runs in experiment {experiment!r} at {tracking.tracking_uri()}"
    if not any(metric in run.metrics for run in runs):
        known = sorted({name for run in runs for name in run.metrics if name.startswith(("test/", "time/"))})
        raise UserError(f"--metric {metric}: no run of {experiment!r} has it; e.g. {', '.join(known)}")
    lower_is_better = "loss" in metric
    runs.sort(key=lambda run: run.metrics.get(metric, float("inf") if lower_is_better else float("-inf")),
              reverse=not lower_is_better)
    keys = sorted({key for run in runs for key in run.params})
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
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) for line in [header, *rows]]

    curves = {label: _validation_curve(run) for label, run in zip(labels, runs)}
    values = {label: run.metrics[metric] for label, run in zip(labels, runs) if metric in run.metrics}
    out.mkdir(parents=True, exist_ok=True)
    plots.comparison(curves, values, metric).savefig(out / "compare.png")
    order = "lower" if lower_is_better else "higher"
    return "\n".join([*lines, "", f"sorted by {metric} ({order} is better); figure: {out / 'compare.png'}"])


def _validation_curve(run: tracking.PipelineRunRecord) -> list[tuple[int, float]]:
    """val/acc of the head phase, then of the finetune phase, on one epoch axis."""
    curve: list[tuple[int, float]] = []
    for phase in ("head", "finetune"):
        run_id = tracking.phase_run_id(run, phase)
        offset = curve[-1][0] if curve else 0
        curve += [(offset + step, value) for step, value in (tracking.metric_history(run_id, "val/acc") if run_id else [])]
    return curve
