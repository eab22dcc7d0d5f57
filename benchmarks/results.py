"""Test accuracy on real Fashion-MNIST, over seeds, each row with the command that reproduces it.

Writes results.json, RESULTS.md and low_label.png (default: into benchmarks/). Every row but logistic regression is a
pipeline run: the flow that `twostage run -c CONFIG --set ...` runs, called here in one process so that
Prefect's server starts once. Runs are logged to the usual MLflow store (sqlite:///mlflow.db here unless
MLFLOW_TRACKING_URI says otherwise), one experiment per row, to browse or `twostage compare` later.

  main rows   the reference tutorial as written (stage 1 learns nothing: a random frozen encoder and a
              head), plain supervised training of its MLP, its settings with our real pretraining, the
              tuned MLP config and the CNN config. Timed rows retrain every phase (`--rerun pretrain`);
              the time is the flow run's wall time, the process already warm (server up, imports done),
              each run started SETTLE_S after the last, less Prefect's retry sleeps (prefect_retries.py).
  low-label   at each label fraction: two-stage (pretrain, head, finetune) and probe only (finetune 0)
              for each stage-1 objective (its settings: OBJECTIVES), from scratch (no stage 1 or 2, all
              at the finetune lr), and logistic regression on pixels. The supervised phases get
              study_budget(): about as many optimizer steps as with all labels, the same for every method.

  transfer    seconds per finetuning epoch of torchvision backbones against the `cnn` encoder at image sizes 32
              and 64 (transfer.py, on --transfer-images Fashion-MNIST images).

`--parts main`, `study` or `transfer` measures those parts and keeps the others' rows from results.json.

Usage: python benchmarks/results.py [--parts main study transfer] [--seeds 0 1 2] [--fractions 0.01 0.1 1.0]
                                    [--transfer-images 2048] [--transfer-rounds 3] [--set KEY=VALUE ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from prefect_retries import SETTLE_S, time_flow_run  # noqa: E402 - beside this script

from flows.prefect_defaults import set_prefect_defaults  # noqa: E402

set_prefect_defaults()

import torch  # noqa: E402
import yaml  # noqa: E402

from configs.loader import load_config  # noqa: E402
from configs.schema import PipelineConfig  # noqa: E402

MLP = "configs/fashion_mnist.yaml"
REFERENCE = "configs/mnist.yaml"
FASHION = ["data.dataset=fashion_mnist"]
MAIN_ROWS = [  # key, what it is, config, overrides
    ("tutorial", "reference tutorial as written: random frozen encoder + head, 5 epochs, batch 32",
     REFERENCE, [*FASHION, "pretrain.epochs=0", "finetune.epochs=0"]),
    ("supervised", "plain supervised training of the same MLP, 5 epochs, batch 32",
     REFERENCE, [*FASHION, "pretrain.epochs=0", "head.epochs=0"]),
    ("reference", "reference settings with our real pretraining: 5+5+5 epochs, batch 32",
     REFERENCE, FASHION),
    ("tuned", "tuned MLP (configs/fashion_mnist.yaml)", MLP, []),
    ("cnn", "CNN encoder (configs/fashion_mnist_cnn.yaml)", "configs/fashion_mnist_cnn.yaml", []),
]
# The low-label study's encoder, wider than the tuned config's [256, 128]: stage 1 gains more from width than
# training from scratch does. At 1% of the labels (seed 0), denoising pretraining beat scratch by 0.9 points with
# [256, 128] (5 epochs), 1.8 with [1024, 256] (20) and 2.3 with [2048, 512] (20); scratch got 0.778-0.779 at each.
STUDY_MODEL = ["model.encoder_widths=[2048,512]"]
# The low-label study's finetuning with all labels (2,954 steps). Fixed here, not taken from the tuned config,
# whose batch-512 finetuning is tuned for speed with all labels: the study's budget should not move with it.
# 14 epochs rather than 7: at 1% of the labels (10x the epochs) 140 gained 0.6 points over 70 after denoising
# pretraining of the wide encoder, and none from scratch (seed 0).
STUDY_BASE = ["finetune.epochs=14", "finetune.batch_size=256", "finetune.optimizer.lr=0.002"]
STUDY_MIN_BATCH = 32  # the low-label study's smallest batch: 16 did no better at 1% of the labels (seed 0)
# Stage-1 settings of the low-label study (figures at 1% of the labels, seed 0 unless said). Denoising trains
# until its gains stopped; the autoencoder and contrastive epochs are capped by this 2-core machine's time
# (a wide-encoder epoch costs about 8 s of denoising).
OBJECTIVES = {
    "autoencoder": ["pretrain.objective=autoencoder", "pretrain.epochs=5"],
    "denoising": [  # masking 50% of the pixels: +0.8 points over noise alone, 70-75% no better; the wide encoder's
        # features gained 1.2 points as a linear probe from 20 to 60 epochs (0.781, 0.793), and 100 epochs gained
        # nothing after finetuning (0.8076 over 3 seeds, as after 60); at 20 epochs, augmenting its input lost 0.7
        # points of probe and a cosine lr schedule 0.6
        "pretrain.objective=denoising", "pretrain.mask_fraction=0.5", "pretrain.epochs=60",
    ],
    "contrastive": [  # [256, 128] after 5, 20, 60 epochs: 0.787, 0.794, 0.798 after finetuning; 10 here, for time
        "pretrain.objective=contrastive", "pretrain.augment.translate_fraction=0.2", "pretrain.augment.scale_delta=0.4",
        "pretrain.augment.rotation_deg=15", "pretrain.augment.hflip=true", "pretrain.augment.noise_std=0.1",
        "pretrain.batch_size=512", "pretrain.temperature=0.2", "pretrain.epochs=10",
    ],
}
PUBLISHED = [  # zalandoresearch/fashion-mnist benchmark rows, for scale
    ("scikit-learn MLPClassifier (published benchmark)", "≈ 0.877"),
    ("small 2-conv networks (published benchmark)", "0.91–0.93"),
]


@dataclass
class Row:
    label: str
    command: str
    accuracies: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    made: dict | None = None  # when and how a main row was measured

    def accuracy(self) -> str:
        return f"{statistics.mean(self.accuracies):.4f} ± {spread(self.accuracies):.4f}"


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["main", "study", "transfer"],
                        default=["main", "study", "transfer"],
                        help="measure these; the other parts' rows come from the last results.json")
    parser.add_argument("--rows", nargs="+", choices=[key for key, *_ in MAIN_ROWS], metavar="ROW",
                        help="with main: measure only these rows (tutorial, supervised, reference, tuned, cnn)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--transfer-images", type=int, default=2048)
    parser.add_argument("--transfer-rounds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="applied to every pipeline row, e.g. data.mirror=DIR")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args(argv)

    from flows.two_stage import run_here
    from models.device import resolve_device
    from tasks.data import prepare

    def pipeline(config_path: str, overrides: list[str], seed: int, timed: bool) -> tuple[float, float]:
        """(test accuracy, seconds): a timed run's wall time, less Prefect's client retry sleeps if any."""
        config = load_config(REPO / config_path, [*overrides, f"seed={seed}", *args.overrides])
        report, seconds, retries_s = time_flow_run(lambda: run_here(config, rerun="pretrain" if timed else None),
                                                   settle=timed)
        seconds -= retries_s
        retried = f" (less {retries_s:.1f} s of Prefect's retry sleeps)" if retries_s else ""
        print(f"  {command(config_path, overrides)} --set seed={seed}: test/acc {report.metrics['test/acc']:.4f}, "
              f"{seconds:.1f} s{retried}", flush=True)
        return report.metrics["test/acc"], seconds

    pipeline("configs/quickstart.yaml", ["name=results-warmup", "pretrain.epochs=1", "head.epochs=1",
                                         "finetune.epochs=1"], 0, timed=False)  # lazy imports, first flow run
    base = load_config(REPO / MLP, args.overrides)
    made = {
        "command": " ".join(["python benchmarks/results.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": str(datetime.date.today()), "machine": machine(resolve_device(base.device)),
        "torch": torch.__version__, "sizes": prepare(base.data).sizes, "seeds": args.seeds,
    }
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}

    if "main" in args.parts:
        kept = results.get("main", {}).get("rows", {}) if args.rows else {}
        rows = {}
        for key, label, config_path, overrides in MAIN_ROWS:
            if key in kept and key not in args.rows:
                rows[key] = kept[key]
                continue
            overrides = [f"name=results-{key}", *overrides]
            row = Row(label, command(config_path, overrides), made=made)
            for seed in args.seeds:
                accuracy, seconds = pipeline(config_path, overrides, seed, timed=True)
                row.accuracies.append(accuracy)
                row.seconds.append(seconds)
            rows[key] = asdict(row)
        results["main"] = {"made": made, "rows": rows}

    if "study" in args.parts:
        rows, ran = study(args.fractions, args.seeds, args.overrides, base)
        results["study"] = {"made": {**made, "sweep": ran}, "rows": rows}

    if "transfer" in args.parts:
        from transfer import measure

        print("transfer: seconds per finetuning epoch", flush=True)
        results["transfer"] = {"made": made, **measure(args.transfer_images, args.transfer_rounds,
                                                       ["resnet18", "mobilenet_v3_small"],
                                                       say=lambda line: print(f"  {line}", flush=True))}

    args.out.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results, indent=1) + "\n")
    if "study" in results:
        plot_study(results["study"]["rows"], args.out / "low_label.png")
    (args.out / "RESULTS.md").write_text(report(results))
    print(f"wrote {results_file}, {args.out / 'RESULTS.md'} and {args.out / 'low_label.png'}")
    return 0


def study(fractions: list[float], seeds: list[int], overrides: list[str], base: PipelineConfig) -> tuple[list[dict], dict]:
    """The low-label study's rows, measured as one `twostage sweep`: each method at each share a point set, crossed
    with the seeds; on the work pool's workers when PREFECT_API_URL is set, else here, one point after another.
    Returns the rows, and the sweep's id, size, wall time and where it ran."""
    from prefect.settings import get_current_settings

    from configs.loader import parse_value
    from configs.sweeps import build_sweep
    from flows.sweep import DEFAULT_DEPLOYMENT, run_sweep
    from tasks import tracking

    study_base = load_config(REPO / MLP, [*STUDY_MODEL, *STUDY_BASE, *overrides])
    cells = []  # (fraction, method, overrides) of every row
    for fraction in fractions:
        head, finetune = study_budget(study_base, fraction)
        labels = [f"data.label_fraction={fraction}", *STUDY_MODEL]
        cells += [
            (fraction, f"{method}, {objective}", [*labels, *chosen, *epochs])
            for objective, chosen in OBJECTIVES.items()
            for method, epochs in (("two-stage", [*head, *finetune]), ("probe only", [*head, "finetune.epochs=0"]))
        ]
        cells.append((fraction, "from scratch",
                      [*labels, "pretrain.epochs=0", "head.epochs=0", *finetune, "finetune.encoder_lr_ratio=1.0"]))
    point_sets = [{key: parse_value(value, key) for key, _, value in (item.partition("=") for item in cell[2])}
                  for cell in cells]
    sweep_file = Path(tempfile.mkdtemp()) / "study.yaml"
    sweep_file.write_text(yaml.safe_dump({"points": point_sets, "grid": {"seed": seeds}}, sort_keys=False))
    sweep = build_sweep(str(REPO / MLP), ["name=low_label_study", *overrides], [], str(sweep_file))
    api_url = get_current_settings().api.url
    started = time.perf_counter()
    if run_sweep(sweep, api_url, DEFAULT_DEPLOYMENT, None, "test/acc", Path("sweeps")) != 0:
        sys.exit("the study's sweep did not complete: run the same command again to run only its failed points")
    seconds = time.perf_counter() - started
    runs = {run.tags["twostage.config_hash"]: run
            for run in reversed(tracking.pipeline_runs("low_label_study", sweep_id=sweep.id))}
    rows = []
    for index, (fraction, method, cell) in enumerate(cells):
        points = sweep.points[index * len(seeds):(index + 1) * len(seeds)]
        row = Row(method, command(MLP, ["name=low_label_study", *cell]))
        row.accuracies = [runs[point.config_hash].metrics["test/acc"] for point in points]
        rows.append({"fraction": fraction, **asdict(row)})
        if method == "from scratch":
            rows.append({"fraction": fraction, **asdict(logistic_regression(base, fraction))})
    where = f"{online_workers(api_url)} worker(s) of the work pool" if api_url else "1 process, one point after another"
    return rows, {"id": sweep.id, "points": len(sweep.points), "seconds": round(seconds, 1), "where": where}


