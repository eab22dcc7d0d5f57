"""The benchmark scripts run end to end on tiny data (their figures are for people, not assertions)."""

from __future__ import annotations

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
