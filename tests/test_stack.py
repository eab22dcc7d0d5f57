"""The team stack on loopback (`make stack`, deploy/stack.py): PostgreSQL, an S3 store (SeaweedFS), the Prefect and
MLflow servers on them, two process workers, and the heartbeat automation that marks a dead worker's run Crashed.

Marked `stack`: the module starts one stack in a temporary folder (about a minute) and stops it at the end, checking
that nothing it started survives. Phases of the workers' flow runs hand each other their state through the object
store (TWOSTAGE_STORAGE=s3://twostage/phases), so a flow run retried on the other worker finds it there. Every server
asks for credentials: a client holds the Prefect auth string and the pipeline's MLflow account (.stack/env), the
workers also the object store's keys (.stack/worker.env).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_server import wait_for

from conftest import REPO, tiny_config

pytestmark = pytest.mark.stack
CLIENT_VARIABLES = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                    "MLFLOW_TRACKING_PASSWORD", "TWOSTAGE_STORAGE", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL")


@dataclass
class Stack:
    folder: Path
    env: dict[str, str]  # what `make stack` tells a client to export
    worker_env: dict[str, str]  # a worker's: the client's and the object store's keys

    @property
    def secrets(self) -> dict[str, str]:
        return json.loads((self.folder / "secrets.json").read_text())

    @property
    def processes(self) -> dict[str, dict]:
        return json.loads((self.folder / "stack.json").read_text())["processes"]

    def worker_log(self, name: str) -> str:
        return Path(self.processes[name]["log"]).read_text(errors="replace")

    def workers_that_ran(self, flow_run_id) -> list[str]:
        return [name for name in ("worker-1", "worker-2") if str(flow_run_id) in self.worker_log(name)]


def stack_command(folder: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in CLIENT_VARIABLES}
    return subprocess.run([sys.executable, str(REPO / "deploy" / "stack.py"), *args], cwd=REPO, timeout=timeout,
                          env={**env, "TWOSTAGE_STACK_DIR": str(folder)}, capture_output=True, text=True)


def exported(env_file: Path) -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(\S*)$", env_file.read_text(), flags=re.M))


@pytest.fixture(scope="module")
def stack() -> Stack:
    # Not under pytest's tmp_path: its root is private to us, and PostgreSQL runs as the user `postgres` when we are
    # root, so its cluster needs a folder that user can reach.
    folder = Path(tempfile.mkdtemp(prefix="twostage-stack-"))
    folder.chmod(0o755)
    up = stack_command(folder, "up")
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        stack = Stack(folder, exported(folder / "env"), exported(folder / "worker.env"))
        assert set(stack.env) == {"PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_URI",
                                  "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}  # no object store key
        assert {"TWOSTAGE_STORAGE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(stack.worker_env)
        for secret in stack.secrets.values():
            assert secret not in up.stdout + up.stderr  # `up` says where the secrets are, not what they are
        yield stack
    finally:
        pids = [process["pid"] for process in json.loads((folder / "stack.json").read_text())["processes"].values()] \
            if (folder / "stack.json").exists() else []
        down = stack_command(folder, "down")
        assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
        assert not [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
        shutil.rmtree(folder)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


@pytest.fixture
def client_env(stack, monkeypatch):
    """This process as a client of the stack: the exports `make stack` prints."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for key, value in stack.env.items():
        monkeypatch.setenv(key, value)
    with temporary_settings({PREFECT_API_URL: stack.env["PREFECT_API_URL"]}):
        yield stack.env


def object_store(stack: Stack):
    """The object store as a worker sees it, with the keys only workers and the MLflow server hold."""
    import s3fs

    env = stack.worker_env
    return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_url=env["AWS_ENDPOINT_URL"], client_kwargs={"region_name": "us-east-1"})


