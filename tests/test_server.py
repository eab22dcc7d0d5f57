"""Scheduled runs on a real Prefect server: `twostage serve`, deployment parameters, flow-run artifacts.

Marked `server`: these start `prefect server start` once for the module (about a minute in all);
`pytest -m "not server"` skips them for a quicker local loop. `make test` and CI run them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from configs.loader import load_config, validate_config
from conftest import REPO

pytestmark = pytest.mark.server
BIN = Path(sys.executable).parent
QUICKSTART = REPO / "configs" / "quickstart.yaml"
PARENT_OF = "tags.`twostage.flow_run_id` = '{}' and tags.`twostage.config_hash` LIKE '%'"  # not its phases' runs
FAST = ["--set=pretrain.epochs=2", "--set=head.epochs=2", "--set=finetune.epochs=2"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> str:
    """A real Prefect server on a free loopback port, with its own PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 120, "the Prefect server")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def flow_run_artifacts(flow_run_id) -> dict[str, object]:
    """The flow run's artifacts by key, read with Prefect's client from the current API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {artifact.key: artifact for artifact in found}


def client_env(tmp_path: Path, api_url: str | None) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def test_serve_without_a_prefect_server_exits_2_saying_how_to_start_one(tmp_path):
    result = subprocess.run(
        [str(BIN / "twostage"), "serve", "-c", str(QUICKSTART), "--cron", "0 3 * * *"],
        env=client_env(tmp_path, None), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "prefect server start" in result.stderr and "PREFECT_API_URL" in result.stderr


def test_serve_rejects_a_bad_cron_expression(tmp_path, prefect_api):
    result = subprocess.run(
        [str(BIN / "twostage"), "serve", "-c", str(QUICKSTART), "--cron", "every night"],
        env=client_env(tmp_path, prefect_api), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "--cron 'every night' is not a cron expression" in result.stderr


def test_a_served_deployment_runs_its_cron_schedule_tracked_in_mlflow_with_summary_artifacts(tmp_path, prefect_api):
    """`twostage serve --cron "* * * * *"`: the server schedules a flow run for the next minute and the served
    process runs it (Prefect 3.9: from a cloudpickle bundle) to Completed, all five phases, tracked in MLflow."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {**client_env(tmp_path, prefect_api), "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PYTHONFAULTHANDLER": "1"}
    serve = subprocess.Popen(
        [str(BIN / "twostage"), "serve", "-c", str(QUICKSTART), "--cron", "* * * * *", "--name", "nightly", *FAST],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:

            def deployment():
                try:
                    return client.read_deployment_by_name("two-stage/nightly")
                except Exception:  # noqa: BLE001 - not registered yet
                    return None

            served = wait_for(deployment, 120, "the served deployment")
            assert [s.schedule.cron for s in served.schedules] == ["* * * * *"]
            expected = load_config(QUICKSTART, [arg.removeprefix("--set=") for arg in FAST])
            assert validate_config(served.parameters["config"]) == expected

            with pytest.raises(Exception, match="epoch"):  # a bad "Custom run" is refused, naming the field
                run_deployment("two-stage/nightly", parameters={"config": {"finetune": {"epoch": 3}}}, timeout=0)

            def scheduled_run_done():
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[served.id])))
                done = [run for run in runs if run.auto_scheduled and run.state.is_final()]
                return done[0] if done else None

            flow_run = wait_for(scheduled_run_done, 240, "a flow run of the cron schedule to finish")
            assert flow_run.state.is_completed(), flow_run.state
            artifacts = flow_run_artifacts(flow_run.id)
    finally:
        os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C
        try:
            output, _ = serve.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # say where it hangs: faulthandler prints every thread's stack on SIGABRT
            os.killpg(serve.pid, signal.SIGABRT)
            output, _ = serve.communicate(timeout=60)
            pytest.fail(f"twostage serve did not stop within 120 s of Ctrl-C; its output and threads:\n{output[-8000:]}")
    assert serve.returncode == 0, output[-3000:]

    tracking = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = tracking.search_runs(
        [tracking.get_experiment_by_name("quickstart").experiment_id],
        filter_string=PARENT_OF.format(flow_run.id),
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "test/acc" in runs[0].data.metrics
    summary = artifacts["twostage-summary"].data
    for phase in ("data", "pretrain", "head", "finetune", "evaluate"):
        assert f"| {phase} | run |" in summary
    assert "test/acc" in summary
    assert runs[0].info.run_id in artifacts["twostage-mlflow-run"].data


@pytest.mark.filterwarnings("ignore:Ad-hoc flow submission via workers is experimental:FutureWarning")
def test_a_worker_runs_the_flow_from_a_bundle_that_pickles_our_modules_by_value(tmp_path, prefect_api, monkeypatch):
    """A process worker's ad-hoc submission (Prefect 3.9): the worker pickles the flow and our modules by value
    into a bundle, checks its requirements with uv in the active venv, and runs it in a new process. That process
    holds two copies of our classes, the bundle's and those a stored result is decoded into: phases that an
    earlier run in this process completed are reused there all the same."""
    import asyncio

    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    from configs.loader import validate_config
    from conftest import tiny_config
    from flows.two_stage import two_stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("VIRTUAL_ENV", sys.prefix)  # as in an activated venv: where uv checks the bundle's requirements
    config = validate_config(tiny_config()).model_dump(mode="json")
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        earlier = two_stage(validate_config(config))

    async def submit_and_wait():
        async with ProcessWorker(work_pool_name="adhoc", create_pool_if_not_found=True) as worker:
            future = await worker.submit(two_stage, parameters={"config": config})

            def final_state():
                future.wait(timeout=300)
                return future.state

            return await asyncio.to_thread(final_state)

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        state = asyncio.run(submit_and_wait())
    assert state.is_completed(), state
    tracking = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = tracking.search_runs([tracking.get_experiment_by_name("tiny").experiment_id])
    assert {run.info.status for run in runs} == {"FINISHED"}
    parents = [run for run in runs if "twostage.phase" not in run.data.tags]
    latest = next(run for run in parents if run.info.run_id != earlier.pipeline_run_id)
    phases_of_latest = {run.data.tags["twostage.phase"] for run in runs
                        if run.data.tags.get("mlflow.parentRunId") == latest.info.run_id}
    assert phases_of_latest == {"data", "evaluate"}  # pretrain, head and finetune reused from the earlier run
    assert {"twostage.reused.pretrain", "twostage.reused.head", "twostage.reused.finetune"} <= set(latest.data.tags)


def test_prefect_yaml_deploys_the_shipped_configs_with_their_validated_parameters():
    check = subprocess.run([sys.executable, str(REPO / "deploy" / "prefect_yaml.py"), "--check"], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr  # generated from configs/*.yaml: one source of truth
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in project["deployments"]}
    assert set(deployments) == {"sweep", "quickstart", "mnist", "fashion_mnist", "fashion_mnist_cnn"}
    sweep = deployments.pop("sweep")  # twostage sweep gives each of its flow runs a config: it has none, nor a schedule
    assert sweep["entrypoint"] == "flows/two_stage.py:two_stage" and sweep["work_pool"]["name"] == "twostage"
    assert "parameters" not in sweep and "schedules" not in sweep
    for name, deployment in deployments.items():
        assert deployment["entrypoint"] == "flows/two_stage.py:two_stage"
        assert deployment["work_pool"]["name"] == "twostage"
        config = load_config(REPO / "configs" / f"{name}.yaml")
        assert validate_config(deployment["parameters"]["config"]) == config
        assert deployment["schedules"][0]["cron"]
        assert deployment["tags"] == [f"config:{config.name}", f"dataset:{config.data.dataset}"]


def test_prefect_deploy_and_a_process_worker_run_a_deployment_from_prefect_yaml(tmp_path, prefect_api):
    """`prefect deploy --all`, then `prefect worker start --pool twostage` runs the quickstart deployment."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    (tmp_path / "prefect.yaml").write_text((REPO / "prefect.yaml").read_text())
    (tmp_path / "flows").symlink_to(REPO / "flows")  # the entrypoint's path, without running in the checkout
    env = client_env(tmp_path, prefect_api)

    def prefect(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "prefect"), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=timeout)

    assert prefect("work-pool", "create", "twostage", "--type", "process").returncode == 0
    deployed = prefect("--no-prompt", "deploy", "--all")
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        names = {d.name for d in client.read_deployments()}
        assert {"sweep", "quickstart", "mnist", "fashion_mnist"} <= names
        deployment = client.read_deployment_by_name("two-stage/quickstart")
        assert validate_config(deployment.parameters["config"]) == load_config(QUICKSTART)
        flow_run = client.create_flow_run_from_deployment(deployment.id)
        worker = prefect("worker", "start", "--pool", "twostage", "--run-once")
        assert worker.returncode == 0, worker.stderr[-3000:]
        assert client.read_flow_run(flow_run.id).state.is_completed()
    tracking = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = tracking.search_runs([tracking.get_experiment_by_name("quickstart").experiment_id],
                                filter_string=PARENT_OF.format(flow_run.id))
    assert len(runs) == 1 and runs[0].data.metrics["test/acc"] >= 0.95
