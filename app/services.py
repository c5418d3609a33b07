"""Local services the project starts itself: SeaweedFS (S3) and an MLflow tracking server.

Everything lives under one folder (``.perennial/services`` by default): data, logs, PID files and
the generated S3 identities. Every instance gets its own ports, so tests can run beside ``make run``.
Both servers bind to 127.0.0.1 only. SeaweedFS runs with an identities file, so anonymous S3
access is denied; MLflow proxies artifacts into that S3 (``--artifacts-destination``), so MLflow
clients need no S3 credentials of their own.

With ``auth`` (``perennial services up --auth``, PERENNIAL_MLFLOW_AUTH=1) MLflow runs its basic-auth app as
``mlflow server --app-name perennial-auth`` (perennial/auth_app.py: the server itself refuses alias changes but
`challenger`, and renames, without MANAGE): anonymous requests are refused, and three identities get generated
passwords, kept in ``mlflow-auth.json`` (0600) and one 0600 ``<identity>.env`` each, never printed or logged:
``admin`` (MLflow's admin), ``retrain`` (EDIT on the experiment and the registered model: runs and versions) and
``reviewer`` (MANAGE on the registered model: promote, rollback, unpromote). services.env carries the retrain
identity. Once a root has started with auth it keeps it (ports.json), so a restart never opens the registry.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

HOST = "127.0.0.1"
VOLUME_SLOTS = 1000
# SeaweedFS marks every volume read-only when its disk has under 1% free (`weed volume -minFreeSpace`, which
# `weed mini` does not expose); S3 writes then fail with InternalError. We refuse to start below this floor
# plus room for a run's writes, so the user reads "free disk space" instead of a retried InternalError.
SEAWEEDFS_MIN_FREE_FRACTION = 0.01
WRITE_ROOM_BYTES = 1 << 30
# SeaweedFS `weed mini` opens these besides S3; each gets an explicit port so instances never collide.
_WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
)


class ServiceError(RuntimeError):
    pass


# MLflow's basic-auth identities (``auth``): the admin, the retrain's, a reviewer's (their usernames are these names).
AUTH_IDENTITIES = ("admin", "retrain", "reviewer")
# `mlflow server --app-name`: MLflow's basic-auth app with alias changes taking MANAGE (perennial/auth_app.py APP_NAME,
# an entry point of group mlflow.app in pyproject.toml; named here so the CLI does not import MLflow's server)
AUTH_APP = "perennial-auth"
USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


def _write_secret(path: Path, text: str) -> None:
    """Write a file only its owner can read: created 0600, never readable by others for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    path.chmod(0o600)


def _env_file(env: dict[str, str]) -> str:
    return "".join(f"export {key}={value}\n" for key, value in env.items())


@dataclass(frozen=True)
class DiskHeadroom:
    """Free space on the disk holding SeaweedFS's data, against the floor below which it refuses writes.

    Attributes are bytes. ``writable`` is False once ``free`` is under ``floor``: SeaweedFS then makes every
    volume read-only and each S3 PUT answers InternalError.
    """

    free: int
    floor: int

    @classmethod
    def of(cls, path: Path) -> "DiskHeadroom":
        usage = shutil.disk_usage(path)
        return cls(free=usage.free, floor=int(usage.total * SEAWEEDFS_MIN_FREE_FRACTION))

    @property
    def writable(self) -> bool:
        return self.free > self.floor

    def describe(self) -> str:
        gib = 1 << 30
        return f"{self.free / gib:.1f} GiB free, SeaweedFS refuses writes under {self.floor / gib:.1f} GiB free"

    def refuse_if_short(self, path: Path, room: int = WRITE_ROOM_BYTES) -> None:
        """Raise ServiceError when fewer than ``room`` bytes are writable above the floor."""
        if self.free - self.floor < room:
            raise ServiceError(
                f"not enough disk for SeaweedFS at {path}: {self.describe()} (1% of the disk), and a run needs "
                f"at least {room / (1 << 30):.1f} GiB above that. Every S3 write would fail with InternalError. "
                "Free disk space (`df -h`; old runs under .perennial/work, pytest's /tmp/pytest-of-*) "
                "or point PERENNIAL_SERVICES_DIR at a disk with more free space, then start the services again."
            )


