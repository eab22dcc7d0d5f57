"""The team stack on this machine's loopback: `python deploy/stack.py up|down|env|status|restart SERVER`.

Every server binds to 127.0.0.1 on a port picked free at `up`, and is started in this order, each waited for:

    postgres        PostgreSQL 15 (run as user `postgres` when we are root), databases `prefect`, `mlflow` and
                    `mlflow_auth`; over TCP only with its password, over its unix socket only for its owner
    s3              SeaweedFS `weed mini`: an S3 endpoint (bucket `twostage`) with its own access key
    prefect-server  Prefect's API and UI, its database `prefect` on PostgreSQL; every API call needs the auth string
    mlflow          MLflow's tracking server with its basic-auth app (accounts `admin`, `twostage` for the pipeline,
                    `viewer`), its database `mlflow`, artifacts proxied to s3://twostage/mlflow-artifacts
    (setup)         work pool `twostage`, crash-detection automations (deploy/prefect_setup.py), `prefect deploy --all`
    worker-1, -2    two process workers of pool `twostage`, run from the repository root

State lives in .stack/ at the repository root (or $TWOSTAGE_STACK_DIR):

    secrets.json    every credential, made at the first `up` and kept (mode 600); see SECRETS
    env             a client's exports: `source .stack/env` (mode 600): the servers' URLs, the Prefect auth string and
                    the pipeline's MLflow account; no S3 key (MLflow proxies artifacts)
    worker.env      a worker's: env plus the S3 store's keys and TWOSTAGE_STORAGE (mode 600)
    stack.json      every process started (pid, process group, start time) and every port; removed by `down`
    s3-config.json  SeaweedFS identities: the S3 key and secret (mode 600); s3-admin.options its admin password
    mlflow-auth.ini MLflow's auth app configuration (no secret in it: the server gets them in its environment)
    postgres/       the PostgreSQL cluster (owned by `postgres`); run/ its unix socket (mode 700)
    s3/             SeaweedFS data; s3-run/ its local sockets
    prefect/        PREFECT_HOME of the server; prefect-client/ that of the CLI calls and workers
    logs/           one log per component: <component>.log

No secret is put on a command line (which `ps` shows every local user), in a config, or in a log, and `up` prints
where they are, not what they are (`env` prints the client's exports, secrets included, when asked): servers and
workers get them in their environment (readable by their user only) or in mode-600 files. Data survives `down`;
`up` reuses it and the secrets (delete .stack/ for a cold start), with new ports. `up`
refuses to start a second stack while any process of the recorded one is alive (exit 1). `down` stops exactly the
recorded processes and their descendants (a worker's flow runs live in sessions of their own), never anything found
by name, and works after a failed or killed `up`. `status` exits 0 when every component answers, else 3.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STACK = Path(os.environ.get("TWOSTAGE_STACK_DIR") or REPO / ".stack").resolve()
BIN = Path(sys.prefix) / "bin"  # the venv this script runs in: prefect, mlflow, weed
PG_BIN = Path(os.environ.get("TWOSTAGE_PG_BIN", "/usr/lib/postgresql/15/bin"))
HOST = "127.0.0.1"
BUCKET = "twostage"
POOL = "twostage"
WORKERS = ("worker-1", "worker-2")
STATE = STACK / "stack.json"
ENV_FILE = STACK / "env"
WORKER_ENV_FILE = STACK / "worker.env"
SECRETS_FILE = STACK / "secrets.json"
ADOPT_MARKER = STACK / "adopt-pending"  # a stack from before accounts: its experiments and models await an owner
SECRETS = {  # name in secrets.json: what it opens
    "postgres_password": "PostgreSQL's superuser `postgres` over TCP (the servers' databases)",
    "s3_access_key": "the S3 store (with s3_secret_key): the MLflow server and the workers only",
    "s3_secret_key": "the S3 store's secret key",
    "prefect_auth_string": "Prefect's API and UI (PREFECT_API_AUTH_STRING; the UI asks for it)",
    "mlflow_admin_password": "MLflow's `admin` account: manages accounts and every permission",
    "mlflow_pipeline_password": "MLflow's `twostage` account (the pipeline): READ all, MANAGE what it creates",
    "mlflow_viewer_password": "MLflow's `viewer` account: READ only",
    "mlflow_flask_secret_key": "signs the MLflow UI's session cookies",
}
MLFLOW_PIPELINE_USER, MLFLOW_VIEWER_USER = "twostage", "viewer"
AS_ROOT = os.geteuid() == 0


class StackError(Exception):
    """One line for the user: which component failed and where its log is."""


# --- processes ---------------------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, start time in clock ticks) of a live process, None if gone (zombies count as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in "ZX" else (fields[0], int(fields[1]), int(fields[2]), int(fields[19]))


def alive(rec: dict) -> bool:
    """Is this recorded process still the one we started (same pid and start time)?"""
    stat = proc_stat(rec["pid"])
    return stat is not None and stat[3] == rec["start"]


def descendants(pids: list[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))):
            children.setdefault(stat[1], []).append(int(entry.name))
    found, todo = [], list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def record(pid: int) -> dict:
    stat = proc_stat(pid)
    return {"pid": pid, "pgid": stat[2] if stat else pid, "start": stat[3] if stat else 0}


def memory_mb(rec: dict) -> tuple[float, float]:
    """(RSS, PSS) of a process and all its descendants, in MB. PSS shares shared pages (PostgreSQL's buffers,
    a forked server's libraries) out among the processes mapping them, so it does not count them twice."""
    totals = [0, 0]
    for pid in [rec["pid"], *descendants([rec["pid"]])]:
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                for i, key in enumerate(("Rss:", "Pss:")):
                    if line.startswith(key):
                        totals[i] += int(line.split()[1])
        except OSError:
            pass
    return totals[0] / 1024, totals[1] / 1024


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now: all held open together, so no two are the same."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port_pair(offset: int = 10000) -> int:
    """A free port P with P + offset free too: SeaweedFS's maintenance worker dials the admin's gRPC port at
    admin port + 10000 whatever -admin.port.grpc says."""
    while True:
        first, second = socket.socket(), socket.socket()
        try:
            first.bind((HOST, 0))
            port = first.getsockname()[1]
            if port + offset <= 65535:
                second.bind((HOST, port + offset))
                return port
        except OSError:
            pass
        finally:
            first.close()
            second.close()


def as_postgres(args: list) -> list[str]:
    """PostgreSQL refuses to run as root: run its binaries as user `postgres` then."""
    return ["runuser", "-u", "postgres", "--", *map(str, args)] if AS_ROOT else list(map(str, args))


def own_by_postgres(*paths: Path) -> None:
    """Hand PostgreSQL's folders to user `postgres`, who must also be able to reach them."""
    if not AS_ROOT:
        return
    STACK.chmod(STACK.stat().st_mode | 0o011)  # our folder: others may pass through it (not list it)
    for path in paths:
        shutil.chown(path, "postgres", "postgres")
    if subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(paths[0])]).returncode:
        private = next((str(d) for d in reversed(paths[0].parents) if not d.stat().st_mode & 0o001), "?")
        raise StackError(f"postgres: user postgres cannot reach {STACK}: {private} is private to its owner (e.g. "
                         "pytest's /tmp/pytest-of-root); set TWOSTAGE_STACK_DIR under a folder others may pass through")


