"""`twostage run` as a user types it, in a subprocess: exit codes, one-line errors, progress and the summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO

TWOSTAGE = Path(sys.executable).parent / "twostage"
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def twostage(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(cwd / "prefect-home")}
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store: sqlite:///mlflow.db in the working directory
    env.pop("PREFECT_API_URL", None)  # Prefect's ephemeral server, as on a fresh machine
    return subprocess.run([str(TWOSTAGE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


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
    (["--set", "device=cuda"] if not __import__("torch").cuda.is_available() else ["--set", "device=tpu"], ["device"]),
])
def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path, args, fragments):
    result = twostage("run", *(["-c", str(QUICKSTART)] if "-c" not in args else []), *args, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert result.stderr.count("\n") == 1


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
        assert f"{phase} epoch 2/2 train/loss" in result.stderr
    assert "val/acc" in result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-3].startswith("quickstart: test/acc ")
    run_id = lines[-2].split()[2]
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in lines[-1]
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