def online_workers(api_url: str) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        pool = client.read_deployment_by_name("two-stage/sweep").work_pool_name
        return len([worker for worker in client.read_workers_for_work_pool(pool) if worker.status == "ONLINE"])


def study_budget(base: PipelineConfig, fraction: float) -> tuple[list[str], list[str]]:
    """Head and finetune settings for a share of the labels: about as many optimizer steps as with all of them.

    `base`'s epochs times min(1/fraction, 10); below 10% of the labels also a batch shrunk in proportion, no
    smaller than STUDY_MIN_BATCH (at 1% and batch 256: 32 images, 17 steps an epoch instead of 3).
    """
    scale = min(round(1 / fraction), 10)
    phases = []
    for name, phase in (("head", base.head), ("finetune", base.finetune)):
        batch = min(phase.batch_size, max(STUDY_MIN_BATCH, round(phase.batch_size * fraction * scale)))
        phases.append([f"{name}.epochs={phase.epochs * scale}", f"{name}.batch_size={batch}"])
    phases[1].append(f"finetune.optimizer.lr={base.finetune.optimizer.lr:g}")
    return phases[0], phases[1]


def command(config_path: str, overrides: list[str]) -> str:
    return " ".join(["twostage run -c", config_path, *(f"--set {shlex.quote(override)}" for override in overrides)])


