"""Evaluation: test metrics, confusion matrix, per-class scores, and the final model logged to MLflow."""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from sklearn import metrics as sk_metrics

from configs.schema import EvalConfig
from models.training import classification_metrics
from tasks import plots, tracking
from tasks.data import load_splits
from tasks.phase import load_model
from tasks.results import Checkpoint, DataBundle, EvalReport, RunContext


@task(name="evaluate")
def evaluate(config: EvalConfig, data: DataBundle, finetuned: Checkpoint, run: RunContext) -> EvalReport:
    """Evaluate the finetuned model on the test split; returns its test metrics and model URI."""
    with tracking.phase_run(run, "evaluate") as child:
        splits = load_splits(data, run.device)
        model = load_model(finetuned, run.device)
        loss, accuracy, predicted = classification_metrics(model, splits.test_x, splits.test_y, config.batch_size)
        truth, predicted = splits.test_y.cpu().numpy(), predicted.cpu().numpy()
        classes = list(range(data.num_classes))
        metrics = {
            "test/acc": accuracy,
            "test/loss": loss,
            "test/f1_macro": float(sk_metrics.f1_score(truth, predicted, labels=classes, average="macro", zero_division=0)),
        }
        child.log_metrics(metrics, on_parent=True)
        precision, recall, f1, support = sk_metrics.precision_recall_fscore_support(
            truth, predicted, labels=classes, zero_division=0
        )
        per_class = {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": float(s)}
            for name, p, r, f, s in zip(data.class_names, precision, recall, f1, support)
        }
        child.log_dict(per_class, "per_class_metrics.json")
        matrix = sk_metrics.confusion_matrix(truth, predicted, labels=classes)
        child.log_figure(plots.confusion_matrix(matrix, data.class_names), "confusion_matrix.png")
        classifier = model.classifier().eval().cpu()
        model_uri = child.log_model(classifier, input_example=splits.test_x[:4].cpu().numpy())
        get_run_logger().info(
            "evaluate: %s", " ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        )
        return EvalReport(
            metrics=metrics, per_class=per_class, run_id=child.run_id,
            pipeline_run_id=run.parent_run_id, experiment_id=run.experiment_id, model_uri=model_uri,
            seconds=time.perf_counter() - child.started,
        )
