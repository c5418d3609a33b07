"""Load and secrets, on one set of real retrains (docs/reliability.md).

Five concurrent triggers of the same nightly retrain lineage (incremental ingestion from S3, the
micro config) run once per module; one test checks that the lineage lock let one of them train
at a time and left the replay buffer and the ingestion watermark intact, the other greps every
output of those runs (and of a failing run) for the S3 keys. Sharing the runs keeps CI cost to
one real training.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import threading
import traceback
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.continual_retrain import continual_retrain
from models.cl.replay import ReplayBuffer
from perennial import demo_data
from perennial.config import StorageConfig, build_config
from perennial.ingest import read_watermark
from perennial.locks import lineage_limit_name
from perennial.storage import MANIFEST_NAME, ObjectStore, StorageError
from tests.test_pipeline import micro_config

pytestmark = pytest.mark.integration

TRIGGERS = 5
RUN_KEY = "nightly-20990101"  # what `run_key: nightly-{date}` expands to: every trigger of that night shares it
PREFIX = "perennial"


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def publish_incoming(store: ObjectStore) -> dict[str, list[str]]:
    """The objects a nightly tick finds under incoming/, per dataset."""
    seed = 7
    general = demo_data.general_corpus(128, seed)
    task = demo_data.demo_tasks(seed)["arithmetic"]
    objects = {
        "incoming/general/day1.jsonl": [{"text": t, "split": "test" if i < 8 else "train"} for i, t in enumerate(general)],
        "incoming/domain/day1.jsonl": [{"text": t, "split": "train"} for t in demo_data.domain_corpus(60, seed)],
        "incoming/tasks/day1.jsonl": demo_data.task_records(task, 48, 8, seed),
    }
    for key, rows in objects.items():
        store.put_bytes(key, _jsonl(rows))
    return {name: [key for key in objects if key.startswith(f"incoming/{name}/")] for name in ("general", "domain", "tasks")}


def nightly_config(services, tmp_path, bucket: str):
    data = micro_config(services, tmp_path).model_dump(mode="json")
    data["run_name"] = "nightly"
    data["storage"]["bucket"] = bucket
    data["tracking"].update(experiment=f"load-{bucket}", registered_model=f"load-{bucket}")

    def dataset(name: str, shape: str, role: str | None, new_data: str) -> dict:
        spec = {"name": name, "shape": shape, "sources": [{"uri": f"s3://{bucket}/incoming/{name}/"}], "incremental": {"new_data": new_data}}
        return {**spec, "role": role} if role else spec

    data["data"] = {"source": "datasets", "datasets": [
        dataset("general", "text", "general", "append"),
        dataset("domain", "text", "domain", "append"),
        dataset("tasks", "instruction", None, "next_task"),
    ]}
    return build_config(data)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def captured_output():
    """stdout, stderr and every INFO+ log record of this process (all threads), as text.

    INFO, not DEBUG: botocore's DEBUG dump of each request shows the access key id in its
    Authorization header (never the secret key; docs/reliability.md).
    """
    out = io.StringIO()
    handler = _Records()
    loggers = [logging.getLogger(), logging.getLogger("prefect")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    text = SimpleNamespace(value="")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield text
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
        text.value = out.getvalue() + "\n".join(handler.lines)


@pytest.fixture(scope="module")
def nightly(services, prefect_harness, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nightly")
    bucket = f"load-{uuid.uuid4().hex[:10]}"
    store = ObjectStore(StorageConfig(endpoint_url=services.s3_endpoint, bucket=bucket))
    store.ensure_bucket()
    incoming = publish_incoming(store)
    cfg = nightly_config(services, tmp, bucket)

    results: list = [None] * TRIGGERS
    errors: list = [None] * TRIGGERS

    def trigger(index: int) -> None:
        try:
            results[index] = continual_retrain(config=cfg.model_dump(mode="json"), run_key=RUN_KEY)
        except BaseException as error:  # reported by the tests
            errors[index] = error

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the single_torch_thread fixture would, which a module fixture cannot use
    try:
        with captured_output() as output:
            threads = [threading.Thread(target=trigger, args=(i,), name=f"trigger-{i}") for i in range(TRIGGERS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=600)
    finally:
        torch.set_num_threads(torch_threads)
    return SimpleNamespace(cfg=cfg, store=store, incoming=incoming, results=results, errors=errors, output=output,
                           work_dir=tmp / "work", stuck=[t.name for t in threads if t.is_alive()])


@pytest.mark.slow
def test_concurrent_triggers_of_one_lineage_train_one_at_a_time(nightly, services):
    assert not nightly.stuck, nightly.stuck
    assert nightly.errors == [None] * TRIGGERS, nightly.errors  # all finish: none refused, none failed
    first = nightly.results[0]
    for summary in nightly.results[1:]:
        assert summary["mlflow_run_id"] == first["mlflow_run_id"] and summary["checkpoints"] == first["checkpoints"]
        assert summary["accuracy_matrix"] == first["accuracy_matrix"]
        assert summary["registered_model"]["version"] == first["registered_model"]["version"] == 1

    client = MlflowClient(services.mlflow_uri)
    experiment = client.get_experiment_by_name(nightly.cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [first["mlflow_run_id"]]  # one retrain, not five racing ones
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == first["mlflow_run_id"]),
                      key=lambda r: r.info.start_time)
    # Every stage run of every trigger (a resumed trigger opens its own stage runs) lies after the previous one ended.
    assert all(r.info.status == "FINISHED" for r in children)
    for before, after in zip(children, children[1:]):
        assert after.info.start_time >= before.info.end_time, (before.data.tags["mlflow.runName"], after.data.tags["mlflow.runName"])
    trained = [r.data.tags["mlflow.runName"] for r in children if client.get_metric_history(r.info.run_id, "train/loss")]
    assert sorted(trained) == sorted(set(trained)) and "cit-01-tasks-1" in trained  # each stage trained exactly once

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        limit = prefect.read_global_concurrency_limit_by_name(lineage_limit_name(nightly.cfg.tracking.registered_model))
    assert limit.limit == 1 and limit.active_slots == 0

    # the replay buffer and every dataset version are committed once, and verify
    store = nightly.store
    replay = [i.key for i in store.list(f"{PREFIX}/runs/") if "/replay/" in i.key and i.key.endswith(MANIFEST_NAME)]
    assert len(replay) == 1
    verify = nightly.work_dir.parent / "verify"
    store.download_dir(replay[0].rsplit("/", 1)[0], verify / "replay")  # every sha256 checked against the manifest
    buffer = ReplayBuffer.from_jsonl(verify / "replay" / "buffer.jsonl")  # parsed as the next task would
    assert buffer.task_names() == ["tasks-1"] and buffer.records()
    for name, keys in nightly.incoming.items():
        versions = [i.key for i in store.list(f"{PREFIX}/datasets/{name}/") if i.key.endswith(MANIFEST_NAME)]
        assert len(versions) == 1, versions  # five ticks, one version: nothing ingested twice
        digest = versions[0].split("/")[-2]
        store.download_dir(versions[0].rsplit("/", 1)[0], verify / "data" / name)
        watermark = read_watermark(store, PREFIX, name)
        etags = {f"s3://{store.bucket}/{info.key}": info.etag for key in keys for info in store.list(key)}
        assert watermark["processed"] == etags and watermark["version"] == digest


# --- secrets -------------------------------------------------------------------------------------


def _texts_from_mlflow(client: MlflowClient, experiment_name: str, registered_model: str, download_to: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    experiment = client.get_experiment_by_name(experiment_name)
    found["experiment"] = json.dumps(experiment.tags)
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        rid = run.info.run_id
        found[f"run {rid} params"] = json.dumps(run.data.params)
        found[f"run {rid} tags"] = json.dumps(run.data.tags)  # run name and description (mlflow.note.content) are tags
        found[f"run {rid} metrics"] = json.dumps(sorted(run.data.metrics))
        found[f"run {rid} inputs"] = repr(run.inputs)
        local = Path(client.download_artifacts(rid, "", str(download_to / rid)))
        for path in local.rglob("*"):
            if path.is_file():
                found[f"run {rid} artifact {path.relative_to(local)}"] = path.read_bytes().decode("latin-1")
    model = client.get_registered_model(registered_model)
    found["registered model"] = json.dumps({"description": model.description, "tags": model.tags})
    for version in client.search_model_versions(f"name = '{registered_model}'"):
        found[f"model version {version.version}"] = json.dumps(
            {"description": version.description, "tags": version.tags, "source": version.source, "run_link": version.run_link})
    return found


def _texts_from_prefect() -> dict[str, str]:
    from prefect.client.orchestration import get_client

    def every(read) -> list:  # the API answers at most 200 per call
        items, offset = [], 0
        while page := read(limit=200, offset=offset):
            items += page
            offset += len(page)
        return items

    found: dict[str, str] = {}
    with get_client(sync_client=True) as prefect:
        for flow_run in every(prefect.read_flow_runs):
            found[f"flow run {flow_run.name}"] = flow_run.model_dump_json()  # parameters, state message, tags
        for task_run in every(prefect.read_task_runs):
            found[f"task run {task_run.name}"] = task_run.model_dump_json()
        found["prefect logs"] = "\n".join(log.message for log in every(prefect.read_logs))
        for artifact in every(prefect.read_artifacts):
            found[f"prefect artifact {artifact.key}"] = f"{artifact.description}\n{artifact.data}"
    return found


def _texts_from_tree(root: Path, label: str) -> dict[str, str]:
    return {f"{label} {p.relative_to(root)}": p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_no_output_of_a_run_holds_the_s3_keys(nightly, services, tmp_path):
    access, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    # The session services generate random keys (LocalServices._credentials), so a hit cannot be a coincidence.
    assert access.startswith("perennial-") and len(secret) >= 24
    assert services.client_env()["AWS_SECRET_ACCESS_KEY"] == secret

    # A failing run: a bucket S3 refuses, after the keys were used to ask for it.
    bad = nightly.cfg.model_dump(mode="json")
    bad["storage"]["bucket"] = "no..such.bucket"
    with captured_output() as failing_output, pytest.raises(StorageError) as failure:
        continual_retrain(config=build_config(bad).model_dump(mode="json"), run_key="nightly-bad-bucket")
    assert "InvalidBucketName" in str(failure.value)

    outputs = {
        "stdout, stderr and logs of the five runs": nightly.output.value,
        "stdout, stderr and logs of the failing run": failing_output.value,
        "error of the failing run": "".join(traceback.format_exception(failure.value)),
        **_texts_from_mlflow(MlflowClient(services.mlflow_uri), nightly.cfg.tracking.experiment,
                             nightly.cfg.tracking.registered_model, tmp_path / "mlflow"),
        **_texts_from_prefect(),
        **_texts_from_tree(nightly.work_dir, "work dir"),
    }
    for info in nightly.store.list(f"{PREFIX}/"):  # everything the runs wrote to S3
        outputs[f"s3 {info.key}"] = nightly.store.get_bytes(info.key).decode("latin-1")
    assert any("nightly" in text for text in outputs.values())  # the grep reads real outputs
    assert any(key.startswith("run ") and "artifact" in key for key in outputs) and any("prefect artifact" in k for k in outputs)
    leaks = [(where, which) for where, text in outputs.items() for which, value in (("access key", access), ("secret key", secret))
             if value in text]
    assert leaks == []


# --- network exposure ------------------------------------------------------------------------------


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port`, read from the kernel's tables."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A = LISTEN
                continue
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, raw))
    return found


def test_services_listen_on_loopback_only(services):
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp to read listening sockets from (not Linux)")
    ports = {"s3": services.s3_port, "mlflow": services.mlflow_port, **services.weed_ports}
    listening = {name: _listening_addresses(port) for name, port in ports.items()}
    assert listening["s3"] and listening["mlflow"], listening
    exposed = {name: addresses for name, addresses in listening.items() if addresses - {"127.0.0.1"}}
    assert exposed == {}  # nothing on 0.0.0.0, :: or an external interface


def test_caller_aws_keys_are_not_accepted_by_the_s3_server(tmp_path, monkeypatch):
    """A key in the caller's environment when `services up` runs is no S3 identity; only the generated one is.

    SeaweedFS adds AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from its own environment as an admin
    identity, so a server started with the caller's whole environment kept those keys valid, and a
    rotation (source services.env, then rotate) left the old key working.
    """
    import boto3
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import ClientError

    from app.services import LocalServices

    stray = {"AWS_ACCESS_KEY_ID": "stray-" + uuid.uuid4().hex[:8], "AWS_SECRET_ACCESS_KEY": uuid.uuid4().hex}
    for key, value in stray.items():
        monkeypatch.setenv(key, value)
    local = LocalServices.on_free_ports(tmp_path / "services")
    env = local.up(timeout=120)
    try:
        def s3(access_key: str, secret_key: str):
            return boto3.client("s3", endpoint_url=local.s3_endpoint, aws_access_key_id=access_key,
                                aws_secret_access_key=secret_key, region_name="us-east-1",
                                config=BotoConfig(retries={"max_attempts": 1}))

        with pytest.raises(ClientError) as refused:
            s3(stray["AWS_ACCESS_KEY_ID"], stray["AWS_SECRET_ACCESS_KEY"]).list_objects_v2(Bucket=local.bucket)
        assert refused.value.response["Error"]["Code"] in {"InvalidAccessKeyId", "AccessDenied", "SignatureDoesNotMatch"}
        # the generated identity still works, and it is the only one the server loaded
        s3(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]).list_objects_v2(Bucket=local.bucket)
        log = (local.root / "seaweedfs.log").read_text(errors="replace")
        assert "Available keys: 2" not in log
    finally:
        local.down()