def flow_run(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def submit(config: dict):
    """A flow run of the quickstart deployment with this config, on whichever worker takes it."""
    from prefect.deployments import run_deployment

    return run_deployment("two-stage/quickstart", parameters={"config": config}, timeout=0).id


def finished(flow_run_id) -> bool:
    state = flow_run(flow_run_id).state
    assert not (state.is_failed() or state.is_cancelled()), f"flow run {flow_run_id}: {state.type} {state.message}"
    return state.is_completed()


def runs_of(tracking: MlflowClient, experiment: str, flow_run_id) -> list:
    found = tracking.get_experiment_by_name(experiment)
    if not found:
        return []
    return tracking.search_runs([found.experiment_id], f"tags.`twostage.flow_run_id` = '{flow_run_id}'")


def steps(tracking: MlflowClient, run_id: str) -> list[int]:
    return sorted(metric.step for metric in tracking.get_metric_history(run_id, "loss/train"))


def test_four_runs_at_once_two_on_the_workers_two_from_clients_lose_and_duplicate_nothing_and_the_best_is_champion(
    client_env, stack, tmp_path
):
    data = {"dataset": "digits", "root": str(tmp_path / "data")}
    ids = [submit(tiny_config(name="stack-load", seed=seed, data=data)) for seed in (0, 1)]
    clients = []
    for seed in (2, 3):  # `twostage run` with the exports, from folders of their own
        folder = tmp_path / f"client-{seed}"
        folder.mkdir()
        (folder / "config.yaml").write_text(yaml.safe_dump(tiny_config(name="stack-load", seed=seed, data=data)))
        clients.append(subprocess.Popen([str(Path(sys.executable).parent / "twostage"), "run", "-c", "config.yaml"],
                                        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    wait_for(lambda: all(finished(i) for i in ids), 420, "both flow runs on the workers to complete")
    for client in clients:
        assert client.wait(timeout=420) == 0, client.stderr.read()[-3000:]

    assert sorted(worker for i in ids for worker in stack.workers_that_ran(i)) == ["worker-1", "worker-2"]
    tracking = MlflowClient(client_env["MLFLOW_TRACKING_URI"])
    experiment = tracking.get_experiment_by_name("stack-load").experiment_id
    everything = tracking.search_runs([experiment], max_results=1000)
    parents = [run for run in everything if "twostage.config_hash" in run.data.tags]
    assert len(parents) == 4 and len(everything) == 4 * 6  # each parent and its 5 phases, nothing twice
    assert {run.info.status for run in everything} == {"FINISHED"}
    prefect_ui = client_env["PREFECT_API_URL"].removesuffix("/api")
    for flow_run_id, parent in ((i, next(p for p in parents if p.data.tags["twostage.flow_run_id"] == str(i)))
                                for i in ids):
        assert parent.data.tags["twostage.prefect_flow_run_url"] == f"{prefect_ui}/runs/flow-run/{flow_run_id}"
    for run in everything:
        if run.data.tags.get("twostage.phase") in ("pretrain", "head", "finetune"):
            assert steps(tracking, run.info.run_id) == [1, 2]  # every epoch once
    versions = tracking.search_model_versions("name = 'stack-load'")
    champion = tracking.get_model_version_by_alias("stack-load", "champion")
    assert len(versions) == 4
    champion_parent = tracking.get_run(tracking.get_run(champion.run_id).data.tags["mlflow.parentRunId"])
    assert champion_parent.data.metrics["test/acc"] == max(parent.data.metrics["test/acc"] for parent in parents)

    stored = object_store(stack).find(stack.worker_env["TWOSTAGE_STORAGE"])
    assert len([key for key in stored if "/checkpoints/" in key and key.endswith(".pt")]) >= 6  # 3 phases, 2 seeds
    assert len([key for key in stored if "/results/" in key]) >= 6 and not [key for key in stored if ".tmp" in key]
    for seed in (2, 3):  # a client holds no object store key: its phases stay in its own folder
        assert len(list((tmp_path / f"client-{seed}" / "outputs" / "checkpoints").glob("*.pt"))) == 3


def test_a_sweep_on_the_two_workers_pretrains_once_for_its_points_and_running_it_again_runs_only_the_failed_point(
    client_env, stack, tmp_path
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from conftest import tiny_mnist

    # seed 11: no other test of the module trains this pretraining key in the shared object store
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config(name="stack-sweep", seed=11,
                                                                     data={"root": str(tmp_path / "data")})))
    shared = [{"data.label_fraction": fraction, "finetune.epochs": epochs} for fraction in (0.5, 1.0) for epochs in (1, 2)]
    failing = {"data.dataset": "mnist", "data.mirror": str(tmp_path / "mirror")}  # no MNIST files there yet
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"points": [*shared, failing]}))
    # before the worker-kill test below, which leaves one worker: both are alive here
    command = [str(Path(sys.executable).parent / "twostage"), "sweep", "-c", "config.yaml", "--file", "sweep.yaml"]

    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    assert "1 of 5 points failed (data.dataset=mnist" in first.stderr and "run the same command" in first.stderr
    sweep_id = re.search(r"^sweep (\w+): 5 points of stack-sweep", first.stdout, flags=re.M).group(1)
    assert re.search(rf"^sweep {sweep_id}: 4/5 done, 0 running, 1 failed, 0 waiting", first.stdout, flags=re.M)

    tracking = MlflowClient(client_env["MLFLOW_TRACKING_URI"])
    experiment = tracking.get_experiment_by_name("stack-sweep").experiment_id
    (sweep_run,) = tracking.search_runs([experiment], "tags.`twostage.sweep` = 'true'")
    parents = tracking.search_runs([experiment], f"tags.`twostage.sweep_id` = '{sweep_id}' and "
                                                 "tags.`twostage.config_hash` LIKE '%'")
    finished = [run for run in parents if run.info.status == "FINISHED"]
    assert len(finished) == 4 and {run.data.tags["mlflow.parentRunId"] for run in parents} == {sweep_run.info.run_id}
    pretrains = [run for parent in finished for run in tracking.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`twostage.phase` = 'pretrain'")]
    assert len(pretrains) == 1  # four points with one pretraining key: trained once, by whichever started first
    reusers = [run for run in finished if run.data.tags.get("twostage.reused.pretrain") == pretrains[0].info.run_id]
    assert len(reusers) == 3
    with get_client(sync_client=True) as prefect:
        flow_runs = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"sweep:{sweep_id}"])))
    assert len(flow_runs) == 5
    assert sorted({worker for run in flow_runs for worker in stack.workers_that_ran(run.id)}) == ["worker-1", "worker-2"]

    tiny_mnist(tmp_path / "mirror")  # the failed point's data is there now
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"sweep {sweep_id}: 5 points of stack-sweep over" in again.stdout and "4 completed before, 1 to run" in again.stdout
    with get_client(sync_client=True) as prefect:
        flow_runs = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"sweep:{sweep_id}"])))
    assert len(flow_runs) == 6  # only the failed point ran again
    assert len([run for run in tracking.search_runs([experiment], f"tags.`twostage.sweep_id` = '{sweep_id}' and "
                "attributes.status = 'FINISHED' and tags.`twostage.config_hash` LIKE '%'")]) == 5
    assert tracking.get_run(sweep_run.info.run_id).info.status == "FINISHED"
    assert "mean ± std" not in again.stdout and "data.dataset" in again.stdout.split("points completed")[1]
    print("\n" + again.stdout)


