"""The lifecycle and writes of MLflow runs: one parent run per pipeline run, one child run per phase, and the
reaper of runs whose process died.

Run ids are always passed explicitly through `MlflowClient` (MLflow's active run is thread-local, and
Prefect may run tasks on other threads). Metrics go in batch calls: a training phase sends the epochs since its
last epoch state in one call (every epoch, when epochs are longer than `checkpoint_every_s`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import get_run_logger
from prefect.settings import get_current_settings

from configs.loader import flatten, to_yaml
from configs.schema import PipelineConfig, config_hash
from tasks import plots
from tasks.files import absolute
from tasks.provenance import git_commit
from tasks.results import Checkpoint, RunContext, SweepRef
from tasks.tracking import registry
from tasks.tracking.history import metric_history
from tasks.tracking.store import TrackingStoreError, open_store, run_url, tracking_uri
from tasks.tracking.store import client as store_client


@contextmanager
def _refused_as_one_line(uri: str, experiment: str) -> Iterator[None]:
    """An MLflow account that may not write to the experiment (403 from a server with authentication): one line."""
    try:
        yield
    except MlflowException as error:
        if error.error_code != "PERMISSION_DENIED" and "error code 403" not in str(error):
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "(none)")
        raise TrackingStoreError(
            f"MLflow tracking server {uri}: account {user} may not write to experiment {experiment} (403 Forbidden); "
            "ask its admin for EDIT on it, or set `name` to an experiment of your own"
        ) from None


@contextmanager
def pipeline_run(
    config: PipelineConfig, flow_run_id: str | None, device: str, amp: bool, rerun: str | None = None,
    sweep: SweepRef | None = None,
) -> Iterator[RunContext]:
    """Open the parent run: tags, the flattened config as params, the resolved config as an artifact.

    device and amp: as resolved on this machine (the config may say "auto"); tagged, and handed to the phases with
    `rerun` (`--rerun PHASE`). A sweep's point is nested under the sweep's run and tagged with its id.

    MLflow's standard tags come from MLflow's own context providers (mlflow.user, mlflow.source.*), the commit from
    this package's checkout wherever the run starts; MLflow's system metrics (CPU, memory, disk, network) are sampled
    onto the run unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is false.

    The run ends FINISHED, FAILED (an exception) or KILLED (Ctrl-C), never left RUNNING.
    """
    started = time.perf_counter()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = open_store(uri)
    with _refused_as_one_line(uri, config.name):
        experiment = client.get_experiment_by_name(config.name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(config.name)
        abandoned = _mark_abandoned_runs_killed(client, experiment_id, str(flow_run_id))
        identity = config_hash(config)
        parent = client.create_run(
            experiment_id,
            run_name=run_name(config),
            tags={
                **_standard_tags(),
                "twostage.config_hash": identity,
                "twostage.device": device,
                "twostage.amp": "bf16" if amp else "float32",
                **_process_tags(str(flow_run_id)),
                **_prefect_link(flow_run_id),
                **({"twostage.sweep_id": sweep.id, "mlflow.parentRunId": sweep.run_id} if sweep else {}),
            },
        )
    if abandoned:
        get_run_logger().info("marked %d run(s) of dead processes KILLED: %s", len(abandoned), ", ".join(abandoned))
    run_id = parent.info.run_id
    with _terminated_on_exit(client, run_id), _system_metrics(run_id, uri):
        _log_params(client, run_id, flatten(config))
        client.log_text(run_id, to_yaml(config), "config.yaml")
        yield RunContext(
            name=config.name,
            tracking_uri=uri,
            experiment_id=experiment_id,
            parent_run_id=run_id,
            flow_run_id=str(flow_run_id),
            seed=config.seed,
            device=device,
            amp=amp,
            compile=config.compile,
            storage=absolute(config.storage),  # reused results must not depend on the working folder
            checkpoint_every_s=config.checkpoint_every_s,
            rerun=rerun,
        )
        client.log_metric(run_id, "time/total_s", time.perf_counter() - started)


def run_name(config: PipelineConfig) -> str:
    """The parent run's name, and its Prefect flow run's: `<config name>-<config hash, 7 characters>`."""
    return f"{config.name}-{config_hash(config)[:7]}"


def _standard_tags() -> dict[str, str]:
    """MLflow's standard tags of a run started here, its source being this package's flow and commit."""
    from mlflow.tracking.context.registry import resolve_tags

    commit = git_commit()
    tags = resolve_tags({"mlflow.source.name": "twostage (flows/two_stage.py)", "mlflow.source.type": "LOCAL"})
    tags.pop("mlflow.source.git.commit", None)  # resolved from the entry script's folder, which may be another repo
    tags.pop("mlflow.source.git.repoURL", None)
    tags.pop("mlflow.source.git.branch", None)
    return {**tags, **({"mlflow.source.git.commit": commit} if commit else {})}


@contextmanager
def _system_metrics(run_id: str, uri: str) -> Iterator[None]:
    """MLflow's system metrics monitor on the run (`system/...`, every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s,
    5 by default here: a quickstart lasts 15 s), on unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false."""
    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() in ("false", "0", "no"):
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=5, tracking_uri=uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


@dataclass
class EpochMetrics:
    step: int
    values: dict[str, float]
    timestamp_ms: int


class PhaseRun:
    """One phase's child run; every call names its run id."""

    def __init__(self, context: RunContext, run_id: str):
        self.context = context
        self.run_id = run_id
        self.client = store_client(context.tracking_uri)
        self.started = time.perf_counter()

    def log_params(self, params: dict, on_parent_only: bool = False) -> None:
        run_id = self.context.parent_run_id if on_parent_only else self.run_id
        _log_params(self.client, run_id, {key: str(value) for key, value in params.items()})

    def log_metrics(self, metrics: dict[str, float], on_parent: bool = False) -> None:
        """Metrics at step 0, on this run (and on the parent run)."""
        run_ids = [self.run_id, self.context.parent_run_id] if on_parent else [self.run_id]
        stamp = int(time.time() * 1000)
        for run_id in run_ids:
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items()])

    def log_epochs(self, epochs: list[EpochMetrics]) -> None:
        """Several epochs' metrics in one batch call, each at its epoch's step and time."""
        metrics = [
            Metric(name, float(value), epoch.timestamp_ms, epoch.step)
            for epoch in epochs
            for name, value in epoch.values.items()
        ]
        for start in range(0, len(metrics), 1000):  # MLflow accepts at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_figure(self, figure, file_name: str) -> None:
        self.client.log_figure(self.run_id, figure, file_name)

    def log_dict(self, data: dict, file_name: str) -> None:
        self.client.log_dict(self.run_id, data, file_name)

    def last_step(self, metric: str) -> int:
        """The highest step logged for `metric` in this run (0 when none)."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, metric)), default=0)

    def tag_parent(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.context.parent_run_id, key, value)

    def log_datasets(self, splits: dict[str, tuple[int, ...]], name: str, digest: str, source: str) -> None:
        """The splits as MLflow dataset inputs (context = split) of this run and of the parent run.

        splits: {"train": (N, C, H, W), ...}; digest: the data fingerprint (MLflow keeps 36 characters).
        """
        inputs = [
            DatasetInput(
                Dataset(
                    name=f"{name}-{split}", digest=digest[:36], source_type="local",
                    source=json.dumps({"uri": source}), profile=json.dumps({"num_rows": shape[0], "shape": shape}),
                ),
                tags=[InputTag("mlflow.data.context", split)],
            )
            for split, shape in splits.items()
        ]
        for run_id in (self.run_id, self.context.parent_run_id):
            try:
                self.client.log_inputs(run_id, datasets=inputs)
            except MlflowException as error:
                # MLflow's SQL store looks a dataset up, then inserts it: two runs logging the same new dataset at
                # once both insert, and one fails on the primary key (seen on PostgreSQL with four runs at once).
                # The dataset exists now, so the same call succeeds.
                if "dataset_pk" not in str(error) and "UNIQUE constraint failed: datasets" not in str(error):
                    raise
                self.client.log_inputs(run_id, datasets=inputs)

    def log_model(self, model, input_example, registered_name: str, metadata: dict, tags: dict[str, str]):
        """Log the final PyTorch model (signature inferred from the example) as a new registered version.

        Registered through the client, which prints nothing (mlflow.pytorch.log_model's own registration prints
        "Successfully registered model" between our log lines). Returns the logged model's URI and the version.
        """
        torch_version = torch.__version__.split("+")[0]  # without the local "+cu130": pip can resolve it
        # The logged model is made here, in this run's experiment: mlflow.pytorch.log_model given a run_id but no
        # active run makes it in the default experiment ("0": our models were listed there, not in their own
        # experiment), where the pipeline's account on an authenticated server may not write (403).
        logged = self.client.create_logged_model(self.context.experiment_id, name="model", source_run_id=self.run_id,
                                                 tags=_standard_tags())
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=input_example,
            pip_requirements=[f"torch=={torch_version}"],  # inferring them costs ~10 s in a subprocess
            metadata=metadata,
            run_id=self.run_id,
            model_id=logged.model_id,
        )
        try:
            self.client.create_registered_model(registered_name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        created = self.client.create_model_version(
            registered_name, info.model_uri, run_id=self.run_id, tags=tags, model_id=info.model_id,
            description=f"Pipeline run: {run_url(self.context.experiment_id, self.context.parent_run_id)}",
        )
        return info.model_uri, str(created.version)

    def delete_model_version(self, name: str, version: str) -> None:
        self.client.delete_model_version(name, version)

    def promote(self, name: str, version: str, metric: str, value: float, min_improvement: float,
                floor: registry.Floor | None = None) -> str:
        """The registry's decision for this version (tasks/tracking/registry.py), tagged on this run and the parent."""
        decision = registry.promote(self.client, name, version, metric, value, min_improvement, floor)
        self.client.set_tag(self.run_id, "twostage.registry_decision", decision)
        self.client.set_tag(self.context.parent_run_id, "twostage.registry_decision", decision)
        return decision