def logistic_regression(base: PipelineConfig, fraction: float) -> Row:
    """scikit-learn's LogisticRegression on the normalised pixels of the same labeled subset."""
    from sklearn.linear_model import LogisticRegression

    from tasks.data import label_subset, load_splits, prepare

    bundle = prepare(base.data)
    splits = load_splits(bundle, "cpu")
    images, labels = splits.labeled(label_subset(bundle, fraction))
    images, labels = images.flatten(1).numpy(), labels.numpy()
    model = LogisticRegression(max_iter=300).fit(images, labels)
    accuracy = float((model.predict(splits.test_x.flatten(1).numpy()) == splits.test_y.numpy()).mean())
    print(f"  logistic regression at label fraction {fraction}: test/acc {accuracy:.4f}", flush=True)
    return Row("logistic regression on pixels", "LogisticRegression(max_iter=300) in benchmarks/results.py", [accuracy])


def plot_study(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.subplots()
    fractions = sorted({row["fraction"] for row in rows})
    for index, method in enumerate(dict.fromkeys(row["label"] for row in rows)):
        points = sorted((row["fraction"], row["accuracies"]) for row in rows if row["label"] == method)
        style = "-" if method.startswith("two-stage") else ":" if method.startswith("probe") else "--"
        axes.errorbar([f for f, _ in points], [statistics.mean(a) for _, a in points],
                      yerr=[spread(a) for _, a in points], fmt=style, marker="o", capsize=3, label=method,
                      color=f"C{index}")
    axes.set(xscale="log", xlabel="share of training labels", ylabel="test accuracy",
             title="Fashion-MNIST with few labels: mean ± std over seeds")
    axes.set_xticks(fractions, [f"{fraction:.0%}" for fraction in fractions])
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)


