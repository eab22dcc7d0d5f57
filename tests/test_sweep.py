"""`twostage sweep`: which points a sweep has, that every one is validated before any runs, and a sweep run here
(no Prefect server: one point after another) with its comparison. The same sweep on two workers: test_stack.py."""

from __future__ import annotations

import re

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_cli import assert_one_line_error, twostage

from configs.errors import UserError
from configs.sweeps import build_sweep, parse_grid
from conftest import REPO, tiny_config

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def test_a_grid_sweeps_every_combination_in_the_order_given_and_the_same_grid_has_the_same_id():
    sweep = build_sweep(QUICKSTART, ["finetune.epochs=3"], ["data.label_fraction=0.1,0.5", "seed=0,1,2"])
    assert sweep.keys == ["data.label_fraction", "seed"] and sweep.experiment == "quickstart"
    assert [point.label for point in sweep.points[:4]] == [
        "data.label_fraction=0.1 seed=0", "data.label_fraction=0.1 seed=1", "data.label_fraction=0.1 seed=2",
        "data.label_fraction=0.5 seed=0"]
    assert {point.config.finetune.epochs for point in sweep.points} == {3}
    assert [(p.config.data.label_fraction, p.config.seed) for p in sweep.points][-1] == (0.5, 2)
    reordered = build_sweep(QUICKSTART, ["finetune.epochs=3"], ["seed=0,1,2", "data.label_fraction=0.1,0.5"])
    assert reordered.id == sweep.id  # the same points
    assert build_sweep(QUICKSTART, ["finetune.epochs=4"], ["data.label_fraction=0.1,0.5", "seed=0,1,2"]).id != sweep.id


def test_grid_values_are_yaml_and_commas_inside_brackets_belong_to_the_value():
    assert parse_grid("model.encoder_widths=[64,32],[128, 64]") == ("model.encoder_widths", [[64, 32], [128, 64]])
    assert parse_grid("pretrain.objective=denoising,contrastive") == ("pretrain.objective", ["denoising", "contrastive"])
    with pytest.raises(UserError, match="expected KEY=V1,V2"):
        parse_grid("seed")
    with pytest.raises(UserError, match="an empty value"):
        parse_grid("seed=0,,1")


def test_a_sweep_file_crosses_each_override_set_with_the_grid_and_sets_its_common_values(tmp_path):
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "points": [{"pretrain.objective": "denoising"}, {"pretrain.objective": "autoencoder", "pretrain.epochs": 5}],
        "grid": {"seed": [0, 1]},
        "set": {"head.epochs": 7},
    }, sort_keys=False))
    sweep = build_sweep(QUICKSTART, [], [], str(tmp_path / "sweep.yaml"))
    assert sweep.keys == ["pretrain.objective", "pretrain.epochs", "seed"]
    assert [point.label for point in sweep.points] == [
        "pretrain.objective=denoising seed=0", "pretrain.objective=denoising seed=1",
        "pretrain.objective=autoencoder pretrain.epochs=5 seed=0", "pretrain.objective=autoencoder pretrain.epochs=5 seed=1"]
    assert {point.config.head.epochs for point in sweep.points} == {7}


@pytest.mark.parametrize("grids, sweep_file, message", [
    (["seed=0,1", "data.label_fraction=0.5,2"], None,
     "sweep point 2 (seed=0 data.label_fraction=2): invalid value for 'data.label_fraction'"),
    (["finetune.epoch=1,2"], None, "sweep point 1 (finetune.epoch=1): unknown key 'finetune.epoch'"),
    (["name=a,b"], None, "name can't be swept"),
    (["seed=0,0"], None, "are the same config"),
    (["seed=0", "seed=1"], None, "seed is swept twice"),
    ([], None, "a sweep needs points"),
    ([], {"grid": {"seed": [0]}, "point": [{"seed": 1}]}, "unknown key 'point'"),
    ([], {"grid": {"seed": 0}}, "grid: must map each key to a non-empty list"),
])
def test_a_bad_point_anywhere_is_one_line_naming_it(tmp_path, grids, sweep_file, message):
    path = None
    if sweep_file is not None:
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(sweep_file))
    with pytest.raises(UserError, match=re.escape(message)):
        build_sweep(QUICKSTART, [], grids, path)


