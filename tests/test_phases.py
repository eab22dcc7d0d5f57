"""Each training phase without the Prefect engine or MLflow: given its key, a logger and a fake tracker."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
import pytest
import torch

from configs.schema import DataConfig, FinetuneConfig, HeadConfig, ModelConfig, PretrainConfig
from tasks.checkpoints import checkpoint_problem, load_model
from tasks.data import label_subset, prepare
from tasks.files import name_of, read_bytes, torch_load
from tasks.finetune import train_end_to_end
from tasks.head import train_head_on_frozen_encoder
from tasks.phase import training_phase
from tasks.pretrain import train_encoder
from tasks.results import RunContext


class FakeTracker:
    """tracking.PhaseTracker in memory: what a phase logs to its child run."""

    def __init__(self, fail_after_epoch: int | None = None):
        self.run_id, self.started = "fake-run", time.perf_counter()
        self.params, self.metrics, self.epochs, self.artifacts, self.figures = {}, {}, [], [], []
        self.fail_after_epoch = fail_after_epoch

    def log_params(self, params, on_parent_only=False):
        self.params.update(params)

    def log_metrics(self, metrics, on_parent=False):
        self.metrics.update(metrics)

    def log_epochs(self, epochs):
        if self.fail_after_epoch is not None and epochs[-1].step >= self.fail_after_epoch:
            raise RuntimeError("worker lost")  # before MLflow has them, as when the process dies
        self.epochs += epochs

    def log_artifact(self, path, folder=None):
        self.artifacts.append(f"{folder}/{Path(path).name}")

    def log_figure(self, figure, file_name):
        self.figures.append(file_name)

    def last_step(self, metric):
        return max((epoch.step for epoch in self.epochs if metric in epoch.values), default=0)


@pytest.fixture
def run(tmp_path) -> RunContext:
    return RunContext(name="tiny", tracking_uri="none", experiment_id="0", parent_run_id="parent", flow_run_id="flow",
                      seed=0, device="cpu", amp=False, compile=False, storage=str(tmp_path), checkpoint_every_s=0)


@pytest.fixture
def in_memory_store(tmp_path) -> Iterator[RunContext]:
    """Storage that is not a local folder (fsspec's in-memory file system), as an object store is."""
    storage = f"memory://{tmp_path.name}"
    yield RunContext(name="tiny", tracking_uri="none", experiment_id="0", parent_run_id="parent", flow_run_id="flow",
                     seed=0, device="cpu", amp=False, compile=False, storage=storage, checkpoint_every_s=0)
    fsspec.filesystem("memory").rm(storage, recursive=True)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    bundle = prepare(DataConfig(dataset="digits", root=tmp_path_factory.mktemp("data")))
    return bundle, label_subset(bundle, 0.5)


@contextmanager
def phase(name: str, run: RunContext, tracker: FakeTracker) -> Iterator:
    @contextmanager
    def open_child(context, phase_name, reopen=None):
        yield tracker

    with training_phase(name, run, key=hashlib.sha256(name.encode()).hexdigest(), logger=logging.getLogger("test"),
                        open_child=open_child) as training:
        yield training


def sha256(location: str) -> str:
    return hashlib.sha256(read_bytes(location)).hexdigest()


@pytest.mark.parametrize("objective, headline, figures", [
    ("denoising", "pretrain/recon_loss", ["reconstructions.png", "features_pca.png"]),
    ("contrastive", "pretrain/contrastive_loss", ["features_pca.png"]),
])
def test_pretraining_logs_its_epochs_figures_and_headline_and_returns_an_intact_checkpoint(
    run, digits, objective, headline, figures
):
    tracker = FakeTracker()
    config = PretrainConfig(epochs=2, batch_size=128, objective=objective, augment={"noise_std": 0.1})
    with phase("pretrain", run, tracker) as training:
        checkpoint = train_encoder(training, config, ModelConfig(encoder_widths=[32, 16]), digits[0])
    assert [epoch.step for epoch in tracker.epochs] == [1, 2]
    assert tracker.figures == figures and headline in tracker.metrics
    assert sha256(checkpoint.path) == checkpoint.sha256
    assert tracker.artifacts == [f"checkpoint/{name_of(checkpoint.path)}"]
    assert checkpoint.phase == "pretrain" and checkpoint.run_id == "fake-run"
    assert not list(Path(run.storage).glob("checkpoints/*.state*.pt"))  # epoch states cleared once finished


def test_a_phase_in_an_object_store_resumes_from_its_epoch_state_there_and_publishes_a_checked_checkpoint(
    in_memory_store, digits, caplog
):
    run, config, model = in_memory_store, PretrainConfig(epochs=3, batch_size=128), ModelConfig(encoder_widths=[32, 16])
    with phase("pretrain", run, FakeTracker()) as training:
        uninterrupted = train_encoder(training, config, model, digits[0])
    reference = torch_load(read_bytes(uninterrupted.path))

    tracker = FakeTracker(fail_after_epoch=2)  # lost once epoch 2's state is in the store, before its metrics are sent
    with pytest.raises(RuntimeError, match="worker lost"), phase("pretrain", run, tracker) as training:
        train_encoder(training, config, model, digits[0])
    tracker.fail_after_epoch = None  # another worker, the same MLflow child run
    with caplog.at_level(logging.INFO), phase("pretrain", run, tracker) as training:
        resumed = train_encoder(training, config, model, digits[0])

    assert "pretrain: resuming after epoch 2/3" in caplog.text and [epoch.step for epoch in tracker.epochs] == [1, 2, 3]
    weights = torch_load(read_bytes(resumed.path))
    assert resumed.path.startswith("memory://") and all(torch.equal(weights[k], reference[k]) for k in reference)
    memory = fsspec.filesystem("memory")
    assert memory.glob(f"{run.storage}/checkpoints/*") == [memory._strip_protocol(resumed.path)]  # no temporary
    memory.pipe_file(resumed.path, read_bytes(resumed.path)[:-1] + b"x")  # changed in the store
    assert "not the recorded" in checkpoint_problem(resumed)
    with pytest.raises(ValueError, match=f"pretrain checkpoint unusable: {resumed.path} has sha256"):
        load_model(resumed, "cpu")


def test_head_training_changes_only_the_head_and_finetuning_then_changes_the_encoder(run, digits):
    data, labeled = digits
    with phase("pretrain", run, FakeTracker()) as training:
        pretrained = train_encoder(training, PretrainConfig(epochs=1), ModelConfig(encoder_widths=[32, 16]), data)
    tracker = FakeTracker()
    with phase("head", run, tracker) as training:
        head = train_head_on_frozen_encoder(training, HeadConfig(epochs=2, batch_size=64), data, labeled, pretrained)
    weights = {name: torch_load(read_bytes(checkpoint.path)) for name, checkpoint
               in (("pretrain", pretrained), ("head", head))}
    for key, value in weights["pretrain"].items():
        same = torch.equal(value, weights["head"][key])
        assert same == (not key.startswith("head.")), key
    assert {"acc/val", "loss/train"} <= set(tracker.epochs[-1].values) and "head/best_val_acc" in tracker.metrics
    assert tracker.params["params_trainable"] < tracker.params["params_frozen"]

    tracker = FakeTracker()
    with phase("finetune", run, tracker) as training:
        finetuned = train_end_to_end(training, FinetuneConfig(epochs=2, batch_size=64), data, labeled, head)
    after = torch_load(read_bytes(finetuned.path))
    assert not torch.equal(after["encoder.1.weight"], weights["head"]["encoder.1.weight"])
    assert [epoch.step for epoch in tracker.epochs] == [1, 2] and "finetune/best_val_acc" in tracker.metrics
    assert finetuned.metrics["finetune/best_val_acc"] == max(epoch.values["acc/val"] for epoch in tracker.epochs)
