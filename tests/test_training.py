"""The one training loop and what each phase asks of it: learning, freezing, learning rates, stopping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from configs.schema import (
    AugmentConfig,
    EarlyStoppingConfig,
    FinetuneConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainConfig,
)
from models.evaluation import classification_metrics, encode, reconstruction_error
from models.networks import build_model
from models.objectives import augment_batch, classification_loss, inverse_frequency_weights, reconstruction_loss
from models.training import NonFiniteLossError, fit, freeze, make_optimizer, make_scheduler, train_mode
from tasks.finetune import param_groups


def blobs(count: int = 256, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 8, 8) whose class is a bright row, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % classes
    images = torch.randn(count, 1, 8, 8, generator=generator) * 0.3
    images[torch.arange(count), 0, labels * 2] += 2.0
    return images, labels


def run(model, groups, loss_fn, data, config, validate=None, seed=0):
    history = []
    validate = validate or (lambda m: {"loss/val": 0.0})
    result = fit(model, groups, loss_fn, data, validate, config, history.append, torch.Generator().manual_seed(seed))
    return result, history


def test_fit_overfits_one_batch():
    torch.manual_seed(0)
    images, labels = blobs(32)
    model = build_model(ModelConfig(encoder_widths=[64, 16]), (1, 8, 8), 4)
    config = TrainConfig(epochs=150, batch_size=32, optimizer=OptimizerConfig(lr=1e-2))
    _, history = run(model, [{"params": list(model.parameters())}], classification_loss(), (images, labels), config)
    assert history[-1].train_loss < 0.01
    assert classification_metrics(model, images, labels, 64)[1] == 1.0


def test_the_tutorials_stage_one_loss_is_identically_zero_and_ours_is_not():
    torch.manual_seed(0)
    images, _ = blobs(16)
    model = build_model(ModelConfig(), (1, 8, 8), 4)
    features = model.encoder(images)
    assert nn.functional.mse_loss(features, features.detach()).item() == 0.0
    assert reconstruction_loss(AugmentConfig())(model, images, None).item() > 0.1


@pytest.mark.parametrize("noise_std, mask_fraction", [(0.0, 0.0), (0.3, 0.0), (0.0, 0.3)])
def test_pretraining_moves_encoder_weights_and_lowers_reconstruction_loss(noise_std, mask_fraction):
    torch.manual_seed(0)
    images, labels = blobs(256)
    model = build_model(ModelConfig(encoder_widths=[64, 16]), (1, 8, 8), 4)
    before = [p.detach().clone() for p in model.encoder.parameters()]
    error_before = reconstruction_error(model, images, 128)
    groups = [{"params": [*model.encoder.parameters(), *model.decoder.parameters()]}]
    config = TrainConfig(epochs=10, batch_size=32)
    run(model, groups, reconstruction_loss(AugmentConfig(), noise_std, mask_fraction), (images, labels), config)
    assert all(not torch.equal(b, a) for b, a in zip(before, model.encoder.parameters()))
    assert reconstruction_error(model, images, 128) < 0.7 * error_before


def batchnorm_model() -> nn.Module:
    config = ModelConfig(encoder_widths=[32, 16], head_widths=[8], batchnorm=True, dropout=0.2)
    return build_model(config, (1, 8, 8), 4)


def test_train_head_leaves_encoder_weights_and_batchnorm_stats_unchanged():
    torch.manual_seed(0)
    images, labels = blobs(128)
    model = batchnorm_model()
    freeze(model.encoder)
    encoder_state = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    assert any("running_mean" in k for k in encoder_state)
    groups = [{"params": list(model.head.parameters())}]
    head_before = [p.detach().clone() for p in model.head.parameters()]
    config = TrainConfig(epochs=3, batch_size=32)
    run(model, groups, classification_loss(), (images, labels), config,
        validate=lambda m: {"loss/val": classification_metrics(m, images, labels, 64)[0]})
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, encoder_state[key]), key  # weights, running_mean/var, num_batches_tracked
    assert any(not torch.equal(b, a) for b, a in zip(head_before, model.head.parameters()))


def test_train_mode_keeps_frozen_modules_in_eval_including_dropout():
    model = batchnorm_model()
    freeze(model.encoder)
    train_mode(model)
    assert all(not m.training for m in model.encoder.modules())
    assert all(m.training for m in model.head.modules())


def test_head_optimizer_holds_only_head_parameters():
    model = batchnorm_model()
    freeze(model.encoder)
    optimizer = make_optimizer([{"params": list(model.head.parameters())}], OptimizerConfig())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.head.parameters()}
    assert not held & {id(p) for p in model.encoder.parameters()}


def test_head_on_cached_features_matches_training_through_the_frozen_encoder():
    images, labels = blobs(128)
    config = TrainConfig(epochs=3, batch_size=32)
    heads = []
    for cached in (True, False):
        torch.manual_seed(0)
        model = build_model(ModelConfig(encoder_widths=[32, 16]), (1, 8, 8), 4)
        freeze(model.encoder)
        trained, inputs = (model.head, encode(model.encoder, images, 64)) if cached else (model, images)
        run(trained, [{"params": list(model.head.parameters())}], classification_loss(), (inputs, labels), config)
        heads.append(model.head.state_dict())
    for key in heads[0]:
        torch.testing.assert_close(heads[0][key], heads[1][key])


def test_finetune_gives_encoder_a_lower_lr_than_head():
    model = build_model(ModelConfig(), (1, 8, 8), 4)
    config = FinetuneConfig(encoder_lr_ratio=0.1, optimizer=OptimizerConfig(lr=1e-3))
    optimizer = make_optimizer(param_groups(model, config), config.optimizer)
    head_group, encoder_group = optimizer.param_groups
    assert head_group["lr"] == pytest.approx(1e-3)
    assert encoder_group["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in head_group["params"]} == {id(p) for p in model.head.parameters()}
    assert {id(p) for p in encoder_group["params"]} == {id(p) for p in model.encoder.parameters()}


def test_early_stopping_stops_and_restores_the_best_weights():
    torch.manual_seed(0)
    images, labels = blobs(64)
    model = build_model(ModelConfig(encoder_widths=[16, 8]), (1, 8, 8), 4)
    scores = iter([3.0, 1.0, 2.0, 2.5, 2.6, 9.0])
    snapshots = []

    def validate(m):
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return {"loss/val": next(scores)}

    config = TrainConfig(epochs=6, batch_size=16, early_stopping=EarlyStoppingConfig(enabled=True, patience_epochs=2))
    result, history = run(model, [{"params": list(model.parameters())}], classification_loss(), (images, labels), config, validate)
    assert result.stopped_early and len(history) == 4 and result.best_epoch == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[1][key])


@pytest.mark.parametrize(
    "scheduler, expected",
    [
        (SchedulerConfig(name="none"), [1.0, 1.0, 1.0, 1.0]),
        (SchedulerConfig(name="step", step_size_epochs=2, gamma=0.5), [1.0, 1.0, 0.5, 0.5]),
        (SchedulerConfig(name="exponential", gamma=0.5), [1.0, 0.5, 0.25, 0.125]),
        (SchedulerConfig(name="cosine"), [1.0, 0.8535534, 0.5, 0.1464466]),
        (SchedulerConfig(name="plateau", gamma=0.5, patience_epochs=0), [1.0, 1.0, 0.5, 0.25]),
    ],
)
def test_schedulers_set_the_lr_of_each_epoch(scheduler, expected):
    images, labels = blobs(32)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    val_losses = iter([1.0, 1.0, 1.0, 1.0])
    config = TrainConfig(epochs=4, batch_size=32, optimizer=OptimizerConfig(lr=1.0, name="sgd", momentum=0), scheduler=scheduler)
    _, history = run(model, [{"params": list(model.parameters())}], lambda m, x, y: 0.0 * m(x).sum(), (images, labels), config,
                     validate=lambda m: {"loss/val": next(val_losses)})
    assert [s.lr for s in history] == pytest.approx(expected)


def test_make_scheduler_none_is_no_scheduler():
    optimizer = make_optimizer([{"params": [nn.Parameter(torch.zeros(1))]}], OptimizerConfig())
    assert make_scheduler(optimizer, SchedulerConfig(), 3) is None


def test_gradient_clipping_bounds_the_update():
    images, labels = blobs(32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    before = model[1].weight.detach().clone()
    config = TrainConfig(epochs=1, batch_size=32, grad_clip_norm=0.01, optimizer=OptimizerConfig(name="sgd", lr=1.0, momentum=0))
    run(model, [{"params": list(model.parameters())}], lambda m, x, y: 1e4 * m(x).pow(2).mean(), (images, labels), config)
    assert (model[1].weight - before).norm() <= 0.01 + 1e-6


def test_non_finite_loss_stops_with_the_epoch():
    images, labels = blobs(32)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    config = TrainConfig(epochs=3, batch_size=32)
    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        run(model, [{"params": list(model.parameters())}], lambda m, x, y: m(x).sum() * float("nan"), (images, labels), config)


def test_same_seed_gives_the_same_weights():
    images, labels = blobs(64)
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        model = build_model(ModelConfig(encoder_widths=[16, 8], dropout=0.2), (1, 8, 8), 4)
        run(model, [{"params": list(model.parameters())}], classification_loss(), (images, labels), TrainConfig(epochs=2, batch_size=16), seed=3)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key])


def test_augmentation_keeps_shapes_and_changes_images():
    images, _ = blobs(16)
    config = AugmentConfig(rotation_deg=15, translate_fraction=0.1, scale_delta=0.1, hflip=True, noise_std=0.05)
    torch.manual_seed(0)
    augmented = augment_batch(images, config)
    assert augmented.shape == images.shape
    assert not torch.allclose(augmented, images)
    assert torch.equal(augment_batch(images, AugmentConfig(rotation_deg=0)), images)


def test_class_weights_are_inverse_to_frequency():
    weights = inverse_frequency_weights(torch.tensor([0, 0, 0, 1]), 2)
    assert weights[1] == pytest.approx(3 * weights[0])


class Interrupted(Exception):
    pass


def test_resuming_a_saved_state_gives_the_uninterrupted_result(tmp_path):
    """Kill after epoch 2 of 5, reload the state from disk (weights_only), finish: same weights as never stopping."""
    images, labels = blobs(128)
    config = TrainConfig(
        epochs=5, batch_size=16, optimizer=OptimizerConfig(name="adamw", weight_decay=0.01),
        scheduler=SchedulerConfig(name="cosine"),
        early_stopping=EarlyStoppingConfig(enabled=True, patience_epochs=10),
    )

    def train(resume=None, stop_after=None):
        torch.manual_seed(5)
        model = build_model(ModelConfig(encoder_widths=[32, 16], dropout=0.3, batchnorm=True), (1, 8, 8), 4)
        saved = []

        def on_epoch(stats):
            if stats.epoch == stop_after:
                raise Interrupted

        try:
            fit(model, [{"params": list(model.parameters())}], classification_loss(), (images, labels),
                lambda m: {"loss/val": classification_metrics(m, images, labels, 64)[0]}, config, on_epoch,
                torch.Generator().manual_seed(5), save_state=saved.append, resume=resume)
        except Interrupted:
            pass
        return model, saved

    uninterrupted, _ = train()
    _, saved = train(stop_after=2)
    torch.save(saved[-1], tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["epoch"] == 2
    resumed, _ = train(resume=state)
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-6, atol=1e-7)


def test_batch_size_one_trains():
    images, labels = blobs(8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    before = model[1].weight.detach().clone()
    _, history = run(model, [{"params": list(model.parameters())}], classification_loss(), (images, labels),
                     TrainConfig(epochs=1, batch_size=1))
    assert history[0].train_loss > 0 and not torch.equal(before, model[1].weight)


def test_nt_xent_is_low_when_the_two_views_agree_and_high_when_they_do_not():
    from models.objectives import nt_xent

    torch.manual_seed(0)
    views = torch.randn(8, 16)
    matching = nt_xent(torch.cat([views, views]), temperature=0.1)
    unrelated = nt_xent(torch.cat([views, torch.randn(8, 16)]), temperature=0.1)
    assert matching < 0.1 < unrelated


def test_contrastive_pretraining_moves_encoder_weights_and_lowers_its_loss():
    from models.networks import projection_head
    from models.objectives import contrastive_loss

    torch.manual_seed(0)
    images, labels = blobs(256)
    model = build_model(ModelConfig(encoder_widths=[64, 16]), (1, 8, 8), 4)
    trained = nn.Sequential(model.encoder, projection_head(16, 8))
    before = [p.detach().clone() for p in model.encoder.parameters()]
    loss_fn = contrastive_loss(AugmentConfig(translate_fraction=0.1, noise_std=0.3), temperature=0.5)
    _, history = run(trained, [{"params": list(trained.parameters())}], loss_fn, (images, labels),
                     TrainConfig(epochs=20, batch_size=64, optimizer=OptimizerConfig(lr=3e-3)))
    assert all(not torch.equal(b, a) for b, a in zip(before, model.encoder.parameters()))
    assert history[-1].train_loss < 0.8 * history[0].train_loss


@pytest.mark.parametrize("option", ["amp", "compile"])
def test_bf16_autocast_and_compile_train_float32_weights_to_the_same_accuracy(option):
    """`amp: true` and `compile: true` (meant for GPUs) also run on the CPU; results match within noise."""
    images, labels = blobs(256)
    config = TrainConfig(epochs=15, batch_size=32, optimizer=OptimizerConfig(lr=3e-3))
    accuracies = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(encoder_widths=[32, 16]), (1, 8, 8), 4)
        fit(model, [{"params": list(model.parameters())}], classification_loss(), (images, labels),
            lambda m: {"loss/val": 0.0}, config, lambda stats: None, torch.Generator().manual_seed(0),
            **{option: enabled})
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert not any(key.startswith("_orig_mod") for key in model.state_dict())
        accuracies.append(classification_metrics(model, images, labels, 64)[1])
    assert accuracies[0] > 0.95
    assert accuracies[1] == pytest.approx(accuracies[0], abs=0.03)


def test_finetune_augmentation_perturbs_training_batches_only():
    torch.manual_seed(0)
    images, labels = blobs(64)
    model = build_model(ModelConfig(encoder_widths=[32, 16]), (1, 8, 8), 4).eval()
    plain, augmented = classification_loss(), classification_loss(augment=AugmentConfig(translate_fraction=0.2, hflip=True))
    assert augmented(model, images, labels).item() != pytest.approx(plain(model, images, labels).item(), abs=1e-4)
    assert classification_loss(augment=AugmentConfig())(model, images, labels).item() == plain(model, images, labels).item()


def test_label_smoothing_trains_against_targets_mixed_with_the_uniform_distribution():
    torch.manual_seed(0)
    images, labels = blobs(64)
    model = build_model(ModelConfig(encoder_widths=[32, 16]), (1, 8, 8), 4).eval()
    log_probs = torch.log_softmax(model(images), dim=1)
    smoothed = torch.full_like(log_probs, 0.2 / 4).scatter_(1, labels[:, None], 1 - 0.2 + 0.2 / 4)
    expected = -(smoothed * log_probs).sum(dim=1).mean()
    assert classification_loss(label_smoothing=0.2)(model, images, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    assert classification_loss(label_smoothing=0.2)(model, images, labels).item() != pytest.approx(
        classification_loss()(model, images, labels).item(), rel=1e-3
    )
