"""Fault injection against real services: S3 killed mid-upload, MLflow down mid-run and at start,
the disk filling up while a checkpoint is written (docs/reliability.md lists what each shows).

The S3 and MLflow faults kill and restart servers, so they get their own SeaweedFS + MLflow
(`fault_services`), never the session's `services` other tests share.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from mlflow.tracking import MlflowClient

from models.atomic import DiskFullError
from models.engine import load_state, save_state, train
from perennial.config import OptimConfig, StorageConfig, build_config
from app.services import LocalServices, ServiceError, _pid_alive, free_ports, sigterm_as_interrupt
from perennial.storage import MANIFEST_NAME, ObjectStore, StorageError, sha256_file
from perennial.tracking import Tracker, TrackingError
from tasks.stage import latest_checkpoint
from tests.test_engine import examples, tiny_model
from tests.test_pipeline import micro_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_torch_thread")]

# The fault services' credentials live under their own names, so the session services' AWS_* stay as they are.
ACCESS_ENV, SECRET_ENV = "PERENNIAL_FAULTS_ACCESS_KEY", "PERENNIAL_FAULTS_SECRET_KEY"


@pytest.fixture(scope="module")
def fault_services(tmp_path_factory):
    local = LocalServices.on_free_ports(tmp_path_factory.mktemp("fault-services"))
    env = local.up(timeout=120)
    os.environ[ACCESS_ENV], os.environ[SECRET_ENV] = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    yield local
    local.down()
    os.environ.pop(ACCESS_ENV, None)
    os.environ.pop(SECRET_ENV, None)


@pytest.fixture
def faults(fault_services) -> LocalServices:
    """Both fault services up at the start of every test, whatever an earlier test left killed."""
    fault_services.up(timeout=120)
    return fault_services


def fault_store(services: LocalServices, **storage) -> ObjectStore:
    cfg = StorageConfig(endpoint_url=services.s3_endpoint, bucket=f"f-{uuid.uuid4().hex[:12]}",
                        access_key_env=ACCESS_ENV, secret_key_env=SECRET_ENV, **storage)
    store = ObjectStore(cfg)
    store.ensure_bucket()
    return store


# --- S3 ------------------------------------------------------------------------------------------


def test_s3_killed_mid_upload_is_retried_and_never_shows_a_partial_checkpoint(faults, tmp_path):
    store = fault_store(faults, max_attempts=8)
    checkpoints = "runs/r1/stages/cit-01-a/checkpoints"
    prefix = f"{checkpoints}/step-00000004"
    source = tmp_path / "step-00000004"
    source.mkdir()
    names = [f"shard-{i}.safetensors" for i in range(4)]
    for name in names:
        (source / name).write_bytes(os.urandom(3 * 2**20))
    reader = ObjectStore(store.cfg)  # a second client: what any other process sees meanwhile

    sent: list[str] = []
    killed, looked = threading.Event(), threading.Event()
    seen: dict = {}
    problems: list[BaseException] = []

    def restart_and_look() -> None:
        try:
            time.sleep(1.0)  # the uploader meets a dead server and retries meanwhile
            faults.up(timeout=120)  # SeaweedFS again, same ports and data folder
            seen["manifest"] = reader.read_manifest(prefix)
            seen["objects"] = sorted(info.key.rsplit("/", 1)[1] for info in reader.list(prefix + "/"))
            seen["latest"] = latest_checkpoint(reader, checkpoints)
            try:
                reader.download_dir(prefix, tmp_path / "too-early")
            except StorageError as error:
                seen["download"] = str(error)
        except BaseException as error:  # surfaced by the main thread's assertions
            problems.append(error)
        finally:
            looked.set()

    def before_send(request, **_) -> None:
        key = unquote(urlsplit(request.url).path).split("/", 2)[2]
        sent.append(key)
        if key == f"{prefix}/{names[1]}" and not killed.is_set():
            # The first file is stored, the second is on its way: kill -9 the server now.
            killed.set()
            faults.kill("seaweedfs")
            threading.Thread(target=restart_and_look, daemon=True).start()
        if key.endswith("/" + MANIFEST_NAME):
            looked.wait(timeout=180)  # the commit waits until the reader has seen the interrupted upload

    store.client.meta.events.register("before-send.s3.PutObject", before_send)
    manifest = store.upload_dir(source, prefix, meta={"step": 4})

    assert killed.is_set() and not problems, problems
    # while interrupted: files are there but nothing is committed, so nothing would load or resume from it
    assert seen["manifest"] is None and seen["latest"] is None
    assert names[0] in seen["objects"] and MANIFEST_NAME not in seen["objects"]
    assert "never committed" in seen.get("download", "")
    # the interrupted PUT was sent again and the upload finished
    assert sent.count(f"{prefix}/{names[1]}") >= 2
    assert sorted(manifest["files"]) == names
    assert latest_checkpoint(reader, checkpoints) == prefix
    reader.download_dir(prefix, tmp_path / "restored")  # verifies every sha256 against the manifest
    for name in names:
        assert sha256_file(tmp_path / "restored" / name) == sha256_file(source / name)


def test_s3_answering_503_is_retried_then_a_clear_error(monkeypatch, tmp_path):
    """A server that only answers 503 (what S3 gateways say while overloaded or restarting): SeaweedFS
    cannot be made to do that on demand, so a stand-in HTTP server does."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    methods: list[str] = []

    class Unavailable(BaseHTTPRequestHandler):
        def answer(self) -> None:
            methods.append(self.command)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b"<Error><Code>ServiceUnavailable</Code><Message>restarting</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_PUT = do_GET = do_HEAD = do_POST = answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(ACCESS_ENV, "any")
    monkeypatch.setenv(SECRET_ENV, "any")
    store = ObjectStore(StorageConfig(endpoint_url=f"http://127.0.0.1:{server.server_address[1]}", max_attempts=2,
                                      access_key_env=ACCESS_ENV, secret_key_env=SECRET_ENV))
    (tmp_path / "weights.safetensors").write_bytes(b"w" * 1024)
    try:
        # upload_file wraps a 503 in boto3's S3UploadFailedError; it must be retried like any 5xx
        with pytest.raises(StorageError, match=r"S3 upload_file failed after 2 attempts .*Is the server up"):
            store.put_file(tmp_path / "weights.safetensors", "ckpt/weights.safetensors")
    finally:
        server.shutdown()
    # one put_file makes 3 PUTs (botocore's own retries); more means ObjectStore tried it again
    assert methods.count("PUT") >= 4