def test_a_worker_killed_mid_finetune_crashes_its_run_which_the_other_worker_resumes_from_the_object_store(
    client_env, stack, tmp_path
):
    config = tiny_config(name="stack-kill", data={"dataset": "digits", "root": str(tmp_path / "data")},
                         finetune={"epochs": 400, "batch_size": 32}, checkpoint_every_s=0)
    flow_run_id = submit(config)
    tracking = MlflowClient(client_env["MLFLOW_TRACKING_URI"])

    def finetune_child():
        runs = [run for run in runs_of(tracking, "stack-kill", flow_run_id)
                if run.data.tags.get("twostage.phase") == "finetune"]
        return runs[0] if runs and len(steps(tracking, runs[0].info.run_id)) >= 5 else None

    child = wait_for(finetune_child, 300, "five finetune epochs in MLflow")
    (victim,) = stack.workers_that_ran(flow_run_id)
    flow_process = int(child.data.tags["twostage.pid"])
    os.killpg(stack.processes[victim]["pgid"], signal.SIGKILL)
    os.kill(flow_process, signal.SIGKILL)
    killed_at = len(steps(tracking, child.info.run_id))
    started = time.monotonic()

    wait_for(lambda: flow_run(flow_run_id).state.is_crashed() or flow_run(flow_run_id).run_count > 1, 240,
             "the automation to mark the run Crashed")
    crashed_after = time.monotonic() - started
    wait_for(lambda: finished(flow_run_id), 420, "the retried run to complete")
    survivor = "worker-2" if victim == "worker-1" else "worker-1"
    assert survivor in stack.workers_that_ran(flow_run_id)
    print(f"\ncrash detected {crashed_after:.0f} s after kill -9; finetune killed after epoch {killed_at}")

    runs = runs_of(tracking, "stack-kill", flow_run_id)
    assert not [run for run in runs if run.info.status == "RUNNING"]
    parents = [run for run in runs if "twostage.config_hash" in run.data.tags]
    assert sorted(run.info.status for run in parents) == ["FINISHED", "KILLED"]
    retried = next(run for run in parents if run.info.status == "FINISHED")
    assert {"twostage.reused.pretrain", "twostage.reused.head"} <= set(retried.data.tags)
    finetunes = [run for run in runs if run.data.tags.get("twostage.phase") == "finetune"]
    assert len(finetunes) == 1 and finetunes[0].info.run_id == child.info.run_id  # one child, reopened
    resumed_from = int(finetunes[0].data.tags["twostage.resumed_from_epoch"])
    # The kill may land after an epoch's state is saved and before its metrics are sent: then the run resumes one
    # epoch past what MLflow showed, and sends that epoch from the saved history (seen once in five runs here).
    assert 1 <= resumed_from <= killed_at + 1 and steps(tracking, child.info.run_id) == list(range(1, 401))
    print(f"resumed after epoch {resumed_from}: {killed_at - resumed_from} epoch(s) trained again; "
          "pretrain and head reused")


