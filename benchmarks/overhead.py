"""Where a `twostage run` spends its time: training compute against orchestration and tracking.

One process does what `twostage run` does, timing each part: Python imports, the start of Prefect's
ephemeral server, then flow runs, each in a fresh folder (its own MLflow store and outputs, every phase
trained): the first pays the libraries' lazy imports, as a `twostage run` does; the later ones (--later,
default 3; the one with the median overhead is shown) are what each further run of a long-lived process
(`twostage serve`) costs. Flow runs get `twostage run`'s Prefect settings (`local_run_settings`: no
heartbeats on the ephemeral server), and each starts 2 s after the last one ended (prefect_retries.py).
A flow run's wall time is split into
  - compute: the training phases' epochs (forward, backward, optimizer steps, validation);
  - Prefect: what a flow run of five empty tasks costs (the median of three, measured after the pipeline's
    flow runs), plus the sleeps of its client's retries during this flow run, if any;
  - ours: the rest: data preparation and, in each phase, everything around its epochs (MLflow runs and
    metrics, epoch states, checkpoints, plots; evaluation with model logging and registry), and the
    parent run (its params and config, the loss-curve figure, the Prefect summary artifacts).

Usage: python benchmarks/overhead.py [-c CONFIG] [--set KEY=VALUE ...] [--later N]   (default: configs/quickstart.yaml)
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from prefect_retries import time_flow_run  # noqa: E402 - beside this script

from flows.prefect_defaults import set_prefect_defaults  # noqa: E402

set_prefect_defaults()

import torch._dynamo  # noqa: E402, F401 - torch imports it when the first optimizer is made (~1 s)
from mlflow.tracking import MlflowClient  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings  # noqa: E402

from configs.loader import load_config  # noqa: E402
from flows.two_stage import local_run_settings, two_stage  # noqa: E402

TRAINING = ("pretrain", "head", "finetune")
OUR_LIMIT_S = 2.0  # issue 6: our own overhead per pipeline run on quickstart


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--later", type=int, default=3, help="later flow runs; the median one is shown")
    args = parser.parse_args(argv)
    imports_s = time.perf_counter() - STARTED

    started = time.perf_counter()
    with get_client(sync_client=True) as client:  # the first client starts the ephemeral server
        client.hello()
    server_s = time.perf_counter() - started

    config = load_config(Path(args.config).resolve(), args.overrides)
    runs = [measure_flow_run(config) for _ in range(1 + args.later)]
    prefect_s = statistics.median(prefect_cost() for _ in range(3))
    for run in runs:
        run["prefect_s"] = prefect_s + run["retries_s"]
        run["ours"]["parent"] -= run["prefect_s"]
    first, laters = runs[0], sorted(runs[1:], key=lambda run: sum(run["ours"].values()))
    later = laters[len(laters) // 2]
    runs = [first, later]

    print(f"config: {args.config} {' '.join(args.overrides)}  (test/acc {later['test/acc']:.4f})")
    print(f"{'Python imports (torch, prefect, mlflow)':44s} {imports_s:6.2f} s")
    print(f"{'Prefect ephemeral server start-up':44s} {server_s:6.2f} s   (none with PREFECT_API_URL set)")
    print(f"{'MLflow sqlite store creation':44s} {first['store_s']:6.2f} s   (once per new store)")
    print(f"{'':44s} {'first run':>9s} {'later run':>10s}   (later run, by phase; the median of {len(laters)})")
    for label, key in (
        ("flow run, wall", "flow_s"),
        ("  compute: training epochs", "compute"),
        ("  ours: the rest (tracking, checkpoints, plots)", "ours"),
        ("  Prefect: a flow run of five empty tasks", "prefect_s"),
        ("    of it, its client's retry sleeps", "retries_s"),
    ):
        values = [run[key] if isinstance(run[key], float) else sum(run[key].values()) for run in runs]
        by_phase = _by_phase(later[key]) if isinstance(later[key], dict) else ""
        print(f"{label:44s} {values[0]:8.2f} s {values[1]:8.2f} s   {by_phase}")
    print(f"{'whole process':44s} {time.perf_counter() - STARTED:6.2f} s")
    ours, once = sum(later["ours"].values()), sum(first["ours"].values()) - sum(later["ours"].values())
    verdict = "within" if ours <= OUR_LIMIT_S else "OVER"
    print(f"our overhead per pipeline run {ours:.2f} s: {verdict} the {OUR_LIMIT_S:.0f} s target "
          f"(the first run in a process adds {once:.2f} s of one-time lazy imports)")
    return 0


def measure_flow_run(config) -> dict:
    """One flow run in a fresh folder: its own MLflow store, data cache, outputs and Prefect results."""
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        uri = f"sqlite:///{Path(folder) / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        started = time.perf_counter()
        MlflowClient(uri).search_experiments()  # creates the store's tables
        store_s = time.perf_counter() - started
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: Path(folder) / "results"}), local_run_settings():
            report, flow_s, retries_s = time_flow_run(lambda: two_stage(config))
        parts = phase_times(MlflowClient(uri), report.pipeline_run_id)
        os.chdir(REPO)
    compute = {phase: parts[phase]["epochs_s"] for phase in TRAINING}
    ours = {phase: parts[phase]["total_s"] - parts[phase].get("epochs_s", 0.0) for phase in parts}
    ours["parent"] = flow_s - sum(parts[phase]["total_s"] for phase in parts)  # less Prefect's share, in main()
    return {"store_s": store_s, "flow_s": flow_s, "compute": compute, "ours": ours, "retries_s": retries_s,
            "test/acc": report.metrics["test/acc"]}


@task
def _nothing(value: int) -> int:
    return value


@flow
def _five_empty_tasks() -> None:
    for index in range(5):
        _nothing(index)


def prefect_cost() -> float:
    """Seconds of a flow run of five empty tasks: Prefect's own share of a five-phase flow run."""
    with local_run_settings():
        _, seconds, retries_s = time_flow_run(_five_empty_tasks)
        return seconds - retries_s


def phase_times(client: MlflowClient, pipeline_run_id: str) -> dict[str, dict[str, float]]:
    """{phase: {"total_s": the phase task's seconds, "epochs_s": its epochs' seconds (training phases)}}."""
    parent = client.get_run(pipeline_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{pipeline_run_id}'"
    )
    times = {}
    for child in children:
        phase = child.data.tags["twostage.phase"]
        times[phase] = {"total_s": child.data.metrics[f"time/{phase}_s"]}
        if phase in TRAINING:
            times[phase]["epochs_s"] = sum(m.value for m in client.get_metric_history(child.info.run_id, "time/epoch_s"))
    return times


def _by_phase(seconds: dict[str, float]) -> str:
    return ", ".join(f"{phase} {value:.2f}" for phase, value in seconds.items())


if __name__ == "__main__":
    sys.exit(main())
