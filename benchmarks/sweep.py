"""A quickstart sweep on the team stack's workers, one at a time against two at a time, and what a point costs on a
worker against a local `twostage run`.

Starts its own stack (deploy/stack.py in a temporary folder, two process workers) and stops it at the end, or uses
a running one (`--env .stack/env`, whose work pool's concurrency limit it sets back afterwards). Then, in one run:
  1. `twostage run` of one quickstart point here (no Prefect server, a local MLflow store and storage): the process's
     wall time and its flow run's time (MLflow's time/total_s);
  2. `twostage sweep` of POINTS quickstart points (seeds 0..) with `--max-parallel 1` (the pool runs one flow run at
     a time), then of POINTS other points (the next seeds: the same work, nothing to reuse) with `--max-parallel 2`.
Prints each sweep's wall time and their ratio; per point on a worker: the time it waited for a worker, its flow
run's time in Prefect, its pipeline's time in MLflow; and the scaling these project for more workers on hosts of
their own.

Usage: python benchmarks/sweep.py [--points 8] [--set KEY=VALUE ...] [--env STACK_ENV_FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
CLIENT_VARIABLES = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                    "MLFLOW_TRACKING_PASSWORD", "TWOSTAGE_STORAGE")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=8, help="points per sweep (default 8)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="applied to every point, e.g. finetune.epochs=5")
    parser.add_argument("--env", type=Path, metavar="FILE",
                        help="a running stack's client environment (make stack writes .stack/env), instead of a new stack")
    args = parser.parse_args(argv)
    overrides = [f"--set={override}" for override in args.overrides]
    clean = {key: value for key, value in os.environ.items() if key not in CLIENT_VARIABLES}

    with tempfile.TemporaryDirectory(prefix="twostage-local-") as local:
        started = time.perf_counter()
        run = subprocess.run([str(BIN / "twostage"), "run", "-c", QUICKSTART, *overrides, "--set=seed=1000"],
                             cwd=local, env=clean, capture_output=True, text=True, timeout=900)
        local_wall = time.perf_counter() - started
        if run.returncode != 0:
            sys.exit(f"local twostage run failed:\n{run.stderr[-3000:]}")
        from mlflow.tracking import MlflowClient

        local_store = MlflowClient(f"sqlite:///{local}/mlflow.db")
        (parent,) = local_store.search_runs([local_store.get_experiment_by_name("quickstart").experiment_id],
                                            "tags.`twostage.config_hash` LIKE '%'")
        local_flow = parent.data.metrics["time/total_s"]
    print(f"local `twostage run`: {local_wall:.1f} s wall, of which the pipeline (time/total_s) {local_flow:.1f} s")

    if args.env:
        env = {**clean, **exported(args.env)}
        limit = pool_limit(env)
        try:
            report(args.points, local_wall, local_flow, sweeps(args.points, overrides, env))
        finally:
            pool_limit(env, (limit,))
        return 0
    folder = Path(tempfile.mkdtemp(prefix="twostage-bench-stack-"))
    folder.chmod(0o755)  # PostgreSQL runs as the user postgres when we are root
    stack_env = {**clean, "TWOSTAGE_STACK_DIR": str(folder)}
    up = subprocess.run([sys.executable, str(REPO / "deploy" / "stack.py"), "up"], cwd=REPO, env=stack_env,
                        capture_output=True, text=True, timeout=600)
    try:
        if up.returncode != 0:
            sys.exit(f"stack up failed:\n{up.stdout[-2000:]}{up.stderr[-2000:]}")
        report(args.points, local_wall, local_flow, sweeps(args.points, overrides, {**clean, **exported(folder / "env")}))
    finally:
        subprocess.run([sys.executable, str(REPO / "deploy" / "stack.py"), "down"], cwd=REPO, env=stack_env,
                       capture_output=True, timeout=300)
        shutil.rmtree(folder, ignore_errors=True)  # `down` keeps the stack's data; this one was only for the benchmark
    return 0


def exported(env_file: Path) -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(\S*)$", Path(env_file).read_text(), flags=re.M))


def sweeps(points: int, overrides: list[str], env: dict[str, str]) -> dict[int, tuple]:
    """{workers: (wall seconds, *point_times)} of a sweep with --max-parallel 1, then of one with 2."""
    measured = {}
    for workers in (1, 2):
        first_seed = (workers - 1) * points
        seeds = ",".join(str(seed) for seed in range(first_seed, first_seed + points))
        with tempfile.TemporaryDirectory(prefix="twostage-sweep-") as cwd:
            started = time.perf_counter()
            result = subprocess.run(
                [str(BIN / "twostage"), "sweep", "-c", QUICKSTART, *overrides, "--grid", f"seed={seeds}",
                 "--max-parallel", str(workers)], cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
            wall = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"sweep on {workers} worker(s) failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        sweep_id = re.search(r"^sweep (\w+):", result.stdout, flags=re.M).group(1)
        measured[workers] = (wall, *point_times(env, sweep_id))
    return measured


def pool_limit(env: dict[str, str], set_to: tuple[int | None] = ()) -> int | None:
    """The sweep deployment's work pool's concurrency limit (None: no limit); first set to `set_to[0]` if given."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate

    with client_of(env), get_client(sync_client=True) as client:
        pool = client.read_deployment_by_name("two-stage/sweep").work_pool_name
        if set_to:
            client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=set_to[0]))
        return client.read_work_pool(pool).concurrency_limit