def test_a_fresh_folder_on_the_default_storage_reuses_nothing_from_the_object_store(client_env, stack, tmp_path):
    config = ["--set=name=stack-fresh", f"--set=data.root={tmp_path / 'data'}"] + [
        f"--set={phase}.epochs=2" for phase in ("pretrain", "head", "finetune")]
    command = [str(Path(sys.executable).parent / "twostage"), "run", "-c", str(REPO / "configs/quickstart.yaml")]
    as_worker = {**os.environ, **stack.worker_env}  # a host holding the workers' credentials
    shared = subprocess.run(command + config, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=as_worker)
    assert shared.returncode == 0, shared.stderr[-3000:]
    (tmp_path / "fresh").mkdir()
    fresh = subprocess.run(command + config, cwd=tmp_path / "fresh", capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "reused the completed phase" not in fresh.stderr and (tmp_path / "fresh" / "outputs" / "results").is_dir()
    (tmp_path / "another").mkdir()
    again = subprocess.run(command + config, cwd=tmp_path / "another", capture_output=True, text=True, timeout=600,
                           env=as_worker)
    assert again.stderr.count("reused the completed phase") == 3  # the object store's phases, from any folder


def test_an_mlflow_server_stopped_mid_run_ends_the_run_naming_it_and_the_same_command_resumes_once_it_is_back(
    client_env, stack, tmp_path
):
    config = tiny_config(name="stack-outage", data={"dataset": "digits", "root": str(tmp_path / "data")},
                         finetune={"epochs": 600}, checkpoint_every_s=0.5)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = [str(Path(sys.executable).parent / "twostage"), "run", "-c", "config.yaml"]
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}  # MLflow's client gives up at once, not in minutes
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: (tmp_path / "first.log").read_text().count("finetune epoch") >= 30, 300, "finetune epochs")
        mlflow_server = stack.processes["mlflow"]
        os.killpg(mlflow_server["pgid"], signal.SIGTERM)
        assert first.wait(timeout=300) == 3
    output = (tmp_path / "first.log").read_text()
    assert f"twostage: error: the MLflow tracking server {client_env['MLFLOW_TRACKING_URI']} stopped answering" in output
    assert "run the same command to resume" in output and "Traceback" not in output

    restarted = stack_command(stack.folder, "restart", "mlflow")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("reused the completed phase") == 2  # pretrain and head
    assert re.search(r"finetune: resuming after epoch \d+/600", again.stderr)


