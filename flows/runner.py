"""The plumbing around the flow's five phase calls: the MLflow parent run, each phase's Prefect retries, reuse of a
phase an earlier flow run completed, `--rerun`, and the flow run's summary.

    with pipeline(config, rerun) as step:
        pretrained = step(pretrain, config.pretrain, config.model, data)

`step(task, phase_config, *inputs)` runs the task (named for its phase) with the retries its phase config sets,
then the run context as its last argument. A training phase whose result Prefect finds cached is reused when its
checkpoint is intact, else trained again; `--rerun PHASE` refreshes that phase's cache and every later one's.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import Task, get_run_logger, runtime

from configs.errors import UserError
from configs.schema import PHASES, Phase, PipelineConfig
from flows.summary import publish_summary
from models.device import resolve_amp, resolve_device
from tasks import tracking
from tasks.checkpoints import checkpoint_problem
from tasks.keys import input_key
from tasks.locks import locks_for
from tasks.results import Checkpoint, RunContext, SweepRef
from tasks.sources import DownloadFailedError
from tasks.storage import check_stored_result, result_storage


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect's retry condition: retrying cannot fix a bad config or missing data, so don't;
    a failed download may work the next time."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, UserError) or isinstance(error, DownloadFailedError)


def with_retries(task: Task, phase_config) -> Task:
    return task.with_options(
        retries=phase_config.retries,
        retry_delay_seconds=phase_config.retry_delay_s,
        retry_condition_fn=retry_unless_user_error,
    )


def forced(phase: str, rerun: Phase | None) -> bool:
    """`--rerun PHASE` forces that phase and every phase after it."""
    return rerun is not None and PHASES.index(phase) >= PHASES.index(rerun)


class Steps:
    """Runs the phases of one pipeline run, keeping what each returned for the summary."""

    def __init__(self, run: RunContext):
        self.run = run
        self.results: dict[str, Any] = {}

    def __call__(self, task: Task, phase_config, *inputs):
        phase, arguments = task.name, (phase_config, *inputs, self.run)
        configured = with_retries(task, phase_config).with_options(refresh_cache=forced(phase, self.run.rerun) or None)
        if task.persist_result:  # a training phase: its result is kept for later runs to reuse
            configured = self._persisted(configured, arguments)
        state = configured(*arguments, return_state=True)
        result = state.result()
        if state.name == "Cached":
            result = self._reuse(phase, configured, result, arguments)
        self.results[phase] = result
        return result

    def _persisted(self, task: Task, arguments: tuple) -> Task:
        """Results as JSON in the run's storage; one process at a time trains a key, the others then reuse its
        result. A stored result that is not a JSON record of a checkpoint is moved aside, and the phase runs."""
        storage = self.run.storage
        key = input_key(task.name, inspect.signature(task.fn).bind(*arguments).arguments)  # as Prefect caches it
        problem = check_stored_result(storage, key)
        if problem:
            get_run_logger().warning("%s: the stored result %s; running the phase again", task.name, problem)
        return task.with_options(
            result_storage=result_storage(storage), result_serializer="json",
            cache_policy=task.cache_policy.configure(lock_manager=locks_for(storage), isolation_level="SERIALIZABLE"),
        )

    def _reuse(self, phase: str, configured: Task, checkpoint, arguments: tuple):
        """A cached phase's checkpoint, when intact and made by a run of this tracking store; else the phase
        trained again."""
        problem = checkpoint_problem(checkpoint)
        problem = f"checkpoint {problem}" if problem else tracking.unlinked_run(self.run, checkpoint)
        if problem:
            get_run_logger().warning("%s: the reusable result's %s; running the phase again", phase, problem)
            return configured.with_options(refresh_cache=True)(*arguments)
        tracking.record_reuse(self.run, phase, checkpoint)
        get_run_logger().info(
            "%s: reused the completed phase of MLflow run %s (%s)", phase, checkpoint.run_id, checkpoint.path
        )
        # Rebuilt from its fields: Prefect decodes a stored result into the classes of `tasks.results` as imported,
        # while a run from a bundle (Prefect 3.9 pickles our modules by value) uses the bundle's own copies, and
        # pydantic refuses a field whose value is an instance of the other copy.
        return Checkpoint.model_validate(checkpoint.model_dump() | {"reused": True})


def tag_flow_run(config: PipelineConfig, sweep: SweepRef | None) -> None:
    """Tags to find the flow run by in Prefect's UI and API: `config:<name>`, `dataset:<name>`, `sweep:<id>` (added to
    those it was created with, e.g. a deployment's)."""
    from prefect.client.orchestration import get_client

    tags = {f"config:{config.name}", f"dataset:{config.data.dataset}", *([f"sweep:{sweep.id}"] if sweep else [])}
    current = set(runtime.flow_run.tags)
    if not tags <= current:
        with get_client(sync_client=True) as client:
            client.update_flow_run(runtime.flow_run.id, tags=sorted(current | tags))


@contextmanager
def pipeline(config: PipelineConfig, rerun: Phase | None = None, sweep: SweepRef | None = None) -> Iterator[Steps]:
    """The parent run of one pipeline run (device and amp resolved on this machine), and its phases' runner;
    on success, the summary in Prefect and the loss curves in MLflow."""
    device = resolve_device(config.device)
    amp = resolve_amp(config.amp, device)
    tag_flow_run(config, sweep)
    with tracking.pipeline_run(config, runtime.flow_run.id, device, amp.enabled, rerun, sweep) as run:
        (get_run_logger().warning if amp.warning else get_run_logger().info)(
            "MLflow run %s (experiment %s); %s, %s", tracking.run_url(run.experiment_id, run.parent_run_id),
            config.name, device, amp.message,
        )
        steps = Steps(run)
        yield steps
        publish_summary(run, steps.results)
