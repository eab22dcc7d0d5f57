"""Stage 1: self-supervised pretraining of the encoder (autoencoder, denoising or contrastive)."""

from __future__ import annotations

import torch
from prefect import task
from torch import nn

from configs.schema import ModelConfig, PretrainConfig
from models.networks import build_model, projection_head
from models.objectives import contrastive_loss, reconstruction_loss
from models.training import encode, reconstruction_error
from tasks import plots
from tasks.data import load_splits
from tasks.phase import PHASE_CACHE, training_phase
from tasks.results import Checkpoint, DataBundle, RunContext


@task(name="pretrain", cache_policy=PHASE_CACHE, persist_result=True)
def pretrain(config: PretrainConfig, model_config: ModelConfig, data: DataBundle, run: RunContext) -> Checkpoint:
    """Stage 1: train the encoder on every training image, without labels; returns the model's checkpoint."""
    with training_phase("pretrain", run) as phase:
        splits = load_splits(data, run.device)
        model = build_model(model_config, data.input_shape, data.num_classes).to(run.device)
        if config.objective == "contrastive":
            projection = projection_head(model_config.encoder_widths[-1], config.projection_dim).to(run.device)
            trained = nn.Sequential(model.encoder, projection)  # images -> projections
            groups = [{"params": list(trained.parameters())}]
            loss_fn = contrastive_loss(config.augment, config.temperature)
            validate = _seeded(lambda m: {"val/loss": _mean_loss(loss_fn, m, splits.val_x)}, run.device)
            phase.log_parameter_counts(nn.ModuleList([model, projection]), groups)
        else:
            trained = model
            groups = [{"params": [*model.encoder.parameters(), *model.decoder.parameters()]}]
            noise, mask = (config.noise_std, config.mask_fraction) if config.objective == "denoising" else (0.0, 0.0)
            loss_fn = reconstruction_loss(config.augment, noise, mask)
            validate = lambda m: {"val/loss": reconstruction_error(m, splits.val_x, batch_size=1024)}  # noqa: E731
            phase.log_parameter_counts(model, groups)
        result = phase.fit(trained, groups, loss_fn, (splits.train_x, splits.train_y), validate, config)

        model.eval()
        if config.objective == "contrastive":
            headline = {"pretrain/contrastive_loss": validate(trained)["val/loss"]}
        else:
            with torch.inference_mode():
                sample = splits.val_x[:8]
                figure = plots.reconstructions(sample, model.reconstruct(sample))
            phase.child.log_figure(figure, "reconstructions.png")
            headline = {"pretrain/recon_loss": reconstruction_error(model, splits.val_x, batch_size=1024)}
        features = encode(model.encoder, splits.val_x, 1024)
        title = f"validation features after {config.objective} pretraining (PCA)"
        phase.child.log_figure(plots.feature_projection(features, splits.val_y, data.class_names, title), "features_pca.png")
        return phase.finish(model, result, model_config, data.input_shape, headline)


def _mean_loss(loss_fn, model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        losses = [loss_fn(model, images[i : i + batch_size], None) for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.stack(losses).mean().item()


def _seeded(validate, device: str):
    """The same augmentations on every validation, without disturbing training's random stream."""
    where = torch.device(device)
    devices = [where.index or 0] if where.type == "cuda" else []

    def seeded(model: nn.Module) -> dict[str, float]:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            return validate(model)

    return seeded