def test_each_server_refuses_a_request_without_or_with_wrong_credentials(stack):
    import base64

    import boto3
    import botocore.exceptions
    import psycopg2
    import requests

    env, worker = stack.env, stack.worker_env

    def basic(text: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(text.encode()).decode()}

    prefect = f"{env['PREFECT_API_URL']}/flow_runs/filter"
    assert requests.post(prefect, json={}, timeout=10).status_code == 401
    assert requests.post(prefect, json={}, headers=basic("twostage:wrong"), timeout=10).status_code == 401
    assert requests.post(prefect, json={}, headers=basic(env["PREFECT_API_AUTH_STRING"]), timeout=10).status_code == 200

    mlflow_api = f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(mlflow_api, timeout=10).status_code == 401
    assert requests.get(env["MLFLOW_TRACKING_URI"], timeout=10).status_code == 401  # the UI too
    for user in ("admin", "twostage", "viewer"):
        assert requests.get(mlflow_api, auth=(user, "wrong"), timeout=10).status_code == 401
    pipeline = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    assert requests.get(mlflow_api, auth=pipeline, timeout=10).status_code == 200

    assert requests.get(f"{worker['AWS_ENDPOINT_URL']}/twostage/", timeout=10).status_code == 403  # anonymous

    def s3(secret: str):
        return boto3.client("s3", endpoint_url=worker["AWS_ENDPOINT_URL"], region_name="us-east-1",
                            aws_access_key_id=worker["AWS_ACCESS_KEY_ID"], aws_secret_access_key=secret)

    with pytest.raises(botocore.exceptions.ClientError, match="SignatureDoesNotMatch|AccessDenied|403"):
        s3("wrong").list_objects_v2(Bucket="twostage", MaxKeys=1)
    assert s3(worker["AWS_SECRET_ACCESS_KEY"]).list_objects_v2(Bucket="twostage", MaxKeys=1)["ResponseMetadata"][
        "HTTPStatusCode"] == 200

    port = json.loads((stack.folder / "stack.json").read_text())["ports"]["postgres"]
    for password in (None, "wrong"):  # the servers' databases: not around the servers' authentication
        with pytest.raises(psycopg2.OperationalError, match="password"):
            psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="mlflow", password=password,
                             connect_timeout=5)
    for name in ("secrets.json", "env", "worker.env", "s3-config.json", "mlflow-auth.ini"):
        assert (stack.folder / name).stat().st_mode & 0o777 == 0o600, name


def test_a_missing_or_wrong_credential_is_one_line_naming_the_server_and_the_variable(stack, tmp_path):
    clean = {key: value for key, value in os.environ.items() if key not in CLIENT_VARIABLES}
    mlflow, prefect = stack.env["MLFLOW_TRACKING_URI"], stack.env["PREFECT_API_URL"]
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("L", (8, 8)).save(image)
    cases = [
        ("run", {"MLFLOW_TRACKING_USERNAME": None, "MLFLOW_TRACKING_PASSWORD": None},
         f"MLflow tracking server {mlflow} requires an account (401 Unauthorized); set MLFLOW_TRACKING_USERNAME and "
         "MLFLOW_TRACKING_PASSWORD"),
        ("run", {"MLFLOW_TRACKING_PASSWORD": "wrong"},
         f"MLflow tracking server {mlflow} refused MLFLOW_TRACKING_USERNAME twostage with this MLFLOW_TRACKING_PASSWORD"),
        ("predict", {"MLFLOW_TRACKING_PASSWORD": "wrong"}, f"MLflow tracking server {mlflow} refused"),
        ("run", {"PREFECT_API_AUTH_STRING": None},
         f"Prefect server {prefect} requires authentication (401 Unauthorized); set PREFECT_API_AUTH_STRING"),
        ("compare", {"MLFLOW_TRACKING_PASSWORD": "wrong"}, f"MLflow tracking server {mlflow} refused"),
        ("sweep", {"PREFECT_API_AUTH_STRING": "twostage:wrong"},
         f"Prefect server {prefect} refused PREFECT_API_AUTH_STRING (401 Unauthorized)"),
        ("serve", {"PREFECT_API_AUTH_STRING": "twostage:wrong"}, f"Prefect server {prefect} refused"),
    ]
    for command, changes, expected in cases:
        env = {**clean, **stack.env, **changes}
        args = {"run": ["run"], "sweep": ["sweep", "--grid", "seed=0,1"], "predict": ["predict", str(image)],
                "compare": ["compare", "-e", "quickstart"], "serve": ["serve", "--cron", "0 3 * * *"]}[command]
        args = args if command == "compare" else [*args, "-c", str(REPO / "configs" / "quickstart.yaml")]
        done = subprocess.run([str(Path(sys.executable).parent / "twostage"), *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, env={key: value for key, value in env.items() if value is not None})
        assert done.returncode == 2, (command, changes, done.stderr[-2000:])
        assert done.stderr.startswith(f"twostage: error: {expected}") and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "outputs").exists()  # refused before anything ran


