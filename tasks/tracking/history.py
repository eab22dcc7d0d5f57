"""Reading runs back: the pipeline runs of an experiment (compare), metric histories, logged models (predict)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from configs.errors import UserError
from tasks.tracking.registry import champion_version
from tasks.tracking.store import client, open_store, tracking_uri


@dataclass
class PipelineRunRecord:
    run_id: str
    name: str
    start_time_ms: int
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]


def pipeline_runs(experiment_name: str, last: int | None = None, sweep_id: str | None = None) -> list[PipelineRunRecord]:
    """The experiment's finished pipeline (parent) runs, newest first, those of one sweep when `sweep_id` is given;
    [] when there is no such experiment, or no store at all (reading never creates one)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return []
    store = open_store(uri)
    experiment = store.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    sweep = f" and tags.`twostage.sweep_id` = '{sweep_id}'" if sweep_id else ""
    runs = store.search_runs(
        [experiment.experiment_id],
        filter_string=f"attributes.status = 'FINISHED' and tags.`twostage.config_hash` LIKE '%'{sweep}",
        order_by=["attributes.start_time DESC"], max_results=5000,
    )
    parents = runs[:last]  # a pipeline run's parent has the config hash; its phases' and a sweep's runs don't
    return [
        PipelineRunRecord(run.info.run_id, run.info.run_name, run.info.start_time, run.data.params,
                          run.data.metrics, run.data.tags)
        for run in parents
    ]


def phase_run_id(pipeline: PipelineRunRecord, phase: str) -> str | None:
    """The child run that produced `phase` for this pipeline run: its own, or the reused one."""
    store = client(tracking_uri())
    experiment_id = store.get_run(pipeline.run_id).info.experiment_id
    children = store.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{pipeline.run_id}' and tags.`twostage.phase` = '{phase}'",
    )
    return children[0].info.run_id if children else pipeline.tags.get(f"twostage.reused.{phase}")


def metric_history(run_id: str, name: str, uri: str | None = None) -> list[tuple[int, float]]:
    """(step, value) of `name` in the run, by step."""
    return sorted((m.step, m.value) for m in client(uri or tracking_uri()).get_metric_history(run_id, name))


def champion_pipeline_run(model_name: str) -> str | None:
    """The pipeline run whose model holds alias `champion` of `model_name`, if any."""
    version = champion_version(client(tracking_uri()), model_name)
    return version.tags.get("twostage.pipeline_run_id") if version else None


class ModelNotFoundError(UserError):
    """No model at the URI given: the message names it and the tracking store."""


def load_classifier(model_uri: str):
    """A logged classifier by any MLflow model URI: (pyfunc model, the twostage metadata logged with it).

    Raises:
        ModelNotFoundError: nothing at that URI (one line, naming it).
    """
    open_store(tracking_uri())  # an unusable store, a server refusing our account: one line, first
    mlflow.set_tracking_uri(tracking_uri())
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as error:
        raise ModelNotFoundError(f"no model at {model_uri} in {tracking_uri()} ({str(error).splitlines()[0]})") from None
    return model, (model.metadata.metadata or {}).get("twostage", {})


def pinned_model_uri(model_uri: str) -> str:
    """`models:/NAME@ALIAS` as the version it points at now, `models:/NAME/VERSION`; other URIs as they are.

    Raises:
        ModelNotFoundError: no such model or alias (one line, naming it).
    """
    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    if not model_uri.startswith("models:/") or not alias:
        return model_uri
    try:
        return f"models:/{name}/{client(tracking_uri()).get_model_version_by_alias(name, alias).version}"
    except MlflowException as error:
        raise ModelNotFoundError(f"no model at {model_uri} in {tracking_uri()} ({str(error).splitlines()[0]})") from None


def logged_encoder_state(model_uri: str) -> dict:
    """The encoder weights of the twostage model at `model_uri` (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/...),
    read from its pipeline run's finetune checkpoint, a plain state dict (weights_only: nothing is unpickled),
    with keys as in the encoder (`net.conv1.weight`, ...).

    Raises:
        ModelNotFoundError: no such model, or one not made by a twostage pipeline run (one line, naming it).
    """
    import torch

    store = client(tracking_uri())
    not_ours = ModelNotFoundError(f"{model_uri} in {tracking_uri()} was not made by a twostage pipeline run with a "
                                  "finetune checkpoint: give its registered twostage model, or a state-dict file")
    try:
        if model_uri.startswith("models:/"):
            name, _, number = pinned_model_uri(model_uri).removeprefix("models:/").partition("/")
            pipeline_run_id = store.get_model_version(name, number).tags.get("twostage.pipeline_run_id")
        else:
            run = store.get_run(model_uri.removeprefix("runs:/").split("/", 1)[0])
            pipeline_run_id = run.data.tags.get("mlflow.parentRunId")
        if not pipeline_run_id:
            raise not_ours
        pipeline = store.get_run(pipeline_run_id)
        record = PipelineRunRecord(pipeline.info.run_id, pipeline.info.run_name, pipeline.info.start_time,
                                   pipeline.data.params, pipeline.data.metrics, pipeline.data.tags)
        finetune = phase_run_id(record, "finetune")
        files = [item.path for item in store.list_artifacts(finetune, "checkpoint")] if finetune else []
        if not files:
            raise not_ours
        state = torch.load(store.download_artifacts(finetune, files[0]), map_location="cpu", weights_only=True)
    except (MlflowException, OSError) as error:
        raise ModelNotFoundError(f"no model at {model_uri} in {tracking_uri()} ({str(error).splitlines()[0]})") from None
    return {key.removeprefix("encoder."): value for key, value in state.items() if key.startswith("encoder.")}