@contextmanager
def phase_run(context: RunContext, phase: str, reopen: tuple[str, int] | None = None) -> Iterator[PhaseRun]:
    """A child run of the pipeline's parent run, tagged with the phase; FAILED if the phase raises.

    `reopen` = (run id, epoch): continue the child run of an interrupted attempt that saved that epoch,
    now under this pipeline's parent run.
    """
    client = store_client(context.tracking_uri)
    tags = {"mlflow.parentRunId": context.parent_run_id, "twostage.phase": phase,
            **_process_tags(context.flow_run_id)}
    run_id = _reopen(client, reopen[0], context.experiment_id) if reopen else None
    if run_id:
        for key, value in {**tags, "twostage.resumed_from_epoch": str(reopen[1])}.items():
            client.set_tag(run_id, key, value)
    else:
        run_id = client.create_run(context.experiment_id, run_name=phase, tags=tags).info.run_id
    with _terminated_on_exit(client, run_id):
        yield PhaseRun(context, run_id)


def _reopen(client: MlflowClient, run_id: str, experiment_id: str) -> str | None:
    """Set the run RUNNING again; None when it is gone or in another experiment (then a new child starts)."""
    try:
        if client.get_run(run_id).info.experiment_id != experiment_id:
            return None
        client.update_run(run_id, status="RUNNING")
    except MlflowException:
        return None
    return run_id