# --- MLflow --------------------------------------------------------------------------------------


def test_mlflow_down_mid_training_buffers_metrics_and_loses_none(faults, tmp_path):
    tracker = Tracker(faults.mlflow_uri, "faults", spool_dir=tmp_path / "stage")
    run_id = tracker.start_run("mlflow-outage")
    down = threading.Event()
    seconds_while_down: list[float] = []
    at_restart: dict = {}

    def log(metrics: dict, step: int) -> None:
        started = time.monotonic()
        tracker.log_metrics(run_id, {f"train/{k}": v for k, v in metrics.items()}, step)
        if down.is_set():
            seconds_while_down.append(time.monotonic() - started)

    def on_step_end(step: int, model) -> None:
        if step == 3:  # steps 1-3 reached MLflow; 4-6 are logged while it is dead
            faults.kill("mlflow")
            down.set()
        if step == 6:
            at_restart["unsent"] = tracker.unsent
            at_restart["spooled"] = tracker.spool.read_text().splitlines()
            faults.up(timeout=120)
            down.clear()

    cfg = OptimConfig(lr=5e-3, max_steps=8, batch_size=4, warmup_steps=1, log_every=1)
    result = train(tiny_model(), examples(16), cfg, seed=0, pad_token_id=0, log_fn=log, on_step_end=on_step_end)
    tracker.finish(run_id)

    assert at_restart["unsent"] == 6  # loss and lr of steps 4, 5, 6
    assert [json.loads(line)["step"] for line in at_restart["spooled"]] == [4, 4, 5, 5, 6, 6]
    assert len(seconds_while_down) == 3 and max(seconds_while_down) < 10  # training never waited out MLflow's retries
    client = MlflowClient(faults.mlflow_uri)
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 9))  # none lost, none twice
    assert [m.value for m in history] == pytest.approx(result.losses)
    assert len(client.get_metric_history(run_id, "train/lr")) == 8
    assert client.get_run(run_id).info.status == "FINISHED"
    assert tracker.unsent == 0 and tracker.spool.read_text() == ""


