"""The Prefect flow end to end, against a real Prefect test server and a real MLflow store in a temp dir."""

from __future__ import annotations

import getpass
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from configs.loader import load_config, validate_config
from configs.schema import PretrainConfig
from conftest import REPO, isolated_workdir, tiny_config
from flows.runner import with_retries
from flows.two_stage import local_run_settings, two_stage
from tasks.pretrain import pretrain
from tasks.sources import DataNotFoundError

PHASES = ["data", "pretrain", "head", "finetune", "evaluate"]


@pytest.fixture(scope="module")
def quickstart_run(prefect_server, tmp_path_factory):
    """One run of the shipped quickstart config; the tests below read what it left in MLflow."""
    with isolated_workdir(tmp_path_factory.mktemp("quickstart")) as workdir:
        uri = f"sqlite:///{workdir / 'mlflow.db'}"
        report = two_stage(load_config(REPO / "configs" / "quickstart.yaml"))
        client = MlflowClient(uri)
        parent = client.get_run(report.pipeline_run_id)
        children = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
        yield {"report": report, "client": client, "parent": parent, "uri": uri, "workdir": workdir,
               "children": {run.data.tags["twostage.phase"]: run for run in children}}


def artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    paths = set()
    for item in client.list_artifacts(run_id, folder):
        paths |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


def test_quickstart_reaches_95_percent_test_accuracy(quickstart_run):
    assert quickstart_run["report"].metrics["test/acc"] >= 0.95


def test_parent_run_carries_tags_flattened_params_and_resolved_config(quickstart_run):
    parent, client = quickstart_run["parent"], quickstart_run["client"]
    assert parent.info.status == "FINISHED"
    assert client.get_experiment(parent.info.experiment_id).name == "quickstart"
    tags = parent.data.tags
    assert len(tags["twostage.config_hash"]) == 64
    assert parent.info.run_name == f"quickstart-{tags['twostage.config_hash'][:7]}"
    assert tags["mlflow.source.git.commit"] and tags["twostage.flow_run_id"] not in ("", "None")
    assert len(tags["twostage.data_fingerprint"]) == 64
    assert (tags["twostage.device"], tags["twostage.amp"]) == ("cpu", "float32")  # quickstart: amp false
    params = parent.data.params
    assert params["finetune.optimizer.lr"] == "0.001" and params["data.dataset"] == "digits"
    assert params["model.encoder_widths"] == "[128, 32]" and params["seed"] == "0"
    config_yaml = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="config.yaml", tracking_uri=quickstart_run["uri"])).read_text())
    assert validate_config(config_yaml) == load_config(REPO / "configs" / "quickstart.yaml")


def test_the_parent_run_has_mlflows_standard_tags_and_system_metrics(quickstart_run):
    parent = quickstart_run["parent"]
    tags = parent.data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.user"] == getpass.getuser() and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] == "twostage (flows/two_stage.py)" and tags["mlflow.source.git.commit"] == head
    assert "twostage.git_commit" not in tags  # the standard tag is its one home
    assert parent.data.metrics["system/cpu_utilization_percentage"] >= 0  # sampled every second in the tests


def test_the_flow_run_is_named_and_tagged_like_its_mlflow_run_links_to_it_and_shows_each_phases_progress(
        quickstart_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    parent = quickstart_run["parent"]
    flow_run_id = parent.data.tags["twostage.flow_run_id"]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert flow_run.name == parent.info.run_name == f"quickstart-{parent.data.tags['twostage.config_hash'][:7]}"
    assert {"config:quickstart", "dataset:digits"} <= set(flow_run.tags)
    links = [artifact.data for artifact in artifacts if artifact.key == "twostage-mlflow-run"]
    assert len(links) == 1 and f"/runs/{parent.info.run_id}?workflowType=machine_learning)" in links[0]
    progress = {artifact.description.split(":")[0]: artifact.data for artifact in artifacts
                if artifact.type == "progress"}
    assert progress == {"pretrain": 100.0, "head": 100.0, "finetune": 100.0}


def test_one_finished_child_run_per_phase(quickstart_run):
    children = quickstart_run["children"]
    assert sorted(children) == sorted(PHASES)
    for phase, run in children.items():
        assert run.info.status == "FINISHED", phase
        assert run.info.run_name == phase


@pytest.mark.parametrize("phase, epochs, metrics", [
    ("pretrain", 30, {"loss/train", "loss/val", "lr"}),
    ("head", 30, {"loss/train", "loss/val", "acc/val", "lr"}),
    ("finetune", 20, {"loss/train", "loss/val", "acc/val", "lr"}),
])
def test_training_phases_log_every_epoch_as_a_step(quickstart_run, phase, epochs, metrics):
    client, run = quickstart_run["client"], quickstart_run["children"][phase]
    assert metrics <= set(run.data.metrics)
    for name in metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert steps == list(range(1, epochs + 1)), name
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss/train")]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("phase, expected", [
    ("pretrain", {"reconstructions.png", "features_pca.png"}),
    ("head", set()),
    ("finetune", set()),
])
def test_training_phases_log_checkpoint_and_plots(quickstart_run, phase, expected):
    paths = artifact_paths(quickstart_run["client"], quickstart_run["children"][phase].info.run_id)
    assert expected <= paths
    assert any(p.startswith("checkpoint/") and p.endswith(".pt") for p in paths)


