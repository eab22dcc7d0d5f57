"""The pipeline as a Prefect flow: data, stage-1 pretraining, stage-2 head, finetuning, evaluation."""

from __future__ import annotations

from prefect import flow, runtime

from configs.loader import ConfigError
from configs.schema import PipelineConfig
from tasks import tracking
from tasks.data import prepare_data
from tasks.evaluate import evaluate
from tasks.finetune import finetune
from tasks.head import train_head
from tasks.pretrain import pretrain
from tasks.results import EvalReport


def retry_unless_config_error(task, task_run, state) -> bool:
    """Prefect's retry condition: retrying cannot fix a bad config or missing data, so don't."""
    return not isinstance(state.result(raise_on_failure=False), ConfigError)


def with_retries(task, phase_config):
    return task.with_options(
        retries=phase_config.retries,
        retry_delay_seconds=phase_config.retry_delay_s,
        retry_condition_fn=retry_unless_config_error,
    )


@flow(name="two-stage", validate_parameters=True)
def two_stage(config: PipelineConfig) -> EvalReport:
    """Two-stage backpropagation: pretrain an autoencoder, train a head on its frozen encoder, finetune."""
    with tracking.pipeline_run(config, flow_run_id=runtime.flow_run.id) as run:
        data = with_retries(prepare_data, config.data)(config.data, run)
        pretrained = with_retries(pretrain, config.pretrain)(config.pretrain, config.model, data, run)
        head = with_retries(train_head, config.head)(config.head, data, pretrained, run)
        finetuned = with_retries(finetune, config.finetune)(config.finetune, data, head, run)
        return with_retries(evaluate, config.evaluate)(config.evaluate, data, finetuned, run)