def point_times(env: dict[str, str], sweep_id: str) -> tuple[list[float], list[float], list[float]]:
    """Per point of the sweep: seconds waiting for a worker, the flow run's seconds in Prefect, the pipeline's
    time/total_s in MLflow."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with client_of(env), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"sweep:{sweep_id}"])))
        waits = [(run.start_time - run.expected_start_time).total_seconds() for run in runs]
        flows = [(run.end_time - run.start_time).total_seconds() for run in runs]
        tracking = MlflowClient(env["MLFLOW_TRACKING_URI"])
        parents = tracking.search_runs([tracking.get_experiment_by_name("quickstart").experiment_id],
                                       f"tags.`twostage.sweep_id` = '{sweep_id}' and "
                                       "tags.`twostage.config_hash` LIKE '%'")
    pipelines = [run.data.metrics["time/total_s"] for run in parents]
    return waits, flows, pipelines


@contextlib.contextmanager
def client_of(env: dict[str, str]):
    """This process as the stack's client: its Prefect server and MLflow account (MLflow reads it from os.environ)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    account = {key: env[key] for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD") if key in env}
    before = {key: os.environ.get(key) for key in account}
    os.environ.update(account)
    try:
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"],
                                 PREFECT_API_AUTH_STRING: env.get("PREFECT_API_AUTH_STRING")}):
            yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def report(points: int, local_wall: float, local_flow: float, sweeps: dict) -> None:
    print(f"\n{points} quickstart points per sweep (each trains all three phases); {os.cpu_count()} CPU cores here")
    print(f"{'workers':>8} {'wall s':>8} {'s/point':>8} {'waited s':>9} {'flow run s':>11} {'pipeline s':>11}")
    for workers, (wall, waits, flows, pipelines) in sweeps.items():
        print(f"{workers:>8} {wall:>8.1f} {wall / points:>8.1f} {statistics.median(waits):>9.1f} "
              f"{statistics.median(flows):>11.1f} {statistics.median(pipelines):>11.1f}")
    (one, *_), (two, *_) = sweeps[1], sweeps[2]
    print(f"\nwall time 1 worker / 2 workers: {one / two:.2f}x (waited, flow run, pipeline: medians per point)")
    pipeline = statistics.median(sweeps[1][3])
    per_point = one / points
    overhead = per_point - pipeline
    print(f"a point on one worker: {per_point:.1f} s of sweep wall time, {pipeline:.1f} s of it the pipeline; "
          f"{overhead:.1f} s per point for the worker's pickup, the flow run's process and imports "
          f"(a local `twostage run`: {local_wall:.1f} s, {local_wall - local_flow:.1f} s of it outside the pipeline)")
    for workers in (2, 4, 8):
        rounds = -(-points // workers)
        print(f"projected on {workers} workers with cores of their own: {rounds} rounds x {per_point:.1f} s = "
              f"{rounds * per_point:.0f} s, {one / (rounds * per_point):.1f}x")


if __name__ == "__main__":
    sys.exit(main())
