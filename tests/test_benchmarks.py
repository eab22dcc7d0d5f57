"""The benchmark scripts run end to end on tiny data (their figures are for people, not assertions)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

from configs.loader import load_config
from conftest import REPO, tiny_mnist

pytestmark = pytest.mark.benchmark


def test_speed_benchmark_prints_each_phase_with_its_ratios(tmp_path):
    tiny_mnist(tmp_path / "idx", train=300, test=50)
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "speed.py"), "--limit", "300", "--data", str(tmp_path / "idx")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "300 training images per epoch" in result.stdout
    assert re.search(r"^CPU .+: avx2[+-] avx512_f[+-] avx512_bf16[+-] amx_bf16[+-]; torch kernels \w+", result.stdout, re.M)
    assert re.search(r"^\(c\) = configs/fashion_mnist.yaml: amp auto: (bf16 autocast|float32)", result.stdout, re.M)
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
         "--set", "pretrain.epochs=2", "--set", "head.epochs=2", "--set", "finetune.epochs=2", "--later", "2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {label.strip(): (float(first), float(later)) for label, first, later
            in re.findall(r"^(.+?)\s+([0-9.]+) s\s+([0-9.]+) s", result.stdout, re.M)}
    assert {"flow run, wall", "compute: training epochs", "Prefect: a flow run of five empty tasks",
            "of it, its client's retry sleeps"} <= set(rows)
    for label, (first, later) in rows.items():
        if label == "of it, its client's retry sleeps":  # none, unless the server's sqlite was busy
            assert first >= 0 and later >= 0, result.stdout
        else:
            assert first > 0 and later > 0, (label, result.stdout)
    assert rows["compute: training epochs"][1] < rows["flow run, wall"][1]
    assert re.search(r"^our overhead per pipeline run [0-9.]+ s: (within|OVER) the 2 s target", result.stdout, re.M)
    assert not (tmp_path / "mlflow.db").exists()  # it measured in folders of its own


def test_results_benchmark_writes_the_tables_and_the_low_label_plot(tmp_path):
    tiny_mnist(tmp_path / "idx", train=200, test=50)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "PREFECT_HOME": str(tmp_path / "prefect-home")}  # its phase results stay out of ~/.prefect
    env.pop("PREFECT_API_URL", None)  # the study's sweep runs here, one point after another, as without a server
    quick = [f"{phase}.epochs=1" for phase in ("pretrain", "head", "finetune")]
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "results.py"), "--seeds", "0", "--fractions", "0.1", "1.0",
         "--out", str(tmp_path / "out"), "--transfer-images", "64", "--transfer-rounds", "1",
         *(f"--set={item}" for item in [*quick, f"data.mirror={tmp_path / 'idx'}"])],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "out" / "RESULTS.md").read_text()
    for row in ("reference tutorial as written", "plain supervised", "tuned MLP", "CNN encoder"):
        assert re.search(rf"^\| {row}[^|]*\| [01]\.\d{{4}} ± 0\.0000 \| \d+\.\d \| `twostage run -c configs/", text, re.M), row
    assert "--set pretrain.epochs=0 --set finetune.epochs=0" in text  # the tutorial: no stage 1, no finetuning
    study = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    for method in ("two-stage, denoising", "probe only, contrastive", "from scratch", "logistic regression on pixels"):
        assert re.search(r"(\| [01]\.\d{4} ± 0\.0000 ){2}\|$", study[method]), study[method]
    assert ("label_fraction=0.1 --set 'model.encoder_widths=[2048,512]' --set pretrain.objective=denoising "
            "--set pretrain.mask_fraction=0.5 --set pretrain.epochs=60 --set head.epochs=10 --set head.batch_size=256 --set finetune.epochs=10 "
            "--set finetune.batch_size=256 --set finetune.optimizer.lr=0.002`") in text
    assert "--set head.epochs=10 --set head.batch_size=256 --set finetune.epochs=0`" in text  # probe only: 10x the head's epochs
    assert re.search(r"The study ran as one `twostage sweep` \(sweep \w+, 14 points\) in \d+ min on 1 process, one "
                     "point after another", text)  # 7 methods at 2 shares, 1 seed
    assert (tmp_path / "out" / "low_label.png").stat().st_size > 10_000
    for size in (32, 64):
        for encoder in ("cnn", "resnet18", "mobilenet_v3_small"):
            assert re.search(rf"^\| {size}×{size} \| {encoder} \| \d+\.\d\d M \| \d+\.\d\d \| \d+\.\d{{3}} \| \d+\.\d \|$",
                             text, re.M), (size, encoder)
    assert "| 32×32 | resnet18 | 11.18 M |" in text and "on 64 images of" in text
    saved = json.loads((tmp_path / "out" / "results.json").read_text())  # what `--parts` keeps between runs
    assert set(saved) == {"main", "study", "transfer"} and saved["main"]["made"]["sizes"]["train"] == 180


def test_low_label_study_trains_about_as_many_steps_at_every_share_of_the_labels():
    sys.path.insert(0, str(REPO / "benchmarks"))  # as when the script runs: it imports prefect_retries beside it
    spec = importlib.util.spec_from_file_location("results", REPO / "benchmarks" / "results.py")
    results = importlib.util.module_from_spec(spec)
    sys.modules["results"] = results  # dataclasses look their module up there
    spec.loader.exec_module(results)
    base = load_config(REPO / results.MLP, results.STUDY_BASE)
    train = 54_000

    def finetune_steps(fraction: float) -> int:
        head, finetune = results.study_budget(base, fraction)
        config = load_config(REPO / results.MLP, [*head, *finetune])
        assert config.head.batch_size == config.finetune.batch_size >= results.STUDY_MIN_BATCH
        return config.finetune.epochs * math.ceil(round(train * fraction) / config.finetune.batch_size)

    with_all_labels = finetune_steps(1.0)
    for fraction in (0.1, 0.01):  # 3 steps an epoch at 1% and batch 256: the study once gave it 1/7 of the steps
        assert 0.75 * with_all_labels <= finetune_steps(fraction) <= 1.25 * with_all_labels, fraction


def test_retry_sleeps_counts_the_sleeps_prefects_client_logs_and_restores_its_logger():
    sys.path.insert(0, str(REPO / "benchmarks"))  # as when a benchmark script runs
    from prefect.client.base import logger  # the logger Prefect's client announces each retry on
    from prefect_retries import retry_sleeps

    before = (logger.level, logger.propagate, list(logger.handlers))
    with retry_sleeps() as sleeps:  # the message as prefect/client/base.py writes it
        logger.debug("Received response with retryable status code 503. Another attempt will be made in "
                     "1.9576984344907802s. This is attempt 1/6.")
        logger.debug("something else")
    assert sleeps == [1.9576984344907802]
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