def base_env() -> dict[str, str]:
    """This process's environment without any Prefect, MLflow or AWS setting a caller may have exported."""
    skip = ("PREFECT_", "MLFLOW_", "AWS_")
    return {k: v for k, v in os.environ.items() if not k.startswith(skip)} | {
        "DO_NOT_TRACK": "true",  # no telemetry from anything that honours it
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def wait_for(name: str, check, timeout: float, rec: dict | None = None) -> None:
    """Poll check() until true; fail early if the component's process died."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as error:  # noqa: BLE001 - not up yet
            last = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        if rec is not None and not alive(rec):
            raise StackError(f"{name} exited during start-up; see {log_path(name)}")
        time.sleep(0.5)
    raise StackError(f"{name} not healthy after {timeout:.0f} s ({last}); see {log_path(name)}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as response:
        return response.status == 200


def log_path(name: str) -> Path:
    return STACK / "logs" / f"{name}.log"


def load_state() -> dict | None:
    return json.loads(STATE.read_text()) if STATE.exists() else None


def save_state(state: dict) -> None:
    tmp = STATE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(STATE)


def write_private(path: Path, text: str) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)


def stack_secrets() -> dict[str, str]:
    """The stack's credentials: made at the first `up` (secrets.json, mode 600) and kept, since PostgreSQL and
    MLflow's account store keep theirs; a name added to SECRETS later is made then."""
    kept = json.loads(SECRETS_FILE.read_text()) if SECRETS_FILE.exists() else {}
    made = {name: kept.get(name) or secrets.token_urlsafe(24) for name in SECRETS}
    made["s3_access_key"] = kept.get("s3_access_key") or "twostage" + secrets.token_hex(6)
    made["prefect_auth_string"] = kept.get("prefect_auth_string") or f"twostage:{secrets.token_urlsafe(24)}"
    if made != kept:
        write_private(SECRETS_FILE, json.dumps(made, indent=2) + "\n")
    return made


def exports(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


# --- up ----------------------------------------------------------------------------------------------------


class Up:
    """Starts the components in order, recording each process in stack.json the moment it exists."""

    def __init__(self, recorded: dict | None = None) -> None:
        """A new stack on free ports, or (`recorded`: stack.json's state) the running one, to restart a component."""
        # A stack made before it had accounts: its experiments and models have no owner yet. Adopted at `up`; the
        # marker stays until that has succeeded, so an `up` that fails before then leaves it for the next one.
        if not recorded and not SECRETS_FILE.exists() and (STACK / "postgres" / "PG_VERSION").exists():
            ADOPT_MARKER.touch()
        self.secrets = stack_secrets()
        if recorded:
            self.ports, self.state = recorded["ports"], recorded
        else:
            names = ["postgres", "s3", "prefect", "mlflow", "s3_grpc", "s3_master", "s3_master_grpc", "s3_volume",
                     "s3_volume_grpc", "s3_filer", "s3_filer_grpc"]  # fmt: skip
            admin = free_port_pair()  # the admin's HTTP and gRPC ports: SeaweedFS wants them 10000 apart
            ports = [port for port in free_ports(len(names) + 2) if port not in (admin, admin + 10000)]
            self.ports = dict(zip(names, ports)) | {"s3_admin": admin, "s3_admin_grpc": admin + 10000}
            self.state = {"stack_dir": str(STACK), "ports": self.ports, "processes": {}, "timings_s": {}}
        self.pg_url = f"postgres@{HOST}:{self.ports['postgres']}"  # its password comes in PGPASSWORD
        self.client_env = {  # a client's: what `source .stack/env` exports
            "PREFECT_API_URL": f"http://{HOST}:{self.ports['prefect']}/api",
            "PREFECT_API_AUTH_STRING": self.secrets["prefect_auth_string"],
            "MLFLOW_TRACKING_URI": f"http://{HOST}:{self.ports['mlflow']}",
            "MLFLOW_TRACKING_USERNAME": MLFLOW_PIPELINE_USER,
            "MLFLOW_TRACKING_PASSWORD": self.secrets["mlflow_pipeline_password"],
        }
        self.s3_env = {  # the S3 store's, for the MLflow server and the workers
            "AWS_ENDPOINT_URL": f"http://{HOST}:{self.ports['s3']}",
            "AWS_ACCESS_KEY_ID": self.secrets["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": self.secrets["s3_secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.worker_env = self.client_env | {"TWOSTAGE_STORAGE": f"s3://{BUCKET}/phases"} | self.s3_env

    def spawn(self, name: str, cmd: list, env: dict[str, str], umask: int = -1) -> dict:
        """Start a server in its own session (its process group is what `down` signals), logging to logs/."""
        with open(log_path(name), "ab") as log:
            proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, umask=umask)  # fmt: skip
        rec = record(proc.pid) | {"log": str(log_path(name))}
        self.state["processes"][name] = rec
        save_state(self.state)
        return rec

    def run(self, name: str, what: str, cmd: list, env: dict[str, str] | None = None, timeout: float = 300) -> None:
        """A one-off command (`what` names it in errors); its output goes to the component's log."""
        with open(log_path(name), "ab") as log:
            try:
                done = subprocess.run(list(map(str, cmd)), cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, timeout=timeout)  # fmt: skip
            except subprocess.TimeoutExpired:
                raise StackError(f"{name}: {what} timed out after {timeout:.0f} s; see {log_path(name)}") from None
        if done.returncode:
            raise StackError(f"{name}: {what} failed (exit {done.returncode}); see {log_path(name)}")

    def timed(self, name: str, step) -> None:
        began = time.monotonic()
        step()
        self.state["timings_s"][name] = round(time.monotonic() - began, 1)
        save_state(self.state)
        print(f"  {name:<15} ready in {self.state['timings_s'][name]:5.1f} s", flush=True)

    def postgres(self) -> None:
        data, sockets, log = STACK / "postgres", STACK / "run", log_path("postgres")
        for folder in (data, sockets):
            folder.mkdir(mode=0o700, exist_ok=True)
        log.touch()
        own_by_postgres(data, sockets, log)
        if not (data / "PG_VERSION").exists():
            initdb = [PG_BIN / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--locale=C.UTF-8", "--no-instructions"]  # fmt: skip
            self.run("postgres", "initdb", as_postgres(initdb), base_env())
        # Over TCP only with the password; over the unix socket (its folder is private to the cluster's owner) the
        # owner alone, without one. Written at every `up`: a cluster made by an earlier, trusting stack is closed too.
        (data / "pg_hba.conf").write_text("# deploy/stack.py writes this at every `up`\n"
                                          "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        if AS_ROOT:
            shutil.chown(data / "pg_hba.conf", "postgres", "postgres")
        options = f"-c listen_addresses={HOST} -p {self.ports['postgres']} -k {sockets}"
        try:
            pg_ctl = [PG_BIN / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start"]
            self.run("postgres", "pg_ctl start", as_postgres(pg_ctl), base_env(), timeout=90)
        finally:  # record the postmaster even if pg_ctl gave up waiting on it
            pid_file = data / "postmaster.pid"
            if pid_file.exists() and (pid := int(pid_file.read_text().split()[0])) and proc_stat(pid):
                self.state["processes"]["postgres"] = record(pid) | {"log": str(log), "pg_ctl": True}
                save_state(self.state)
        import psycopg2

        def create_databases() -> bool:
            conn = psycopg2.connect(host=str(sockets), port=self.ports["postgres"], user="postgres", dbname="postgres")
            conn.autocommit = True
            with conn.cursor() as cur:  # not `with conn`: that opens a transaction, which CREATE DATABASE refuses
                cur.execute("SET log_statement = 'none'")  # the password below stays out of the server's log
                cur.execute("ALTER ROLE postgres PASSWORD %s", (self.secrets["postgres_password"],))
                for db in ("prefect", "mlflow", "mlflow_auth"):
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                    if not cur.fetchone():
                        cur.execute(f'CREATE DATABASE "{db}"')
            conn.close()
            return True

        wait_for("postgres", create_databases, 30, self.state["processes"].get("postgres"))

    def s3(self) -> None:
        p, run = self.ports, STACK / "s3-run"
        for folder in (STACK / "s3", run):
            folder.mkdir(mode=0o700, exist_ok=True)  # s3/ too: weed saves its options (admin password) there
        identity = {"name": "twostage", "credentials": [{"accessKey": self.s3_env["AWS_ACCESS_KEY_ID"],
                                                          "secretKey": self.s3_env["AWS_SECRET_ACCESS_KEY"]}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
        write_private(STACK / "s3-config.json", json.dumps({"identities": [identity]}, indent=2))
        # A secret in an options file rather than on the command line, which every local user can read.
        write_private(STACK / "s3-admin.options", f"admin.password={secrets.token_urlsafe(24)}\n")
        flags = {  # fmt: skip
            "dir": STACK / "s3", "ip": HOST, "ip.bind": HOST, "options": STACK / "s3-admin.options",
            "s3.config": STACK / "s3-config.json", "s3.port": p["s3"], "s3.port.grpc": p["s3_grpc"],
            "master.port": p["s3_master"], "master.port.grpc": p["s3_master_grpc"],
            "volume.port": p["s3_volume"], "volume.port.grpc": p["s3_volume_grpc"],
            "filer.port": p["s3_filer"], "filer.port.grpc": p["s3_filer_grpc"],
            "admin.port": p["s3_admin"], "admin.port.grpc": p["s3_admin_grpc"],
            # No UI, no WebDAV, Iceberg or Lance endpoints, no telemetry to seaweedfs.com:
            "admin.ui": "false", "webdav": "false", "s3.port.iceberg": 0, "s3.port.lance": 0,
            "master.telemetry": "false",
            # Its local sockets default to /tmp: keep them in the stack.
            "filer.localSocket": run / "filer.sock", "s3.localSocket": run / "s3.sock",
        }
        cmd = [BIN / "weed", "-logtostderr", "mini", *(f"-{key}={value}" for key, value in flags.items())]
        # umask 077: weed puts its gRPC sockets in /tmp (a fixed path), so only we may connect to them.
        rec = self.spawn("s3", cmd, base_env(), umask=0o077)
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=self.s3_env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=self.s3_env["AWS_SECRET_ACCESS_KEY"])  # fmt: skip

        def bucket_ready() -> bool:
            if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
                s3.create_bucket(Bucket=BUCKET)
            s3.head_bucket(Bucket=BUCKET)
            return True

        wait_for("s3", bucket_ready, 60, rec)

    def prefect_server(self) -> None:
        (STACK / "prefect").mkdir(exist_ok=True)
        env = base_env() | {
            "PREFECT_HOME": str(STACK / "prefect"),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{self.pg_url}/prefect",
            "PGPASSWORD": self.secrets["postgres_password"],  # asyncpg reads it, as libpq does
            "PREFECT_SERVER_API_AUTH_STRING": self.secrets["prefect_auth_string"],  # every API call but /health: 401
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # Concurrency leases (the pipeline's phase locks) on disk, not in the server's memory: a restarted server
            # still knows a slot's lease, and frees the slot when the lease runs out. In memory, a slot held across
            # a restart is never freed, and the next run of that phase waits forever (seen here).
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
            # The UI asks the API at this address; unset, it assumes port 4200 and shows "Can't connect" (seen here).
            "PREFECT_UI_API_URL": f"http://{HOST}:{self.ports['prefect']}/api",
        }
        cmd = [BIN / "prefect", "server", "start", "--host", HOST, "--port", self.ports["prefect"]]
        rec = self.spawn("prefect-server", cmd, env)
        wait_for("prefect-server", lambda: http_ok(f"http://{HOST}:{self.ports['prefect']}/api/health"), 180, rec)

    def mlflow(self) -> None:
        # MLflow's basic-auth app: anyone signed in reads (default_permission READ), an experiment's or model's
        # creator manages it, the admin manages accounts. Its admin password is set the first time it starts.
        # auth_cache_ttl_seconds: a password is checked (PBKDF2, 0.29 s of CPU here) once a minute per account, not
        # on every request: a quickstart `twostage run` against the stack took 34.5 s with a check per request,
        # 10.7 s with the cache. With one server worker, a changed password or a deleted account takes effect at
        # once all the same (the worker that changes it drops its cache entry).
        auth_db = f"postgresql+psycopg2://{self.pg_url}/mlflow_auth"
        write_private(STACK / "mlflow-auth.ini", f"""[mlflow]
default_permission = READ
database_uri = {auth_db}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 60
""")
        env = base_env() | self.s3_env | {
            "MLFLOW_S3_ENDPOINT_URL": self.s3_env["AWS_ENDPOINT_URL"],
            "PGPASSWORD": self.secrets["postgres_password"],
            "MLFLOW_AUTH_CONFIG_PATH": str(STACK / "mlflow-auth.ini"),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.secrets["mlflow_admin_password"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secrets["mlflow_flask_secret_key"],
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job runner: ~0.5 GB instead of ~2.5 GB
        }
        cmd = [BIN / "mlflow", "server", "--app-name", "basic-auth", "--host", HOST, "--port", self.ports["mlflow"],
               "--workers", "1", "--backend-store-uri", f"postgresql+psycopg2://{self.pg_url}/mlflow",
               "--serve-artifacts", "--artifacts-destination", f"s3://{BUCKET}/mlflow-artifacts"]  # fmt: skip
        rec = self.spawn("mlflow", cmd, env)
        wait_for("mlflow", lambda: http_ok(f"http://{HOST}:{self.ports['mlflow']}/health"), 180, rec)
        self.mlflow_account(MLFLOW_PIPELINE_USER, self.secrets["mlflow_pipeline_password"])
        self.mlflow_account(MLFLOW_VIEWER_USER, self.secrets["mlflow_viewer_password"])
        if ADOPT_MARKER.exists():
            self.adopt_unowned()
            ADOPT_MARKER.unlink()

    def mlflow_admin(self, method: str, path: str, **kwargs):
        """A request to MLflow's REST API as `admin`; a refusal is a StackError naming why."""
        import requests

        url = f"http://{HOST}:{self.ports['mlflow']}/api/{path}"
        answer = requests.request(method, url, auth=("admin", self.secrets["mlflow_admin_password"]), timeout=30,
                                  **kwargs)
        if answer.status_code == 401:
            raise StackError(f"mlflow: admin's password in {SECRETS_FILE} is not the one MLflow's account store holds "
                             "(it keeps the first one it was given): restore that file, or delete the stack folder "
                             "for a cold start")
        return answer
    def mlflow_account(self, user: str, password: str) -> None:
        """Make a non-admin MLflow account (as `admin`), or set its password to the kept one if it exists."""
        account = {"username": user, "password": password}
        if self.mlflow_admin("GET", "2.0/mlflow/users/get", params={"username": user}).status_code == 200:
            answer = self.mlflow_admin("PATCH", "2.0/mlflow/users/update-password", json=account)
        else:
            answer = self.mlflow_admin("POST", "2.0/mlflow/users/create", json=account)
        if answer.status_code != 200:
            raise StackError(f"mlflow: account {user} could not be made ({answer.status_code} {answer.text[:200]}); "
                             f"see {log_path('mlflow')}")

    def adopt_unowned(self) -> None:
        """Give the pipeline's account MANAGE on every experiment and registered model of a stack made before it had
        accounts: the pipeline made them all, and without an owner its account could only read them (403)."""
        def every(method: str, path: str, key: str, **query) -> list[dict]:
            found, token = [], None
            while True:
                page = {**query, "max_results": 1000, **({"page_token": token} if token else {})}
                answer = (self.mlflow_admin(method, path, json=page) if method == "POST"
                          else self.mlflow_admin(method, path, params=page)).json()
                found += answer.get(key, [])
                if not (token := answer.get("next_page_token")):
                    return found

        owned = [("experiment", e["experiment_id"]) for e in every(
            "POST", "2.0/mlflow/experiments/search", "experiments", view_type="ALL")] + [
            ("registered_model", m["name"]) for m in every("GET", "2.0/mlflow/registered-models/search",
                                                           "registered_models")]
        for resource_type, resource_id in owned:
            grant = {"username": MLFLOW_PIPELINE_USER, "resource_type": resource_type, "resource_id": resource_id,
                     "permission": "MANAGE"}
            answer = self.mlflow_admin("POST", "3.0/mlflow/users/permissions/grant", json=grant)
            if answer.status_code != 200:
                raise StackError(f"mlflow: could not give {MLFLOW_PIPELINE_USER} {resource_type} {resource_id} "
                                 f"({answer.status_code} {answer.text[:200]})")
        print(f"  (a stack made before it had accounts: {MLFLOW_PIPELINE_USER} now manages its {len(owned)} "
              "experiments and registered models)", flush=True)

    def client_process_env(self) -> dict[str, str]:
        """What the CLI calls and the workers get: the client environment, a private PREFECT_HOME, heartbeats."""
        (STACK / "prefect-client").mkdir(exist_ok=True)
        return base_env() | self.worker_env | {
            "PREFECT_HOME": str(STACK / "prefect-client"),
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",  # flow runs emit heartbeats: the crash detector's input
        }  # fmt: skip

    def prefect_setup(self) -> None:
        env = self.client_process_env()
        setup = [BIN / "python", REPO / "deploy" / "prefect_setup.py"]  # work pool and automations, idempotent
        self.run("prefect-setup", "deploy/prefect_setup.py", setup, env, timeout=120)
        deploy = [BIN / "prefect", "--no-prompt", "deploy", "--all"]  # prefect.yaml: the shipped configs
        self.run("prefect-setup", "prefect deploy --all", deploy, env, timeout=300)

    def workers(self) -> None:
        env = self.client_process_env() | {
            # The workers share this host's cores: each flow run's torch gets its share of them. With every run
            # taking all cores, two at once on 2 cores ran 4x slower each (OpenMP threads oversubscribed), and a
            # sweep on two workers took 1.18x as long as on one (benchmarks/sweep.py).
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(WORKERS))),
            # A worker asks for work every 10 s by default, so a point waited up to 10 s for a free worker.
            "PREFECT_WORKER_QUERY_SECONDS": "2",
        }
        for name in WORKERS:
            # --limit 1: a worker trains one flow run at a time (training takes its cores), so runs submitted
            # together spread over the workers instead of queueing on the first to poll
            cmd = [BIN / "prefect", "--no-prompt", "worker", "start", "--pool", POOL, "--name", f"stack-{name}",
                   "--install-policy", "never", "--limit", "1"]  # fmt: skip
            self.spawn(name, cmd, env)

        def online() -> bool:
            url = f"{self.client_env['PREFECT_API_URL']}/work_pools/{POOL}/workers/filter"
            request = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json",
                                                                      "Authorization": self.prefect_authorization()})
            with urllib.request.urlopen(request, timeout=3) as response:
                found = {w["name"] for w in json.load(response) if w["status"] == "ONLINE"}
            return {f"stack-{name}" for name in WORKERS} <= found

        for name in WORKERS:
            rec = self.state["processes"][name]
            wait_for(name, lambda rec=rec: alive(rec) and online(), 120, rec)

    def prefect_authorization(self) -> str:
        return "Basic " + base64.b64encode(self.secrets["prefect_auth_string"].encode()).decode()

    def __call__(self) -> None:
        began = time.monotonic()
        print(f"Starting the team stack in {STACK} (logs in {STACK / 'logs'})", flush=True)
        self.timed("postgres", self.postgres)
        self.timed("s3", self.s3)
        self.timed("prefect-server", self.prefect_server)
        self.timed("mlflow", self.mlflow)
        self.timed("prefect-setup", self.prefect_setup)
        self.timed("workers", self.workers)
        self.state["timings_s"]["total"] = round(time.monotonic() - began, 1)
        save_state(self.state)
        write_private(ENV_FILE, exports(self.client_env))
        write_private(WORKER_ENV_FILE, exports(self.worker_env))
        print(f"\nStack up in {self.state['timings_s']['total']:.1f} s.")
        print(f"  Prefect UI  http://{HOST}:{self.ports['prefect']}   (it asks for the auth string: "
              "PREFECT_API_AUTH_STRING in the env file)")
        print(f"  MLflow UI   http://{HOST}:{self.ports['mlflow']}   (sign in as {MLFLOW_PIPELINE_USER}, "
              f"{MLFLOW_VIEWER_USER} or admin)")
        print(f"  S3          {self.s3_env['AWS_ENDPOINT_URL']} (bucket {BUCKET})")
        print(f"  PostgreSQL  {self.pg_url}")
        print(f"\nA client: `source {ENV_FILE}` ({', '.join(self.client_env)}).")
        print(f"A worker on another host: {WORKER_ENV_FILE} (adds the S3 keys and TWOSTAGE_STORAGE).")
        print(f"Every password and key: {SECRETS_FILE}. These files are readable by you alone (mode 600).")


def up() -> int:
    state = load_state()
    if state and (running := [n for n, rec in state["processes"].items() if alive(rec)]):
        print(f"stack: already running in {STACK} ({', '.join(running)}); `stack.py down` first", file=sys.stderr)
        return 1
    for folder in (STACK, STACK / "logs"):
        folder.mkdir(mode=0o755, exist_ok=True)
    ENV_FILE.unlink(missing_ok=True)
    WORKER_ENV_FILE.unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated (SIGTERM)"))  # cleaned up like Ctrl-C
    # Started from `nohup` or a script's `&`, we inherit SIGINT ignored, and so would the servers: a Prefect worker
    # turns SIGTERM into SIGINT to stop, and would then never stop. With a handler here, they start with the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        Up()()
    except BaseException as error:  # noqa: BLE001 - also Ctrl-C: never leave half a stack running
        message = str(error) if isinstance(error, StackError) else f"{type(error).__name__}: {error}"
        print(f"\nstack up failed: {message}\nstopping what was started ...", file=sys.stderr)
        down(quiet=True)
        print(f"stack up failed: {message}", file=sys.stderr)
        return 1
    return 0


# --- down, status, env -------------------------------------------------------------------------------------


def stop(name: str, rec: dict, grace: float = 15) -> list[int]:
    """Stop one component: its process group, and any descendant that left it. Returns the pids that survive."""
    if not alive(rec):
        return []
    pids = [rec["pid"], *descendants([rec["pid"]])]
    # A group whose leader is one of ours is signalled whole (it was made by start_new_session); any other
    # process alone, so that a group we did not make (the caller's shell, say) is never signalled.
    groups = {stat[2] for pid in pids if (stat := proc_stat(pid)) and stat[2] in pids}
    loners = [pid for pid in pids if (stat := proc_stat(pid)) and stat[2] not in groups]
    if rec.get("pg_ctl"):
        pg_ctl = [PG_BIN / "pg_ctl", "-D", STACK / "postgres", "-m", "fast", "-w", "-t", "30", "stop"]
        subprocess.run(as_postgres(pg_ctl), env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for kill, target in [(os.killpg, group) for group in groups] + [(os.kill, pid) for pid in loners]:
            try:
                kill(target, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5)
        while time.monotonic() < deadline and any(proc_stat(pid) for pid in pids):
            time.sleep(0.2)
        if not any(proc_stat(pid) for pid in pids):
            break
        print(f"  {name}: still running after SIGTERM, sending SIGKILL", file=sys.stderr)
    return [pid for pid in pids if proc_stat(pid)]


def down(quiet: bool = False) -> int:
    state = load_state()
    if not state:
        if not quiet:
            print(f"stack: nothing recorded in {STATE}; nothing to stop")
        return 0
    survivors, stopped = [], 0
    for name, rec in reversed(state["processes"].items()):
        was_alive = alive(rec)
        left = stop(name, rec)
        survivors += left
        stopped += was_alive
        if not quiet:
            print(f"  {name:<15} pid {rec['pid']:<7} {'stopped' if was_alive else 'was not running'}")
    checked = [rec["pid"] for rec in state["processes"].values()]
    if survivors or any(alive(rec) for rec in state["processes"].values()):
        print(f"stack down: processes still alive: {survivors}", file=sys.stderr)
        return 1
    STATE.unlink()
    ENV_FILE.unlink(missing_ok=True)
    WORKER_ENV_FILE.unlink(missing_ok=True)
    print(
        f"stack down: stopped {stopped} component(s); none of the recorded pids {checked} (nor their "
        f"descendants) is alive. Data kept in {STACK}."
    )
    return 0


def status() -> int:
    state = load_state()
    if not state:
        print(f"stack: not running (no {STATE})")
        return 3
    ports = state["ports"]
    checks = {
        "postgres": lambda: socket.create_connection((HOST, ports["postgres"]), 2).close() or True,
        "s3": lambda: socket.create_connection((HOST, ports["s3"]), 2).close() or True,
        "prefect-server": lambda: http_ok(f"http://{HOST}:{ports['prefect']}/api/health"),
        "mlflow": lambda: http_ok(f"http://{HOST}:{ports['mlflow']}/health"),
    }
    all_up = True
    for name, rec in state["processes"].items():
        try:
            healthy = alive(rec) and checks.get(name, lambda: True)()
        except Exception:  # noqa: BLE001
            healthy = False
        all_up &= healthy
        word = "up" if healthy else "sick" if alive(rec) else "DOWN"  # sick: running, not answering
        rss, pss = memory_mb(rec)
        detail = f"pid {rec['pid']:<7} rss {rss:5.0f} MB  pss {pss:5.0f} MB" if alive(rec) else "gone"
        print(f"  {name:<15} {word:<5} {detail}")
    print(f"  Prefect UI http://{HOST}:{ports['prefect']}   MLflow UI http://{HOST}:{ports['mlflow']}")
    return 0 if all_up else 3


RESTARTABLE = {"prefect-server": Up.prefect_server, "mlflow": Up.mlflow}


def restart(name: str) -> int:
    """Stop one server of the running stack and start it again on its port (what a server restart or an outage
    looks like to the pipeline)."""
    state = load_state()
    if not state or name not in state["processes"]:
        print(f"stack: no {name} recorded in {STATE}", file=sys.stderr)
        return 1
    if "PREFECT_API_AUTH_STRING" not in (ENV_FILE.read_text() if ENV_FILE.exists() else ""):
        print("stack: this stack was started by a version without credentials; `stack.py down`, then `up`",
              file=sys.stderr)
        return 1
    stop(name, state["processes"][name])
    try:
        RESTARTABLE[name](Up(recorded=state))
    except StackError as error:
        print(f"stack restart failed: {error}", file=sys.stderr)
        return 1
    print(f"  {name:<15} restarted, pid {state['processes'][name]['pid']}")
    return 0


def env() -> int:
    if not ENV_FILE.exists():
        print(f"stack: not running (no {ENV_FILE})", file=sys.stderr)
        return 3
    print(ENV_FILE.read_text(), end="")
    return 0


if __name__ == "__main__":
    commands = {"up": up, "down": down, "status": status, "env": env}
    if len(sys.argv) == 3 and sys.argv[1] == "restart" and sys.argv[2] in RESTARTABLE:
        sys.exit(restart(sys.argv[2]))
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: {Path(sys.argv[0]).name} {'|'.join(commands)} | restart {'|'.join(RESTARTABLE)}")
    sys.exit(commands[sys.argv[1]]())