def log_pipeline_curves(context: RunContext, phase_run_ids: dict[str, str]) -> None:
    """One figure on the parent run with the loss curves of every training phase (reused ones too)."""
    histories = {
        phase: {name: metric_history(run_id, name, context.tracking_uri) for name in ("loss/train", "loss/val")}
        for phase, run_id in phase_run_ids.items()
    }
    store_client(context.tracking_uri).log_figure(context.parent_run_id, plots.pipeline_curves(histories),
                                                 "loss_curves.png")


def unlinked_run(context: RunContext, checkpoint: Checkpoint) -> str | None:
    """Why a reusable phase can't be linked to the MLflow run that trained it (the run is not in this tracking store:
    MLFLOW_TRACKING_URI changed since), or None."""
    try:
        store_client(context.tracking_uri).get_run(checkpoint.run_id)
    except MlflowException:
        return f"MLflow run {checkpoint.run_id} is not in the tracking store {context.tracking_uri}"
    return None


def record_reuse(context: RunContext, phase: str, checkpoint: Checkpoint) -> None:
    """A phase reused from an earlier flow run gets no child run: tag the parent with the one that made it."""
    client = store_client(context.tracking_uri)
    client.set_tag(context.parent_run_id, f"twostage.reused.{phase}", checkpoint.run_id)
    stamp = int(time.time() * 1000)
    metrics = [Metric(name, value, stamp, 0) for name, value in checkpoint.metrics.items()]
    params = [Param(name, str(count)) for name, count in checkpoint.parameter_counts.items()]
    client.log_batch(context.parent_run_id, metrics=metrics, params=params)


def _prefect_link(flow_run_id: str | None) -> dict[str, str]:
    """The flow run's page in the Prefect UI, as a tag and as the run's description (the MLflow UI shows it as
    markdown, a link); none for the ephemeral server, which ends with the run."""
    settings = get_current_settings()
    if flow_run_id is None or not settings.api.url or not settings.ui_url:
        return {}
    url = f"{settings.ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}"
    return {"twostage.prefect_flow_run_url": url, "mlflow.note.content": f"Prefect flow run: [{url}]({url})"}


def _process_tags(flow_run_id: str) -> dict[str, str]:
    return {"twostage.host": socket.gethostname(), "twostage.pid": str(os.getpid()),
            "twostage.flow_run_id": flow_run_id}


def _mark_abandoned_runs_killed(client: MlflowClient, experiment_id: str, flow_run_id: str) -> list[str]:
    """Runs still RUNNING whose process is gone become KILLED: those of a dead process on this host, and on any host
    those of an earlier attempt of this flow run (a worker that died: Prefect marked its run Crashed and retries it
    here, perhaps on another host)."""
    host = socket.gethostname()
    abandoned = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        dead_here = tags.get("twostage.host") == host and not _process_alive(int(tags.get("twostage.pid", "0")))
        earlier_attempt = flow_run_id != "None" and tags.get("twostage.flow_run_id") == flow_run_id
        if dead_here or earlier_attempt:
            client.set_terminated(run.info.run_id, "KILLED")
            abandoned.append(run.info.run_id)
    return abandoned


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@contextmanager
def _terminated_on_exit(client: MlflowClient, run_id: str) -> Iterator[None]:
    """FINISHED, FAILED on an error, KILLED when stopped from outside: Ctrl-C, SIGTERM (Prefect's
    TerminationSignal), a cancellation; those are BaseExceptions that are not Exceptions."""
    try:
        yield
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    except BaseException:
        client.set_terminated(run_id, "KILLED")
        raise
    client.set_terminated(run_id, "FINISHED")


def _log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])
