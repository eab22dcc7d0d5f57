"""`twostage`: the command line. Parses, loads and validates the config, then runs the flow.

Exit codes: 0 success; 2 bad input (config, data) with one line on stderr and no traceback;
1 anything unexpected.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from configs.errors import UserError
from configs.loader import load_config, to_yaml
from configs.schema import PHASES
from flows.prefect_defaults import set_prefect_defaults
from tasks.provenance import describe

DEFAULT_CONFIG = "configs/quickstart.yaml"


class OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes end as every other bad input does: one line, exit 2 (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"twostage: error: {message}; see {self.prog} --help\n")


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrors(prog="twostage", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=describe())
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)
    run = commands.add_parser("run", help="run the pipeline once (Prefect's ephemeral server unless PREFECT_API_URL is set)")
    serve = commands.add_parser("serve", help="serve the pipeline on a cron schedule from a Prefect server")
    sweep = commands.add_parser(
        "sweep", help="run a grid of configs: on the work pool's workers when PREFECT_API_URL is set, else here")
    for command in (run, serve, sweep):
        command.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"YAML config (default: {DEFAULT_CONFIG})")
        command.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config value before validation, e.g. --set finetune.epochs=3 (repeatable)",
        )
    run.add_argument(
        "--rerun", choices=PHASES, metavar="PHASE",
        help=f"run PHASE and every phase after it even if an earlier run completed them ({', '.join(PHASES)})",
    )
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved config (YAML, defaults filled in) and exit")
    run.add_argument("--dry-run", action="store_true",
                     help="say for each phase whether this run would reuse it or train it, and why; train nothing")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="sweep KEY over these values; several --grid sweep every combination (repeatable)")
    sweep.add_argument("--file", metavar="SWEEP.yaml",
                       help="grid:, points: (override sets, each crossed with the grid) and set: in a file")
    sweep.add_argument("--deployment", default="two-stage/sweep",
                       help="the deployment whose work pool runs the points (default: two-stage/sweep)")
    sweep.add_argument("--max-parallel", type=positive_int, metavar="N",
                       help="set the work pool's concurrency limit to N flow runs (it stays set)")
    sweep.add_argument("--metric", default="test/acc", help="compare the points by this metric (default: test/acc)")
    sweep.add_argument("--out", default="sweeps", type=Path, metavar="DIR",
                       help="the comparison figure goes to DIR/SWEEP_ID/compare.png (default: sweeps)")
    serve.add_argument("--cron", required=True, metavar="EXPR", help='cron schedule, e.g. "0 3 * * *" (03:00 daily)')
    serve.add_argument("--name", help="deployment name (default: the config's name)")
    compare = commands.add_parser("compare", help="compare an experiment's pipeline runs; writes compare.png")
    compare.add_argument("-e", "--experiment", default="quickstart", help="MLflow experiment (default: quickstart)")
    compare.add_argument("--metric", default="test/acc", help="sort and chart by this metric (default: test/acc)")
    compare.add_argument("--last", type=positive_int, metavar="N", help="only the N newest runs")
    compare.add_argument("--out", default="compare", type=Path, metavar="DIR", help="folder for compare.png")
    predict = commands.add_parser("predict", help="classify image files with a registered model")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--model", metavar="URI", help="any MLflow model URI (default: models:/NAME@champion)")
    predict.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config whose model NAME is the default")
    args = parser.parse_args(argv)
    set_prefect_defaults()
    # MLflow's own INFO lines (database migrations, system metrics) in a second format between ours: WARNING and up.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Against an MLflow server, MLflow prints two "View run/experiment at" lines for every run it ends (12 for one
    # pipeline run); our last line links the pipeline run.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        if args.command == "serve":
            return serve_pipeline(args.config, args.overrides, args.cron, args.name)
        if args.command == "sweep":
            return sweep_pipeline(args)
        if args.command == "compare":
            from flows.compare import compare

            print(compare(args.experiment, args.metric, args.last, args.out))
            return 0
        if args.command == "predict":
            from flows.predict import predict

            return predict(args.model or default_model_uri(args.config), args.images)
        if args.print_config:
            print(to_yaml(load_config(args.config, args.overrides)), end="")
            return 0
        if args.dry_run:
            from flows.plan import plan

            print(plan(load_config(args.config, args.overrides), args.rerun))
            return 0
        return run_pipeline(args.config, args.overrides, args.rerun)
    except UserError as error:
        print(f"twostage: error: {error}", file=sys.stderr)
        return 2


def run_pipeline(config_path: str, overrides: list[str], rerun: str | None = None) -> int:
    config = load_config(config_path, overrides)
    from models.device import resolve_device

    resolve_device(config.device)  # fail before any run is opened if the device is missing

    from flows.interrupts import start_ephemeral_server_shielded, stop_on_signals
    from flows.two_stage import run_here  # imports Prefect, MLflow and torch: only once the config is valid
    from tasks.tracking import run_url, tracking_uri

    prefect_api_url = _checked_servers_and_console()
    with stop_on_signals() as stopped:
        try:
            start_ephemeral_server_shielded()
            report = run_here(config, rerun=rerun)
        except KeyboardInterrupt:
            print(f"twostage: stopped by {stopped.name}; the MLflow runs are marked KILLED and nothing was registered. "
                  "Run the same command to resume after the last saved epoch.", file=sys.stderr)
            return stopped.exit_code
        except Exception as error:
            from flows.servers import lost_server

            server = lost_server(error, tracking_uri(), prefect_api_url)
            if server is None:
                raise
            print(f"twostage: error: {server} stopped answering during the run ({type(error).__name__}). Finished "
                  "phases and the last saved epoch state are kept in the run's storage: once it answers again, run "
                  "the same command to resume.", file=sys.stderr)
            if server.startswith("the Prefect server"):
                # Prefect's log and event services would retry the dead server for minutes at exit (4 min
                # measured) before the process ends: nothing more can reach it, and every run is ended already.
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(3)
            return 3
    metrics = "  ".join(f"{name} {value:.4f}" for name, value in report.metrics.items())
    uri = tracking_uri()
    print(f"{config.name}: {metrics}; {report.promotion}")
    url = run_url(report.experiment_id, report.pipeline_run_id)
    if uri.startswith("http"):
        print(f"Open it: {url}")
    else:
        print(f"Open it: {_mlflow_command()} ui --backend-store-uri {uri}   then {url}")
    return 0


def sweep_pipeline(args: argparse.Namespace) -> int:
    """Validate every point, then run them (flows/sweep.py)."""
    from configs.sweeps import build_sweep

    sweep = build_sweep(args.config, args.overrides, args.grid, args.file)
    from flows.sweep import run_sweep

    prefect_api_url = _checked_servers_and_console()
    return run_sweep(sweep, prefect_api_url, args.deployment, args.max_parallel, args.metric, args.out)


def _checked_servers_and_console() -> str | None:
    """Before a run or a sweep: a bad MLflow store or TWOSTAGE_PROGRESS_EVERY_S is one line now, not a failed phase;
    the console shows our lines (a live line per phase on a terminal). Returns PREFECT_API_URL (None: ephemeral)."""
    from prefect.settings import get_current_settings

    from flows.servers import check_prefect_server
    from tasks.progress import log_every_s, quiet_console
    from tasks.tracking import open_store, tracking_uri

    prefect_api_url = get_current_settings().api.url
    open_store(tracking_uri())  # a bad URI, an MLflow server that is down, a broken store: say so now, in one line
    check_prefect_server(prefect_api_url)  # down, or refusing our credentials: one line too
    log_every_s()
    _hide_tracebacks_of_expected_errors(tracking_uri(), prefect_api_url)
    quiet_console(live=True)
    return prefect_api_url


def default_model_uri(config_path: str) -> str:
    config = load_config(config_path)
    return f"models:/{config.evaluate.registered_model or config.name}@champion"


def serve_pipeline(config_path: str, overrides: list[str], cron: str, name: str | None) -> int:
    """Serve the flow with this schedule and the validated config as its parameters, until Ctrl-C."""
    config = load_config(config_path, overrides)
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.settings import get_current_settings

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise UserError(f"--cron {cron!r} is not a cron expression; e.g. \"0 3 * * *\" runs daily at 03:00") from None
    if not get_current_settings().api.url:
        raise UserError(
            "twostage serve needs a Prefect server, which the ephemeral one cannot be: start one with "
            "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    from prefect.deployments.runner import EntrypointType

    from flows.interrupts import stop_serving_on_ctrl_c
    from flows.servers import check_prefect_server
    from flows.two_stage import two_stage
    from tasks.tracking import open_store, tracking_uri

    check_prefect_server(get_current_settings().api.url)
    open_store(tracking_uri())  # the scheduled runs will log there

    stop_serving_on_ctrl_c(grace_s=30)
    try:
        two_stage.serve(
            name=name or config.name,
            cron=cron,
            parameters={"config": config.model_dump(mode="json")},
            description=f"{config.name} from {config_path}",
            entrypoint_type=EntrypointType.MODULE_PATH,  # flows.two_stage:two_stage, wherever it runs from
        )
    except KeyboardInterrupt:
        print("twostage serve: stopped", file=sys.stderr)
    return 0


def _mlflow_command() -> str:
    """The `mlflow` executable of this Python environment, as a path that works without activating it."""
    beside = Path(sys.executable).parent / "mlflow"
    if not beside.exists():
        return "mlflow"
    try:
        return str(beside.relative_to(Path.cwd()))
    except ValueError:
        return str(beside)


class _NoTracebackForExpectedErrors(logging.Filter):
    def __init__(self, tracking_uri: str, prefect_api_url: str | None):
        super().__init__()
        self.servers = tracking_uri, prefect_api_url

    def filter(self, record: logging.LogRecord) -> bool:
        from flows.servers import lost_server

        if record.exc_info and (isinstance(record.exc_info[1], UserError) or
                                lost_server(record.exc_info[1], *self.servers)):
            record.exc_info, record.exc_text = None, None
        return True


def _hide_tracebacks_of_expected_errors(tracking_uri: str, prefect_api_url: str | None) -> None:
    """Prefect logs a failed task's traceback; for a config or data mistake, or a server that stopped answering,
    the one-line message is enough."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith("prefect")]
    for logger in [logging.getLogger(), *loggers]:
        for handler in logger.handlers:
            handler.addFilter(_NoTracebackForExpectedErrors(tracking_uri, prefect_api_url))


if __name__ == "__main__":
    sys.exit(main())