def test_a_point_is_the_same_point_wherever_its_phases_are_stored_and_takes_the_workers_storage(monkeypatch):
    from flows.sweep import _as_parameter

    monkeypatch.setenv("TWOSTAGE_STORAGE", "s3://team/phases")  # a worker's
    on_worker = build_sweep(str(REPO / "configs" / "quickstart.yaml"), [], ["seed=0,1"])
    monkeypatch.delenv("TWOSTAGE_STORAGE")  # a client's: the default, outputs
    on_client = build_sweep(str(REPO / "configs" / "quickstart.yaml"), [], ["seed=0,1"])
    assert on_client.points[0].config.storage == "outputs" and on_worker.points[0].config.storage == "s3://team/phases"
    assert [p.run_name for p in on_client.points] == [p.run_name for p in on_worker.points]
    assert on_client.points[0].run_name != on_client.points[1].run_name  # the seed is part of it
    assert "storage" not in _as_parameter(on_client.points[0].config)  # the worker fills in its own
    chosen = build_sweep(str(REPO / "configs" / "quickstart.yaml"), ["storage=s3://mine/phases"], ["seed=0,1"])
    assert _as_parameter(chosen.points[0].config)["storage"] == "s3://mine/phases"  # one the user set travels


@pytest.mark.cli
def test_a_bad_point_exits_2_before_anything_runs(tmp_path):
    result = twostage("sweep", "-c", QUICKSTART, "--grid", "seed=0,1", "--grid", "data.val_fraction=0.1,3", cwd=tmp_path)
    assert_one_line_error(result, "sweep point 2 (seed=0 data.val_fraction=3)", "invalid value for 'data.val_fraction'")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.cli
def test_without_a_prefect_server_the_points_run_here_pretraining_once_per_seed_then_the_comparison(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config(name="local-sweep")))
    args = ["sweep", "-c", "config.yaml", "--grid", "data.label_fraction=0.5,1.0", "--grid", "seed=0,1"]
    result = twostage(*args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_id = re.search(r"^sweep (\w+): 4 points of local-sweep over data.label_fraction, seed; 0 completed before, "
                         r"4 to run here, one after another$", result.stdout, flags=re.M).group(1)
    assert re.search(rf"^sweep {sweep_id}: 4/4 done, 0 running, 0 failed, 0 waiting; best test/acc", result.stdout,
                     flags=re.M)
    table = result.stdout.split("4 of 4 points completed\n")[1]
    header, *rows = table.split("\n\n")[0].splitlines()
    assert header.split() == ["data.label_fraction", "seeds", "test/acc", "test/loss", "test/f1_macro", "seconds"]
    assert [row.split()[:2] for row in rows] == [["1.0", "2"], ["0.5", "2"]] and all("±" in row for row in rows)
    assert "mean ± std over seeds 0, 1" in table and (tmp_path / "sweeps" / sweep_id / "compare.png").stat().st_size
    assert table.count("of local-sweep") == 4  # each point's registry decision
    assert result.stderr.count("pretrain: reused the completed phase") == 2  # at the second share, per seed

    tracking = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracking.get_experiment_by_name("local-sweep").experiment_id
    (sweep_run,) = tracking.search_runs([experiment], "tags.`twostage.sweep` = 'true'")
    assert sweep_run.info.status == "FINISHED" and sweep_run.data.params["sweep.seed"] == "0,1"
    parents = tracking.search_runs([experiment], f"tags.`twostage.sweep_id` = '{sweep_id}' and "
                                                 "tags.`twostage.config_hash` LIKE '%'")
    assert len(parents) == 4 and {run.data.tags["mlflow.parentRunId"] for run in parents} == {sweep_run.info.run_id}

    again = twostage(*args, cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and "4 completed before, 0 to run" in again.stdout
    assert len(tracking.search_runs([experiment], f"tags.`twostage.sweep_id` = '{sweep_id}'")) == 1 + 4  # no new run


def test_a_key_with_the_same_value_in_every_point_is_not_a_swept_column(tmp_path):
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "points": [{"model.encoder_widths": [64, 32], "pretrain.objective": "denoising"},
                   {"model.encoder_widths": [64, 32], "pretrain.objective": "autoencoder", "pretrain.epochs": 5}],
        "grid": {"seed": [0, 1]},
    }, sort_keys=False))
    sweep = build_sweep(QUICKSTART, [], [], str(tmp_path / "sweep.yaml"))
    assert sweep.keys == ["pretrain.objective", "pretrain.epochs", "seed"]
    assert sweep.points[0].label == "pretrain.objective=denoising seed=0"
    assert {tuple(point.config.model.encoder_widths) for point in sweep.points} == {(64, 32)}
