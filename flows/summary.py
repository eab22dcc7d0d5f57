"""What a flow run shows in the Prefect UI: a table of its phases and a link to its MLflow run."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact

from tasks import tracking
from tasks.results import Checkpoint, RunContext

TRAINING = ("pretrain", "head", "finetune")


def summary_markdown(results: dict[str, Any]) -> str:
    """A markdown table: phase, reused or run, seconds, key metrics. results: what each phase returned."""
    data, labeled = results["data"]
    sizes = {**data.sizes, "labeled": labeled.count}
    rows = [("data", "run", data.seconds, ", ".join(f"{k} {v}" for k, v in sizes.items()))]
    for phase in TRAINING:
        checkpoint: Checkpoint = results[phase]
        headline = {k: v for k, v in checkpoint.metrics.items() if not k.startswith("time/")}
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in headline.items())
        rows.append((phase, "reused" if checkpoint.reused else "run", checkpoint.seconds, metrics))
    report = results["evaluate"]
    evaluated = ", ".join(f"{k} {v:.4f}" for k, v in report.metrics.items())
    rows.append(("evaluate", "run", report.seconds, f"{evaluated}; registry: {report.promotion}"))
    lines = ["| phase | reused or run | seconds | key metrics |", "|---|---|---:|---|"]
    lines += [f"| {phase} | {how} | {seconds:.1f} | {metrics} |" for phase, how, seconds, metrics in rows]
    return "\n".join(lines)


def publish_summary(run: RunContext, results: dict[str, Any]) -> None:
    """The loss curves of all phases on the MLflow parent run; on this flow run, the markdown artifact
    `twostage-summary` and the link artifact `twostage-mlflow-run`."""
    tracking.log_pipeline_curves(run, {phase: results[phase].run_id for phase in TRAINING})
    create_markdown_artifact(
        "## twostage run\n\n" + summary_markdown(results)
        + "\n\nA reused phase's seconds are those of the run that produced it.",
        key="twostage-summary",
        description="Phases of this pipeline run",
    )
    report = results["evaluate"]
    create_link_artifact(
        tracking.run_url(report.experiment_id, report.pipeline_run_id),
        link_text=f"MLflow run {report.pipeline_run_id}",
        key="twostage-mlflow-run",
        description="This pipeline run's parent run in MLflow",
    )
