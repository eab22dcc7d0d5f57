"""The pipeline's configuration: one strict Pydantic model per phase, composed into `PipelineConfig`.

Every model forbids unknown keys, so a typo in a YAML file or a `--set` override is an error that names
the key instead of a setting that is silently ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
)

STORAGE_SCHEMES = (None, "file", "s3")  # a local folder, or an object store through fsspec (s3fs)
Phase = Literal["data", "pretrain", "head", "finetune", "evaluate"]
PHASES: tuple[str, ...] = get_args(Phase)  # in the order they run


class StrictModel(BaseModel):
    """Validators that compare fields are field validators reading earlier fields (`info.data`), not model
    validators: Prefect 3.9's bundles pickle these classes by value, and cloudpickle loses a nested model's
    after-validator (pydantic-core SchemaError "Error building function-after serializer")."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizerConfig(StrictModel):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    momentum: NonNegativeFloat = Field(0.9, description="SGD only.")


class SchedulerConfig(StrictModel):
    """Learning-rate schedule, stepped once per epoch."""

    name: Literal["none", "step", "cosine", "plateau", "exponential"] = "none"
    step_size_epochs: PositiveInt = Field(10, description="step: epochs between decays.")
    gamma: float = Field(0.1, gt=0, le=1, description="step, exponential, plateau: decay factor.")
    patience_epochs: NonNegativeInt = Field(2, description="plateau: epochs without loss/val improvement.")
    min_lr: NonNegativeFloat = Field(0.0, description="cosine: final lr; plateau: lower bound.")


class EarlyStoppingConfig(StrictModel):
    """Stop when loss/val has not improved by `min_delta` for `patience_epochs` epochs."""

    enabled: bool = False
    patience_epochs: PositiveInt = 5
    min_delta: NonNegativeFloat = 0.0
    restore_best: bool = True


class AugmentConfig(StrictModel):
    """Batched tensor augmentation applied to pretraining inputs (zero everywhere: off)."""

    rotation_deg: NonNegativeFloat = 0.0
    translate_fraction: float = Field(0.0, ge=0, lt=0.5)
    scale_delta: float = Field(0.0, ge=0, lt=1, description="Scale drawn from [1 - d, 1 + d].")
    hflip: bool = False
    noise_std: NonNegativeFloat = 0.0

    @property
    def enabled(self) -> bool:
        return any([self.rotation_deg, self.translate_fraction, self.scale_delta, self.hflip, self.noise_std])


class TrainConfig(StrictModel):
    """What every training phase shares: budget, optimizer, schedule, stopping, clipping, retries."""

    epochs: NonNegativeInt = Field(
        5, description="0 skips the phase's training, for baselines: pretrain 0 = a random encoder, finetune 0 = probe only."
    )
    batch_size: PositiveInt = 128
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    grad_clip_norm: PositiveFloat | None = None
    retries: NonNegativeInt = Field(1, description="Prefect task retries for this phase.")
    retry_delay_s: NonNegativeFloat = 0.0


class PretrainConfig(TrainConfig):
    """Stage 1: the encoder learns without labels.

    autoencoder: a decoder reconstructs the (augmented) input; denoising: the same, but the encoder sees a
    corrupted copy (Gaussian noise, masked pixels) and the target stays clean; contrastive: SimCLR, two
    augmentations of each image pulled together by NT-Xent on a projection head that is dropped afterwards.
    """

    objective: Literal["autoencoder", "denoising", "contrastive"] = "autoencoder"
    noise_std: NonNegativeFloat = Field(0.2, description="denoising: Gaussian noise on the encoder's input.")
    mask_fraction: float = Field(0.0, ge=0, lt=1, description="denoising: share of input pixels set to 0.")
    temperature: PositiveFloat = Field(0.5, description="contrastive: NT-Xent temperature.")
    projection_dim: PositiveInt = Field(64, description="contrastive: output size of the projection head.")
    augment: AugmentConfig = Field(AugmentConfig(), validate_default=True)

    @field_validator("augment")
    @classmethod
    def _contrastive_needs_augmentation(cls, augment: AugmentConfig, info: ValidationInfo) -> AugmentConfig:
        if info.data.get("objective") == "contrastive" and not augment.enabled:
            raise ValueError(
                "pretrain.objective contrastive compares two augmentations of each image: set pretrain.augment "
                "(e.g. rotation_deg: 15, translate_fraction: 0.1, noise_std: 0.1)"
            )
        return augment


class SupervisedConfig(TrainConfig):
    class_weighted: bool = Field(False, description="Weight cross-entropy by inverse class frequency.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Cross-entropy against targets mixed with this share of the uniform distribution."
    )


