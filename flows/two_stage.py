"""The pipeline as a Prefect flow: data, stage-1 pretraining, stage-2 head, finetuning, evaluation.

The three training phases persist their results under a key of their inputs and our code, so running the
same config again (or retrying the flow run from the Prefect UI) reuses the phases that completed and
runs only the rest. Data preparation and evaluation are cheap and always run: the data phase is what
notices fresh data. The plumbing (parent run, retries, reuse, --rerun) is flows/runner.py's.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import flow, runtime
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings
from pydantic import ValidationError

from configs.schema import Phase, PipelineConfig
from flows.runner import pipeline
from tasks.data import prepare_data
from tasks.evaluate import evaluate
from tasks.finetune import finetune
from tasks.head import train_head
from tasks.pretrain import pretrain
from tasks.results import EvalReport, SweepRef
from tasks.tracking import run_name
from tasks.weights import data_for_weights


def named_like_its_mlflow_run() -> str:
    """The flow run's name: its MLflow parent run's, `<config name>-<config hash, 7 characters>`."""
    config = runtime.flow_run.parameters.get("config")
    try:
        return run_name(config if isinstance(config, PipelineConfig) else PipelineConfig.model_validate(config))
    except ValidationError:  # the flow run fails on its parameters, naming the field
        return "two-stage-invalid-config"


@flow(name="two-stage", validate_parameters=True, flow_run_name=named_like_its_mlflow_run)
def two_stage(config: PipelineConfig, rerun: Phase | None = None, sweep: SweepRef | None = None) -> EvalReport:
    """Two-stage backpropagation: pretrain an encoder without labels, train a head on it frozen, finetune both."""
    with pipeline(config, rerun, sweep) as step:
        data, labeled = step(prepare_data, data_for_weights(config.data, config.model))
        pretrained = step(pretrain, config.pretrain, config.model, data)
        head = step(train_head, config.head, data, labeled, pretrained)
        finetuned = step(finetune, config.finetune, data, labeled, head)
        return step(evaluate, config.evaluate, data, finetuned)


def run_here(config: PipelineConfig, rerun: Phase | None = None, sweep: SweepRef | None = None) -> EvalReport:
    """Run the flow in this process, as `twostage run`, a sweep without a Prefect server and the benchmarks do."""
    with local_run_settings():
        return two_stage(config, rerun=rerun, sweep=sweep)


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
