"""`twostage run --dry-run`: what a run of this config would do, phase by phase, and why; nothing is trained.

A training phase is reused when a result is stored under its key (its config, its inputs' fingerprints, the seed,
`amp` as resolved here and the code: tasks/keys.py) in the config's storage, its checkpoint is intact, and the
MLflow run that trained it is in this tracking store; `--rerun PHASE` trains that phase and every later one. A
phase whose input is trained anew is trained too: its key depends on that input's weights.
"""

from __future__ import annotations

from configs.schema import PHASES, Phase, PipelineConfig
from models.device import resolve_amp, resolve_device
from tasks.checkpoints import checkpoint_problem
from tasks.data import label_subset, prepare
from tasks.files import absolute
from tasks.keys import input_key
from tasks.results import Checkpoint, RunContext
from tasks.storage import stored_checkpoint
from tasks.tracking import open_store, tracking_uri, unlinked_run
from tasks.weights import data_for_weights


def plan(config: PipelineConfig, rerun: Phase | None = None) -> str:
    """One line per phase: `reuse` or `train`, and why."""
    device = resolve_device(config.device)
    amp = resolve_amp(config.amp, device)
    open_store(tracking_uri())
    storage = absolute(config.storage)
    context = RunContext(name=config.name, tracking_uri=tracking_uri(), experiment_id="", parent_run_id="",
                         flow_run_id="", seed=config.seed, device=device, amp=amp.enabled, compile=config.compile,
                         storage=storage, checkpoint_every_s=config.checkpoint_every_s)
    data = prepare(data_for_weights(config.data, config.model))
    labeled = label_subset(data, config.data.label_fraction)
    lines = [f"{config.name}: a dry run on {device} ({amp.message}), storage {storage}, MLflow {tracking_uri()}",
             f"  data      run    always: it notices fresh data ({data.dataset}: {data.source}, train "
             f"{data.sizes['train']}, labeled {labeled.count}, images {'x'.join(map(str, data.input_shape))})"]
    inputs = {
        "pretrain": lambda: {"config": config.pretrain, "model_config": config.model, "data": data},
        "head": lambda: {"config": config.head, "data": data, "labeled": labeled, "pretrained": upstream},
        "finetune": lambda: {"config": config.finetune, "data": data, "labeled": labeled, "head": upstream},
    }
    upstream: Checkpoint | None = None
    trained_before: str | None = None
    for phase in ("pretrain", "head", "finetune"):
        if rerun is not None and PHASES.index(phase) >= PHASES.index(rerun):
            how, why, upstream = "train", f"--rerun {rerun}", None
        elif trained_before:
            how, why, upstream = "train", f"its input, {trained_before}, is trained in this run", None
        else:
            key = input_key(phase, {**inputs[phase](), "run": context})
            upstream, problem = stored_checkpoint(storage, key)
            if problem is None:
                broken = checkpoint_problem(upstream)
                problem = f"checkpoint {broken}" if broken else unlinked_run(context, upstream)
            if problem:
                how, why, upstream = "train", problem, None
            else:
                how, why = "reuse", f"MLflow run {upstream.run_id} trained it ({upstream.seconds:.1f} s)"
        trained_before = trained_before or (phase if how == "train" else None)
        lines.append(f"  {phase:<9} {how:<6} {why}")
    lines.append("  evaluate  run    always: tests the final model and registers it")
    return "\n".join(lines)