def test_unsent_metrics_of_a_failed_stage_attempt_are_sent_by_the_retry(faults, tmp_path):
    run_id = Tracker(faults.mlflow_uri, "faults").start_run("retried-stage")
    (dead,) = free_ports(1)
    # Attempt 1 cannot reach its server: the metrics wait in the spool, and the stage fails rather than finish without them.
    attempt1 = Tracker(f"http://127.0.0.1:{dead}", "faults", spool_dir=tmp_path / "stage")
    for step in (1, 2, 3):
        attempt1.log_metrics(run_id, {"train/loss": 1.0 / step}, step)
    with pytest.raises(TrackingError, match=rf"3 metrics could not be sent to http://127.0.0.1:{dead}"):
        attempt1.flush(attempts=2)
    # Prefect's retry runs the stage again in the same work dir: its tracker reads the spool back.
    attempt2 = Tracker(faults.mlflow_uri, "faults", spool_dir=tmp_path / "stage")
    assert attempt2.unsent == 3
    attempt2.finish(run_id)
    history = sorted(MlflowClient(faults.mlflow_uri).get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]


def test_mlflow_down_at_start_fails_fast_before_any_work(faults, prefect_harness, tmp_path):
    from flows.continual_retrain import continual_retrain

    store = fault_store(faults)
    (dead,) = free_ports(1)
    data = micro_config(faults, tmp_path).model_dump(mode="json")
    data["storage"].update(bucket=store.bucket, access_key_env=ACCESS_ENV, secret_key_env=SECRET_ENV)
    data["tracking"].update(tracking_uri=f"http://127.0.0.1:{dead}", registered_model="faults-preflight")
    cfg = build_config(data)
    started = time.monotonic()
    with pytest.raises(TrackingError, match=rf"MLflow tracking server http://127.0.0.1:{dead} is unreachable.*services-up"):
        continual_retrain(config=cfg.model_dump(mode="json"))
    assert time.monotonic() - started < 60
    assert list(store.list("")) == []  # no data ingested, no model built, nothing trained
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("*.safetensors"))


# --- disk full -------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: room for the tiny model's checkpoints until something else fills it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    except OSError as error:
        pytest.skip(f"cannot run mount to make a small disk: {error}")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> None:
    """What else shares a disk (logs, caches, another job) takes every free byte."""
    with open(disk / "ballast", "wb", buffering=0) as handle:  # unbuffered: nothing left to fail again on close
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError:
            pass


