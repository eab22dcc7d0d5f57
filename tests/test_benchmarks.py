"""The benchmark scripts run end to end on tiny data (their figures are for people, not assertions)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO, tiny_mnist


def test_speed_benchmark_prints_each_phase_with_its_ratios(tmp_path):
    tiny_mnist(tmp_path / "idx", train=300, test=50)
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "speed.py"), "--limit", "300", "--batch-size", "64",
         "--data", str(tmp_path / "idx")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "300 training images per epoch" in result.stdout
    number = r"\s+([0-9.]+)s?"
    for phase in ("pretrain", "head", "finetune"):
        row = re.search(rf"^{phase}" + number * 7 + "$", result.stdout, re.MULTILINE)
        assert row, result.stdout
        seconds_and_ratios = list(map(float, row.groups()))  # a, b, c, d, a/b, a/c, c/d
        assert min(seconds_and_ratios) > 0


def test_overhead_benchmark_splits_a_flow_run_into_compute_ours_and_prefect(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the session's test server
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "overhead.py"),
         "--set", "pretrain.epochs=2", "--set", "head.epochs=2", "--set", "finetune.epochs=2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {label.strip(): (float(first), float(later)) for label, first, later
            in re.findall(r"^(.+?)\s+([0-9.]+) s\s+([0-9.]+) s", result.stdout, re.M)}
    assert {"flow run, wall", "compute: training epochs", "Prefect: a flow run of five empty tasks"} <= set(rows)
    for label, (first, later) in rows.items():
        assert first > 0 and later > 0, (label, result.stdout)
    assert rows["compute: training epochs"][1] < rows["flow run, wall"][1]
    assert re.search(r"^our overhead per pipeline run [0-9.]+ s: (within|OVER) the 2 s target", result.stdout, re.M)
    assert not (tmp_path / "mlflow.db").exists()  # it measured in folders of its own
