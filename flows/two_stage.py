"""The pipeline as a Prefect flow: data, stage-1 pretraining, stage-2 head, finetuning, evaluation.

The three training phases persist their results under a key of their inputs and source, so running the
same config again (or retrying the flow run from the Prefect UI) reuses the phases that completed and
runs only the rest. Data preparation and evaluation are cheap and always run: the data phase is what
notices fresh data.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import flow, get_run_logger, runtime
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

from configs.errors import ConfigError
from configs.schema import PHASES, Phase, PipelineConfig
from flows.summary import publish_summary
from models.device import resolve_amp, resolve_device
from tasks import tracking
from tasks.data import DownloadFailedError, prepare_data
from tasks.evaluate import evaluate
from tasks.finetune import finetune
from tasks.head import train_head
from tasks.phase import checkpoint_problem
from tasks.pretrain import pretrain
from tasks.results import Checkpoint, EvalReport, RunContext


def retry_unless_config_error(task, task_run, state) -> bool:
    """Prefect's retry condition: retrying cannot fix a bad config or missing data, so don't;
    a failed download may work the next time."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, ConfigError) or isinstance(error, DownloadFailedError)


def with_retries(task, phase_config):
    return task.with_options(
        retries=phase_config.retries,
        retry_delay_seconds=phase_config.retry_delay_s,
        retry_condition_fn=retry_unless_config_error,
    )


def forced(phase: str, rerun: Phase | None) -> bool:
    """`--rerun PHASE` forces that phase and every phase after it."""
    return rerun is not None and PHASES.index(phase) >= PHASES.index(rerun)


def reuse_or_train(phase: str, task, phase_config, rerun: Phase | None, *args, run: RunContext) -> Checkpoint:
    """Run a training phase, or reuse its result from an earlier flow run when it is still intact."""
    configured = with_retries(task, phase_config).with_options(refresh_cache=forced(phase, rerun) or None)
    state = configured(*args, run, return_state=True)
    checkpoint = state.result()
    if state.name != "Cached":
        return checkpoint
    problem = checkpoint_problem(checkpoint)
    if problem:
        get_run_logger().warning("%s: the reusable result's checkpoint %s; running the phase again", phase, problem)
        return configured.with_options(refresh_cache=True)(*args, run)
    tracking.record_reuse(run, phase, checkpoint)
    get_run_logger().info("%s: reused the completed phase of MLflow run %s (%s)", phase, checkpoint.run_id, checkpoint.path)
    return checkpoint.model_copy(update={"reused": True})


@flow(name="two-stage", validate_parameters=True)
def two_stage(config: PipelineConfig, rerun: Phase | None = None) -> EvalReport:
    """Two-stage backpropagation: pretrain an autoencoder, train a head on its frozen encoder, finetune."""
    device = resolve_device(config.device)
    amp = resolve_amp(config.amp, device)
    (get_run_logger().warning if amp.warning else get_run_logger().info)(amp.message)
    with tracking.pipeline_run(config, flow_run_id=runtime.flow_run.id, device=device, amp=amp.enabled) as run:
        data = with_retries(prepare_data, config.data)(config.data, run, rebuild=forced("data", rerun))
        pretrained = reuse_or_train("pretrain", pretrain, config.pretrain, rerun, config.pretrain, config.model, data, run=run)
        head = reuse_or_train("head", train_head, config.head, rerun, config.head, data, pretrained, run=run)
        finetuned = reuse_or_train("finetune", finetune, config.finetune, rerun, config.finetune, data, head, run=run)
        report = with_retries(evaluate, config.evaluate)(config.evaluate, data, finetuned, run)
        publish_summary(run, data, [pretrained, head, finetuned], report)
    return report


def run_here(config: PipelineConfig, rerun: Phase | None = None) -> EvalReport:
    """Run the flow in this process, as `twostage run` and the benchmarks do."""
    with local_run_settings():
        return two_stage(config, rerun=rerun)


@contextmanager
def local_run_settings() -> Iterator[None]:
    """Prefect settings for flow runs started from this process.

    Without PREFECT_API_URL a flow run reports to Prefect's ephemeral server, which lives and dies with this
    process: no one is left to notice a crash, so the run sends no heartbeats. They would also cost time:
    Prefect joins their thread at its next whole second, and in 3.9.1 a short flow run took a median 2.09 s
    with heartbeats against 1.17 s without (8 runs each, alternating).
    """
    ephemeral = not get_current_settings().api.url
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None} if ephemeral else {}):
        yield