class HeadConfig(SupervisedConfig):
    """Stage 2: a classification head on the frozen encoder's features."""

    cache_features: bool = Field(
        True, description="Run the frozen encoder once and train the head on the cached features."
    )


class FinetuneConfig(SupervisedConfig):
    """Stage 3: everything trains; the encoder at `optimizer.lr * encoder_lr_ratio`."""

    encoder_lr_ratio: float = Field(0.1, gt=0, le=1)
    unfreeze_after_epochs: NonNegativeInt = Field(
        0, description="The encoder stays frozen (weights and BatchNorm statistics) for this many epochs while the "
        "head trains on, then trains at its lr (Lightning's BackboneFinetuning habit); 0: from the first epoch.",
    )
    augment: AugmentConfig = Field(AugmentConfig(), description="Augmentation of the labeled training images.")


class EvalConfig(StrictModel):
    """Test metrics, and the final model registered in MLflow's model registry."""

    batch_size: PositiveInt = 1024
    registered_model: str | None = Field(None, description="Registered model name; none: the config's name.")
    promote_metric: Literal["test/acc", "test/f1_macro", "test/loss"] = Field(
        "test/acc", description="Compared with the champion's; test/loss: lower is better."
    )
    min_improvement: NonNegativeFloat = Field(
        0.0, description="A new version becomes champion when strictly better by at least this much."
    )
    min_metric: float | None = Field(
        None,
        description="No version whose promote_metric is not strictly better than this gets an alias. None: chance, "
        "i.e. test/acc above the majority class's share of the test set, test/f1_macro above 1/classes, test/loss "
        "below ln(classes) (uniform predictions).",
    )
    retries: NonNegativeInt = 1
    retry_delay_s: NonNegativeFloat = 0.0


DatasetName = Literal["digits", "mnist", "fashion_mnist", "kmnist", "cifar10", "image_folder"]


class DataConfig(StrictModel):
    dataset: DatasetName = "digits"
    root: Path = Field(Path("data"), description="Downloads and the cache of prepared tensors.")
    mirror: Path | None = Field(None, description="A directory holding the data set's original archives.")
    download: bool = True
    image_folder: Path | None = Field(
        None, validate_default=True, description="image_folder: a directory with one folder per class."
    )
    image_size: PositiveInt | None = Field(
        None, description="Images are resized to this square size (bilinear, antialiased); none: the data set's own "
        "size (image_folder: 32).",
    )
    channels: Literal[1, 3] | None = Field(
        None, description="1 = grayscale, 3 = RGB (grayscale repeated); none: the data set's own (image_folder: 3).",
    )
    mean: list[float] | None = Field(None, description="Per-channel mean; none: measured on the training split.")
    std: list[PositiveFloat] | None = Field(
        None, validate_default=True, description="Per-channel std; none: measured on the training split."
    )
    split_seed: int = Field(
        0, description="Seeds the splits and the labeled subset, so runs of any `seed` share a test set."
    )
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Only for data sets without an official test split.")
    label_fraction: float = Field(
        1.0, gt=0, le=1, description="Stratified share of training labels used by head and finetune."
    )
    retries: NonNegativeInt = Field(2, description="Prefect task retries, e.g. for a flaky download.")
    retry_delay_s: NonNegativeFloat = 5.0

    @field_validator("image_folder")
    @classmethod
    def _image_folder_needs_a_folder(cls, folder: Path | None, info: ValidationInfo) -> Path | None:
        if info.data.get("dataset") == "image_folder" and folder is None:
            raise ValueError("data.image_folder must be set when data.dataset is image_folder")
        return folder

    @field_validator("std")
    @classmethod
    def _mean_and_std_together(cls, std: list[float] | None, info: ValidationInfo) -> list[float] | None:
        mean = info.data.get("mean")
        if (mean is None) != (std is None):
            raise ValueError("set data.mean and data.std together (or neither, to measure them)")
        if mean is not None and len(mean) != len(std):
            raise ValueError("data.mean and data.std need one value per channel each")
        return std


