"""Kill a worker mid-finetune and watch the other resume it.

    source .stack/env; .venv/bin/python deploy/crash_check.py


Starts a quickstart run of deployment two-stage/quickstart with a long finetune, waits until the finetune has
logged some epochs in MLflow, kills the worker running it with SIGKILL, then prints the timeline of the run's states
(server timestamps) and what the retry reused and resumed (from MLflow):

    --kill host    (default) the worker's process group and the flow run's (a process worker starts each flow run
                   in a session of its own): what a lost machine or container looks like
    --kill worker  the worker's process group alone: the flow run's process survives it

Phases hand each other their state through the stack's object store (TWOSTAGE_STORAGE), so the retry on the other
worker reuses pretrain and head and resumes finetune after its last saved epoch. It leaves the stack one worker
short: `make stack-down && make stack` restores it. 3-5 minutes, ~1 CPU core.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient
from prefect import get_client
from prefect.deployments import run_deployment

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "deploy"))
from stack import WORKERS, alive, descendants, load_state, proc_stat  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill", choices=("host", "worker"), default="host")
    parser.add_argument("--after", type=int, default=20, help="finetune epochs in MLflow before the kill")
    parser.add_argument("--epochs", type=int, default=2000, help="finetune epochs (quickstart: 30; ~0.03 s each)")
    parser.add_argument("--observe", type=float, default=600, help="seconds to follow the run after the kill")
    args = parser.parse_args()

    state = load_state()
    if not state or not os.environ.get("PREFECT_API_URL"):
        sys.exit("crash_check: start the stack and `source .stack/env` first")
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["finetune"]["epochs"] = args.epochs
    run = run_deployment("two-stage/quickstart", parameters={"config": config}, timeout=0,
                         job_variables={"env": {"OMP_NUM_THREADS": "1"}},  # one core: the machine is shared
                         tags=["crash-check"])  # fmt: skip
    print(f"flow run {run.name} ({run.id}) created", flush=True)
    began = time.monotonic()

    def flow_run():
        with get_client(sync_client=True) as client:
            return client.read_flow_run(run.id)

    tracking = MlflowClient()

    def runs():
        experiment = tracking.get_experiment_by_name(config["name"])
        return tracking.search_runs([experiment.experiment_id], f"tags.`twostage.flow_run_id` = '{run.id}'") \
            if experiment else []

    def epochs(run_id: str) -> list[int]:
        return sorted(metric.step for metric in tracking.get_metric_history(run_id, "loss/train"))

    def finetune():
        found = [r for r in runs() if r.data.tags.get("twostage.phase") == "finetune"]
        return found[0] if found else None

    while not ((child := finetune()) and len(epochs(child.info.run_id)) >= args.after):
        current = flow_run()
        if time.monotonic() - began > 600 or current.state.is_final():
            sys.exit(f"crash_check: finetune never got going: {current.state.name} {current.state.message}")
        time.sleep(1)
    workers = {name: state["processes"][name] for name in WORKERS if alive(state["processes"][name])}
    busy = {name: rec for name, rec in workers.items() if descendants([rec["pid"]])}
    if len(busy) != 1:
        sys.exit(f"crash_check: expected one busy worker, found {sorted(busy)}")
    (name, rec), = busy.items()
    flow_processes = descendants([rec["pid"]])
    groups = {rec["pgid"]} | ({proc_stat(pid)[2] for pid in flow_processes if proc_stat(pid)}
                              if args.kill == "host" else set())  # fmt: skip
    print(f"{name} (pid {rec['pid']}) runs it in {flow_processes}; SIGKILL to process groups {sorted(groups)}")
    killed_at, killed_epoch = time.time(), len(epochs(child.info.run_id))
    for group in groups:
        os.killpg(group, signal.SIGKILL)

    seen, deadline = [], time.monotonic() + args.observe
    while time.monotonic() < deadline:
        current = flow_run()
        step = (current.state.name, current.run_count)
        if not seen or seen[-1] != step:
            seen.append(step)
            print(f"  +{time.time() - killed_at:6.1f} s  {current.state.name:<14} run_count {current.run_count}  "
                  f"{(current.state.message or '')[:70]}", flush=True)  # fmt: skip
            if current.state.name == "Running" and current.run_count > 1:
                again = [n for n, r in workers.items() if n != name and alive(r) and descendants([r["pid"]])]
                print(f"           the retry runs on {again or 'no worker of this stack'}", flush=True)
        if current.state.is_final() and current.state.name != "Crashed":
            break
        time.sleep(1)
    survivors = [pid for pid in flow_processes if proc_stat(pid)]
    print(f"flow-run processes of the killed worker still alive: {survivors or 'none'}")

    with get_client(sync_client=True) as client:
        history = sorted(client.read_flow_run_states(run.id), key=lambda s: s.timestamp)
    kill_time = datetime.fromtimestamp(killed_at, tz=timezone.utc)
    print(f"\nState history of {run.name} (seconds relative to the kill):")
    for item in history:
        print(f"  {(item.timestamp - kill_time).total_seconds():+8.1f} s  {item.name:<14} {(item.message or '')[:80]}")
    parents = [r for r in runs() if "twostage.config_hash" in r.data.tags]
    retried = [r for r in parents if r.info.status == "FINISHED"]
    resumed = (finetune().data.tags.get("twostage.resumed_from_epoch") if finetune() else None) or "-"
    tags = retried[0].data.tags if retried else {}
    reused = sorted(tag.split(".")[-1] for tag in tags if tag.startswith("twostage.reused.")) or "-"
    print(f"\nMLflow: parent runs {sorted(r.info.status for r in parents)}; the retry reused {reused}; "
          f"finetune killed after epoch {killed_epoch}, resumed after epoch {resumed}, "
          f"its epochs logged once each: {epochs(child.info.run_id) == list(range(1, args.epochs + 1))}")
    print(json.dumps({"killed": name, "kill": args.kill, "states": [s.name for s in history],
                      "killed_epoch": killed_epoch, "resumed_from_epoch": resumed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
