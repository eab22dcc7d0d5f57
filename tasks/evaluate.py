"""Evaluation: test metrics and plots, and the final model registered in MLflow (champion or challenger)."""

from __future__ import annotations

import math
import time

import numpy as np
from prefect import get_run_logger, task
from sklearn import metrics as sk_metrics

from configs.schema import EvalConfig
from models.evaluation import classification_metrics, encode, first_block_maps
from tasks import plots, tracking
from tasks.checkpoints import load_model
from tasks.data import load_splits
from tasks.locks import holding, locks_for
from tasks.results import Checkpoint, DataBundle, EvalReport, RunContext
from tasks.tracking.registry import Floor


@task(name="evaluate")
def evaluate(config: EvalConfig, data: DataBundle, finetuned: Checkpoint, run: RunContext) -> EvalReport:
    """Evaluate the finetuned model on the test split and register it; returns metrics, model URI, decision."""
    logger = get_run_logger()
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
        child.log_figure(plots.f1_bars(per_class), "per_class_f1.png")
        matrix = sk_metrics.confusion_matrix(truth, predicted, labels=classes)
        child.log_figure(plots.confusion_matrix(matrix, data.class_names), "confusion_matrix.png")
        maps = first_block_maps(model.encoder, splits.test_x[:4])
        if maps is not None:
            child.log_figure(plots.feature_maps(splits.test_x[:4], maps, "first convolutional block after "
                                                "finetuning (test images)"), "feature_maps.png")
        features = encode(model.encoder, splits.test_x, config.batch_size)
        title = "test features after finetuning (PCA)"
        child.log_figure(plots.feature_projection(features, splits.test_y, data.class_names, title), "features_pca.png")

        registered_name = config.registered_model or run.name
        model_uri, version = child.log_model(
            model.classifier().eval().cpu(),
            input_example=splits.test_x[:4].cpu().numpy(),
            registered_name=registered_name,
            metadata={"twostage": {
                "class_names": data.class_names, "input_shape": list(data.input_shape),
                "mean": data.mean, "std": data.std, "dataset": data.dataset,
            }},
            tags={**{name: str(value) for name, value in metrics.items()},
                  "twostage.pipeline_run_id": run.parent_run_id, "twostage.run_id": child.run_id},
        )
        try:
            with holding(locks_for(run.storage), f"registry-{registered_name}"):  # one decision at a time
                promotion = child.promote(registered_name, version, config.promote_metric,
                                          metrics[config.promote_metric], config.min_improvement,
                                          promotion_floor(config, truth, data.num_classes))
        except BaseException:  # failed or stopped before the decision: the version must not stay registered
            child.delete_model_version(registered_name, version)
            raise
        logger.info("evaluate: %s; registry: %s", " ".join(f"{name} {value:.4f}" for name, value in metrics.items()),
                    promotion)
        seconds = time.perf_counter() - child.started
        child.log_metrics({"time/evaluate_s": seconds}, on_parent=True)
        return EvalReport(
            metrics=metrics, per_class=per_class, run_id=child.run_id,
            pipeline_run_id=run.parent_run_id, experiment_id=run.experiment_id, model_uri=model_uri,
            model_version=version, promotion=promotion, seconds=seconds,
        )


def promotion_floor(config: EvalConfig, truth: np.ndarray, num_classes: int) -> Floor:
    """What the promote metric must beat: `min_metric`, else chance on this test set."""
    if config.min_metric is not None:
        return Floor(config.min_metric, "evaluate.min_metric")
    if config.promote_metric == "test/acc":
        share = np.bincount(truth, minlength=num_classes).max() / len(truth)
        return Floor(float(share), "chance: the majority class's share of the test set; evaluate.min_metric sets it")
    if config.promote_metric == "test/f1_macro":
        return Floor(1 / num_classes, f"chance: 1/{num_classes} classes; evaluate.min_metric sets it")
    return Floor(math.log(num_classes), f"chance: ln({num_classes}), the loss of uniform predictions; "
                 "evaluate.min_metric sets it")