def report(results: dict) -> str:
    lines = ["# Results on Fashion-MNIST", ""]
    if "main" in results:
        rows = {key: Row(**row) for key, row in results["main"]["rows"].items()}
        reference, tuned = statistics.mean(rows["reference"].seconds), statistics.mean(rows["tuned"].seconds)
        lines += [
            describe(results["main"]["made"]),
            "",
            "| | test accuracy | flow run (s) | command (add `--set seed=N`) |",
            "|---|---:|---:|---|",
            *(f"| {row.label}{measured_apart(row, results['main']['made'])} | {row.accuracy()} | "
              f"{statistics.mean(row.seconds):.1f} | `{row.command}` |" for row in rows.values()),
            *(f"| {label} | {value} | | |" for label, value in PUBLISHED),
            "",
            f"The tuned MLP config's flow run takes 1/{reference / tuned:.1f} of the reference settings' "
            f"({tuned:.1f} s against {reference:.1f} s). A flow run is the whole pipeline (data, pretrain, head, "
            "finetune, evaluate, with tracking) in a warm process, every phase trained; `twostage run` adds Python "
            "imports and Prefect's server start-up (`benchmarks/overhead.py` measures them). Each timed run starts "
            f"{SETTLE_S:.0f} s after the last one ended: a flow run created while Prefect's ephemeral server still "
            "stores the last one's events can find its sqlite database busy, and Prefect's client then sleeps 2 s "
            "before it retries (`benchmarks/prefect_retries.py`; such sleeps are not counted).",
            "",
        ]
    if "study" in results:
        cells = {(row["label"], row["fraction"]): Row(**{k: v for k, v in row.items() if k != "fraction"})
                 for row in results["study"]["rows"]}
        fractions = sorted({fraction for _, fraction in cells})
        tuned, study = load_config(REPO / MLP), load_config(REPO / MLP, [*STUDY_MODEL, *STUDY_BASE])
        lines += [
            "## Few labels",
            "",
            "![low-label study](low_label.png)",
            "",
            describe(results["study"]["made"]) + " The tuned MLP config with a wider encoder "
            f"({study.model.encoder_widths} instead of {tuned.model.encoder_widths}: `STUDY_MODEL` in the script; "
            "stage 1 gains more from width "
            "than training from scratch does); with all labels, head and finetune "
            f"train {study.head.epochs} + {study.finetune.epochs} epochs at batch {study.finetune.batch_size} (finetune "
            f"lr {study.finetune.optimizer.lr:g}: `STUDY_BASE` in the script). With a share "
            "of labels below 1, head and finetune get min(1/share, 10) times the epochs and, below 10%, a batch "
            f"shrunk in proportion (no smaller than {STUDY_MIN_BATCH}): about as many optimizer steps as with all "
            "labels, the same for every method. The labeled subset is the same for every seed "
            "(`data.split_seed` 0). Pretraining runs on every training image without its label, with the settings in "
            "the commands below (their reasons: `OBJECTIVES` in the script), once per objective and seed: the "
            "pipeline reuses it at every share." + ran_as(results["study"]["made"]),
            "",
            "| method | " + " | ".join(f"{fraction:.0%} of labels" for fraction in fractions) + " |",
            "|---|" + "---:|" * len(fractions),
            *(f"| {method} | " + " | ".join(cells[(method, f)].accuracy() for f in fractions) + " |"
              for method in dict.fromkeys(method for method, _ in cells)),
            "",
            "Commands (add `--set seed=N`):",
            "",
            *(f"- {method}, {fraction:.0%} of labels: `{row.command}`" for (method, fraction), row in cells.items()),
            "",
        ]
    if "transfer" in results:
        transfer = results["transfer"]
        lines += [
            "## Transfer learning: a finetuning epoch on CPU",
            "",
            f"Made by `{transfer['made']['command']}` on {transfer['made']['date']}: {transfer['machine']}. Seconds "
            f"per finetuning epoch (`benchmarks/transfer.py`: finetune's parameter groups, a linear head, batch 64) "
            f"on {transfer['images']} resized to each size, median of {transfer['rounds']} epochs after a warm-up "
            "one; grayscale goes into the backbones as 3 repeated channels, as in the pipeline. Ratio: to the `cnn` "
            "encoder (configs/fashion_mnist_cnn.yaml) at the same size.",
            "",
            "| image size | encoder | parameters | s/epoch | s per 1,000 images | × cnn |",
            "|---|---|---:|---:|---:|---:|",
            *(f"| {row['size']}×{row['size']} | {row['encoder']} | {row['params_m']:.2f} M | {row['seconds']:.2f} | "
              f"{row['per_1000']:.3f} | {row['ratio']:.1f} |" for row in transfer["rows"]),
            "",
        ]
    return "\n".join(lines)


