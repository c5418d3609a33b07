"""MLflow tracking through explicit run ids (no fluent global state), so Prefect tasks in any thread
log to the right run: one parent run per retrain, one nested run per stage.

Mid-run outages: metrics go through a small write-ahead buffer. A metric that cannot be sent is
kept (in memory and in a JSONL spool file under the stage's work dir) and flushed, in order, on
the next successful call or at the end of the stage. Every send first asks the server's /health
(2 s timeout), so a training step never waits out MLflow's own retries (minutes) while the server
is down. A stage never finishes with unsent metrics: `finish` waits about a minute for the server,
then fails the stage, and the retried stage's tracker reads the spool back and sends it
(docs/reliability.md).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
# On a run that ended FAILED or KILLED (a retrain's parent run, a stage's run): the error, "Type: message",
# cut to fit MLflow's tag value limit (Tracker.end_failed).
ERROR_TAG = "perennial.error"
ERROR_TAG_CHARS = 5000
# A retrain's parent run carries these, for `perennial status` (app/status.py) and resumes (tasks/runtime.py).
FLOW_RUN_ID_TAG = "prefect.flow_run_id"
FLOW_RUN_NAME_TAG = "prefect.flow_run_name"
# Every flow run that worked on a parent run, oldest first (a killed attempt, then the one that resumed it).
FLOW_RUNS_TAG = "perennial.flow_run_ids"
S3_PREFIX_TAG = "perennial.s3_prefix"
RUN_KEY_TAG = "perennial.run_key"
# A retrain's lineage: the registered model it retrains. A run key is looked up within its lineage.
LINEAGE_TAG = "perennial.lineage"
# On a stage attempt whose process died: the id of the attempt that took over (Tracker._start_stage_run).
SUPERSEDED_BY_TAG = "perennial.superseded_by"
# The MLflow 3 UI's kind of an experiment; one without it is inferred to be GenAI.
# "custom_model_development" is the UI's "Machine learning" kind.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The UI's sidebar and landing page follow a per-browser "GenAI / Model training" switch that starts
# on GenAI (an empty traces overview), whatever the experiment's kind; links with this query open in
# Model training: the runs table, models, the model registry.
UI_WORKFLOW = "workflowType=machine_learning"
# The runs table shows no metric columns until a person picks them. A shared view (what the UI's
# "Share" button stores as an experiment tag) opens it with the summary metrics of each retrain:
# `#/experiments/<id>/runs?viewStateShareKey=perennial` (runs_table_link).
RUNS_VIEW = "perennial"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW}"
RUNS_VIEW_METRICS = ["ap", "aip", "bwt", "fwt", "forgetting_mean", "general_ppl_final", "general_task_delta", "drift/kl_mean"]


# Where metrics also go while a Prefect task runs: a callable(metrics, step) that tasks/progress.py sets for
# the task's duration, so the task run's log shows training progress (step/total, loss) as MLflow gets it.
METRICS_OBSERVER: ContextVar[Callable[[dict, int], None] | None] = ContextVar("perennial_metrics_observer", default=None)


class TrackingError(RuntimeError):
    pass


class MlflowAuthError(TrackingError):
    """MLflow's basic-auth app refused the request: no credentials, or a wrong user or password. Deterministic:
    the same credentials are refused again, so nothing retries it (tasks/wrappers.py NOT_RETRIED, Tracker.flush)."""


# MLflow's client reads these (mlflow.utils.credentials); with the server's basic-auth app on they name who acts.
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"
# The error codes of a refusal by MLflow's auth app (401, 403): a retry gets the same answer.
AUTH_ERROR_CODES = ("UNAUTHENTICATED", "PERMISSION_DENIED")


def credential_secrets(environ: dict[str, str] | None = None) -> list[str]:
    """The MLflow credentials of this process in every form they could be written in: the password, the token,
    and `user:password` as text and as the Basic header's base64. The username itself is not secret (it is the
    identity decisions are recorded under) and is left as it is."""
    import base64

    environ = os.environ if environ is None else environ
    user, password, token = (environ.get(key, "") for key in (USERNAME_ENV, PASSWORD_ENV, TOKEN_ENV))
    values = [password, token]
    if password:
        pair = f"{user}:{password}"
        values += [pair, base64.b64encode(pair.encode()).decode()]
    return [value for value in values if value]


def is_auth_refusal(error: BaseException) -> bool:
    """An MlflowException (or MlflowAuthError) that MLflow's auth app answered 401 or 403: never worth a retry."""
    return isinstance(error, MlflowAuthError) or getattr(error, "error_code", None) in AUTH_ERROR_CODES


