"""Transfer learning: a torchvision backbone as the encoder, started from a state-dict file or from the encoder of a
model in our own registry, frozen with its BatchNorm statistics while the head trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torchvision.models import get_model

from configs.loader import validate_config
from configs.schema import ModelConfig
from conftest import tiny_config
from flows.two_stage import two_stage
from models.networks import build_model
from tasks.checkpoints import load_model
from tasks.results import Checkpoint
from tasks.weights import WeightsError, load_starting_weights

BACKBONE = {"kind": "backbone", "backbone": "resnet18", "head_widths": []}
AS_IT_CAME = {"objective": "contrastive", "epochs": 0, "augment": {"translate_fraction": 0.1}}  # stage 1 skipped


def saved_state(tmp_path, name: str = "resnet18", seed: int = 7) -> str:
    """A randomly initialised torchvision model's state dict in a file: "pretrained weights" made offline."""
    torch.manual_seed(seed)
    path = tmp_path / f"{name}-{seed}.pth"
    torch.save(get_model(name, weights=None).state_dict(), path)
    return str(path)


def test_a_state_dict_file_loads_into_the_backbone_exactly(tmp_path):
    path = saved_state(tmp_path)
    model = build_model(ModelConfig(**BACKBONE, weights=path), (1, 8, 8), 10)
    assert load_starting_weights(model.encoder, ModelConfig(**BACKBONE, weights=path)) == path
    saved = torch.load(path, weights_only=True)
    loaded = model.encoder.net.state_dict()
    assert set(saved) - set(loaded) == {"fc.weight", "fc.bias"}  # the classifier is not part of a backbone
    assert all(torch.equal(loaded[key], saved[key]) for key in loaded)


def test_a_safetensors_file_loads_too(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    path = tmp_path / "resnet18.safetensors"
    save_file(get_model("resnet18", weights=None).state_dict(), path)
    config = ModelConfig(**BACKBONE, weights=str(path))
    model = build_model(config, (3, 8, 8), 10)
    load_starting_weights(model.encoder, config)
    assert torch.equal(model.encoder.net.conv1.weight, torch.load(saved_state(tmp_path, seed=3), weights_only=True)
                       ["conv1.weight"])


def test_imagenet_weights_get_their_own_normalisation_on_three_channels(tmp_path):
    from configs.schema import DataConfig
    from tasks.data import prepare
    from tasks.weights import data_for_weights

    imagenet = ModelConfig(**BACKBONE, weights="imagenet")
    data = data_for_weights(DataConfig(dataset="digits", root=tmp_path), imagenet)
    bundle = prepare(data)  # the bundle's statistics are what evaluate logs with the model, and predict applies
    assert bundle.input_shape == (3, 8, 8)  # grayscale repeated, so each channel gets ImageNet's statistics
    assert bundle.mean == pytest.approx([0.485, 0.456, 0.406]) and bundle.std == pytest.approx([0.229, 0.224, 0.225])
    own = DataConfig(dataset="digits", root=tmp_path, mean=[0.5], std=[0.25])
    assert data_for_weights(own, imagenet) == own  # statistics the user set are kept
    for weights in ("none", saved_state(tmp_path)):  # a file's or random weights take the data's own statistics
        assert data_for_weights(DataConfig(dataset="digits"), ModelConfig(**BACKBONE, weights=weights)).mean is None


def test_weights_of_another_architecture_are_one_line_naming_the_file_and_the_key(tmp_path):
    path = saved_state(tmp_path, "mobilenet_v3_small")
    model = build_model(ModelConfig(**BACKBONE), (3, 8, 8), 10)
    with pytest.raises(WeightsError, match=rf"^model.weights {path} lacks conv1.weight \(\d+ missing, \d+ unexpected\)"):
        load_starting_weights(model.encoder, ModelConfig(**BACKBONE, weights=path))
    with pytest.raises(WeightsError, match=r"^model.weights .*nothing.pth: no such file"):
        load_starting_weights(model.encoder, ModelConfig(**BACKBONE, weights=str(tmp_path / "nothing.pth")))


def test_a_backbone_takes_grayscale_images_as_three_equal_channels():
    model = build_model(ModelConfig(**BACKBONE), (1, 8, 8), 10).eval()
    gray = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model.encoder(gray), model.encoder.net(gray.repeat(1, 3, 1, 1)))
        assert model.encoder.net.conv1.in_channels == 3


def test_the_phase_key_follows_the_weights_content_not_the_files_path(tmp_path):
    from tasks.keys import input_key

    first, second = saved_state(tmp_path, seed=1), saved_state(tmp_path, seed=2)
    copy = tmp_path / "elsewhere.pth"
    copy.write_bytes(Path(first).read_bytes())
    key = lambda path: input_key("pretrain", {"model_config": ModelConfig(**BACKBONE, weights=str(path))})  # noqa: E731
    assert key(first) == key(copy) != key(second)


def test_a_torchvision_model_without_a_feature_vector_is_one_line_naming_it():
    from models.networks import BackboneError

    with pytest.raises(BackboneError, match=r"^model.backbone vit_b_16 does not take images of shape \(1, 8, 8\)"):
        build_model(ModelConfig(**{**BACKBONE, "backbone": "vit_b_16"}), (1, 8, 8), 10)


