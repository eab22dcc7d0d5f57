"""Stage 1: self-supervised pretraining of the encoder as an autoencoder."""

from __future__ import annotations

import torch
from prefect import task

from configs.schema import ModelConfig, PretrainConfig
from models.networks import build_model
from models.objectives import reconstruction_loss
from models.training import fit, reconstruction_error
from tasks import plots, tracking
from tasks.data import load_splits
from tasks.phase import epoch_reporter, finish_phase, log_parameter_counts, run_fit, seeded_generator
from tasks.results import Checkpoint, DataBundle, RunContext


@task(name="pretrain")
def pretrain(config: PretrainConfig, model_config: ModelConfig, data: DataBundle, run: RunContext) -> Checkpoint:
    """Stage 1: train encoder + decoder to reconstruct every training image; returns their checkpoint."""
    with tracking.phase_run(run, "pretrain") as child:
        generator = seeded_generator(run, "pretrain")
        splits = load_splits(data, run.device)
        model = build_model(model_config, data.input_shape, data.num_classes).to(run.device)
        autoencoder = [*model.encoder.parameters(), *model.decoder.parameters()]
        log_parameter_counts(child, model)
        result = run_fit("pretrain", lambda: fit(
            model,
            [{"params": autoencoder}],
            reconstruction_loss(config.augment, config.denoise_std),
            (splits.train_x, splits.train_y),  # every training image: stage 1 needs no labels
            lambda m: {"val/loss": reconstruction_error(m, splits.val_x, batch_size=1024)},
            config,
            epoch_reporter("pretrain", child),
            generator,
        ))
        model.eval()
        with torch.inference_mode():
            sample = splits.val_x[:8]
            child.log_figure(plots.reconstructions(sample, model.reconstruct(sample)), "reconstructions.png")
        checkpoint = finish_phase(
            "pretrain", model, result, child, run,
            (config, model_config, data.fingerprint, run.seed), model_config, data.input_shape,
        )
        child.log_metrics({"pretrain/recon_loss": checkpoint.metrics["val/loss"]}, on_parent=True)
        return checkpoint
