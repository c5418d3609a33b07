"""`perennial status`: recent retrains, each an MLflow parent run joined with the Prefect flow run
that ran it (docs/operations.md).

The two sides disagree exactly when something went wrong, which is why both are shown: a flow
run that crashed leaves its MLflow run RUNNING, and a flow run that never reached preflight has
no MLflow run at all. The join key is the MLflow parent-run tag `prefect.flow_run_id`, written by
tasks/runtime.py:start_run.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone

from perennial.registry import REGISTERED_VERSION_TAG, VERDICT_TAG
from perennial.tracking import (
    UI_WORKFLOW,
    FLOW_RUN_ID_TAG,
    FLOW_RUN_NAME_TAG,
    FLOW_RUNS_TAG,
    PARENT_TAG,
    RUN_KEY_TAG,
    S3_PREFIX_TAG,
    flow_run_history,
)

RETRAIN_FLOW = "continual-retrain"


@dataclass
class FlowRunInfo:
    id: str
    name: str
    state: str
    started: datetime | None
    deployment: str | None


@dataclass
class PrefectSide:
    """Flow runs by id, or why there are none (`missing`)."""

    url: str | None
    runs: dict[str, FlowRunInfo]
    recent: list[FlowRunInfo]
    missing: str | None = None


def _utc(value: datetime | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):  # MLflow: epoch milliseconds
        value = datetime.fromtimestamp(value / 1000, tz=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def prefect_unreachable(url: str | None, timeout: float = 3.0) -> str | None:
    """Why the Prefect API cannot be asked, or None when it answers /health."""
    if not url:
        # Without a URL Prefect's client would start a throwaway local server: slow, and not the
        # server the deployments run on.
        return "PREFECT_API_URL is not set (pass --prefect-api-url or export PREFECT_API_URL)"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                return None
            return f"Prefect API {url} answered /health with HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        return f"Prefect API {url} is unreachable ({getattr(error, 'reason', error)})"


def prefect_side(url: str | None, flow_run_ids: list[str], limit: int) -> PrefectSide:
    """The flow runs named by MLflow tags, plus the newest `limit` continual-retrain flow runs."""
    missing = prefect_unreachable(url)
    if missing:
        return PrefectSide(url, {}, [], missing)
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowFilter,
        FlowFilterId,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ids = []
    for value in flow_run_ids:
        try:
            ids.append(UUID(value))
        except ValueError:
            pass
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            tagged = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))) if ids else []
            recent = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[RETRAIN_FLOW])),
                                           sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit)
            runs = {run.id: run for run in [*tagged, *recent]}
            deployment_ids = sorted({run.deployment_id for run in runs.values() if run.deployment_id}, key=str)
            deployments = client.read_deployments(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=deployment_ids))) if deployment_ids else []
            flow_ids = sorted({run.flow_id for run in runs.values()} | {d.flow_id for d in deployments}, key=str)
            flows = {flow.id: flow.name for flow in client.read_flows(flow_filter=FlowFilter(id=FlowFilterId(any_=flow_ids)))} if flow_ids else {}
    except Exception as error:  # an API that answers /health but fails a query still leaves the MLflow side
        return PrefectSide(url, {}, [], f"Prefect API {url} query failed ({type(error).__name__}: {error})")
    names = {d.id: f"{flows.get(d.flow_id, '?')}/{d.name}" for d in deployments}

    def info(run) -> FlowRunInfo:
        # The type (COMPLETED, CRASHED, SCHEDULED...) is stable; the name adds detail (Late, AwaitingRetry).
        state = run.state.type.value if run.state else "UNKNOWN"
        if run.state and run.state.name and run.state.name.upper() != state:
            state = f"{state} ({run.state.name})"
        return FlowRunInfo(str(run.id), run.name, state, run.start_time or run.expected_start_time,
                           names.get(run.deployment_id) if run.deployment_id else None)

    return PrefectSide(url, {str(key): info(run) for key, run in runs.items()}, [info(run) for run in recent])


def mlflow_side(client, experiment_id: str, limit: int) -> tuple[list, dict[str, list]]:
    """The newest parent runs (all of those fetched, newest first) and their stage runs."""
    # One search: parents and stages together; stages are grouped under their parent.
    runs = client.search_runs([experiment_id], max_results=max(limit * 30, 100), order_by=["attributes.start_time DESC"])
    stages: dict[str, list] = {}
    for run in runs:
        parent = run.data.tags.get(PARENT_TAG)
        if parent:
            stages.setdefault(parent, []).append(run)
    for children in stages.values():
        children.sort(key=lambda child: child.info.start_time or 0)
    parents = [run for run in runs if PARENT_TAG not in run.data.tags]
    return parents, stages


def _s3_prefix(run) -> str:
    tagged = run.data.tags.get(S3_PREFIX_TAG)
    if tagged:
        return tagged
    # Runs started before the tag existed also predate per-lineage folders: the layout runs/<key> of their time.
    params, key = run.data.params, run.data.tags.get(RUN_KEY_TAG)
    if key and "storage.bucket" in params:
        prefix = params.get("storage.prefix", "").strip("/")
        return f"s3://{params['storage.bucket']}/{prefix + '/' if prefix else ''}runs/{key}"
    return "-"


def _stage_name(run) -> str:
    return run.data.tags.get("stage", run.data.tags.get("mlflow.runName", "?"))


def _flow_run_ids(run) -> list[str]:
    """Every flow run that worked on a parent run, oldest first; the last is the current one."""
    tags = run.data.tags
    history = flow_run_history(tags)
    current = tags.get(FLOW_RUN_ID_TAG)
    if current and current not in history:  # runs started before the history tag existed
        history.append(current)
    return history


def _stages_line(children: list) -> str:
    """Each stage's newest attempt; attempts that a resume superseded are counted, not listed as RUNNING."""
    attempts: dict[str, list] = {}
    for child in children:
        attempts.setdefault(_stage_name(child), []).append(child)
    parts = []
    for name, runs in attempts.items():
        earlier = len(runs) - 1
        parts.append(f"{name}={runs[-1].info.status}" + (f" (+{earlier} superseded)" if earlier else ""))
    return "  ".join(parts)


