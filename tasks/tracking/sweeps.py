"""A sweep's MLflow run: the parent of its points' pipeline runs, so the MLflow UI shows them grouped under it and
filters them by `tags.twostage.sweep_id`; it holds the sweep's comparison when the sweep ends."""

from __future__ import annotations

import os
import socket

from mlflow.entities import Param

from tasks.tracking.store import open_store


def open_sweep_run(uri: str, experiment: str, sweep_id: str, swept: dict[str, str], spec_yaml: str) -> tuple[str, str]:
    """(experiment id, run id) of the sweep's run, RUNNING: the run of an earlier invocation of the same sweep,
    reopened, or a new one with the swept keys' values as params and the sweep's points as `sweep.yaml`."""
    client = open_store(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    tags = {"twostage.host": socket.gethostname(), "twostage.pid": str(os.getpid())}
    earlier = client.search_runs(
        [experiment_id], f"tags.`twostage.sweep_id` = '{sweep_id}' and tags.`twostage.sweep` = 'true'", max_results=1)
    if earlier:
        run_id = earlier[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        return experiment_id, run_id
    run = client.create_run(experiment_id, run_name=f"sweep-{sweep_id}",
                            tags={"twostage.sweep_id": sweep_id, "twostage.sweep": "true", **tags})
    client.log_batch(run.info.run_id, params=[Param(f"sweep.{key}", value[:6000]) for key, value in swept.items()])
    client.log_text(run.info.run_id, spec_yaml, "sweep.yaml")
    return experiment_id, run.info.run_id


def finished_points(uri: str, experiment_id: str, sweep_id: str) -> dict[str, str]:
    """{config hash: pipeline run id} of the sweep's points that completed (FINISHED parent runs)."""
    runs = open_store(uri).search_runs(
        [experiment_id],
        f"attributes.status = 'FINISHED' and tags.`twostage.sweep_id` = '{sweep_id}' "
        "and tags.`twostage.config_hash` LIKE '%'",
        max_results=5000,
    )
    return {run.data.tags["twostage.config_hash"]: run.info.run_id for run in runs}


def close_sweep_run(uri: str, run_id: str, status: str, table: str | None = None, figure=None) -> None:
    """End the sweep's run (FINISHED, FAILED or KILLED), with its comparison table and figure when given."""
    client = open_store(uri)
    if table is not None:
        client.log_text(run_id, table, "compare.txt")
    if figure is not None:
        client.log_figure(run_id, figure, "compare.png")
    client.set_terminated(run_id, status)