def free_ports(count: int) -> list[int]:
    """Ports the OS reports free right now (held open together so they are distinct)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _ports_free(ports) -> bool:
    """Whether every port can be bound on HOST right now."""
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                return False
    return True


def _free_port_range(count: int, start: int) -> int:
    """The first base from ``start`` (in steps of 100) whose ``count`` consecutive ports are free."""
    for base in range(start, 65535 - count, 100):
        if _ports_free(range(base, base + count)):
            return base
    raise ServiceError(f"no {count} consecutive free ports above {start} for SeaweedFS; set PERENNIAL_WEED_PORT_BASE")


# The only variables a server inherits from the caller. Anything else, credentials above all, is
# left behind: SeaweedFS accepts AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from its environment as an
# extra admin identity, so a caller's stray keys (or the keys a rotation just replaced) would stay valid.
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")


def server_env(env: dict[str, str]) -> dict[str, str]:
    """A clean environment for a server: the few inherited basics, the offline/telemetry defaults, then ``env``."""
    from perennial.env import OFFLINE_DEFAULTS

    inherited = {key: os.environ[key] for key in _INHERITED if key in os.environ}
    return {**inherited, **OFFLINE_DEFAULTS, **env}


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def stop_process_group(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop the process group ``process`` leads (started with ``start_new_session=True``, so its children go too):
    SIGTERM, then SIGKILL after ``timeout`` seconds. Nothing when it has already exited."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _tool(name: str) -> str:
    """A console script of this environment (the venv's own `weed`, `mlflow`)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"`{name}` is not installed in this environment; run `make venv`")
    return found


@dataclass
class LocalServices:
    """SeaweedFS + MLflow rooted in one folder. Ports: S3, MLflow, and a base for SeaweedFS internals."""

    root: Path = Path(".perennial/services")
    s3_port: int = 8333
    mlflow_port: int = 5000
    weed_port_base: int = 19330
    bucket: str = "perennial"
    extra_env: dict = field(default_factory=dict)
    auth: bool = False  # MLflow's basic-auth app, with the admin / retrain / reviewer identities (AUTH_IDENTITIES)
    # (experiment, registered model) pairs the identities get their permissions on at `up` (grant_lineage)
    lineages: list = field(default_factory=list)
    # False: nobody chose the SeaweedFS internal ports (no PERENNIAL_WEED_PORT_BASE, no saved state), so a first
    # `up` that finds them taken (another instance on this machine) moves them to a free range instead of failing
    weed_ports_chosen: bool = True

    @classmethod
    def from_env(cls, root: str | Path | None = None) -> "LocalServices":
        """Ports from PERENNIAL_S3_PORT, PERENNIAL_MLFLOW_PORT, PERENNIAL_WEED_PORT_BASE, or saved state."""
        root = Path(root or os.environ.get("PERENNIAL_SERVICES_DIR", ".perennial/services"))
        saved = root / "ports.json"
        ports = json.loads(saved.read_text()) if saved.exists() else {}
        auth_env = os.environ.get("PERENNIAL_MLFLOW_AUTH", "").strip().lower()
        return cls(
            auth=auth_env in ("1", "true", "yes", "on") or bool(ports.get("mlflow_auth", False)),
            root=root,
            s3_port=int(os.environ.get("PERENNIAL_S3_PORT", ports.get("s3", 8333))),
            mlflow_port=int(os.environ.get("PERENNIAL_MLFLOW_PORT", ports.get("mlflow", 5000))),
            weed_port_base=int(os.environ.get("PERENNIAL_WEED_PORT_BASE", ports.get("weed_base", 19330))),
            bucket=os.environ.get("PERENNIAL_BUCKET", ports.get("bucket", "perennial")),
            weed_ports_chosen="PERENNIAL_WEED_PORT_BASE" in os.environ or "weed_base" in ports,
        )

    @classmethod
    def on_free_ports(cls, root: Path, bucket: str = "perennial", auth: bool = False) -> "LocalServices":
        s3, mlflow, *weed = free_ports(2 + len(_WEED_PORT_FLAGS))
        service = cls(root=root, s3_port=s3, mlflow_port=mlflow, bucket=bucket, auth=auth)
        service._weed_ports = dict(zip(_WEED_PORT_FLAGS, weed))
        return service

    # -- derived ------------------------------------------------------------------------------

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def weed_ports(self) -> dict[str, int]:
        explicit = getattr(self, "_weed_ports", None)
        if explicit:
            return explicit
        return {flag: self.weed_port_base + offset for offset, flag in enumerate(_WEED_PORT_FLAGS)}

    def _pidfile(self, name: str) -> Path:
        return self.root / f"{name}.pid"

    def _credentials(self) -> dict[str, str]:
        path = self.root / "credentials.json"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            creds = {"access_key": "perennial-" + secrets.token_hex(6), "secret_key": secrets.token_urlsafe(24)}
            _write_secret(path, json.dumps(creds))
        return json.loads(path.read_text())

    def client_env(self, identity: str | None = "retrain") -> dict[str, str]:
        """Variables a client of these services needs (written to services.env for `source`). With auth, the
        MLflow credentials of ``identity`` (admin, retrain, reviewer; services.env: retrain) come with them."""
        creds = self._credentials()
        mlflow_identity = {}
        if self.auth and identity is not None:
            user = self.auth_identities()[identity]
            mlflow_identity = {USERNAME_ENV: user["username"], PASSWORD_ENV: user["password"]}
        return {
            **mlflow_identity,
            "AWS_ACCESS_KEY_ID": creds["access_key"],
            "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "PERENNIAL_S3_ENDPOINT": self.s3_endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "PERENNIAL_BUCKET": self.bucket,
        }

    # -- lifecycle ----------------------------------------------------------------------------

    def up(self, timeout: float = 180.0) -> dict[str, str]:
        self.root.mkdir(parents=True, exist_ok=True)
        saved = self.root / "ports.json"
        had_auth = saved.exists() and bool(json.loads(saved.read_text()).get("mlflow_auth", False))
        mlflow_pid = self._pidfile("mlflow")
        if self.auth and not had_auth and mlflow_pid.exists() and _pid_alive(int(mlflow_pid.read_text())):
            # `up` leaves a running server as it is: it would stay open while this root said auth is on
            raise ServiceError(
                f"MLflow of {self.root} is running without auth, so `up --auth` would leave it open; nothing was changed. "
                f"Stop it first: `perennial services down --root {self.root}`, then `perennial services up --auth --root {self.root}`"
            )
        self._move_weed_ports_if_taken()
        (self.root / "ports.json").write_text(
            json.dumps({"s3": self.s3_port, "mlflow": self.mlflow_port, "weed_base": self.weed_port_base, "bucket": self.bucket,
                        "mlflow_auth": self.auth})
        )
        env = self.client_env()
        _write_secret(self.root / "services.env", _env_file(env))
        if self.auth:
            for identity in AUTH_IDENTITIES:
                _write_secret(self.root / f"{identity}.env", _env_file(self.client_env(identity)))
        self._start_weed(timeout)
        self._ensure_bucket(env)
        self._start_mlflow(env, timeout)
        if self.auth:
            for experiment, registered_model in self.lineages:
                self.grant_lineage(experiment, registered_model)
        return env

    def _move_weed_ports_if_taken(self) -> None:
        """A first `up` whose SeaweedFS internal ports nobody chose, and another instance holds: a free range instead."""
        if not self.weed_ports_chosen and not getattr(self, "_weed_ports", None) and not _ports_free(self.weed_ports.values()):
            self.weed_port_base = _free_port_range(len(_WEED_PORT_FLAGS), start=self.weed_port_base + 100)

    # -- MLflow's basic-auth app --------------------------------------------------------------

    def auth_identities(self) -> dict[str, dict[str, str]]:
        """identity -> {"username", "password"}, generated once into mlflow-auth.json (0600), with the Flask secret
        key of the auth app's CSRF protection. Never printed or logged."""
        path = self.root / "mlflow-auth.json"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            data = {identity: {"username": identity, "password": secrets.token_urlsafe(24)} for identity in AUTH_IDENTITIES}
            data["flask_secret_key"] = secrets.token_urlsafe(32)
            _write_secret(path, json.dumps(data))
        data = json.loads(path.read_text())
        return {identity: data[identity] for identity in AUTH_IDENTITIES}

    def _auth_server_env(self) -> tuple[list[str], dict[str, str]]:
        """The auth app's extra `mlflow server` arguments (AUTH_APP) and environment: its config (user store in the
        root), the admin's password for its first start, the Flask secret key."""
        self.auth_identities()
        data = json.loads((self.root / "mlflow-auth.json").read_text())
        users = self.root / "mlflow-auth.db"  # the password hashes: made 0600 before MLflow's sqlite opens it
        if not users.exists():
            users.touch(mode=0o600)
        users.chmod(0o600)
        ini = self.root / "mlflow-auth.ini"
        _write_secret(ini, "\n".join([
            "[mlflow]",
            "default_permission = READ",  # every identity reads; writes take a grant (grant_lineage)
            f"database_uri = sqlite:///{(self.root / 'mlflow-auth.db').resolve()}",
            f"admin_username = {data['admin']['username']}",
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
            # MLflow's own credential cache: without it every request pays a PBKDF2 check (~0.5 s on 2 cores, a retrain
            # makes hundreds). Password changes and deletions drop a user's entries at once (one server worker);
            # permissions are read on every request either way.
            "auth_cache_ttl_seconds = 60",
            "",
        ]))
        env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini.resolve()), "MLFLOW_AUTH_ADMIN_PASSWORD": data["admin"]["password"],
               "MLFLOW_FLASK_SERVER_SECRET_KEY": data["flask_secret_key"]}
        return ["--app-name", AUTH_APP], env

    def _admin_call(self, method: str, endpoint: str, body: dict | None = None, params: dict | None = None) -> tuple[int, dict]:
        """One request to MLflow's REST API as the admin: (status, JSON body or {})."""
        import base64
        import urllib.parse

        admin = self.auth_identities()["admin"]
        token = base64.b64encode(f"{admin['username']}:{admin['password']}".encode()).decode()
        url = f"{self.mlflow_uri}{endpoint}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw or b"{}")
        except ValueError:
            return status, {}

    def _admin_ok(self, method: str, endpoint: str, body: dict | None = None, params: dict | None = None) -> dict:
        status, answer = self._admin_call(method, endpoint, body, params)
        if status != 200:  # the error code only: MLflow's messages can quote a request's values
            raise ServiceError(f"MLflow auth setup: {method} {endpoint} answered HTTP {status} {answer.get('error_code', '')}")
        return answer

    def _ensure_users(self) -> None:
        for identity, user in self.auth_identities().items():
            if identity == "admin":
                continue
            status, _ = self._admin_call("GET", "/api/2.0/mlflow/users/get", params={"username": user["username"]})
            if status == 404:
                self._admin_ok("POST", "/api/2.0/mlflow/users/create", {"username": user["username"], "password": user["password"]})

    def _grant(self, identity: str, resource_type: str, resource_id: str, permission: str) -> None:
        """Give ``identity`` exactly ``permission`` on one resource (replacing a different grant)."""
        username = self.auth_identities()[identity]["username"]
        key = {"username": username, "resource_type": resource_type, "resource_id": resource_id}
        held = self._admin_ok("GET", "/api/3.0/mlflow/users/permissions/get", params=key).get("permission")
        if held == permission:
            return
        self._admin_call("POST", "/api/3.0/mlflow/users/permissions/revoke", key)  # 404 when there was no grant
        self._admin_ok("POST", "/api/3.0/mlflow/users/permissions/grant", {**key, "permission": permission})

    def grant_lineage(self, experiment: str, registered_model: str, auto_promote: bool = False) -> None:
        """Create (as the admin) the experiment and the registered model of a lineage, then grant: retrain EDIT on
        both (runs, versions, the `challenger` alias), reviewer MANAGE on the model (promote, rollback, unpromote).
        ``auto_promote``: retrain gets MANAGE on the model too, so registry.auto_promote can move `champion`.

        Created by the admin, not by a retrain: MLflow gives a resource's creator MANAGE on it. Safe to rerun.
        """
        self._ensure_users()
        status, found = self._admin_call("GET", "/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": experiment})
        if status == 200:
            experiment_id = found["experiment"]["experiment_id"]
        else:
            experiment_id = self._admin_ok("POST", "/api/2.0/mlflow/experiments/create", {"name": experiment})["experiment_id"]
        status, _ = self._admin_call("GET", "/api/2.0/mlflow/registered-models/get", params={"name": registered_model})
        if status == 404:
            self._admin_ok("POST", "/api/2.0/mlflow/registered-models/create", {"name": registered_model})
        self._grant("retrain", "experiment", experiment_id, "EDIT")
        self._grant("retrain", "registered_model", registered_model, "MANAGE" if auto_promote else "EDIT")
        self._grant("reviewer", "registered_model", registered_model, "MANAGE")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        pidfile = self._pidfile(name)
        if pidfile.exists() and _pid_alive(int(pidfile.read_text())):
            return
        log = open(self.root / f"{name}.log", "ab")
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=server_env(env), start_new_session=True
        )
        pidfile.write_text(str(process.pid))

    def _wait(self, name: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pid = int(self._pidfile(name).read_text())
        while time.monotonic() < deadline:
            if ready():
                return
            if not _pid_alive(pid):
                break
            time.sleep(0.2)
        tail = (self.root / f"{name}.log").read_text(errors="replace")[-2000:]
        raise ServiceError(f"{name} did not become ready within {timeout:.0f}s; last log lines:\n{tail}")

    def _start_weed(self, timeout: float) -> None:
        creds = self._credentials()
        identities = {
            "identities": [
                {
                    "name": "perennial",
                    "credentials": [{"accessKey": creds["access_key"], "secretKey": creds["secret_key"]}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        s3_config = self.root / "s3.json"
        s3_config.write_text(json.dumps(identities))
        s3_config.chmod(0o600)
        data = self.root / "seaweedfs"
        data.mkdir(exist_ok=True)
        DiskHeadroom.of(data).refuse_if_short(data)
        argv = [
            _tool("weed"),
            "mini",
            f"-dir={data}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-s3.port={self.s3_port}",
            f"-s3.config={s3_config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            "-master.telemetry=false",
            # A fixed number of volume slots. Left at 0, `weed mini` allows free disk / 1 GiB of them (62 at
            # 63 GB free), each bucket claims its own, and a test session's many buckets then ran out
            # ("No writable volumes" -> S3 InternalError) on a fuller disk. Slots cost nothing until written.
            f"-volume.max={VOLUME_SLOTS}",
            *(f"-{flag}={port}" for flag, port in self.weed_ports.items()),
        ]
        self._spawn("seaweedfs", argv, {})
        self._wait("seaweedfs", lambda: self._s3_ready(), timeout)

    def _s3_ready(self) -> bool:
        if not _port_open(self.s3_port):
            return False
        try:
            urllib.request.urlopen(f"{self.s3_endpoint}/", timeout=1)
        except urllib.error.HTTPError as error:  # 403 for anonymous access means S3 is serving
            return error.code in (403, 400)
        except OSError:
            return False
        return True

    def _ensure_bucket(self, env: dict[str, str]) -> None:
        from perennial.config import StorageConfig
        from perennial.env import environ_restored
        from perennial.storage import ObjectStore

        with environ_restored(env):
            os.environ.update(env)
            ObjectStore(StorageConfig(endpoint_url=self.s3_endpoint, bucket=self.bucket)).ensure_bucket()

    def _start_mlflow(self, env: dict[str, str], timeout: float) -> None:
        db = (self.root / "mlflow.db").resolve()
        argv = [
            _tool("mlflow"),
            "server",
            "--host",
            HOST,
            "--port",
            str(self.mlflow_port),
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            f"s3://{self.bucket}/mlflow-artifacts",
            "--serve-artifacts",
            "--workers",
            "1",
        ]
        auth_env = {}
        if self.auth:
            auth_args, auth_env = self._auth_server_env()
            argv += auth_args
        # The job executor (huey consumers) serves MLflow's GenAI jobs, which Perennial never submits.
        quiet = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
        server = {key: value for key, value in env.items() if key not in (USERNAME_ENV, PASSWORD_ENV)}  # a client's, not the server's
        self._spawn("mlflow", argv, {**server, **quiet, **auth_env, **self.extra_env})
        self._wait("mlflow", self._mlflow_ready, timeout)

    def _mlflow_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.mlflow_uri}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self, name: str, timeout: float = 15.0) -> bool:
        pidfile = self._pidfile(name)
        if not pidfile.exists():
            return False
        pid = int(pidfile.read_text())
        if _pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)
        pidfile.unlink(missing_ok=True)
        return True

    def kill(self, name: str) -> None:
        """Hard-kill a service (fault-injection tests)."""
        pid = int(self._pidfile(name).read_text())
        os.killpg(pid, signal.SIGKILL)
        while _pid_alive(pid):
            time.sleep(0.05)

    def down(self) -> None:
        self.stop("mlflow")
        self.stop("seaweedfs")

    def volume_bytes(self) -> int:
        """Bytes SeaweedFS's files take on disk (its volumes, filer store and logs under ``root/seaweedfs``)."""
        return sum(path.stat().st_size for path in (self.root / "seaweedfs").rglob("*") if path.is_file())

    def reclaim_disk(self, garbage_threshold: float = 0.01, pause: float = 2.0, timeout: float = 120.0) -> int:
        """Compact SeaweedFS's volumes now, returning to the disk the space of deleted objects; bytes returned.

        An S3 delete only marks the object: the filer frees its chunks a moment later, in the background, and their
        bytes stay in the volume files until the master vacuums a volume, which it does by itself only every 15
        minutes and only for volumes more than 30% garbage (`weed master -garbageThreshold`). After `perennial gc`
        the user wants the disk back, not the S3 count: this asks the master to vacuum every volume over
        ``garbage_threshold`` (a fraction), every ``pause`` seconds, until two rounds in a row return nothing (the
        filer's deletions have landed) or ``timeout`` seconds. Raises ServiceError when the master does not answer."""
        url = f"http://{HOST}:{self.weed_ports['master.port']}/vol/vacuum?garbageThreshold={garbage_threshold}"
        before = sizes = self.volume_bytes()
        unchanged, deadline = 0, time.monotonic() + timeout
        while unchanged < 2 and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    response.read()
            except (urllib.error.URLError, OSError) as error:
                raise ServiceError(f"SeaweedFS's master at {url} did not compact its volumes ({error}); start the "
                                   "services (`perennial services up`) and run `perennial gc` again") from None
            now = self.volume_bytes()
            unchanged, sizes = (unchanged + 1 if now >= sizes else 0), now
            if unchanged < 2:
                time.sleep(pause)
        return before - sizes

    def status(self) -> dict[str, dict]:
        checks = {"seaweedfs": (self.s3_endpoint, self._s3_ready), "mlflow": (self.mlflow_uri, self._mlflow_ready)}
        report = {}
        for name, (url, ready) in checks.items():
            pidfile = self._pidfile(name)
            pid = int(pidfile.read_text()) if pidfile.exists() else None
            report[name] = {"pid": pid, "running": bool(pid and _pid_alive(pid)), "ready": ready(), "url": url}
        report["mlflow"]["auth"] = self.auth
        headroom = DiskHeadroom.of(self.root if self.root.exists() else Path.cwd())
        report["seaweedfs"]["disk"] = headroom.describe()
        report["seaweedfs"]["writable"] = headroom.writable
        return report


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM raises KeyboardInterrupt, as Ctrl-C does.

    `kill PID`, a scheduler's stop or a CI timeout sends SIGTERM, whose default action ends the
    process at once: no `finally` runs, so services it started stay up and its MLflow run stays
    RUNNING. As an exception it unwinds like Ctrl-C. Only the main thread can set a handler; elsewhere
    this does nothing. The previous handler comes back on leaving.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def running_services(root: Path, bucket: str = "perennial", timeout: float = 180.0, auth: bool = False) -> Iterator[LocalServices]:
    """SeaweedFS + MLflow on free ports for the life of the block, their client variables in os.environ.

    On leaving, also by Ctrl-C or SIGTERM (`sigterm_as_interrupt`), the services are stopped and
    os.environ is restored. For benchmarks and scripts; `perennial services up` keeps them running instead.
    ``auth``: MLflow with its basic-auth app; os.environ then carries the retrain identity (client_env).
    Raises ServiceError when a service does not become ready within `timeout` seconds.
    """
    from perennial.env import environ_restored

    services = LocalServices.on_free_ports(root, bucket=bucket, auth=auth)
    with sigterm_as_interrupt():
        try:
            env = services.up(timeout=timeout)
            with environ_restored(env):
                os.environ.update(env)
                yield services
        finally:
            services.down()