def ran_as(made: dict) -> str:
    """How the study ran: one `twostage sweep`, its size, wall time and workers (none recorded before 2026-12)."""
    sweep = made.get("sweep")
    if not sweep:
        return " (Measured by a loop of flow runs in one process, before the study became a sweep; wall time not recorded.)"
    minutes = sweep["seconds"] / 60
    return (f" The study ran as one `twostage sweep` (sweep {sweep['id']}, {sweep['points']} points) in "
            f"{minutes:.0f} min on {sweep['where']}.")


def measured_apart(row: Row, made: dict) -> str:
    """A note on a row measured by another invocation than the table's (`--rows`)."""
    if row.made is None or row.made["command"] == made["command"]:
        return ""
    return f" (measured by `{row.made['command']}` on {row.made['date']})"


def describe(made: dict) -> str:
    sizes = made["sizes"]
    return (
        f"Made by `{made['command']}` on {made['date']}: {made['machine']}, torch {made['torch']}. Test accuracy on "
        f"the official test split ({sizes['test']:,} images), mean ± sample std over seeds "
        f"{', '.join(map(str, made['seeds']))}; {sizes['train']:,} training and {sizes['val']:,} validation images."
    )


def machine(device: str) -> str:
    """The hardware, and what `amp: auto` (the tuned configs') chose on it."""
    from models.device import cpu_summary, resolve_amp

    hardware = f"GPU {torch.cuda.get_device_name()}" if device == "cuda" else cpu_summary()
    return f"{hardware}, {torch.get_num_threads()} threads ({resolve_amp('auto', device).message})"


if __name__ == "__main__":
    sys.exit(main())
