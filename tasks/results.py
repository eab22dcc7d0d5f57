"""The small typed values phases hand each other: paths, fingerprints, metrics and run ids, never tensors."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from configs.schema import ModelConfig


class Value(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SweepRef(Value):
    """The sweep a pipeline run is a point of (`twostage sweep`): its id, and its MLflow run, the parent of the
    points' parent runs."""

    id: str
    run_id: str


class RunContext(Value):
    """Where a pipeline run writes and logs; created once per flow run by `tracking.pipeline_run`."""

    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    flow_run_id: str  # Prefect's, also on every MLflow run of this flow run (twostage.flow_run_id)
    seed: int
    device: str
    amp: bool
    compile: bool
    storage: str  # where phases hand each other their state: an absolute local path or an object-store URL
    checkpoint_every_s: float
    rerun: str | None = None  # `--rerun PHASE`: that phase and those after it run even if reusable


class DataBundle(Value):
    """Prepared, normalised splits saved by `prepare_data` (a file of uint8 tensors plus statistics): every
    image and its label, but not which labels stages 2 and 3 may use (`LabeledSubset`)."""

    path: Path
    fingerprint: str  # the raw data and the split settings: all that pretraining depends on
    dataset: str
    source: str
    class_names: list[str]
    input_shape: tuple[int, int, int]
    sizes: dict[str, int]  # train, val, test
    mean: list[float]  # per channel, of pixel values scaled to [0, 1]: what predict must apply too
    std: list[float]
    seconds: float = 0.0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class LabeledSubset(Value):
    """Which training labels head and finetune use: a stratified share, drawn by `Splits.labeled`."""

    fraction: float
    count: int
    fingerprint: str  # the data's fingerprint and the share


class Checkpoint(Value):
    """A phase's trained weights (a state-dict file) and what is needed to rebuild the network."""

    phase: str
    path: str  # in the run's storage: a local path or an object-store URL
    sha256: str
    model: ModelConfig
    input_shape: tuple[int, int, int]
    num_classes: int
    metrics: dict[str, float]
    run_id: str
    seconds: float
    parameter_counts: dict[str, int] = {}  # {"parameters/head_trainable": ..., ".../head_frozen": ...}: MLflow params
    reused: bool = False  # set by the flow when the result came from an earlier flow run


class EvalReport(Value):
    """Test-set results of the finished model."""

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    run_id: str
    pipeline_run_id: str
    experiment_id: str
    model_uri: str
    model_version: str
    promotion: str  # "champion", "challenger": what the registry decided, with both numbers
    seconds: float
