"""Faults and bad input, injected: signals in each phase, corrupted files of each kind, runs at once on one store,
bad tracking URIs. Each asserts the exit code, the one-line message, that nothing is lost, and that the same
command then succeeds."""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import torch
from mlflow.tracking import MlflowClient

from configs.loader import validate_config
from configs.schema import DataConfig
from conftest import REPO, isolated_workdir, tiny_config
from flows.two_stage import two_stage
from tasks.data import prepare

TWOSTAGE = Path(sys.executable).parent / "twostage"
QUICKSTART = REPO / "configs" / "quickstart.yaml"
EPOCHS = 12  # at batch 16: a phase lasts long enough to be signalled in its third epoch
LONG = [f"--set={phase}.{key}" for phase in ("pretrain", "head", "finetune") for key in (f"epochs={EPOCHS}", "batch_size=16")]
LONG.append("--set=checkpoint_every_s=0")  # an epoch state after every epoch


def environment(cwd: Path, api_url: str | None) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(cwd / "prefect-home"), "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}
    env.pop("PREFECT_API_URL", None)
    return {**env, "PREFECT_API_URL": api_url} if api_url else env


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("twostage: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def runs_by_phase(client: MlflowClient, experiment: str = "quickstart") -> dict[str, list]:
    found: dict[str, list] = {}
    for run in client.search_runs([client.get_experiment_by_name(experiment).experiment_id]):
        found.setdefault(run.data.tags.get("twostage.phase", "parent"), []).append(run)
    return found


# ------------------------------------------------------------------------------------------------ signals


@pytest.mark.cli
@pytest.mark.parametrize("signum, phase, ephemeral", [
    (signal.SIGINT, "pretrain", False),
    (signal.SIGTERM, "head", False),
    (signal.SIGINT, "finetune", True),  # a terminal's Ctrl-C, Prefect's ephemeral server in the same process group
])
def test_a_signal_in_any_phase_stops_the_run_kills_its_runs_registers_nothing_and_the_same_command_resumes(
    prefect_server, tmp_path, signum, phase, ephemeral
):
    from prefect.settings import PREFECT_API_URL

    api_url = None if ephemeral else PREFECT_API_URL.value()
    command = [str(TWOSTAGE), "run", "-c", str(QUICKSTART), *LONG]
    process = subprocess.Popen(command, cwd=tmp_path, env=environment(tmp_path, api_url), text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if f"{phase} epoch 3/{EPOCHS}" in line:
            break
    signalled = time.monotonic()
    os.killpg(process.pid, signum)  # the whole process group, as a terminal or a service manager does
    seen += list(process.stderr)
    process.wait()
    stopped_after = time.monotonic() - signalled
    stderr = "".join(seen)

    assert process.returncode == 128 + signum, stderr[-3000:]
    assert stopped_after < 15, stopped_after
    expected = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    assert one_error_line(stderr).startswith(f"twostage: stopped by {expected};")
    time.sleep(1)
    with pytest.raises(ProcessLookupError):  # nothing left running: no orphaned ephemeral server
        os.killpg(process.pid, 0)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = runs_by_phase(client)
    assert [run.info.status for run in runs["parent"]] == ["KILLED"]
    assert [run.info.status for run in runs[phase]] == ["KILLED"]
    assert client.search_model_versions() == []

    resumed = subprocess.run(command, cwd=tmp_path, env=environment(tmp_path, PREFECT_API_URL.value()),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = int(re.search(rf"{phase}: resuming after epoch (\d+)/{EPOCHS}", resumed.stderr).group(1))
    assert after >= 3 and f"{phase} epoch 1/{EPOCHS}" not in resumed.stderr
    runs = runs_by_phase(client)
    child = runs[phase][0]
    assert len(runs[phase]) == 1 and child.info.status == "FINISHED"  # the killed child run, continued
    assert [m.step for m in client.get_metric_history(child.info.run_id, "loss/train")] == list(range(1, EPOCHS + 1))
    assert len(client.search_model_versions()) == 1


# ------------------------------------------------------------------------------------------------ corrupted files


def test_an_unreadable_prepared_data_cache_is_named_and_rebuilt(tmp_path, caplog):
    config = DataConfig(dataset="digits", root=tmp_path)
    first = prepare(config)
    first.path.write_bytes(first.path.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING):
        again = prepare(config)
    assert f"{first.path}: unreadable prepared data" in caplog.text and "rebuilding it" in caplog.text
    assert not again.source.startswith("cache") and again.fingerprint == first.fingerprint
    assert prepare(config).source.startswith("cache")


def crafted_pickle(marker: Path) -> tuple[dict, str]:
    """A result record that declares Prefect's pickle serializer: loading it would create `marker`."""

    class Touch:
        def __reduce__(self):
            return Path.touch, (marker,)

    return {"type": "pickle", "picklelib": "cloudpickle", "picklelib_version": None}, \
        base64.encodebytes(cloudpickle.dumps(Touch())).decode()


def crafted_json_hook(marker: Path) -> tuple[dict, str]:
    """A "json" record whose declared object hook is subprocess.call: loading it would run `touch marker`."""
    serializer = {"type": "json", "jsonlib": "json", "object_encoder": "prefect.serializers.prefect_json_object_encoder",
                  "object_decoder": "subprocess.call", "dumps_kwargs": {}, "loads_kwargs": {}}
    return serializer, json.dumps({"touch": 0, str(marker): 0})


@pytest.mark.parametrize("tamper", ["garbage", "pickle", "json-hook"])
def test_a_tampered_phase_result_is_never_loaded_but_moved_aside_with_a_warning_and_the_phase_runs_again(
    prefect_server, workdir, caplog, tamper
):
    config = validate_config(tiny_config())
    first = two_stage(config)
    results = workdir / "outputs" / "results"
    client = MlflowClient()
    pretrain_run = runs_by_phase(client, "tiny")["pretrain"][0].info.run_id
    record_path = next(path for path in results.iterdir() if pretrain_run in path.read_text())
    marker = workdir / "code-ran"
    if tamper == "garbage":
        record_path.write_bytes(b"\x00not a record")
    else:
        record = json.loads(record_path.read_text())
        record["metadata"]["serializer"], record["result"] = (crafted_pickle if tamper == "pickle" else crafted_json_hook)(marker)
        record_path.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        second = two_stage(config)
    assert not marker.exists()
    assert f"pretrain: the stored result {record_path}" in caplog.text and "running the phase again" in caplog.text
    assert record_path.with_name(record_path.name + ".rejected").exists()  # kept for inspection
    assert len(runs_by_phase(client, "tiny")["pretrain"]) == 2  # trained again
    assert second.metrics == pytest.approx(first.metrics)


@pytest.mark.cli
@pytest.mark.parametrize("uri, fragments", [
    ("foo://bar", ["MLflow tracking store foo://bar can't be used", "MLFLOW_TRACKING_URI"]),
    ("http://127.0.0.1:9", ["MLflow tracking server http://127.0.0.1:9 does not answer", "connection refused"]),
    ("sqlite:///broken.db", ["MLflow tracking store sqlite:///broken.db can't be used", "file is not a database"]),
])
def test_an_unusable_tracking_store_is_one_line_and_exit_2_before_prefect_starts(tmp_path, uri, fragments):
    (tmp_path / "broken.db").write_bytes(b"SQLite format 3\x00" + os.urandom(3000))  # a truncated store
    started = time.monotonic()
    result = subprocess.run([str(TWOSTAGE), "run", "-c", str(QUICKSTART)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**environment(tmp_path, None), "MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert all(fragment in line for fragment in fragments), line
    assert "Starting temporary server" not in result.stderr
    assert time.monotonic() - started < 60


# ------------------------------------------------------------------------------------------------ runs at once


@pytest.mark.cli
def test_runs_started_at_once_on_a_new_store_all_finish_train_each_key_once_and_crown_the_best(prefect_server, tmp_path):
    """Two runs with the same seed (one phase key) and one with another, at once, in a new folder."""
    from prefect.settings import PREFECT_API_URL

    seeds = (0, 0, 1)

    fast = [f"--set={phase}.epochs=5" for phase in ("pretrain", "head", "finetune")]
    processes = [
        subprocess.Popen([str(TWOSTAGE), "run", "-c", str(QUICKSTART), *fast, f"--set=seed={seed}"], cwd=tmp_path,
                         env=environment(tmp_path, PREFECT_API_URL.value()), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
        for seed in seeds
    ]
    outputs = [process.communicate(timeout=600)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], [output[-2000:] for output in outputs]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = runs_by_phase(client)
    distinct = len(set(seeds))
    for phase in ("pretrain", "head", "finetune"):
        assert len(runs[phase]) == distinct, phase  # a key trains once; the other runs wait and reuse it
        for run in runs[phase]:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/train")]
            assert steps == list(range(1, 6)), phase  # no epoch logged twice
    assert len(runs["evaluate"]) == 3 and {run.info.status for run in runs["parent"]} == {"FINISHED"}
    versions = client.search_model_versions("name = 'quickstart'")
    champion = client.get_model_version_by_alias("quickstart", "champion")
    assert len(versions) == 3
    assert float(champion.tags["test/acc"]) == max(float(version.tags["test/acc"]) for version in versions)


# ------------------------------------------------------------------------------------------------ promotion


def test_a_model_whose_loss_exploded_is_not_promoted_and_the_decision_says_why(prefect_server, workdir):
    report = two_stage(validate_config(tiny_config(finetune={"optimizer": {"lr": 1e6}})))
    assert "is not promoted" in report.promotion and "chance" in report.promotion, report.promotion
    client = MlflowClient()
    assert client.get_registered_model("tiny").aliases == {}
    assert client.get_run(report.pipeline_run_id).data.tags["twostage.registry_decision"] == report.promotion


def test_the_git_commit_is_the_checkouts_own_wherever_the_run_starts(prefect_server, tmp_path):
    with isolated_workdir(tmp_path):  # a folder outside the checkout
        report = two_stage(validate_config(tiny_config()))
        tags = MlflowClient().get_run(report.pipeline_run_id).data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head


def test_a_checkpoint_loads_with_weights_only(tmp_path):
    """Stored weights are plain tensors: torch refuses anything else (the guard behind load_model)."""

    class Payload:
        def __reduce__(self):
            return Path.touch, (tmp_path / "code-ran",)

    torch.save({"weights": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(tmp_path / "evil.pt", weights_only=True)
    assert not (tmp_path / "code-ran").exists()
