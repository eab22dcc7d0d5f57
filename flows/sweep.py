"""`twostage sweep`: every point of a sweep (configs/sweeps.py) as one pipeline flow run, then one comparison.

With PREFECT_API_URL set, each point is a flow run of a deployment on the work pool (`run_deployment(...,
timeout=0)`), tagged `sweep:<id>` in Prefect; the workers run them in parallel, as many at a time as they and the
pool's concurrency limit allow (`--max-parallel` sets that limit). Without it, the points run here one after another
on Prefect's ephemeral server, with the same results. Either way each point's MLflow parent run is nested under the
sweep's run and tagged `twostage.sweep_id`.

Points whose pretraining key is the same (same data, model, stage-1 settings and seed) train it once: the phases'
locks (tasks/locks.py) let the first train it and the others wait and reuse it, on one host or across workers
sharing an object store. A failed point stops no other; running the same sweep again runs only the points without a
FINISHED MLflow run, and follows those still running on the workers instead of submitting them again.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from configs.errors import UserError
from configs.schema import PipelineConfig
from configs.sweeps import Sweep, SweepPoint
from flows.compare import compare_sweep
from tasks import tracking
from tasks.files import is_local
from tasks.results import SweepRef
from tasks.tracking.sweeps import close_sweep_run, finished_points, open_sweep_run

DEFAULT_DEPLOYMENT = "two-stage/sweep"
POLL_S = 3.0
QUIET_S = 60.0  # a status line at least this often while nothing changes
CRASH_RETRY_GRACE_S = 60.0  # the stack's automation turns a first crash into AwaitingRetry within seconds


def run_sweep(sweep: Sweep, prefect_api_url: str | None, deployment: str, max_parallel: int | None, metric: str,
              out: Path) -> int:
    """Run the points that have no finished MLflow run yet, print progress, then the comparison and each point's
    registry decision. Returns the exit code: 0 when every point completed, 1 when one failed, 130 when stopped."""
    uri = tracking.tracking_uri()
    swept = {key: ",".join(dict.fromkeys(str(point.values.get(key)) for point in sweep.points)) for key in sweep.keys}
    spec = yaml.safe_dump({"config": sweep.config_path, "points": [point.values for point in sweep.points]},
                          sort_keys=False)
    experiment_id, run_id = open_sweep_run(uri, sweep.experiment, sweep.id, swept, spec)
    ref = SweepRef(id=sweep.id, run_id=run_id)
    done = finished_points(uri, experiment_id, sweep.id)
    todo = [point for point in sweep.points if point.config_hash not in done]
    where = f"on the work pool of deployment {deployment}" if prefect_api_url else "here, one after another"
    print(f"sweep {sweep.id}: {len(sweep.points)} points of {sweep.experiment} over {', '.join(sweep.keys)}; "
          f"{len(sweep.points) - len(todo)} completed before, {len(todo)} to run {where}")
    print(f"MLflow: {tracking.run_url(experiment_id, run_id)} (the points are nested under it: "
          f"tags.twostage.sweep_id = '{sweep.id}')", flush=True)
    if max_parallel and not prefect_api_url:
        print("note: --max-parallel sets a work pool's limit; without PREFECT_API_URL the points run here one after "
              "another", file=sys.stderr)
    progress = Progress(sweep, metric, done_before=len(sweep.points) - len(todo))
    try:
        if prefect_api_url:
            _warn_if_storage_is_local(sweep)
            failed = run_on_workers(sweep, todo, ref, deployment, max_parallel, progress)
        else:
            failed = run_here_one_by_one(todo, ref, progress)
    except KeyboardInterrupt:
        close_sweep_run(uri, run_id, "KILLED")
        elsewhere = " (its submitted points go on running on the workers)" if prefect_api_url else ""
        print(f"twostage sweep: stopped following sweep {sweep.id}{elsewhere}; run the same command to continue it",
              file=sys.stderr)
        return 130
    runs = {run.tags["twostage.config_hash"]: run
            for run in reversed(tracking.pipeline_runs(sweep.experiment, sweep_id=sweep.id))}
    text, figure = compare_sweep(sweep, runs, metric, out / sweep.id) if runs else ("no point completed", None)
    print(f"\nsweep {sweep.id}: {len(runs)} of {len(sweep.points)} points completed\n{text}")
    decisions = [(point.label, runs[point.config_hash].tags.get("twostage.registry_decision"))
                 for point in sweep.points if point.config_hash in runs]
    print("\nModel registry:\n" + "\n".join(f"  {label}: {decision}" for label, decision in decisions))
    close_sweep_run(uri, run_id, "FAILED" if failed else "FINISHED", text, figure)
    if failed:
        print(f"twostage sweep: {len(failed)} of {len(sweep.points)} points failed ({'; '.join(failed)}); run the same "
              "command to run only them again", file=sys.stderr)
        return 1
    return 0


@dataclass
class Progress:
    """Points done / running / failed / waiting and the best so far, as a line whenever they change."""

    sweep: Sweep
    metric: str
    done_before: int
    shown: str = ""
    shown_at: float = 0.0
    best: str = ""
    best_at_done: int = -1  # the count of points done when `best` was read from MLflow
    started: float = field(default_factory=time.monotonic)

    def show(self, done: int, running: int, failed: int, waiting: int, late: int = 0) -> None:
        if done != self.best_at_done:
            self.best, self.best_at_done = self._best(), done
        counts = (f"{self.done_before + done}/{len(self.sweep.points)} done, {running} running, {failed} failed, "
                  f"{waiting} waiting" + (f" ({late} late)" if late else ""))
        now = time.monotonic()
        if counts + self.best != self.shown or now - self.shown_at >= QUIET_S:
            elapsed = int(now - self.started)
            print(f"sweep {self.sweep.id}: {counts}{self.best}  [{elapsed // 60}m{elapsed % 60:02d}s]", flush=True)
            self.shown, self.shown_at = counts + self.best, now

    def _best(self) -> str:
        runs = [run for run in tracking.pipeline_runs(self.sweep.experiment, sweep_id=self.sweep.id)
                if self.metric in run.metrics]
        if not runs:
            return ""
        pick = min if "loss" in self.metric else max
        best = pick(runs, key=lambda run: run.metrics[self.metric])
        label = next((point.label for point in self.sweep.points
                      if point.config_hash == best.tags.get("twostage.config_hash")), best.name)
        return f"; best {self.metric} {best.metrics[self.metric]:.4f} ({label})"


def run_here_one_by_one(todo: list[SweepPoint], ref: SweepRef, progress: Progress) -> list[str]:
    """Each point as a flow run in this process; a point that fails is reported and the next one runs."""
    from flows.interrupts import start_ephemeral_server_shielded, stop_on_signals
    from flows.two_stage import run_here

    failed: list[str] = []
    if not todo:
        return failed
    with stop_on_signals():
        start_ephemeral_server_shielded()
        for index, point in enumerate(todo):
            progress.show(index - len(failed), 1, len(failed), len(todo) - index - 1)
            try:
                run_here(point.config, sweep=ref)
            except Exception as error:  # noqa: BLE001 - a failed point must not stop the others
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                print(f"twostage sweep: point {point.label} failed: {reason}", file=sys.stderr, flush=True)
                failed.append(f"{point.label}: {reason}")
        progress.show(len(todo) - len(failed), 0, len(failed), 0)
    return failed


def run_on_workers(sweep: Sweep, todo: list[SweepPoint], ref: SweepRef, deployment: str, max_parallel: int | None,
                   progress: Progress) -> list[str]:
    """Submit each point not already running as a flow run of `deployment`, then follow them until every one has
    ended. Returns the failed points with their state's message."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterTags
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    if not todo:
        return []
    tag = f"sweep:{sweep.id}"
    with get_client(sync_client=True) as client:
        try:
            target = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise UserError(f"--deployment {deployment}: no such deployment on the Prefect server; deploy it with "
                            "`prefect deploy --all` from the repository (make stack does)") from None
        if max_parallel:
            client.update_work_pool(target.work_pool_name, WorkPoolUpdate(concurrency_limit=max_parallel))
            print(f"work pool {target.work_pool_name}: concurrency limit {max_parallel} (--max-parallel)")
        earlier = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
    running = {run.name: run.id for run in sorted(earlier, key=lambda run: run.created)
               if run.state and not run.state.is_final()}
    ids = {}
    for point in todo:
        if point.run_name in running:
            ids[point.config_hash] = running[point.run_name]
            continue
        ids[point.config_hash] = run_deployment(
            deployment, parameters={"config": _as_parameter(point.config), "sweep": ref.model_dump()},
            timeout=0, tags=["twostage-sweep", tag], flow_run_name=point.run_name,
        ).id
    attached = len([point for point in todo if point.run_name in running])
    print(f"submitted {len(todo) - attached} flow runs" + (f", following {attached} still running" if attached else ""),
          flush=True)

    crashed_at: dict[str, float] = {}
    while True:
        with get_client(sync_client=True) as client:
            flow_runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(ids.values()))), limit=len(ids))
        by_id = {run.id: run for run in flow_runs}
        done, active, waiting, late, failed = 0, 0, 0, 0, []
        for point in todo:
            run = by_id.get(ids[point.config_hash])
            state = run.state if run else None
            if state is None or state.is_scheduled() or state.is_pending():
                waiting += 1
                late += bool(state and state.name == "Late")
            elif state.is_completed():
                done += 1
            elif state.is_crashed() and run.run_count < 2 and \
                    time.monotonic() - crashed_at.setdefault(point.config_hash, time.monotonic()) < CRASH_RETRY_GRACE_S:
                active += 1  # the crash-retry automation may send it back to the pool
            elif state.is_final():
                failed.append(f"{point.label}: {state.name} ({(state.message or '').strip()[:200]})")
            else:
                active += 1
        progress.show(done, active, len(failed), waiting, late)
        if done + len(failed) == len(todo):
            return failed
        time.sleep(POLL_S)


def _as_parameter(config: PipelineConfig) -> dict:
    """A point's config as its flow run's parameter. Without `storage` unless the config sets it: the worker's own
    default applies (TWOSTAGE_STORAGE where it runs: the object store the workers share), not this client's."""
    return config.model_dump(mode="json", exclude=None if "storage" in config.model_fields_set else {"storage"})


def _warn_if_storage_is_local(sweep: Sweep) -> None:
    config = sweep.points[0].config
    if "storage" in config.model_fields_set and is_local(config.storage):
        print(f"note: storage is the local folder {config.storage!r}: workers on other hosts share no phases through "
              "it; leave storage unset (the workers' TWOSTAGE_STORAGE applies) or use s3://BUCKET/PREFIX",
              file=sys.stderr)
