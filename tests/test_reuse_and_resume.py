"""A failed phase is retried alone; completed phases are reused; a crash loses at most `checkpoint_every_s` of
training (with 0, the current epoch)."""

from __future__ import annotations

import itertools
import logging

import pytest
from mlflow.tracking import MlflowClient

from configs.loader import validate_config
from configs.schema import PHASES
from conftest import isolated_workdir, tiny_config
from flows.two_stage import two_stage
from tasks import phase as phase_module
from tasks.files import name_of
from tasks.phase import TrainingDivergedError, TrainingPhase


def children(client: MlflowClient, parent_id: str) -> dict[str, object]:
    runs = client.search_runs(
        [client.get_run(parent_id).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    return {run.data.tags["twostage.phase"]: run for run in runs}


def fail_once_in_head_after_epoch(monkeypatch, epoch: int) -> list[int]:
    """Make the head phase raise once, right after reporting `epoch`; returns the epochs it failed after."""
    report, failures = TrainingPhase._report, []

    def fail_once(self, stats):
        report(self, stats)
        if self.name == "head" and stats.epoch == epoch and not failures:
            failures.append(stats.epoch)
            raise RuntimeError("injected by the test")

    monkeypatch.setattr(TrainingPhase, "_report", fail_once)
    return failures


def test_running_the_same_config_again_reuses_every_training_phase(prefect_server, workdir, caplog):
    config = validate_config(tiny_config())
    first = two_stage(config)
    with caplog.at_level(logging.INFO):
        second = two_stage(config)
    client = MlflowClient()
    first_children, second_children = children(client, first.pipeline_run_id), children(client, second.pipeline_run_id)
    assert sorted(second_children) == ["data", "evaluate"]  # reused phases get no new child run
    parent = client.get_run(second.pipeline_run_id)
    for phase in ("pretrain", "head", "finetune"):
        assert parent.data.tags[f"twostage.reused.{phase}"] == first_children[phase].info.run_id
        assert f"{phase}: reused the completed phase of MLflow run {first_children[phase].info.run_id}" in caplog.text
    assert second.metrics == first.metrics
    assert parent.data.metrics["test/acc"] == first.metrics["test/acc"]
    first_parent = client.get_run(first.pipeline_run_id).data.metrics
    for name in ("pretrain/recon_loss", "head/best_val_acc", "finetune/best_val_acc", "time/finetune_s"):
        assert parent.data.metrics[name] == first_parent[name], name


def test_a_run_in_another_folder_trains_anew_though_both_share_one_prefect_home(prefect_server, tmp_path):
    """Phase results live in the run's storage (outputs/ by default), not in Prefect's per-user storage: a second checkout (another
    folder) never reuses the first one's phases, whose checkpoints and MLflow runs it doesn't have."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    config = validate_config(tiny_config())
    shared = {PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-home-storage"}
    with isolated_workdir(tmp_path / "first"), temporary_settings(shared):
        two_stage(config)
    with isolated_workdir(tmp_path / "second"), temporary_settings(shared):
        second = two_stage(config)
        parent = MlflowClient().get_run(second.pipeline_run_id)
        assert sorted(children(MlflowClient(), second.pipeline_run_id)) == sorted(PHASES)
    assert not any(tag.startswith("twostage.reused.") for tag in parent.data.tags)


def test_changing_a_phase_config_reruns_it_and_what_follows_but_nothing_before(prefect_server, workdir):
    first = two_stage(validate_config(tiny_config()))
    changed = two_stage(validate_config(tiny_config(head={"epochs": 3})))
    client = MlflowClient()
    parent = client.get_run(changed.pipeline_run_id)
    assert parent.data.tags["twostage.reused.pretrain"] == children(client, first.pipeline_run_id)["pretrain"].info.run_id
    assert sorted(children(client, changed.pipeline_run_id)) == ["data", "evaluate", "finetune", "head"]


def test_changed_training_code_reruns_every_phase_instead_of_reusing_what_the_old_code_made(
    prefect_server, workdir, monkeypatch
):
    import tasks.keys

    config = validate_config(tiny_config())
    two_stage(config)
    monkeypatch.setattr(tasks.keys, "CODE_FINGERPRINT", tasks.keys.CODE_FINGERPRINT[::-1])  # as after an edit
    changed = two_stage(config)
    assert sorted(children(MlflowClient(), changed.pipeline_run_id)) == ["data", "evaluate", "finetune", "head", "pretrain"]


def test_the_code_fingerprint_changes_with_any_module_of_models_or_tasks(tmp_path):
    import shutil

    from conftest import REPO
    from tasks.keys import CODE_FINGERPRINT, code_fingerprint

    for package in ("models", "tasks"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    assert code_fingerprint(tmp_path) == code_fingerprint() == CODE_FINGERPRINT
    (tmp_path / "notes.md").write_text("not code")
    assert code_fingerprint(tmp_path) == CODE_FINGERPRINT
    for module in ("models/training.py", "models/objectives.py", "tasks/finetune.py"):
        edited = tmp_path / module
        original = edited.read_text()
        edited.write_text(original + "\n# an edit\n")
        assert code_fingerprint(tmp_path) != CODE_FINGERPRINT, module
        edited.write_text(original)


def test_rerun_forces_that_phase_and_those_after_it(prefect_server, workdir):
    config = validate_config(tiny_config())
    two_stage(config)
    forced = two_stage(config, rerun="head")
    client = MlflowClient()
    assert sorted(children(client, forced.pipeline_run_id)) == ["data", "evaluate", "finetune", "head"]
    assert "twostage.reused.pretrain" in client.get_run(forced.pipeline_run_id).data.tags


@pytest.mark.parametrize("damage", ["delete", "modify"])
def test_a_reused_result_whose_checkpoint_is_gone_or_changed_is_recomputed(prefect_server, workdir, caplog, damage):
    config = validate_config(tiny_config())
    first = two_stage(config)
    client = MlflowClient()
    pretrain_run = children(client, first.pipeline_run_id)["pretrain"]
    checkpoint = next((workdir / "outputs" / "checkpoints").glob("pretrain-*.pt"))
    if damage == "delete":
        checkpoint.unlink()
    else:
        checkpoint.write_bytes(checkpoint.read_bytes() + b"tampered")
    with caplog.at_level(logging.WARNING):
        second = two_stage(config)
    assert f"pretrain: the reusable result's checkpoint {checkpoint}" in caplog.text
    rerun = children(client, second.pipeline_run_id)
    assert "pretrain" in rerun and rerun["pretrain"].info.run_id != pretrain_run.info.run_id
    assert second.metrics == pytest.approx(first.metrics)  # the same inputs and seed give the same model


def test_a_reusable_phase_trained_in_another_tracking_store_runs_again_instead_of_linking_a_missing_run(
    prefect_server, workdir, caplog, monkeypatch
):
    config = validate_config(tiny_config())
    first = two_stage(config)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'another.db'}")  # the same folder, a new store
    with caplog.at_level(logging.WARNING):
        second = two_stage(config)
    first_pretrain = children(MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}"), first.pipeline_run_id)["pretrain"]
    assert (f"pretrain: the reusable result's MLflow run {first_pretrain.info.run_id} is not in the tracking store "
            f"sqlite:///{workdir / 'another.db'}; running the phase again") in caplog.text
    client = MlflowClient()
    assert sorted(children(client, second.pipeline_run_id)) == sorted(PHASES)
    assert not any(tag.startswith("twostage.reused.") for tag in client.get_run(second.pipeline_run_id).data.tags)
    assert second.metrics == pytest.approx(first.metrics)


def test_an_exception_in_a_phase_is_retried_by_prefect_and_resumes_from_its_epoch_checkpoint(
    prefect_server, tmp_path, monkeypatch
):
    config = validate_config(tiny_config(checkpoint_every_s=0, head={"epochs": 4, "retries": 1}))
    with isolated_workdir(tmp_path / "reference"):
        reference = two_stage(config)
    failures = fail_once_in_head_after_epoch(monkeypatch, 2)
    with isolated_workdir(tmp_path / "faulty"):
        result = two_stage(config)
        client = MlflowClient()
        head = children(client, result.pipeline_run_id)["head"]
        steps = [m.step for m in client.get_metric_history(head.info.run_id, "loss/train")]
    assert failures == [2]
    assert head.info.status == "FINISHED" and head.data.tags["twostage.resumed_from_epoch"] == "2"
    assert steps == [1, 2, 3, 4]  # one child run, each epoch logged once
    assert result.metrics == pytest.approx(reference.metrics, abs=1e-6)


def test_epoch_states_are_saved_once_checkpoint_every_s_has_passed_and_a_retry_logs_no_epoch_twice(
    prefect_server, tmp_path, monkeypatch
):
    config = validate_config(tiny_config(checkpoint_every_s=1.0, head={"epochs": 5, "retries": 1}))
    with isolated_workdir(tmp_path / "reference"):
        reference = two_stage(config)
    monkeypatch.setattr(phase_module, "monotonic", itertools.count(0.0, 0.4).__next__)  # each reading 0.4 s later
    saved, save = [], phase_module.EpochStates.save

    def record_save(self, state):
        if name_of(self.stem).startswith("head"):
            saved.append(state["epoch"])
        save(self, state)

    monkeypatch.setattr(phase_module.EpochStates, "save", record_save)
    fail_once_in_head_after_epoch(monkeypatch, 4)
    with isolated_workdir(tmp_path / "faulty"):
        result = two_stage(config)
        client = MlflowClient()
        head = children(client, result.pipeline_run_id)["head"]
        steps = [m.step for m in client.get_metric_history(head.info.run_id, "loss/train")]
    # 1.2 s after the phase started, epoch 3 is saved; epoch 4 is not (0.4 s later) and fails; the retry
    # resumes after epoch 3, runs epoch 4 again without logging it a second time, and saves its last epoch
    assert saved == [3, 5]
    assert head.info.status == "FINISHED" and head.data.tags["twostage.resumed_from_epoch"] == "3"
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert result.metrics == pytest.approx(reference.metrics, abs=1e-6)


def test_a_phase_that_fails_between_epoch_states_still_sends_the_epochs_it_trained(prefect_server, workdir, monkeypatch):
    config = validate_config(tiny_config(checkpoint_every_s=3600, head={"epochs": 4, "retries": 0}))  # no state yet
    fail_once_in_head_after_epoch(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="injected by the test"):
        two_stage(config)
    client = MlflowClient()
    head = [run for run in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
            if run.data.tags.get("twostage.phase") == "head"]
    assert [run.info.status for run in head] == ["FAILED"]
    assert [m.step for m in client.get_metric_history(head[0].info.run_id, "loss/train")] == [1, 2, 3]


def test_a_diverging_loss_stops_the_phase_naming_epoch_and_settings_and_keeps_earlier_work(prefect_server, workdir):
    config = validate_config(tiny_config(finetune={"optimizer": {"lr": 1e12}, "retries": 2}))
    with pytest.raises(TrainingDivergedError) as caught:
        two_stage(config)
    message = str(caught.value)
    assert message.startswith("finetune: the training loss became non-finite in epoch ")
    assert "finetune.optimizer.lr" in message and "finetune.grad_clip_norm" in message
    checkpoints = {path.name.split("-")[0] for path in (workdir / "outputs" / "checkpoints").glob("*.pt")}
    assert {"pretrain", "head"} <= checkpoints
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    status = {run.data.tags.get("twostage.phase", "parent"): run.info.status for run in runs}
    assert status == {"parent": "FAILED", "data": "FINISHED", "pretrain": "FINISHED", "head": "FINISHED",
                      "finetune": "FAILED"}


def test_fresh_data_reruns_every_phase_after_the_data_phase(prefect_server, workdir):
    from test_data import write_png_folder

    write_png_folder(workdir / "images", per_class=10)
    config = validate_config(tiny_config(data={"dataset": "image_folder", "image_folder": str(workdir / "images"),
                                               "image_size": 8, "channels": 1}))
    first = two_stage(config)
    unchanged = two_stage(config)
    (workdir / "images" / "class_2" / "0.png").write_bytes((workdir / "images" / "class_1" / "0.png").read_bytes())
    fresh = two_stage(config)
    client = MlflowClient()
    assert sorted(children(client, unchanged.pipeline_run_id)) == ["data", "evaluate"]
    assert sorted(children(client, fresh.pipeline_run_id)) == ["data", "evaluate", "finetune", "head", "pretrain"]
    tags = [client.get_run(r.pipeline_run_id).data.tags["twostage.data_fingerprint"] for r in (first, unchanged, fresh)]
    assert tags[0] == tags[1] != tags[2]


def test_changing_the_label_fraction_reuses_pretraining_which_sees_no_labels(prefect_server, workdir):
    first = two_stage(validate_config(tiny_config()))
    fewer_labels = two_stage(validate_config(tiny_config(data={"dataset": "digits", "label_fraction": 0.3})))
    client = MlflowClient()
    tags = client.get_run(fewer_labels.pipeline_run_id).data.tags
    assert tags["twostage.reused.pretrain"] == children(client, first.pipeline_run_id)["pretrain"].info.run_id
    assert sorted(children(client, fewer_labels.pipeline_run_id)) == ["data", "evaluate", "finetune", "head"]
