"""What a flow run shows in the Prefect UI: a table of its phases and a link to its MLflow run."""

from __future__ import annotations

from prefect.artifacts import create_link_artifact, create_markdown_artifact

from tasks.results import Checkpoint, DataBundle, EvalReport
from tasks.tracking import run_url


def summary_markdown(data: DataBundle, checkpoints: list[Checkpoint], report: EvalReport) -> str:
    """A markdown table: phase, reused or run, seconds, key metrics."""
    rows = [("data", "run", data.seconds, ", ".join(f"{k} {v}" for k, v in data.sizes.items()))]
    for checkpoint in checkpoints:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in checkpoint.metrics.items() if not k.endswith("best_epoch"))
        rows.append((checkpoint.phase, "reused" if checkpoint.reused else "run", checkpoint.seconds, metrics))
    rows.append(("evaluate", "run", report.seconds, ", ".join(f"{k} {v:.4f}" for k, v in report.metrics.items())))
    lines = ["| phase | reused or run | seconds | key metrics |", "|---|---|---:|---|"]
    lines += [f"| {phase} | {how} | {seconds:.1f} | {metrics} |" for phase, how, seconds, metrics in rows]
    return "\n".join(lines)


def publish_summary(data: DataBundle, checkpoints: list[Checkpoint], report: EvalReport) -> None:
    """Markdown artifact `twostage-summary` and link artifact `twostage-mlflow-run` on this flow run."""
    create_markdown_artifact(
        "## twostage run\n\n" + summary_markdown(data, checkpoints, report)
        + "\n\nA reused phase's seconds are those of the run that produced it.",
        key="twostage-summary",
        description="Phases of this pipeline run",
    )
    create_link_artifact(
        run_url(report.experiment_id, report.pipeline_run_id),
        link_text=f"MLflow run {report.pipeline_run_id}",
        key="twostage-mlflow-run",
        description="This pipeline run's parent run in MLflow",
    )
