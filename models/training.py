"""The one training loop every phase shares, and the pieces it is configured with.

Plain PyTorch: data are tensors already on the device, batches are index slices of a random permutation,
and the loop reports through a callback. It knows nothing of phases, Prefect or MLflow.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from configs.schema import EarlyStoppingConfig, OptimizerConfig, SchedulerConfig, TrainConfig

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, inputs, targets) -> scalar
Validate = Callable[[nn.Module], dict[str, float]]  # model -> {"loss/val": ..., ...}


class NonFiniteLossError(FloatingPointError):
    def __init__(self, epoch: int, loss: float):
        super().__init__(f"training loss became {loss} in epoch {epoch}")
        self.epoch = epoch


@dataclass
class EpochStats:
    epoch: int
    epochs: int
    train_loss: float
    val: dict[str, float]
    lr: float
    seconds: float

    def metrics(self) -> dict[str, float]:
        return {"loss/train": self.train_loss, **self.val, "lr": self.lr}


@dataclass
class FitResult:
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False


def freeze(module: nn.Module) -> None:
    """No gradients for `module`; `train_mode` also keeps it in eval() (BatchNorm stats, Dropout)."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)


def train_mode(model: nn.Module) -> None:
    """model.train(), except that every fully frozen submodule stays in eval()."""
    model.train()

    def keep_frozen_in_eval(module: nn.Module) -> None:
        for child in module.children():
            parameters = list(child.parameters())
            if parameters and not any(p.requires_grad for p in parameters):
                child.eval()
            else:
                keep_frozen_in_eval(child)

    keep_frozen_in_eval(model)


def make_optimizer(param_groups: Iterable[dict], config: OptimizerConfig) -> torch.optim.Optimizer:
    """An optimizer over `param_groups` (torch's: a group's own "lr" wins over `config.lr`)."""
    groups = [dict(group) for group in param_groups]  # torch fills its defaults into the dicts it gets
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    optimizer_class = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    # The fused kernel updates all parameters in one call: 20-30% faster steps on CPU at batch 32.
    fused = all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])
    return optimizer_class(groups, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def make_scheduler(optimizer: torch.optim.Optimizer, config: SchedulerConfig, epochs: int):
    """A torch scheduler stepped once per epoch, or None."""
    lr_scheduler = torch.optim.lr_scheduler
    if config.name == "step":
        return lr_scheduler.StepLR(optimizer, step_size=config.step_size_epochs, gamma=config.gamma)
    if config.name == "exponential":
        return lr_scheduler.ExponentialLR(optimizer, gamma=config.gamma)
    if config.name == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=config.min_lr)
    if config.name == "plateau":
        return lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=config.gamma, patience=config.patience_epochs, min_lr=config.min_lr
        )
    return None


class EarlyStopping:
    """Tracks the best loss/val and its weights; says when patience has run out."""

    def __init__(self, config: EarlyStoppingConfig):
        self.config = config
        self.best_loss = math.inf
        self.best_epoch = 0
        self.best_state: dict | None = None

    def update(self, model: nn.Module, epoch: int, val_loss: float) -> bool:
        """Record this epoch; True when training should stop."""
        if val_loss < self.best_loss - self.config.min_delta:
            self.best_loss, self.best_epoch = val_loss, epoch
            if self.config.enabled and self.config.restore_best:
                self.best_state = copy.deepcopy(model.state_dict())
        return self.config.enabled and epoch - self.best_epoch >= self.config.patience_epochs

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_epoch, self.best_state = state["best_loss"], state["best_epoch"], state["best_state"]