@pytest.mark.parametrize(("model", "pretrain", "fragment"), [
    ({**BACKBONE}, {"objective": "autoencoder", "epochs": 0}, "pretrain.objective autoencoder needs a decoder"),
    ({**BACKBONE, "backbone": "resnet7"}, AS_IT_CAME, "model.backbone 'resnet7' is not a torchvision"),
    ({"kind": "mlp", "weights": "imagenet"}, {}, "model.weights applies to model.kind backbone"),
])
def test_backbone_settings_that_cannot_work_are_refused_naming_the_field(model, pretrain, fragment):
    with pytest.raises(ValueError, match=fragment):
        validate_config(tiny_config(model=model, pretrain=pretrain))


def stored_checkpoints(workdir) -> dict[str, Checkpoint]:
    """The training phases' persisted results in the run's storage, by the MLflow run that made each."""
    found = {}
    for record in (workdir / "outputs" / "results").iterdir():
        checkpoint = Checkpoint.model_validate(json.loads(json.loads(record.read_text())["result"])["data"])
        found[checkpoint.run_id] = checkpoint
    return found


def phase_run(experiment: str, phase: str) -> str:
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              filter_string=f"tags.`twostage.phase` = '{phase}'")
    assert len(runs) == 1
    return runs[0].info.run_id


def test_the_head_trains_on_a_frozen_backbone_whose_weights_and_batchnorm_statistics_stay_as_loaded(
        prefect_server, workdir):
    path = saved_state(workdir)
    two_stage(validate_config(tiny_config(model={**BACKBONE, "weights": path}, pretrain=AS_IT_CAME,
                                          head={"epochs": 2}, finetune={"epochs": 1})))
    checkpoints = stored_checkpoints(workdir)
    pretrained, head, finetuned = (load_model(checkpoints[phase_run("tiny", phase)], "cpu").encoder.state_dict()
                                   for phase in ("pretrain", "head", "finetune"))
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(pretrained[f"net.{key}"], saved[key]) for key in saved if not key.startswith("fc."))
    assert any("running_mean" in key for key in pretrained)
    assert all(torch.equal(head[key], pretrained[key]) for key in pretrained)  # weights and BN running statistics
    assert any(not torch.equal(finetuned[key], pretrained[key]) for key in pretrained)  # finetuning moves it
    for phase in ("pretrain", "evaluate"):  # what the network sees: its first convolutional block's feature maps
        assert "feature_maps.png" in {item.path for item in MlflowClient().list_artifacts(phase_run("tiny", phase))}


def test_the_encoder_of_a_registered_model_transfers_into_a_new_experiment(prefect_server, workdir):
    two_stage(validate_config(tiny_config(name="source", model=BACKBONE, pretrain=AS_IT_CAME, head={"epochs": 1},
                                          finetune={"epochs": 1})))
    two_stage(validate_config(tiny_config(name="target", model={**BACKBONE, "weights": "models:/source@champion"},
                                          pretrain=AS_IT_CAME, head={"epochs": 1}, finetune={"epochs": 0})))
    checkpoints = stored_checkpoints(workdir)
    source = load_model(checkpoints[phase_run("source", "finetune")], "cpu").encoder.state_dict()
    target = load_model(checkpoints[phase_run("target", "pretrain")], "cpu").encoder.state_dict()
    assert all(torch.equal(target[key], source[key]) for key in source)


def test_the_encoder_unfreezes_after_the_set_number_of_finetuning_epochs(prefect_server, workdir):
    """finetune.unfreeze_after_epochs N: for N epochs only the head trains (the encoder's weights and BatchNorm
    statistics stay as the head phase left them), then everything does."""
    model = {"encoder_widths": [32, 16], "head_widths": [16], "batchnorm": True}
    encoders = {}
    for frozen_for in (2, 1):
        two_stage(validate_config(tiny_config(model=model, finetune={"epochs": 2, "unfreeze_after_epochs": frozen_for})))
        client = MlflowClient()
        runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                  filter_string="tags.`twostage.phase` = 'finetune'", order_by=["start_time DESC"])
        checkpoints = stored_checkpoints(workdir)
        encoders[frozen_for] = load_model(checkpoints[runs[0].info.run_id], "cpu").encoder.state_dict()
    head = load_model(checkpoints[phase_run("tiny", "head")], "cpu").encoder.state_dict()
    assert any("running_mean" in key for key in head)
    assert all(torch.equal(encoders[2][key], head[key]) for key in head)  # frozen for both epochs
    assert any(not torch.equal(encoders[1][key], head[key]) for key in head)  # trained in its second epoch


def test_a_backbone_trains_on_an_rgb_image_folder_end_to_end_and_predicts_rgb_and_grayscale_files(
        prefect_server, workdir, capsys):
    from PIL import Image
    from test_data import write_png_folder

    from flows.predict import predict

    write_png_folder(workdir / "images", per_class=16)  # red, green and blue-ish 10x10 RGB images
    data = {"dataset": "image_folder", "image_folder": str(workdir / "images"), "image_size": 16, "channels": 3}
    report = two_stage(validate_config(tiny_config(data=data, model=BACKBONE, pretrain=AS_IT_CAME,
                                                   head={"epochs": 3, "batch_size": 16},
                                                   finetune={"epochs": 1, "batch_size": 16})))
    assert report.metrics["test/acc"] > 0
    Image.new("RGB", (30, 20), (230, 20, 20)).save(workdir / "red.png")
    Image.new("L", (16, 16), 128).save(workdir / "gray.png")
    assert predict(report.model_uri, [str(workdir / "red.png"), str(workdir / "gray.png")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(workdir / "red.png"), str(workdir / "gray.png")]
    assert all(line.split(": ")[1].split(" (")[0] in {"class_0", "class_1", "class_2"} for line in lines)