def test_disk_full_while_checkpointing_is_a_clear_error_and_keeps_the_committed_checkpoint(small_disk, fault_services, tmp_path):
    store = fault_store(fault_services)
    checkpoints = "runs/r1/stages/cit-01-a/checkpoints"

    def commit(step: int, state_dir: Path) -> None:  # what tasks/stage.py checkpoint_committer does with a checkpoint
        store.upload_dir(state_dir, f"{checkpoints}/{state_dir.name}", meta={"step": step})
        shutil.rmtree(state_dir)
        fill(small_disk)

    losses: list[float] = []
    cfg = OptimConfig(lr=5e-3, max_steps=12, batch_size=4, warmup_steps=1, checkpoint_every=4, log_every=1)
    with pytest.raises(DiskFullError) as raised:
        train(tiny_model(), examples(16), cfg, seed=0, pad_token_id=0, checkpoint_dir=small_disk / "checkpoints",
              checkpoint_fn=commit, log_fn=lambda metrics, step: losses.append(metrics["loss"]))
    message = str(raised.value)
    assert str(small_disk / "checkpoints" / "step-00000008") in message
    assert "disk full" in message and "work_dir" in message and "resumes from its last committed checkpoint" in message
    assert sorted(p.name for p in (small_disk / "checkpoints").iterdir()) == []  # no half-written step 8 left behind
    assert latest_checkpoint(store, checkpoints) == f"{checkpoints}/step-00000004"

    # the committed step-4 checkpoint is intact (digests verify) and a resume from it finishes the run
    (small_disk / "ballast").unlink()
    restored = tmp_path / "restored"
    store.download_dir(f"{checkpoints}/step-00000004", restored)
    model = tiny_model()
    result = train(model, examples(16), cfg, seed=0, pad_token_id=0, resume_from=restored)
    assert result.resumed_from == 4 and result.losses[:4] == losses[:4] and len(result.losses) == 12


def test_disk_full_never_replaces_a_complete_local_checkpoint(small_disk):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    target = small_disk / "step-00000004"
    save_state(target, model, optimizer, scheduler, 4, [1.0, 0.9, 0.8, 0.7])
    before = {p.name: sha256_file(p) for p in target.iterdir()}
    fill(small_disk)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(DiskFullError, match="step-00000004"):
        save_state(target, model, optimizer, scheduler, 8, [0.5] * 8)
    assert {p.name: sha256_file(p) for p in target.iterdir()} == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["ballast", "step-00000004"]
    fresh = tiny_model()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    step, losses = load_state(target, fresh, fresh_optimizer, torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda s: 1.0))
    assert (step, losses) == (4, [1.0, 0.9, 0.8, 0.7])


def test_services_refuse_to_start_on_a_disk_too_full_for_seaweedfs_writes(small_disk):
    # SeaweedFS turns every volume read-only under 1% free disk, and each S3 PUT then answers InternalError,
    # which the store retries in vain: a CI run on a nearly full disk failed 15 tests that way.
    local = LocalServices.on_free_ports(small_disk / "services")
    with pytest.raises(ServiceError) as raised:
        local.up(timeout=30)
    message = str(raised.value)
    assert "not enough disk for SeaweedFS" in message and "Free disk space" in message and "GiB free" in message
    assert not (small_disk / "services" / "seaweedfs.pid").exists()  # refused before starting anything
    report = local.status()
    assert report["seaweedfs"]["writable"] is True and "GiB free" in report["seaweedfs"]["disk"]
    fill(small_disk)
    assert local.status()["seaweedfs"]["writable"] is False


def test_sigterm_unwinds_like_ctrl_c_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs between bytecodes, well before this ends
    assert signal.getsignal(signal.SIGTERM) is before


HOLD_SERVICES = """
import sys, time
from pathlib import Path
from app.services import running_services
with running_services(Path(sys.argv[1]), timeout=120):
    print("ready", flush=True)
    time.sleep(600)
"""


def test_a_process_stopped_by_sigterm_stops_the_services_it_started(tmp_path):
    # `kill`, a scheduler or a CI timeout sends SIGTERM. Its default action skipped every `finally`, so a
    # benchmark stopped that way left its SeaweedFS and MLflow running until someone killed them by hand.
    root = tmp_path / "services"
    child = subprocess.Popen([sys.executable, "-c", HOLD_SERVICES, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        pids = {name: int((root / f"{name}.pid").read_text()) for name in ("seaweedfs", "mlflow")}
        assert all(_pid_alive(pid) for pid in pids.values())
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) != 0  # a stop by signal is not a success
    finally:
        child.kill()
    assert not any(_pid_alive(pid) for pid in pids.values()), pids
    assert not (root / "seaweedfs.pid").exists() and not (root / "mlflow.pid").exists()