def decisions(client, parents: list) -> dict[str, str]:
    """Per parent run with a registered version: that version's latest decision (its Decision tag), e.g.
    "champion: promoted by dana: ..."; a version deleted since says so."""
    found = {}
    for run in parents:
        registered = run.data.tags.get(REGISTERED_VERSION_TAG)
        if not registered:
            continue
        name, _, version = registered.rpartition("/")
        try:
            found[run.info.run_id] = client.get_model_version(name, version).tags.get("Decision", "")
        except Exception:  # noqa: BLE001  (deleted since, or the registry is unreadable)
            found[run.info.run_id] = "version not found in the registry"
    return found


def _registry_line(run, tracking_uri: str, decision: str | None) -> str:
    """`registry  NAME vN  VERDICT ...  now: DECISION  <version page>`; nothing registered: why not known."""
    registered = run.data.tags.get(REGISTERED_VERSION_TAG)
    if not registered:
        return "    registry -          no version registered (yet)" if run.info.status != "RUNNING" else ""
    name, _, version = registered.rpartition("/")
    verdict = run.data.tags.get(VERDICT_TAG, "verdict not recorded")
    now = f"  now: {decision}" if decision and not decision.startswith("needs review") else ""
    page = f"{tracking_uri.rstrip('/')}/#/models/{name}/versions/{version}?{UI_WORKFLOW}"
    return f"    registry {name} v{version}  {verdict}{now}  {page}"


def render(experiment_name: str, experiment_id: str, tracking_uri: str, parents: list, stages: dict[str, list],
           prefect: PrefectSide, limit: int, decided: dict[str, str] | None = None) -> str:
    lines = [f"experiment {experiment_name!r} at {tracking_uri}; times in UTC"]
    if prefect.missing:
        lines.append(f"prefect: column missing: {prefect.missing}")
    else:
        lines.append(f"prefect: {prefect.url}")
    shown = parents[:limit]
    if not shown:
        lines.append(f"no runs yet in experiment {experiment_name!r}")
    for run in shown:
        tags = run.data.tags
        lines.append("")
        lines.append(f"{_utc(run.info.start_time)}  {tags.get('mlflow.runName', run.info.run_id)}  key={tags.get(RUN_KEY_TAG, '-')}")
        flow_run_id = tags.get(FLOW_RUN_ID_TAG)
        flow_run = prefect.runs.get(flow_run_id) if flow_run_id else None
        if flow_run is not None:
            lines.append(f"    prefect  {flow_run.state:10s} flow run {flow_run.name!r}  "
                         f"deployment {flow_run.deployment or '- (not from a deployment)'}  started {_utc(flow_run.started)}")
        elif not flow_run_id:
            lines.append("    prefect  -          (this run records no Prefect flow run)")
        elif prefect.missing:
            lines.append(f"    prefect  ?          flow run {tags.get(FLOW_RUN_NAME_TAG, flow_run_id)!r} (state not available)")
        else:
            lines.append(f"    prefect  ?          flow run {tags.get(FLOW_RUN_NAME_TAG, flow_run_id)!r} not found on this Prefect API")
        children = stages.get(run.info.run_id, [])
        if children:
            last = children[-1]
            which = "current" if last.info.status == "RUNNING" else "last"
            stage = f"{which} stage {_stage_name(last)} ({last.info.status})"
        else:
            stage = "no stage started"
        lines.append(f"    mlflow   {run.info.status:10s} {stage}  {tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run.info.run_id}")
        if children:
            lines.append("    stages   " + _stages_line(children))
        current_name = flow_run.name if flow_run is not None else tags.get(FLOW_RUN_NAME_TAG, flow_run_id)
        for earlier_id in _flow_run_ids(run)[:-1]:
            earlier = prefect.runs.get(earlier_id)
            state, name = (earlier.state, earlier.name) if earlier else ("?", earlier_id)
            lines.append(f"    prefect  {state:10s} flow run {name!r} superseded: resumed by flow run {current_name!r}")
        lines.append(f"    s3       {_s3_prefix(run)}")
        registry_line = _registry_line(run, tracking_uri, (decided or {}).get(run.info.run_id))
        if registry_line:
            lines.append(registry_line)
    matched = {run_id for run in parents for run_id in _flow_run_ids(run)}
    orphans = [flow_run for flow_run in prefect.recent if flow_run.id not in matched]
    if orphans:
        lines.append("")
        lines.append(f"{RETRAIN_FLOW} flow runs with no MLflow run in this experiment "
                     "(not started yet, failed before preflight, or logging to another experiment):")
        for flow_run in orphans:
            lines.append(f"    {_utc(flow_run.started)}  {flow_run.state:10s} flow run {flow_run.name!r}  "
                         f"deployment {flow_run.deployment or '-'}")
    return "\n".join(lines) + "\n"


def status_report(client, tracking_uri: str, experiment_name: str, limit: int, prefect_url: str | None) -> str | None:
    """The whole report, or None when the experiment does not exist."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    parents, stages = mlflow_side(client, experiment.experiment_id, limit)
    ids = [run_id for run in parents[:limit] for run_id in _flow_run_ids(run)]
    prefect = prefect_side(prefect_url, ids, limit)
    return render(experiment_name, experiment.experiment_id, tracking_uri, parents, stages, prefect, limit,
                  decisions(client, parents[:limit]))