def fit(
    model: nn.Module,
    param_groups: list[dict],
    loss_fn: LossFn,
    data: tuple[torch.Tensor, torch.Tensor],
    validate: Validate,
    config: TrainConfig,
    on_epoch: Callable[[EpochStats], None],
    generator: torch.Generator,
    save_state: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    amp: bool = False,
    compile: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
) -> FitResult:
    """Train the parameters in `param_groups` of `model` on `data` = (inputs, targets).

    Args:
        param_groups: torch's parameter groups, [{"params": [...]}, {"params": [...], "lr": 1e-4}, ...]: only
            these parameters are optimized; a group without "lr" gets `config.optimizer.lr`.
        loss_fn: the loss of one batch; it decides what a batch means (reconstruction, classes).
        validate: metrics of the model after an epoch; "loss/val" drives schedules and early stopping.
        on_epoch: called after every epoch (after `save_state`).
        generator: CPU generator for the batch order, so runs with the same seed repeat exactly.
        save_state: receives everything needed to continue after each epoch (model, optimizer,
            scheduler, early stopping, RNG states, history); pass it back as `resume`.
        resume: a state from `save_state`: training continues after its epoch, as if never stopped.
        amp: forward passes and losses under bfloat16 autocast (weights, gradients and optimizer stay float32).
        compile: the training forward pass through `torch.compile` (validation runs the model as it is).
        on_batch: called after every optimizer step with (batches done this epoch, batches per epoch), for progress
            displays; it must not wait on the device.
        on_epoch_start: called with the epoch's number before it trains, e.g. to freeze or unfreeze parameters
            (a parameter without requires_grad gets no gradient, and the optimizer leaves it as it is).

    Raises:
        NonFiniteLossError: the epoch's training loss was NaN or infinite.
    """
    inputs, targets = data
    optimizer = make_optimizer(param_groups, config.optimizer)
    scheduler = make_scheduler(optimizer, config.scheduler, config.epochs)
    stopper = EarlyStopping(config.early_stopping)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    result = FitResult()
    first_epoch = 1
    if resume is not None:
        first_epoch = resume["epoch"] + 1
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume["scheduler"])
        stopper.load_state_dict(resume["early_stopping"])
        _set_rng_states(resume["rng"], generator, inputs.device)
        result.history = [EpochStats(**stats) for stats in resume["history"]]
        result.stopped_early = resume["stopped_early"]
    count = len(inputs)
    per_epoch = math.ceil(count / config.batch_size)
    forward = torch.compile(model) if compile else model  # shares the parameters; state dicts stay `model`'s
    for epoch in range(first_epoch, config.epochs + 1):
        if result.stopped_early:
            break
        started = time.perf_counter()
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        train_mode(model)
        order = torch.randperm(count, generator=generator).to(inputs.device)
        total, seen = torch.zeros((), device=inputs.device), 0
        for batch, start in enumerate(range(0, count, config.batch_size), 1):
            index = order[start : start + config.batch_size]
            if len(index) == 1 and start > 0:
                continue  # a lone trailing sample would break BatchNorm and adds nothing
            with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(forward, inputs[index], targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip_norm:
                nn.utils.clip_grad_norm_(trainable, config.grad_clip_norm)
            optimizer.step()
            total += loss.detach() * len(index)
            seen += len(index)
            if on_batch is not None:
                on_batch(batch, per_epoch)
        train_loss = (total / seen).item()  # the epoch's one host sync
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(epoch, train_loss)
        val = validate(model)
        lr = optimizer.param_groups[0]["lr"]
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val["loss/val"])
        elif scheduler is not None:
            scheduler.step()
        result.stopped_early = stopper.update(model, epoch, val["loss/val"])
        stats = EpochStats(epoch, config.epochs, train_loss, val, lr, time.perf_counter() - started)
        result.history.append(stats)
        if save_state is not None:
            save_state({
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "early_stopping": stopper.state_dict(),
                "rng": _rng_states(generator, inputs.device),
                "history": [dataclasses.asdict(s) for s in result.history],
                "stopped_early": result.stopped_early,
            })
        on_epoch(stats)
    result.best_epoch = stopper.best_epoch
    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state)
    return result


def _rng_states(generator: torch.Generator, device: torch.device) -> dict:
    states = {"torch": torch.get_rng_state(), "batches": generator.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    generator.set_state(states["batches"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
