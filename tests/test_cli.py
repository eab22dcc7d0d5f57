"""`twostage run` as a user types it, in a subprocess: exit codes, one-line errors, progress and the summary."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from configs.loader import load_config
from conftest import REPO, isolated_workdir
from flows.two_stage import two_stage

pytestmark = pytest.mark.cli
TWOSTAGE = Path(sys.executable).parent / "twostage"
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def environment(cwd: Path, api_url: str | None = None) -> dict[str, str]:
    """The CLI's environment: its own Prefect home; Prefect's ephemeral server unless `api_url` is given."""
    env = {**os.environ, "PREFECT_HOME": str(cwd / "prefect-home")}
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store: sqlite:///mlflow.db in the working directory
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def twostage(*args: str, cwd: Path, api_url: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TWOSTAGE), *args], cwd=cwd, env=environment(cwd, api_url), capture_output=True, text=True,
        timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("twostage: error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.mark.parametrize("args, fragments", [
    (["-c", "nope.yaml"], ["nope.yaml: cannot read config"]),
    (["--set", "finetune.epoch=3"], ["unknown key 'finetune.epoch'", "valid keys here: epochs"]),
    (["--set", "data.val_fraction=2"], ["invalid value for 'data.val_fraction'", "got 2"]),
    (["--set", "model.encoder_widths=[1,"], ["--set 'model.encoder_widths=[1,'", "is not a YAML value", "quote it"]),
    (["--rerun", "everything"], ["argument --rerun", "invalid choice"]),
    (["--set", "device=cuda"] if not __import__("torch").cuda.is_available() else ["--set", "device=tpu"], ["device"]),
])
def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path, args, fragments):
    result = twostage("run", *(["-c", str(QUICKSTART)] if "-c" not in args else []), *args, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert result.stderr.count("\n") == 1


def test_an_empty_config_file_is_refused_not_run_with_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert_one_line_error(twostage("run", "-c", "empty.yaml", cwd=tmp_path), "empty.yaml: the config file is empty")


@pytest.mark.parametrize("last", ["0", "-1", "two"])
def test_compare_refuses_a_last_that_is_not_a_positive_count(tmp_path, last):
    assert_one_line_error(twostage("compare", "--last", last, cwd=tmp_path), "argument --last", repr(last))


def test_compare_in_a_folder_without_a_store_says_so_and_creates_none(tmp_path):
    result = twostage("compare", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("no finished pipeline runs")
    assert not (tmp_path / "mlflow.db").exists()


def test_unreadable_yaml_exits_2_naming_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    assert_one_line_error(twostage("run", "-c", "bad.yaml", cwd=tmp_path), "bad.yaml", "not valid YAML")


def test_missing_data_offline_exits_2_naming_places_and_fix(tmp_path):
    result = twostage(
        "run", "-c", str(QUICKSTART), "--set", "data.dataset=kmnist", "--set", "data.download=false", cwd=tmp_path
    )
    assert_one_line_error(result, "kmnist not found", "Fix:", "data.mirror")


def test_run_prints_progress_then_metrics_run_id_and_the_mlflow_ui_command(tmp_path):
    result = twostage(
        "run", "-c", str(QUICKSTART),
        "--set", "pretrain.epochs=2", "--set", "head.epochs=2", "--set", "finetune.epochs=2", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for phase in ("pretrain", "head", "finetune"):
        assert f"{phase} epoch 2/2 loss/train" in result.stderr
    assert "acc/val" in result.stderr
    assert "amp false: float32" in result.stderr  # what the run trains in, and why, in one line
    assert "Starting temporary server" not in result.stderr and "See https://" not in result.stderr
    assert "Successfully registered model" not in result.stderr + result.stdout
    result_line, open_line = result.stdout.strip().splitlines()
    assert result_line.startswith("quickstart: test/acc ") and "is the champion of quickstart" in result_line
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in open_line
    run_id = open_line.split("/runs/")[1].removesuffix("?workflowType=machine_learning")
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics


def test_in_a_terminal_the_quickstart_shows_ten_lines_with_a_finished_live_line_per_phase(tmp_path):
    """What a user sees at the end of `twostage run` in a 400x60 terminal (wide: no line wraps), read through a
    terminal emulator."""
    import fcntl
    import pty
    import struct
    import termios

    import pyte

    columns, rows = 400, 60
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {**environment(tmp_path), "TERM": "xterm-256color", "TWOSTAGE_PROGRESS_EVERY_S": "10"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen([str(TWOSTAGE), "run", "-c", str(QUICKSTART)], cwd=tmp_path, env=env,
                               stdin=follower, stdout=follower, stderr=follower, start_new_session=True)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process ended
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=300) == 0, output.decode(errors="replace")[-3000:]
    screen = pyte.Screen(columns, rows)
    pyte.ByteStream(screen).feed(output)
    lines = [line.rstrip() for line in screen.display if line.strip()]
    assert len(lines) <= 10, "\n".join(lines)
    for phase, epochs in (("pretrain", 30), ("head", 30), ("finetune", 20)):
        [live] = [line for line in lines if line.startswith(f"{phase} ")]
        assert re.match(rf"{phase} +━+ 100% epoch {epochs}/{epochs} batch done [\d.]+ it/s", live), live
    assert "Finished in state Completed()" in lines[-3]  # the flow run's state; the tasks' are not repeated
    assert sum("Finished in state" in line for line in lines) == 1
    assert lines[-1].startswith("Open it: ")


def test_version_print_config_and_dry_run(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    version = twostage("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"twostage 0.1.0 (commit {head[:7]})"

    printed = twostage("run", "-c", str(QUICKSTART), "--set", "seed=3", "--print-config", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    (tmp_path / "resolved.yaml").write_text(printed.stdout)
    assert load_config(tmp_path / "resolved.yaml") == load_config(QUICKSTART, ["seed=3"])  # every default spelled out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


def test_a_dry_run_says_which_phases_a_run_would_reuse_or_train_and_why(prefect_server, tmp_path):
    fast = ["--set", "pretrain.epochs=2", "--set", "head.epochs=2", "--set", "finetune.epochs=2"]
    before = twostage("run", "-c", str(QUICKSTART), *fast, "--dry-run", cwd=tmp_path)
    assert before.returncode == 0, before.stderr[-3000:]
    assert re.search(r"^  pretrain +train +no result is stored under its key", before.stdout, re.M), before.stdout
    assert re.search(r"^  head +train +its input, pretrain, is trained in this run", before.stdout, re.M)
    assert not (tmp_path / "outputs" / "results").exists()  # nothing trained, nothing stored

    assert twostage("run", "-c", str(QUICKSTART), *fast, cwd=tmp_path).returncode == 0
    after = twostage("run", "-c", str(QUICKSTART), *fast, "--set", "finetune.epochs=3", "--dry-run", cwd=tmp_path)
    assert after.returncode == 0, after.stderr[-3000:]
    assert re.search(r"^  pretrain +reuse +MLflow run [0-9a-f]{32} trained it", after.stdout, re.M), after.stdout
    assert re.search(r"^  head +reuse +MLflow run", after.stdout, re.M)
    assert re.search(r"^  finetune +train +no result is stored under its key", after.stdout, re.M)
    rerun = twostage("run", "-c", str(QUICKSTART), *fast, "--dry-run", "--rerun", "head", cwd=tmp_path)
    assert re.search(r"^  head +train +--rerun head", rerun.stdout, re.M), rerun.stdout


def test_a_run_killed_in_any_phase_resumes_when_the_same_command_runs_again(prefect_server, tmp_path):
    """Kill in pretrain, re-run; kill that run in head, re-run; kill it in finetune, re-run: it completes,
    reusing finished phases, resuming the killed ones after their last epoch, with the uninterrupted result."""
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()  # the session's test server: saves each process starting its own
    overrides = [f"{phase}.{key}" for phase in ("pretrain", "head", "finetune") for key in ("epochs=20", "batch_size=16")]
    overrides.append("checkpoint_every_s=0")  # an epoch state after every epoch: killed after epoch 3, resumed there
    with isolated_workdir(tmp_path / "reference"):
        reference = two_stage(load_config(QUICKSTART, overrides))
    workdir = tmp_path / "killed"
    workdir.mkdir()
    args = ["run", "-c", str(QUICKSTART), *(f"--set={override}" for override in overrides)]

    def run_and_kill(phase: str) -> str:
        process = subprocess.Popen(
            [str(TWOSTAGE), *args], cwd=workdir, env=environment(workdir, api_url), text=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        seen = []
        for line in process.stderr:
            seen.append(line)
            if f"{phase} epoch 3/20" in line or f"{phase} epoch 4/20" in line:
                break
        os.killpg(process.pid, signal.SIGKILL)  # the whole process group, as a crash would
        process.wait()
        return "".join(seen)

    resumed_after = {}
    previous = None
    for phase in ("pretrain", "head", "finetune", None):
        if phase is None:
            result = twostage(*args, cwd=workdir, api_url=api_url)
            assert result.returncode == 0, result.stderr[-3000:]
            output = result.stderr
        else:
            output = run_and_kill(phase)
        if previous:
            match = re.search(rf"{previous}: resuming after epoch (\d+)/20", output)
            assert match, output[-3000:]
            resumed_after[previous] = int(match.group(1))
            assert resumed_after[previous] >= 3
            assert f"{previous} epoch 1/20" not in output
            assert f"{previous} epoch {resumed_after[previous] + 1}/20" in output
            for earlier in ("pretrain", "head")[: ("pretrain", "head", "finetune").index(previous)]:
                assert f"{earlier}: reused the completed phase" in output
        previous = phase or previous

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert "RUNNING" not in {run.info.status for run in runs}  # no phantom running runs
    parents = sorted((r for r in runs if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    assert [parent.info.status for parent in parents] == ["KILLED", "KILLED", "KILLED", "FINISHED"]
    final = parents[-1]
    for phase in ("pretrain", "head", "finetune"):
        phase_runs = [run for run in runs if run.data.tags.get("twostage.phase") == phase]
        assert len(phase_runs) == 1, phase  # the killed attempt's child run continued; no second one
        child = phase_runs[0]
        assert child.info.status == "FINISHED"
        assert child.data.tags["twostage.resumed_from_epoch"] == str(resumed_after[phase])
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss/train")] == list(range(1, 21))
        if phase != "finetune":
            assert final.data.tags[f"twostage.reused.{phase}"] == child.info.run_id
    for name, value in reference.metrics.items():
        assert final.data.metrics[name] == pytest.approx(value, abs=1e-6), name
