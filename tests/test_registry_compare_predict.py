"""Runs made for comparison, the model registry's champion, `twostage compare` and `twostage predict`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from configs.loader import load_config
from conftest import REPO, isolated_workdir
from flows.compare import compare
from flows.predict import predict
from flows.two_stage import two_stage

QUICKSTART = REPO / "configs" / "quickstart.yaml"
PHASES = ("data", "pretrain", "head", "finetune", "evaluate")


@pytest.fixture(scope="module")
def two_runs(prefect_server, tmp_path_factory):
    """The quickstart with seeds 0 and 1, in that order, in one MLflow store."""
    with isolated_workdir(tmp_path_factory.mktemp("registry")) as workdir:
        reports = [two_stage(load_config(QUICKSTART, [f"seed={seed}"])) for seed in (0, 1)]
        yield {"reports": reports, "client": MlflowClient(), "workdir": workdir}


def test_the_registry_champion_is_the_better_run_and_the_other_is_challenger_or_previous_champion(two_runs):
    client, (first, second) = two_runs["client"], two_runs["reports"]
    champion = client.get_model_version_by_alias("quickstart", "champion")
    assert float(champion.tags["test/acc"]) == max(first.metrics["test/acc"], second.metrics["test/acc"])
    other = second if str(champion.version) == first.model_version else first
    aliases = client.get_model_version("quickstart", other.model_version).aliases
    assert aliases == (["previous-champion"] if other is first else ["challenger"])
    assert champion.tags["twostage.pipeline_run_id"] in {first.pipeline_run_id, second.pipeline_run_id}
    assert f"{first.metrics['test/acc']:.4f}" in second.promotion and f"{second.metrics['test/acc']:.4f}" in second.promotion
    assert client.get_run(second.pipeline_run_id).data.tags["twostage.registry_decision"] == second.promotion


def test_two_runs_that_differ_in_seed_differ_in_exactly_that_param(two_runs):
    client, (first, second) = two_runs["client"], two_runs["reports"]
    params = [client.get_run(report.pipeline_run_id).data.params for report in (first, second)]
    assert {key for key in params[0] if params[0][key] != params[1].get(key)} == {"seed"}
    fingerprints = {client.get_run(r.pipeline_run_id).data.tags["twostage.data_fingerprint"] for r in (first, second)}
    assert len(fingerprints) == 1  # the seed changes the training, not the splits: one test set for both


def test_the_parent_run_carries_phase_results_times_and_parameter_counts(two_runs):
    client, report = two_runs["client"], two_runs["reports"][0]
    parent = client.get_run(report.pipeline_run_id)
    metrics = parent.data.metrics
    assert {"test/acc", "test/loss", "test/f1_macro", "pretrain/recon_loss", "head/best_val_acc",
            "finetune/best_val_acc", "time/total_s"} <= set(metrics)
    assert all(metrics[f"time/{phase}_s"] > 0 for phase in PHASES)
    assert metrics["time/total_s"] >= sum(metrics[f"time/{phase}_s"] for phase in PHASES)
    counts = {key: int(value) for key, value in parent.data.params.items() if key.startswith("parameters/")}
    assert counts["parameters/head_frozen"] > 0 and counts["parameters/head_trainable"] > 0  # params, not metrics
    assert counts["parameters/finetune_trainable"] == counts["parameters/head_trainable"] + \
        counts["parameters/head_frozen"] - counts["parameters/finetune_frozen"]
    assert not any(name.startswith(("params/", "parameters/")) for name in metrics)
    assert parent.info.run_name == f"quickstart-{parent.data.tags['twostage.config_hash'][:7]}"


def test_the_data_sets_are_logged_as_dataset_inputs_with_the_data_fingerprint(two_runs):
    client, report = two_runs["client"], two_runs["reports"][0]
    parent = client.get_run(report.pipeline_run_id)
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in parent.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test"}
    fingerprint = parent.data.tags["twostage.data_fingerprint"]
    assert all(dataset.digest == fingerprint[:36] and dataset.name == f"digits-{split}" for split, dataset in inputs.items())
    assert '"num_rows": 359' in inputs["test"].profile


def test_plots_for_people_are_logged(two_runs):
    client, report = two_runs["client"], two_runs["reports"][0]
    parent = report.pipeline_run_id
    children = {run.data.tags["twostage.phase"]: run.info.run_id for run in client.search_runs(
        [report.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")}

    def files(run_id):
        return {item.path for item in client.list_artifacts(run_id)}

    assert "loss_curves.png" in files(parent)
    assert {"reconstructions.png", "features_pca.png"} <= files(children["pretrain"])
    assert {"confusion_matrix.png", "per_class_f1.png", "features_pca.png"} <= files(children["evaluate"])


def test_compare_lists_both_runs_with_seed_marks_the_champion_and_writes_the_figure(two_runs, tmp_path):
    client, reports = two_runs["client"], two_runs["reports"]
    table = compare("quickstart", "test/acc", None, tmp_path)
    header, *rows = table.splitlines()[:3]
    assert header.split()[:3] == ["run", "started", "seed"]
    names = {client.get_run(r.pipeline_run_id).info.run_name for r in reports}
    assert {row.split()[0] for row in rows} == names
    champion_run = client.get_model_version_by_alias("quickstart", "champion").tags["twostage.pipeline_run_id"]
    starred = [row.split()[0] for row in rows if row.rstrip().endswith("*")]
    assert starred == [client.get_run(champion_run).info.run_name]
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    assert table.splitlines()[-1].startswith("sorted by test/acc (higher is better)")


@pytest.mark.cli
def test_compare_with_no_runs_says_so_in_one_line_and_exits_0(tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "twostage"), "compare", "-e", "nothing-here"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0
    assert result.stdout.strip().startswith("no finished pipeline runs in experiment 'nothing-here'")
    assert result.stdout.count("\n") == 1


def test_predict_classifies_test_images_with_the_champion_and_names_a_bad_file(two_runs, tmp_path, capsys):
    client = two_runs["client"]
    champion = client.get_model_version_by_alias("quickstart", "champion")
    prepared = torch.load(next((two_runs["workdir"] / "data" / "prepared").glob("digits-*.pt")), weights_only=True)
    images, labels = prepared["test_images"][:60], prepared["test_labels"][:60]  # raw uint8 (N, 1, 8, 8)
    paths = []
    for index, image in enumerate(images):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(image[0].numpy()).save(paths[-1])
    bad = tmp_path / "missing.png"
    code = predict("models:/quickstart@champion", [str(p) for p in paths[:30]] + [str(bad)] + [str(p) for p in paths[30:]])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.strip() == f"twostage: error: {bad}: not a readable image (No such file or directory); fix: remove or replace it"
    predicted = {line.split(": ")[0]: line.split(": ")[1].split(" (")[0] for line in out.strip().splitlines()}
    assert len(predicted) == 60
    correct = sum(predicted[str(path)] == str(int(label)) for path, label in zip(paths, labels))
    assert correct / 60 >= float(champion.tags["test/acc"]) - 0.05
    assert all("(probability " in line for line in out.strip().splitlines())


def test_predict_refuses_a_decompression_bomb_and_still_classifies_the_other_images(two_runs, tmp_path, capsys):
    Image.new("L", (13_500, 13_500)).save(tmp_path / "huge.png")
    Image.fromarray((torch.rand(8, 8) * 255).to(torch.uint8).numpy()).save(tmp_path / "ok.png")
    code = predict("models:/quickstart@champion", [str(tmp_path / "huge.png"), str(tmp_path / "ok.png")])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.strip().startswith(f"twostage: error: {tmp_path / 'huge.png'}: refused, a decompression bomb")
    assert out.strip().startswith(f"{tmp_path / 'ok.png'}: ") and "(probability " in out