def _auth_request(uri: str, endpoint: str, params: dict | None = None, timeout: float = 10.0):
    """One GET to MLflow's REST API with this process's MLflow credentials and TLS settings (MLflow's own client
    code: MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN, MLFLOW_TRACKING_SERVER_CERT_PATH, ...), never retried."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    return http_request(get_default_host_creds(uri), endpoint, "GET", max_retries=0, timeout=timeout, params=params)


def authenticated_user(uri: str, timeout: float = 10.0) -> tuple[str, bool] | None:
    """Who MLflow at ``uri`` authenticates this process as: (username, is_admin), or None when the server runs
    without its basic-auth app (or is not an HTTP server). Asked once, never retried.

    Raises MlflowAuthError, saying which: no credentials were given, or the user or password is wrong.
    """
    if not uri.startswith("http"):
        return None
    try:
        response = _auth_request(uri, "/api/2.0/mlflow/users/current", timeout=timeout)
    except Exception as error:  # noqa: BLE001  (unreachable: check_tracking_server says so first)
        raise TrackingError(f"MLflow tracking server {uri}: could not ask who this process is ({type(error).__name__})") from None
    if response.status_code == 401:
        user = os.environ.get(USERNAME_ENV)
        if not user and not os.environ.get(TOKEN_ENV):
            raise MlflowAuthError(
                f"MLflow at {uri} requires authentication (its basic-auth app is on) and this request had no credentials: "
                f"set {USERNAME_ENV} and {PASSWORD_ENV} (with `perennial services up --auth`: `source` the identity's file, "
                f".perennial/services/retrain.env or reviewer.env). Not retried")
        who = f"user {user!r} ({USERNAME_ENV})" if user else f"the token in {TOKEN_ENV}"
        raise MlflowAuthError(f"MLflow at {uri} refused the credentials of {who}: wrong password, or no such user. "
                              f"Check {PASSWORD_ENV}; an admin can reset it. Not retried")
    if response.status_code != 200:  # 404: no auth app, so there are no users
        return None
    try:
        user = response.json()["user"]
    except (ValueError, KeyError, TypeError):
        return None
    return str(user["username"]), bool(user.get("is_admin"))


def resource_permission(uri: str, username: str, resource_type: str, resource_id: str, timeout: float = 10.0) -> str:
    """The permission (READ, USE, EDIT, MANAGE, NO_PERMISSIONS, DENY) MLflow's auth app resolves for ``username`` on
    one resource ("experiment" by id, "registered_model" by name), as a real request by that user would see it.
    A user may ask about itself. Raises MlflowAuthError when refused."""
    response = _auth_request(uri, "/api/3.0/mlflow/users/permissions/get", timeout=timeout,
                             params={"username": username, "resource_type": resource_type, "resource_id": resource_id})
    if response.status_code in (401, 403):
        raise MlflowAuthError(f"MLflow at {uri} would not say what {username!r} may do on {resource_type} {resource_id!r} "
                              f"(HTTP {response.status_code}). Not retried")
    if response.status_code != 200:
        raise TrackingError(f"MLflow at {uri}: permission lookup of {username!r} on {resource_type} {resource_id!r} "
                            f"failed with HTTP {response.status_code}")
    return str(response.json().get("permission", "NO_PERMISSIONS"))


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when the tracking server cannot be reached, or (with its basic-auth app
    on) refuses this process's credentials: one clear error (MlflowAuthError), not a retried 401."""
    if not uri.startswith("http"):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                authenticated_user(uri, timeout=timeout)
                return
    except (urllib.error.URLError, OSError) as error:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({error}). Start the local services with "
            "`make services-up` (or `perennial services up`), or set tracking.tracking_uri"
        ) from None
    raise TrackingError(f"MLflow tracking server {uri} is not healthy")