def test_a_viewer_reads_the_runs_but_cannot_move_the_champion_or_run_into_the_experiment(client_env, stack, tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    config = tiny_config(name="stack-viewer", data={"dataset": "digits", "root": str(tmp_path / "data")})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([str(Path(sys.executable).parent / "twostage"), "run", "-c", "config.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "View run" not in done.stdout and done.stdout.count("\n") == 2  # the summary and its link, nothing of MLflow's
    tracking = MlflowClient(client_env["MLFLOW_TRACKING_URI"])  # its account is read from the environment per call
    champion = tracking.get_model_version_by_alias("stack-viewer", "champion").version

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "viewer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.secrets["mlflow_viewer_password"])
    experiment = tracking.get_experiment_by_name("stack-viewer").experiment_id
    runs = tracking.search_runs([experiment])
    assert len(runs) == 6 and tracking.get_model_version_by_alias("stack-viewer", "champion").version == champion
    for refused in (lambda: tracking.set_registered_model_alias("stack-viewer", "champion", champion),
                    lambda: tracking.delete_registered_model_alias("stack-viewer", "champion"),
                    lambda: tracking.set_tag(runs[0].info.run_id, "promoted-by", "viewer")):
        with pytest.raises(MlflowException, match="403"):
            refused()
    as_viewer = subprocess.run([str(Path(sys.executable).parent / "twostage"), "run", "-c", "config.yaml"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert as_viewer.returncode == 2 and "Traceback" not in as_viewer.stderr
    assert as_viewer.stderr.splitlines()[-1] == (
        f"twostage: error: MLflow tracking server {client_env['MLFLOW_TRACKING_URI']}: account viewer may not write to "
        "experiment stack-viewer (403 Forbidden); ask its admin for EDIT on it, or set `name` to an experiment of your own")
    assert len(tracking.search_runs([experiment])) == 6  # nothing was added
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", client_env["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", client_env["MLFLOW_TRACKING_PASSWORD"])
    tracking.set_registered_model_alias("stack-viewer", "champion", champion)  # the pipeline's account may


def test_no_secret_shows_up_in_mlflow_prefect_the_logs_or_a_command_line(client_env, stack, tmp_path):
    import base64
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    command_lines: set[str] = set()
    stop = threading.Event()

    def watch() -> None:  # what `ps` shows every local user, sampled while a sweep runs on the workers
        while not stop.is_set():
            for entry in Path("/proc").iterdir():
                try:
                    command_lines.add((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
                except OSError:
                    pass
            time.sleep(0.2)

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config(name="stack-secrets", data={
        "dataset": "digits", "root": str(tmp_path / "data")})))
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        sweep = subprocess.run([str(Path(sys.executable).parent / "twostage"), "sweep", "-c", "config.yaml", "--grid",
                                "seed=0,1"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        stop.set()
        watcher.join()
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    assert any("prefect.engine" in line or "flow-run" in line for line in command_lines)  # a flow run was seen
    sweep_id = re.search(r"^sweep (\w+):", sweep.stdout, flags=re.M).group(1)

    tracking = MlflowClient(client_env["MLFLOW_TRACKING_URI"])
    mlflow_records = []
    for experiment in tracking.search_experiments():
        for run in tracking.search_runs([experiment.experiment_id], max_results=1000):
            mlflow_records.append([run.info.run_name, run.data.params, run.data.tags])
        for model in tracking.search_logged_models([experiment.experiment_id]):
            mlflow_records.append([model.params, model.tags])
    for model in tracking.search_registered_models():
        for version in tracking.search_model_versions(f"name = '{model.name}'"):
            mlflow_records.append([version.tags, version.description])
    points = tracking.search_runs([tracking.get_experiment_by_name("stack-secrets").experiment_id],
                                  f"tags.`twostage.sweep_id` = '{sweep_id}' and tags.`twostage.config_hash` LIKE '%'")
    # the points ran on the workers, in the object store their TWOSTAGE_STORAGE names, not the client's default
    assert len(points) == 2 and {run.data.params["storage"] for run in points} == {stack.worker_env["TWOSTAGE_STORAGE"]}
    with get_client(sync_client=True) as prefect:
        flow_runs, logs = [], []
        while page := prefect.read_flow_runs(limit=200, offset=len(flow_runs)):
            flow_runs += page
        log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id for run in flow_runs]))
        while page := prefect.read_logs(log_filter, limit=200, offset=len(logs)):
            logs += page
        prefect_records = [
            [run.model_dump(mode="json") for run in flow_runs],
            [log.message for log in logs],
            [artifact.model_dump(mode="json") for artifact in prefect.read_artifacts()],
            [deployment.model_dump(mode="json") for deployment in prefect.read_deployments()],
            prefect.read_work_pool("twostage").model_dump(mode="json"),
            [variable.model_dump(mode="json") for variable in prefect.read_variables()],
            [block.model_dump(mode="json") for block in prefect.read_block_documents(include_secrets=True)],
        ]
    assert logs and prefect_records[2]  # there were logs and artifacts to look at
    files = [path for folder in ("logs", "prefect", "prefect-client") for path in (stack.folder / folder).rglob("*")
             if path.is_file()]
    places = {
        "command lines": "\n".join(command_lines),
        "the sweep's output": sweep.stdout + sweep.stderr,
        "MLflow runs, models and versions": json.dumps(mlflow_records, default=str),
        "Prefect flow runs, logs, artifacts, deployments, work pool, variables": json.dumps(prefect_records, default=str),
        **{str(path): path.read_text(errors="replace") for path in files},
    }
    auth_string = stack.secrets["prefect_auth_string"]
    pipeline_account = f"twostage:{stack.secrets['mlflow_pipeline_password']}"  # as a basic-auth header holds it
    secrets = [*stack.secrets.values(), auth_string.split(":", 1)[1],
               *(base64.b64encode(text.encode()).decode() for text in (auth_string, pipeline_account))]
    for place, text in places.items():
        for secret in secrets:
            assert secret not in text, f"a secret in {place}"


@pytest.mark.benchmark
def test_the_sweep_benchmark_times_one_worker_against_two_and_restores_the_pools_limit(client_env, stack):
    quick = [f"--set={phase}.epochs=1" for phase in ("pretrain", "head", "finetune")]
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sweep.py"), "--points", "2", *quick,
                             "--env", str(stack.folder / "env")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^local `twostage run`: \d+\.\d s wall, of which the pipeline \(time/total_s\) \d+\.\d s$",
                     result.stdout, flags=re.M)
    for workers in (1, 2):
        assert re.search(rf"^\s+{workers}(\s+\d+\.\d){{5}}$", result.stdout, flags=re.M), result.stdout
    assert re.search(r"^wall time 1 worker / 2 workers: \d+\.\d\dx", result.stdout, flags=re.M)
    assert re.search(r"^projected on 8 workers with cores of their own: 1 rounds", result.stdout, flags=re.M)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_work_pool("twostage").concurrency_limit is None  # as before the benchmark