class ModelConfig(StrictModel):
    """Encoder, decoder (the encoder mirrored) and classification head."""

    kind: Literal["mlp", "cnn", "backbone"] = "mlp"
    backbone: str = Field(
        "resnet18", description="backbone: a torchvision classification model (torchvision.models.list_models()), "
        "its classifier removed: its pooled features go to the head. Grayscale images are repeated to 3 channels.",
    )
    weights: str = Field(
        "none", description="backbone: none (random), imagenet (torchvision's weights, checksum-checked; offline "
        "from the torch hub cache in $TORCH_HOME), a state-dict file of the torchvision model (.pth or .pt, loaded "
        "with weights_only; .safetensors), or an MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION, "
        "runs:/ID/model) of another twostage backbone model, whose encoder becomes this one's starting point.",
    )
    encoder_widths: list[PositiveInt] = Field(
        [256, 128], min_length=1, description="Linear layers of the encoder; the last is the feature size."
    )
    conv_channels: list[PositiveInt] = Field(
        [32, 64], min_length=1, description="cnn: channels of the stride-2 conv layers before encoder_widths."
    )
    head_widths: list[PositiveInt] = Field([64], description="Hidden layers of the head.")
    activation: Literal["relu", "gelu", "tanh", "leaky_relu"] = "relu"
    dropout: float = Field(0.0, ge=0, lt=1)
    batchnorm: bool = False

    @field_validator("backbone")
    @classmethod
    def _a_torchvision_classifier(cls, name: str, info: ValidationInfo) -> str:
        if info.data.get("kind") == "backbone":
            from torchvision.models import list_models

            known = list_models(module=__import__("torchvision").models)
            if name not in known:
                raise ValueError(f"model.backbone {name!r} is not a torchvision classification model; e.g. resnet18, "
                                 "resnet34, mobilenet_v3_small (torchvision.models.list_models())")
        return name

    @field_validator("weights")
    @classmethod
    def _weights_for_a_backbone(cls, weights: str, info: ValidationInfo) -> str:
        if weights != "none" and info.data.get("kind") != "backbone":
            raise ValueError("model.weights applies to model.kind backbone; mlp and cnn encoders start random")
        return weights


class PipelineConfig(StrictModel):
    name: str = Field("twostage", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="MLflow experiment name.")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    amp: bool | Literal["auto"] = Field(
        "auto",
        description="Train under bfloat16 autocast. auto: where the hardware computes in bf16 (CUDA GPUs, CPUs with "
        "AVX512-BF16 or AMX); elsewhere bf16 is emulated, about 10x slower than float32 on an AVX2 CPU.",
    )
    compile: bool = Field(False, description="torch.compile the training forward pass (pays off on long GPU runs).")
    storage: str = Field(
        default_factory=lambda: os.environ.get("TWOSTAGE_STORAGE", "outputs"),
        description="Where phases hand each other checkpoints, epoch states and Prefect's phase results: a local "
        "folder (relative to the working folder) or an object-store URL, e.g. s3://bucket/prefix, shared by every "
        "worker. Default: $TWOSTAGE_STORAGE, else outputs.",
    )
    checkpoint_every_s: NonNegativeFloat = Field(
        1.0,
        description="A training phase saves its epoch state, and sends the epochs' metrics to MLflow, at most this "
        "often and after its last epoch; 0: after every epoch.",
    )
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = Field(PretrainConfig(), validate_default=True)  # checked against model
    head: HeadConfig = HeadConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvalConfig = EvalConfig()

    @field_validator("pretrain")
    @classmethod
    def _a_backbone_pretrains_contrastively(cls, pretrain: PretrainConfig, info: ValidationInfo) -> PretrainConfig:
        model = info.data.get("model")
        if model is not None and model.kind == "backbone" and pretrain.objective != "contrastive":
            raise ValueError(f"pretrain.objective {pretrain.objective} needs a decoder, which a backbone has not: use "
                             "contrastive (with pretrain.epochs 0 the backbone stays as it came)")
        return pretrain

    @field_validator("storage")
    @classmethod
    def _storage_is_a_folder_or_a_bucket(cls, value: str) -> str:
        scheme = value.split("://", 1)[0] if "://" in value else None
        if scheme not in STORAGE_SCHEMES:
            raise ValueError(f"{scheme}:// is not a storage this pipeline writes to; use a local folder or "
                             "s3://bucket/prefix (S3 or an S3-compatible store: AWS_ENDPOINT_URL names its endpoint)")
        return value


def config_hash(config: PipelineConfig) -> str:
    """A config's identity: the parent run's `twostage.config_hash`, the `<name>-<hash7>` of its MLflow and Prefect
    runs, a sweep point's. Every setting but `storage`, which says where phases are kept, not what they are: a
    sweep's point takes the storage of the worker that runs it and is the same point there as on the client."""
    return fingerprint(config.model_dump(mode="json", exclude={"storage"}))


def fingerprint(*parts: BaseModel | dict | str | int | float) -> str:
    """sha256 of the parts' canonical JSON: the same settings give the same hex digest."""
    payload = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
