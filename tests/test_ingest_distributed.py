"""Distributed ingestion (Prefect task mapping) against real SeaweedFS keeps exactly the records a
single-machine ingest keeps, in the same order, across files: on 2 local worker processes
(ProcessPoolTaskRunner) and on a real Dask cluster of 2 worker processes, reached by its scheduler's
address as a multi-host cluster is (prefect-dask's DaskTaskRunner; `dask scheduler` + `dask worker`
on each host in production, a distributed.LocalCluster here)."""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest

from bench.ingest_scaling import record, write_jsonl
from perennial.config import ConfigError
from perennial.ingest import ingest_dataset, iter_jsonl
from perennial.ingest.cli import main_ingest
from perennial.env import environ_restored
from perennial.ingest.distributed import DASK_THREAD_VARIABLES, RUNNERS, ingest_distributed, make_task_runner


def _corpus(store, tmp_path) -> dict:
    """Four S3 objects; the generator repeats earlier records (cross-file duplicates), and the fourth
    resends the first file's records marked test (cross-file leakage, or duplicates in test)."""
    for number, (start, count) in enumerate([(0, 700), (700, 700), (1400, 600)]):
        store.put_file(write_jsonl(tmp_path / f"part-{number}.jsonl", count, seed=3, start=start), f"in/part-{number}.jsonl")
    resent = [dict(value, split="test") for value in (record(i, seed=3) for i in range(60)) if isinstance(value, dict)]
    (tmp_path / "part-3.jsonl").write_text("".join(json.dumps(value) + "\n" for value in resent))
    store.put_file(tmp_path / "part-3.jsonl", "in/part-3.jsonl")
    return {"name": "corpus", "shape": "alpaca", "sources": [{"uri": f"s3://{store.bucket}/in/"}]}


@pytest.mark.integration
@pytest.mark.parametrize("runner", ["process", "dask"])
def test_two_workers_keep_what_one_machine_keeps(services, prefect_harness, store, tmp_path, runner):
    spec = _corpus(store, tmp_path)
    one = ingest_dataset(spec, store, tmp_path / "single", "p", shard_records=400)
    with ExitStack() as stack:
        if runner == "dask":
            from distributed import Client, LocalCluster

            # this test's own LocalCluster sets OMP_NUM_THREADS=1 (and more) in this process's environment
            stack.enter_context(environ_restored(DASK_THREAD_VARIABLES))

            # an existing cluster, as `dask scheduler` + `dask worker` make one; the workers' S3
            # credentials are their own environment's (inherited here), the endpoint the config's
            cluster = stack.enter_context(LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None))
            client = stack.enter_context(Client(cluster))
            pids = client.run(os.getpid)
            many = ingest_distributed(spec, store.cfg, tmp_path / "dist", "q", runner="dask", address=cluster.scheduler_address,
                                      shard_records=400)  # fmt: skip
            # the tasks ran on the cluster's two workers (4 units, then the units holding drops)
            executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
            assert len(executed) == 2 and all(count >= 1 for count in executed.values()) and sum(executed.values()) >= 4
        else:
            many = ingest_distributed(spec, store.cfg, tmp_path / "dist", "q", runner="process", workers=2, shard_records=400)

    assert many.local_path.read_bytes() == one.local_path.read_bytes()  # same records, same order
    assert many.counts == one.counts and many.tasks == one.tasks
    assert many.rejected == one.rejected
    assert many.rejected["leakage"] > 10 and many.rejected["duplicate"] > 30  # the cross-file cases happened
    assert sum(1 for _ in iter_jsonl(many.quarantine_path)) == sum(many.rejected.values())
    # every worker's shards and index segments are in S3; the run's scratch objects are gone
    assert all(store.exists(f"q/datasets/corpus/shards/{shard['sha256']}.jsonl") for shard in many.manifest["shards"])
    assert len(many.manifest["index"]) == 4
    assert not list(store.list("q/datasets/corpus/runs/"))
    if runner == "dask":  # the cluster is closed: its worker processes are gone
        deadline = time.monotonic() + 10
        while any(psutil.pid_exists(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(psutil.pid_exists(pid) for pid in pids.values())


@pytest.mark.integration
def test_cli_ingests_on_a_dask_cluster_it_starts_and_closes(services, prefect_harness, store, tmp_path, capsys):
    """`perennial ingest --distributed dask --workers 2`: the runner's own LocalCluster, closed after."""
    spec = _corpus(store, tmp_path)
    config = tmp_path / "ingest.yaml"
    config.write_text(json.dumps({"work_dir": str(tmp_path / "work"), "storage": {"endpoint_url": services.s3_endpoint, "bucket": store.bucket},
                                  "data": {"source": "datasets", "datasets": [spec]}}))  # fmt: skip
    before, environ = _spawned(), {name: os.environ.get(name) for name in DASK_THREAD_VARIABLES}
    assert main_ingest([str(config), "--distributed", "dask", "--workers", "2"]) == 0
    # the cluster's OMP_NUM_THREADS=1 etc. are not left behind for the driver's later subprocesses (torchrun)
    assert {name: os.environ.get(name) for name in DASK_THREAD_VARIABLES} == environ
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    summary = next(line for line in lines if "event" not in line)  # the events it announced follow the summaries
    one = ingest_dataset(spec, store, tmp_path / "single", "p", shard_records=400)
    assert summary["counts"] == one.counts and summary["rejected"] == one.rejected and summary["name"] == "corpus"
    assert not _spawned() - before  # the LocalCluster's worker processes are gone


def _spawned() -> set[int]:
    """Live processes this one spawned with multiprocessing (Dask's and the process pool's workers)."""
    alive = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                alive.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_runner_choices_that_cannot_run_are_refused(capsys, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    assert make_task_runner("dask", workers=3).cluster_kwargs["n_workers"] == 3
    with temporary_settings(updates={PREFECT_API_URL: "http://10.0.0.4:4200/api"}):
        assert make_task_runner("dask", address="tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(ConfigError, match="PREFECT_API_URL is unset"):
        make_task_runner("dask", address="tcp://10.0.0.5:8786")  # its workers could not reach an ephemeral API
    for kwargs, message in [({"runner": "spark"}, "use one of"), ({"runner": "process", "address": "tcp://h:8786"}, "for runner 'dask'"),
                            ({"runner": "dask", "address": "tcp://h:8786", "workers": 2}, "not both"), ({"workers": 0}, "at least 1")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            make_task_runner(**kwargs)
    config = str(Path(__file__).parents[1] / "configs" / "wikitext-ingest.yaml")
    assert main_ingest([config, "--workers", "2"]) == 2
    assert "--address and --workers are for --distributed" in capsys.readouterr().err
    from perennial.ingest.cli import _parser

    assert tuple(next(a for a in _parser()._actions if a.dest == "distributed").choices) == RUNNERS  # the CLI's list is the module's