def test_evaluate_logs_test_metrics_on_child_and_parent_with_plots(quickstart_run):
    child, parent = quickstart_run["children"]["evaluate"], quickstart_run["parent"]
    for name in ("test/acc", "test/loss", "test/f1_macro"):
        assert child.data.metrics[name] == parent.data.metrics[name] == quickstart_run["report"].metrics[name]
    paths = artifact_paths(quickstart_run["client"], child.info.run_id)
    assert {"confusion_matrix.png", "per_class_metrics.json"} <= paths
    assert set(quickstart_run["report"].per_class) == {str(d) for d in range(10)}


def test_the_logged_model_belongs_to_the_pipelines_experiment_and_evaluate_run(quickstart_run):
    client, parent = quickstart_run["client"], quickstart_run["parent"]
    models = client.search_logged_models([parent.info.experiment_id])
    assert [model.source_run_id for model in models] == [quickstart_run["children"]["evaluate"].info.run_id]
    assert models[0].tags["mlflow.source.name"] == parent.data.tags["mlflow.source.name"]  # MLflow's standard tags
    assert not client.search_logged_models(["0"])  # not in the default experiment


def test_the_logged_model_predicts_through_pyfunc(quickstart_run):
    import numpy as np
    import torch

    from configs.schema import DataConfig
    from tasks.data import load_splits, prepare

    report = quickstart_run["report"]
    mlflow.set_tracking_uri(quickstart_run["uri"])
    model = mlflow.pyfunc.load_model(report.model_uri)
    splits = load_splits(prepare(DataConfig(dataset="digits", root=quickstart_run["workdir"] / "data")), "cpu")
    logits = model.predict(splits.test_x.numpy())
    accuracy = (np.asarray(logits).argmax(axis=1) == splits.test_y.numpy()).mean()
    assert accuracy == pytest.approx(report.metrics["test/acc"], abs=1e-6)
    assert torch.is_tensor(splits.test_x)


def test_task_retries_come_from_the_phase_config():
    configured = with_retries(pretrain, PretrainConfig(retries=4, retry_delay_s=2.5))
    assert configured.retries == 4 and configured.retry_delay_seconds == 2.5


def test_flow_runs_send_heartbeats_only_to_a_server_that_outlives_the_process():
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    default = get_current_settings().flows.heartbeat_frequency
    with temporary_settings(restore_defaults={PREFECT_API_URL}), local_run_settings():  # the ephemeral server
        assert get_current_settings().flows.heartbeat_frequency is None
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}), local_run_settings():
        assert get_current_settings().flows.heartbeat_frequency == default is not None


def test_missing_data_fails_without_retries_and_marks_the_runs_failed(prefect_server, workdir):
    config = validate_config(tiny_config(data={"dataset": "kmnist", "download": False, "retries": 3}))
    with pytest.raises(DataNotFoundError, match="kmnist not found"):
        two_stage(config)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert {run.info.status for run in runs} == {"FAILED"}
    assert {run.data.tags.get("twostage.phase") for run in runs} == {None, "data"}


@pytest.mark.parametrize("objective, headline", [("denoising", "pretrain/recon_loss"),
                                                 ("contrastive", "pretrain/contrastive_loss")])
def test_every_pretraining_objective_runs_through_the_pipeline(prefect_server, workdir, objective, headline):
    pretrain = {"objective": objective, "mask_fraction": 0.2, "augment": {"rotation_deg": 10, "noise_std": 0.1}}
    report = two_stage(validate_config(tiny_config(pretrain=pretrain)))
    client = MlflowClient()
    assert headline in client.get_run(report.pipeline_run_id).data.metrics
    child = client.search_runs([report.experiment_id], filter_string="tags.`twostage.phase` = 'pretrain'")[0]
    files = artifact_paths(client, child.info.run_id)
    assert "features_pca.png" in files
    assert ("reconstructions.png" in files) == (objective != "contrastive")
    assert 0 < report.metrics["test/acc"] <= 1


def test_zero_epochs_skip_training_for_baselines(prefect_server, workdir):
    """pretrain.epochs 0 keeps the random encoder (the tutorial's effective stage 1); finetune.epochs 0 is a probe."""
    import torch

    config = validate_config(tiny_config(pretrain={"epochs": 0}, finetune={"epochs": 0}))
    report = two_stage(config)
    client = MlflowClient()
    children = {run.data.tags["twostage.phase"]: run
                for run in client.search_runs([report.experiment_id], filter_string="tags.`twostage.phase` != ''")}
    assert "loss/train" not in children["pretrain"].data.metrics
    assert "loss/train" not in children["finetune"].data.metrics
    assert [m.step for m in client.get_metric_history(children["head"].info.run_id, "loss/train")] == [1, 2]
    checkpoints = {phase: torch.load(next(Path("outputs/checkpoints").glob(f"{phase}-*.pt")), weights_only=True)
                   for phase in ("pretrain", "head", "finetune")}
    for name, weights in checkpoints["pretrain"].items():
        if name.startswith("encoder."):
            assert torch.equal(weights, checkpoints["head"][name]), name
    for name, weights in checkpoints["head"].items():
        assert torch.equal(weights, checkpoints["finetune"][name]), name
    parent = client.get_run(report.pipeline_run_id).data.metrics
    assert parent["finetune/best_val_acc"] == pytest.approx(parent["head/best_val_acc"])
    assert 0 < report.metrics["test/acc"] <= 1


def test_the_parent_loss_figure_draws_when_no_phase_logged_an_epoch():
    """All phases reused from runs in another MLflow store, or trained for 0 epochs: the run must not fail."""
    import io

    from tasks.plots import pipeline_curves

    figure = pipeline_curves({phase: {"loss/train": [], "loss/val": []} for phase in ("pretrain", "head", "finetune")})
    figure.savefig(io.BytesIO(), format="png")
