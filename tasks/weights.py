"""Where a backbone's starting weights come from (`model.weights`), loaded into the encoder before stage 1, and what
identifies them in the phase keys.

- `imagenet`: torchvision's weights for the backbone (its weights enum's DEFAULT), checked against their sha256
  prefix; downloaded where there is a network, else read from the torch hub cache ($TORCH_HOME/hub/checkpoints).
- a file: a state dict of the torchvision model (`torchvision.models.get_model(name).state_dict()`), read with
  `weights_only=True` (`.pth`, `.pt`) or as safetensors (`.safetensors`); its sha256 is in the phase keys, so a
  changed file trains again.
- an MLflow model URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/model`): the logged twostage model's
  encoder, a backbone of the same architecture: transfer from another experiment of our own registry.

The classifier's weights in a file or torchvision's are dropped (the backbone has none); any other missing,
unexpected or mis-shaped key is one line naming the source and the key.
"""

from __future__ import annotations

from pathlib import Path

import torch

from configs.errors import UserError
from configs.schema import DataConfig, ModelConfig
from models.networks import Backbone
from tasks.checkpoints import sha256

MLFLOW_SCHEMES = ("models:/", "runs:/")


class WeightsError(UserError):
    """The starting weights can't be read or don't fit the backbone: the message names the source and the key."""


def load_starting_weights(encoder: Backbone, config: ModelConfig) -> str | None:
    """Load `model.weights` into the backbone; returns what was loaded, for the log, or None for random weights."""
    if config.weights == "none":
        return None
    if config.weights == "imagenet":
        state, source = _torchvision_weights(config.backbone)
    elif config.weights.startswith(MLFLOW_SCHEMES):
        from tasks.tracking import logged_encoder_state

        state, source = logged_encoder_state(config.weights), config.weights
        state = {key.removeprefix("net."): value for key, value in state.items()}
    else:
        state, source = _file_weights(Path(config.weights)), config.weights
    classifier = f"{encoder.classifier_name}."
    state = {key: value for key, value in state.items() if not key.startswith(classifier)}
    _load_exactly(encoder.net, state, source)
    return source


def data_for_weights(data: DataConfig, model: ModelConfig) -> DataConfig:
    """The data settings the starting weights expect. torchvision's (`imagenet`) take RGB images normalised with the
    mean and std their own transforms use, so images become 3-channel (grayscale repeated) and are normalised with
    those, unless data.mean and data.std are set. The prepared data's statistics go into the logged model's
    metadata, so `twostage predict` does the same. Other weights (a file, an MLflow model) take the data's own."""
    if model.kind != "backbone" or model.weights != "imagenet" or data.mean is not None:
        return data
    from torchvision.models import get_model_weights

    transform = get_model_weights(model.backbone).DEFAULT.transforms()
    return data.model_copy(update={"channels": 3, "mean": list(transform.mean), "std": list(transform.std)})


def weights_identity(config: ModelConfig) -> str | None:
    """What the phase keys hold of the starting weights: a file's sha256, the torchvision weights' name, or the
    MLflow model version an alias points at now (`models:/NAME@champion` moved to another version is new weights)."""
    if config.kind != "backbone" or config.weights == "none":
        return None
    if config.weights == "imagenet":
        return config.weights
    if config.weights.startswith(MLFLOW_SCHEMES):
        from tasks.tracking import pinned_model_uri

        return pinned_model_uri(config.weights)
    return sha256(_existing(Path(config.weights)).read_bytes())


def _torchvision_weights(backbone: str) -> tuple[dict, str]:
    """torchvision's DEFAULT weights for the backbone, read with weights_only from the torch hub cache (downloaded
    there first where there is a network), their sha256 checked against the prefix in the file's name."""
    import hashlib

    from torch.hub import HASH_REGEX, get_dir, load_state_dict_from_url
    from torchvision.models import get_model_weights

    weights = get_model_weights(backbone).DEFAULT
    file_name = weights.url.rsplit("/", 1)[1]
    try:
        state = load_state_dict_from_url(weights.url, progress=False, check_hash=True, map_location="cpu",
                                         weights_only=True)
        cached = Path(get_dir()) / "checkpoints" / file_name
        prefix = HASH_REGEX.search(file_name)
        if prefix and not hashlib.sha256(cached.read_bytes()).hexdigest().startswith(prefix.group(1)):
            raise RuntimeError(f"{cached} does not have the sha256 its name promises ({prefix.group(1)}...)")
    except Exception as error:  # noqa: BLE001 - no network, a truncated or tampered file: one line either way
        raise WeightsError(
            f"model.weights imagenet: torchvision's {weights} could not be read ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:160] if str(error) else ''}); without a network, copy {file_name} into "
            f"{get_dir()}/checkpoints, or give a state-dict file"
        ) from None
    return state, f"torchvision {weights}"


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise WeightsError(f"model.weights {path}: no such file; give a state-dict file (.pth, .pt, .safetensors), "
                           "imagenet, none, or an MLflow model URI")
    return path


def _file_weights(path: Path) -> dict:
    _existing(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling refused, truncated, not a torch file: one line each way
        raise WeightsError(f"model.weights {path} is no plain state dict ({type(error).__name__}: "
                           f"{str(error).strip().splitlines()[0][:160] if str(error).strip() else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"model.weights {path} is no state dict of tensors (a dict of name -> tensor)")
    return state


def _load_exactly(net: torch.nn.Module, state: dict, source: str) -> None:
    expected = net.state_dict()
    # BatchNorm's loader fills in num_batches_tracked for state dicts saved before it existed (torchvision's own)
    missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        key, what = (missing[0], "lacks") if missing else (unexpected[0], "has a key the backbone has not:")
        raise WeightsError(f"model.weights {source} {what} {key} ({len(missing)} missing, {len(unexpected)} "
                           "unexpected): is it this model.backbone's state dict?")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise WeightsError(f"model.weights {source}: {key} has shape {tuple(value.shape)}, the backbone's is "
                               f"{tuple(expected[key].shape)}")
    net.load_state_dict(state, strict=False)  # every key but num_batches_tracked checked above
