"""Screenshots of what a user clicks through: the MLflow run page and the Prefect flow-run page of one quickstart run,
taken with headless Chromium, to look at before saying the UIs show what they should.

It starts a Prefect server and an MLflow server (sqlite, in a temporary folder, on free loopback ports), runs
`twostage run -c configs/quickstart.yaml` against them, follows the run's links both ways (the MLflow run's tag to
the Prefect flow run, the flow run's link artifact to the MLflow run), saves the pages as PNGs in --out, and stops
the servers it started (by PID). Needs `chromium` (Debian: apt-get install chromium).

Usage: .venv/bin/python deploy/screenshots.py [--out screenshots]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import base_env, free_ports, http_ok  # noqa: E402 - beside this script


def wait_until(url: str, process: subprocess.Popen, name: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"screenshots: {name} exited during start-up (code {process.returncode})")
        try:
            if http_ok(url):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"screenshots: {name} did not answer {url} within {timeout:.0f} s")


def screenshot(chromium: str, url: str, path: Path, height: int = 1000) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([
            chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--window-size=1500,{height}", "--virtual-time-budget=20000", f"--user-data-dir={profile}",
            f"--screenshot={path}", url,
        ], check=True, capture_output=True, timeout=120)
    print(f"  {path}  <- {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("screenshots"))
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("screenshots: no chromium on PATH; apt-get install chromium", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    prefect_port, mlflow_port = free_ports(2)
    prefect_ui, mlflow_ui = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    work = Path(tempfile.mkdtemp(prefix="twostage-screenshots-"))
    env = base_env() | {"PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "PREFECT_API_URL": f"{prefect_ui}/api", "PREFECT_UI_URL": prefect_ui,
                        "MLFLOW_TRACKING_URI": mlflow_ui}
    logs = open(work / "servers.log", "w")
    servers = [
        subprocess.Popen([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                         env=env, cwd=work, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True),
        subprocess.Popen([BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                          "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}", "--serve-artifacts",
                          "--artifacts-destination", str(work / "artifacts")],
                         env=env, cwd=work, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True),
    ]
    try:
        wait_until(f"{prefect_ui}/api/health", servers[0], "the Prefect server")
        wait_until(f"{mlflow_ui}/health", servers[1], "the MLflow server")
        print(f"Prefect UI {prefect_ui}, MLflow UI {mlflow_ui}; running the quickstart against them")
        run = subprocess.run([BIN / "twostage", "run", "-c", str(REPO / "configs" / "quickstart.yaml")], env=env,
                             cwd=work, capture_output=True, text=True, timeout=900)
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            return 1
        mlflow_run = run.stdout.strip().splitlines()[-1].removeprefix("Open it: ")
        run_id = mlflow_run.split("/runs/")[1].split("?")[0]
        with urllib.request.urlopen(f"{mlflow_ui}/api/2.0/mlflow/runs/get?run_id={run_id}") as answer:
            tags = {tag["key"]: tag["value"] for tag in json.load(answer)["run"]["data"]["tags"]}
        flow_run_page = tags["twostage.prefect_flow_run_url"]
        search = urllib.request.Request(
            f"{mlflow_ui}/api/2.0/mlflow/runs/search", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"experiment_ids": [mlflow_run.split("/experiments/")[1].split("/")[0]],
                             "filter": f"tags.mlflow.parentRunId = '{run_id}' and tags.`twostage.phase` = 'pretrain'"
                             }).encode())
        with urllib.request.urlopen(search) as answer:
            pretrain = mlflow_run.replace(run_id, json.load(answer)["runs"][0]["info"]["run_id"])
        print("The MLflow run, its pretrain child's charts, and the Prefect flow run it links to:")
        screenshot(chromium, mlflow_run, args.out / "mlflow-run.png", height=1400)
        screenshot(chromium, pretrain.replace("?", "/model-metrics?"), args.out / "mlflow-pretrain-charts.png",
                   height=1200)
        screenshot(chromium, flow_run_page, args.out / "prefect-flow-run.png", height=1400)
    finally:
        for server in servers:
            os.killpg(server.pid, 15)
        for server in servers:
            server.wait(timeout=60)
        logs.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