def server_healthy(uri: str, timeout: float = 2.0) -> bool:
    if not uri.startswith("http"):
        return True
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def runs_table_link(experiment_id: str) -> str:
    """The experiment's runs table with the summary metrics as columns, relative to the MLflow UI's address."""
    return f"#/experiments/{experiment_id}/runs?{UI_WORKFLOW}&viewStateShareKey={RUNS_VIEW}"


def _experiment_tags() -> dict[str, str]:
    """What a Perennial experiment carries for the MLflow UI: its kind and the runs-table view."""
    columns = ["attributes.`Dataset`", "attributes.`Models`", *(f"metrics.`{key}`" for key in RUNS_VIEW_METRICS)]
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, RUNS_VIEW_TAG: json.dumps({"selectedColumns": columns})}


def _mask(value: Any, secrets: list[str]) -> str:
    text = str(value)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str, spool_dir: Path | None = None, secrets: list[str] | None = None):
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment = experiment
        # MLflow credentials are always among them (credential_secrets), whoever opened the tracker.
        self.secrets = [s for s in [*(secrets or []), *credential_secrets()] if s]
        self._lock = threading.Lock()
        self.spool = (spool_dir / "unsent-metrics.jsonl") if spool_dir else None
        # What an earlier attempt of this stage could not send (it failed while the server was down).
        self._pending: list[tuple[str, Metric]] = self._read_spool()

    def experiment_id(self) -> str:
        """The experiment's id; it is created (or, from before, tagged) as a model-training
        experiment with the runs-table view (_experiment_tags).

        A tag already set (a person chose another kind in the UI) is left as it is.
        """
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            return self.client.create_experiment(self.experiment, tags=_experiment_tags())
        for key, value in _experiment_tags().items():
            if key not in found.tags:
                self.client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id

    def start_run(self, name: str, parent_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        all_tags = {"mlflow.runName": name, **(tags or {})}
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        run = self.client.create_run(self.experiment_id(), run_name=name, tags={k: _mask(v, self.secrets) for k, v in all_tags.items()})
        return run.info.run_id

    def _start_stage_run(self, name: str, parent_id: str, tags: dict[str, str] | None = None) -> str:
        """The run of one attempt at a stage, under its parent run (stages open it with `stage_run`).

        Earlier attempts at the same stage under the same parent that are still RUNNING belong to a
        process that was killed (or a retry's failed predecessor): they end KILLED, tagged
        ``perennial.superseded_by`` with the new run's id, so no stage shows RUNNING after a resume.
        """
        query = f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.run_name = '{name}' and attributes.status = 'RUNNING'"
        earlier = self.client.search_runs([self.experiment_id()], filter_string=query, max_results=100)
        run_id = self.start_run(name, parent_id=parent_id, tags=tags)
        for attempt in earlier:
            self.client.set_tag(attempt.info.run_id, SUPERSEDED_BY_TAG, run_id)
            self.client.set_terminated(attempt.info.run_id, status="KILLED")
        return run_id

    @contextmanager
    def stage_run(self, name: str, parent_id: str, tags: dict[str, str] | None = None) -> Iterator[str]:
        """One attempt at a stage (`_start_stage_run`), ended with the body: FINISHED when it returns,
        FAILED when it raises, KILLED on an interrupt (Ctrl-C, SIGTERM), so a stage that fails shows
        failed in MLflow at once instead of RUNNING until a resume supersedes it. Yields the run id."""
        run_id = self._start_stage_run(name, parent_id, tags)
        try:
            yield run_id
        except BaseException as error:
            self.end_failed(run_id, error)
            raise
        self.finish(run_id)

    def end_failed(self, run_id: str, error: BaseException) -> None:
        """End ``run_id`` FAILED (KILLED when ``error`` is an interrupt) with the error in ERROR_TAG.

        Never raises: the caller is about to raise the run's own error, which matters more. When MLflow
        is what failed, its client would retry for minutes, so an unreachable server leaves the run
        RUNNING (a resume supersedes it).
        """
        if not server_healthy(self.uri):
            log.warning("MLflow at %s does not answer; run %s stays RUNNING", self.uri, run_id)
            return
        try:
            self.set_tags(run_id, {ERROR_TAG: f"{type(error).__name__}: {error}"[:ERROR_TAG_CHARS]})
            self.client.set_terminated(run_id, status="FAILED" if isinstance(error, Exception) else "KILLED")
        except Exception as mark_error:  # noqa: BLE001 - see above: never hide the run's error behind this one
            log.warning("could not mark MLflow run %s failed: %s", run_id, mark_error)

    def find_run(self, tags: dict[str, str], status: str | None = None) -> str | None:
        """The newest run of the experiment that carries every one of ``tags`` (and ``status``), or None."""
        query = " and ".join([f"tags.`{tag}` = '{value}'" for tag, value in tags.items()]
                             + ([f"attributes.status = '{status}'"] if status else []))
        runs = self.client.search_runs([self.experiment_id()], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        batch = [Param(k, _mask(v, self.secrets)[:6000]) for k, v in params.items()]
        for start in range(0, len(batch), 100):
            self.client.log_batch(run_id, params=batch[start : start + 100])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, _mask(v, self.secrets)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        observer = METRICS_OBSERVER.get()
        if observer is not None:
            try:
                observer(metrics, step)
            except Exception:  # a log line must never fail a training step
                log.debug("metrics observer failed", exc_info=True)
        now = int(time.time() * 1000)
        with self._lock:
            for key, value in metrics.items():
                if value is None:
                    continue
                self._pending.append((run_id, Metric(key, float(value), now, step)))
            self._spool()
        self.flush(raise_on_error=False)

    def flush(self, raise_on_error: bool = True, attempts: int = 1) -> None:
        """Send buffered metrics in order; on failure keep them (and their spool file) for the next try."""
        for attempt in range(attempts):
            with self._lock:
                pending = list(self._pending)
            if not pending:
                return
            try:
                if not server_healthy(self.uri):
                    raise TrackingError(f"{self.uri} does not answer /health")
                by_run: dict[str, list[Metric]] = {}
                for run_id, metric in pending:
                    by_run.setdefault(run_id, []).append(metric)
                for run_id, metrics in by_run.items():
                    for start in range(0, len(metrics), 500):
                        chunk = metrics[start : start + 500]
                        self.client.log_batch(run_id, metrics=chunk)
                        # dropped batch by batch, so a failure halfway never sends a metric twice
                        sent = {id(metric) for metric in chunk}
                        with self._lock:
                            self._pending = [(r, m) for r, m in self._pending if id(m) not in sent]
                            self._spool()
                return
            except Exception as error:  # the server may be restarting; the buffer keeps everything
                last = error
                if is_auth_refusal(error):  # the same credentials are refused again: no retry loop
                    break
                if attempt + 1 < attempts:
                    time.sleep(min(2**attempt, 10))
        if raise_on_error:
            error_type = MlflowAuthError if is_auth_refusal(last) else TrackingError
            raise error_type(f"{len(self._pending)} metrics could not be sent to {self.uri}: {last}") from None

    @property
    def unsent(self) -> int:
        return len(self._pending)

    def _read_spool(self) -> list[tuple[str, Metric]]:
        if self.spool is None or not self.spool.exists():
            return []
        pending = []
        for line in self.spool.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                pending.append((row["run_id"], Metric(row["key"], row["value"], row["ts"], row["step"])))
        return pending

    def _spool(self) -> None:
        if self.spool is None:
            return
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spool, "w") as handle:
            for run_id, metric in self._pending:
                handle.write(json.dumps({"run_id": run_id, "key": metric.key, "value": metric.value, "step": metric.step, "ts": metric.timestamp}) + "\n")

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, _mask(text, self.secrets), artifact_file)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.flush(attempts=10)  # waits up to ~65 s for a restarting server, then fails the stage
        self.client.set_terminated(run_id, status=status)


def flow_run_history(tags: dict[str, str]) -> list[str]:
    """The flow run ids of a parent run's FLOW_RUNS_TAG, oldest first."""
    return [run_id for run_id in tags.get(FLOW_RUNS_TAG, "").split(",") if run_id]
