"""Comparing recipes as plain functions: plan the runs, run one (a continual-retrain subflow, with what it
cost), and report them (JSON, markdown, the accuracy-matrix grid, one MLflow comparison run).

Each run is the product's own retrain under its own run key and lineage (perennial/compare.py:
`recipe_config`, `run_key`): rerun, the comparison resumes an unfinished run from its last committed
stage and collects a finished one from MLflow (its result.json) without training it again, even where
its datasets have new versions since (delete its MLflow parent run to train it on them). A run's cost
is measured in the process that runs it (one run at a time per process: the flow's worker processes,
or the flow's own): CPU seconds of the process and its children, peak resident memory (reset at the
start of the run where Linux allows), wall seconds, summed over interrupted attempts; CIT tokens, the CIT
training time and trainable parameters come from its CIT stages' MLflow runs.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from pydantic import BaseModel

from perennial import compare
from perennial.config import Config, ConfigError, load_config

RESULT_ARTIFACT = "compare/result.json"  # on a finished run's parent run: what the comparison collects on a rerun
ATTEMPT_KEYS = ("wall_s", "cpu_s", "peak_rss_mib")  # what an interrupted attempt records (compare/attempt_<key>)
COMPARISON_TAG = "perennial.comparison"
WORKER_ENV = "PERENNIAL_COMPARE_WORKER"  # set in the flow's worker processes


class Job(BaseModel):
    """One run of a comparison: plain values, so a worker process can take it."""

    recipe: str
    seed: int
    overrides: list[str]
    config: dict
    run_key: str
    drop_outputs: bool = False


class Plan(BaseModel):
    name: str
    command: str
    config_path: str | None
    recipes_file: str
    overrides: list[str]
    variant: dict | None
    jobs: list[Job]
    recipe_order: list[str]
    diagnostics: dict[str, list[str]]
    baseline: str
    resolution: dict
    sweep: dict | None
    learning_rates: dict[str, float]
    model: str
    budget: str
    general_text: str
    tracking_uri: str
    experiment: str
    output_dir: str
    workers: int
    threads: int


def plan_comparison(config_path: str | None, recipes_file: str, overrides: list[str] = (), seeds: list[int] | None = None,
                    only: list[str] | None = None, order: list[str] | None = None, workers: int = 1, threads: int | None = None,
                    name: str | None = None, output_dir: str | None = None, baseline: str | None = None,
                    drop_outputs: bool = False, command: str = "") -> Plan:
    """Every (recipe, seed) run with its validated config and run key; ConfigError before anything runs."""
    spec = compare.load_spec(recipes_file)
    names = list(only or spec.recipes)
    unknown = [recipe for recipe in names if recipe not in spec.every_recipe]
    if unknown:
        raise ConfigError(f"{recipes_file} has no recipe {', '.join(unknown)}; it has {', '.join(spec.every_recipe)}")
    variant = {"sweep": spec.sweep} if spec.sweep else ({"order": list(order)} if order else None)
    base = compare.variant_config(load_config(config_path, list(overrides)), variant)
    jobs = []
    for recipe, seed in compare.run_pairs(spec, names, seeds):
        recipe_overrides = [*spec.every_recipe[recipe], *overrides]
        cfg = compare.recipe_config(config_path, recipe_overrides, seed, variant,
                                    lineage=f"{base.tracking.registered_model}-{compare.slug(recipe)}-s{seed}")
        jobs.append(Job(recipe=recipe, seed=seed, overrides=recipe_overrides, config=cfg.model_dump(mode="json"),
                        run_key=compare.run_key(cfg, recipe, seed), drop_outputs=drop_outputs))
    name = name or Path(recipes_file).stem
    baseline = baseline or spec.baseline or names[0]
    if baseline not in names:
        raise ConfigError(f"baseline {baseline!r} is not one of the compared recipes ({', '.join(names)})")
    general = [d.name for d in base.data.datasets if d.resolved_role == "general"] if base.data.source == "datasets" else []
    return Plan(
        name=name, command=command, config_path=config_path, recipes_file=str(recipes_file), overrides=list(overrides), variant=variant,
        jobs=jobs, recipe_order=names, diagnostics={k: v for k, v in spec.diagnostics.items() if k in names},
        baseline=baseline, resolution=spec.resolution, sweep=spec.sweep,
        learning_rates={job.recipe: Config.model_validate(job.config).cit.optim.lr for job in jobs},
        model=model_line(base), budget=budget_line(base), general_text=general[0] if general else "general",
        tracking_uri=base.tracking.tracking_uri, experiment=base.tracking.experiment,
        output_dir=output_dir or str(Path(base.work_dir).parent / "compare" / name), workers=max(1, workers),
        threads=threads or max(1, (os.cpu_count() or 1) // max(1, workers)),
    )


def model_line(cfg: Config) -> str:
    if cfg.model.source == "gguf":
        return f"{cfg.model.gguf_file} (GGUF, converted once by models/gguf.py), precision {cfg.precision}"
    if cfg.model.source == "tiny":
        tiny = cfg.model.tiny
        return f"tiny Llama: vocab {tiny.vocab_size}, hidden {tiny.hidden_size}, {tiny.num_hidden_layers} layers, {tiny.num_attention_heads} heads"
    return f"{cfg.model.source} {getattr(cfg.model, 'name_or_path', '')}"


def budget_line(cfg: Config) -> str:
    optim = cfg.cit.optim  # the rate is each recipe's own (the cost table's CIT lr), not part of the shared budget
    return f"{optim.max_steps} steps of batch {optim.batch_size} per task, max length {optim.max_length}"


UNWIND_S = 15  # seconds an interrupted worker has to mark its run failed before it exits


# --- one run ---------------------------------------------------------------------------------------


def init_worker(api_url: str | None, threads: int) -> None:
    """A worker process of the comparison: the flow's Prefect API (its subflows show under the comparison) and
    its share of the cores as torch threads (workers x threads = cores, as bench/engine_throughput.py measured)."""
    if api_url:
        os.environ["PREFECT_API_URL"] = api_url
    os.environ[WORKER_ENV] = "1"

    def interrupt(signum, frame):  # as app/services.py's sigterm_as_interrupt: the run unwinds and is marked failed
        # The pool's worker loop catches what its call raises and waits for the next call, so without this the
        # process would outlive the interrupt: it exits once its run has had UNWIND_S seconds to mark itself failed.
        threading.Timer(UNWIND_S, os._exit, (128 + signum,)).start()
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupt)
    import torch

    torch.set_num_threads(threads)


@contextmanager
def worker_pool(workers: int, threads: int) -> Iterator:
    """A Prefect process-pool task runner of ``workers`` processes (`init_worker`: the flow's Prefect API, ``threads``
    torch threads, SIGTERM as Ctrl-C). Interrupted, it stops its running workers (each marks its run failed and
    records the attempt's cost) and cancels the queued runs, instead of waiting for all of them."""
    from prefect.client.orchestration import get_client
    from prefect.task_runners import ProcessPoolTaskRunner

    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    with ProcessPoolTaskRunner(max_workers=workers, initializer=init_worker, initargs=(api_url, threads)) as runner:
        try:
            yield runner
        except BaseException:
            executor = getattr(runner, "_executor", None)
            processes = list(getattr(executor, "_processes", {}).values()) if executor is not None else []
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()
            for process in processes:
                process.join(timeout=UNWIND_S + 15)
                if process.is_alive():
                    process.kill()
            raise


def run_recipe(job: Job, retrain: Callable[..., dict]) -> dict:
    """One run of the comparison, or what an earlier invocation recorded of it when it finished.

    ``retrain`` is the continual-retrain flow (``retrain(config=..., run_key=...)`` returns its summary); the
    flow layer passes it in, so this layer never imports the one above it."""
    from mlflow.tracking import MlflowClient

    config = job.config
    if os.environ.get(WORKER_ENV):  # its own local caches: a folder is never filled by two processes at once
        config = {**config, "work_dir": f"{config['work_dir']}/worker-{os.getpid()}"}  # a location: the run key stays
    cfg = Config.model_validate(config)
    client = MlflowClient(cfg.tracking.tracking_uri)
    collected = finished_result(client, cfg, job.run_key)
    if collected is not None:
        print(f"[{job.recipe} seed {job.seed}] finished earlier under run key {job.run_key}: collected, not trained again")
        return {**collected, "collected": True}
    usage = _usage_meter()
    try:
        summary = retrain(config=config, run_key=job.run_key)
    except BaseException:
        _log_attempt(client, cfg, job.run_key, usage())
        raise
    parent = summary["mlflow_run_id"]
    stages = [run for run in client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
              if run.info.run_name.startswith("cit-")]
    trainable = [run.data.metrics["train/trainable_params"] for run in stages if "train/trainable_params" in run.data.metrics]
    result = {
        "recipe": job.recipe, "seed": job.seed, "overrides": job.overrides, "run_key": job.run_key,
        "precision": run_precision(cfg), "machine": machine(),
        **with_earlier_attempts(client, parent, usage()),
        "cit_tokens": int(sum(run.data.metrics.get("train/tokens", 0) for run in stages)),
        # the CIT stages' training loops alone: what the new data costs, without evaluation and bookkeeping
        "cit_train_s": round(sum(m["train/tokens"] / m["train/tokens_per_second"] for m in (run.data.metrics for run in stages)
                                 if m.get("train/tokens_per_second")), 1),
        "trainable_params": int(max(trainable)) if trainable else None,
        **{key: summary[key] for key in ("tasks", "trained", "accuracy_matrix", "metrics", "general_tasks", "chance")},
        "trained_by_row": summary.get("trained_by_row") or None,  # a row naming several tasks: a joint (multi-task) run
        "mlflow_run_id": parent,
    }
    for key in (*compare.COST_KEYS, "trainable_params"):
        if result.get(key) is not None:
            client.log_metric(parent, f"compare/{key}", result[key])
    client.log_dict(parent, result, RESULT_ARTIFACT)  # last: its presence says the run and its cost are complete
    if job.drop_outputs:  # the numbers are in MLflow; a full model's checkpoints are 0.5 GB a stage
        from perennial.storage import ObjectStore

        ObjectStore(cfg.storage).delete_prefix(summary["s3_prefix"].split("/", 3)[3])
        shutil.rmtree(Path(cfg.work_dir) / summary["run_key"], ignore_errors=True)
    m = result["metrics"]
    shown = " ".join(f"{key}={m[key]:+.3f}" for key in ("ap", "bwt", "fwt") if key in m)  # one task (a sweep): no BWT or FWT
    print(f"[{job.recipe} seed {job.seed}] {shown} ppl {m['general_ppl_base']:.1f} -> {m['general_ppl_final']:.1f} ({result['wall_s']:.0f} s)")
    return result


def finished_result(client, cfg: Config, run_key: str) -> dict | None:
    """The result an earlier invocation recorded on the run key's parent run, when that run finished."""
    from perennial.tracking import LINEAGE_TAG, RUN_KEY_TAG  # MLflow: imported by the run, not by readers of machine()

    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{run_key}' and "
                              f"tags.`{LINEAGE_TAG}` = '{cfg.tracking.registered_model}' and attributes.status = 'FINISHED'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    if not runs:
        return None
    try:
        import mlflow

        return json.loads(mlflow.artifacts.load_text(f"{runs[0].info.artifact_uri}/{RESULT_ARTIFACT}"))
    except Exception:  # noqa: BLE001 - finished, but not by a comparison (or before its result was written): run it
        return None


def _usage_meter():
    """A function giving the wall seconds, CPU seconds (this process and its finished children: torchrun stages)
    and peak RSS (MiB) since this call."""
    started = time.perf_counter()
    before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    reset = _reset_peak_rss()

    def usage() -> dict:
        after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))
        peak = _peak_rss_kib() if reset else None
        return {"wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(cpu, 1),
                "peak_rss_mib": round((peak or after[0].ru_maxrss) / 1024)}  # ru_maxrss: the process's whole life

    return usage


def _reset_peak_rss() -> bool:
    """Linux: start the process's peak resident set (VmHWM) again from its current size (/proc/self/clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _peak_rss_kib() is not None
    except OSError:
        return False


def _peak_rss_kib() -> int | None:
    try:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1])
    except (OSError, StopIteration, ValueError):
        return None


def _log_attempt(client, cfg: Config, run_key: str, cost: dict) -> None:
    """Record an interrupted attempt's cost on its parent run, for the attempt that finishes the run. Never raises:
    the caller re-raises the interrupt. Nothing is recorded when the attempt stopped before its parent run existed."""
    from perennial.tracking import Tracker
    from tasks.runtime import find_parent_run

    try:
        run_id = find_parent_run(Tracker(cfg.tracking.tracking_uri, cfg.tracking.experiment), cfg.tracking.registered_model, run_key)
        if run_id is None:
            return
        attempt = len(client.get_metric_history(run_id, "compare/attempt_wall_s"))
        for key in ATTEMPT_KEYS:
            client.log_metric(run_id, f"compare/attempt_{key}", cost[key], step=attempt)
    except Exception as error:  # noqa: BLE001 - see above
        print(f"could not record the interrupted attempt's cost of {run_key}: {error}", flush=True)


def with_earlier_attempts(client, parent_run_id: str, cost: dict) -> dict:
    """The run's cost over every attempt at it: wall and CPU seconds summed, peak RSS the largest, the attempts."""
    earlier = {key: [m.value for m in client.get_metric_history(parent_run_id, f"compare/attempt_{key}")] for key in ATTEMPT_KEYS}
    return {
        "wall_s": round(cost["wall_s"] + sum(earlier["wall_s"]), 1),
        "cpu_s": round(cost["cpu_s"] + sum(earlier["cpu_s"]), 1),
        "peak_rss_mib": round(max([cost["peak_rss_mib"], *earlier["peak_rss_mib"]])),
        "attempts": 1 + len(earlier["wall_s"]),
    }


def run_precision(cfg: Config) -> str:
    """What the config's precision trains in on this machine: ``auto`` is bf16 autocast only on CPUs with native
    bf16 (models/engine.py), so each run records it."""
    import torch

    from models.engine import autocast_dtype, resolve_device

    return "bf16 autocast" if autocast_dtype(cfg.precision, resolve_device(cfg.device)) == torch.bfloat16 else "fp32"


def machine(packages: tuple[str, ...] = ("torch", "transformers")) -> dict:
    """CPU, cores, memory, native bf16, torch threads, Python and the versions of ``packages``."""
    import torch

    from models.engine import cpu_has_native_bf16

    def first(path: str, prefix: str) -> str | None:
        try:
            return next((line.split(":", 1)[1].strip() for line in Path(path).read_text().splitlines() if line.startswith(prefix)), None)
        except OSError:
            return None

    memory = first("/proc/meminfo", "MemTotal:")
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_model": first("/proc/cpuinfo", "model name") or "unknown", "logical_cores": os.cpu_count(),
        "memory_gib": round(int(memory.split()[0]) / 1024**2, 1) if memory else None,
        # "AMD EPYC" names CPUs with and without AVX512-BF16, and bf16 autocast is ~3x fp32 only with it
        "native_bf16": cpu_has_native_bf16(), "torch_threads": torch.get_num_threads(), **versions,
        "python": platform.python_version(), "platform": platform.platform(),
    }


def load_note(before: float, after: float, cores: int | None = None) -> str:
    """One sentence for a report: was the machine shared while the numbers were taken?"""
    cores = cores or os.cpu_count() or 1
    busy = max(before, after) > 0.5 * cores
    state = "under load from other processes" if busy else "on a mostly idle machine"
    return f"Measured {state} (1-minute load average {before:.1f} before, {after:.1f} after, {cores} logical cores)."


# --- the report ------------------------------------------------------------------------------------


def report_comparison(plan: Plan, results: list[dict], started_at: float, load_before: float, extra: dict | None = None) -> dict:
    """Aggregate the runs, write <name>.json / .md / _matrices.png into the plan's output folder and log them as
    one MLflow comparison run; returns the report (its markdown under "markdown")."""
    runs = sorted(results, key=lambda r: (plan.recipe_order.index(r["recipe"]), r["seed"]))
    first = runs[0]
    report = compare.summarize({
        "name": plan.name, "command": plan.command, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": plan.config_path, "recipes_file": plan.recipes_file, "set": plan.overrides, "variant": plan.variant,
        "machine": {**machine(), "torch_threads": plan.threads}, "load": load_note(load_before, os.getloadavg()[0]),
        "workers": plan.workers, "wall_minutes": (time.time() - started_at) / 60,
        "collected_runs": sum(bool(r.get("collected")) for r in runs), "seeds": sorted({r["seed"] for r in runs}),
        "runs_wall_minutes": sum(r.get("wall_s", 0.0) for r in runs) / 60, "tasks": first["tasks"],
        "chance": {task: round(first["chance"][task], 3) for task in first["tasks"] if first["chance"].get(task)},
        "model": plan.model, "budget": plan.budget, "general_text": plan.general_text, "recipe_order": plan.recipe_order,
        "diagnostics": plan.diagnostics, "baseline": plan.baseline, "resolution": plan.resolution, "sweep": plan.sweep,
        "learning_rates": {recipe: plan.learning_rates[recipe] for recipe in plan.recipe_order},
        "trainable_params": {r["recipe"]: r.get("trainable_params") for r in runs},
        **(extra or {}), "runs": runs,
    })
    return write_comparison(report, Path(plan.output_dir), plan.tracking_uri, plan.experiment)


def write_comparison(report: dict, output_dir: Path, tracking_uri: str | None = None, experiment: str | None = None) -> dict:
    """<name>.json, .md and (not for a sweep) the accuracy-matrix grid; with ``tracking_uri`` also the MLflow
    comparison run (found again by name on a rerun). Returns the report with "markdown" and "mlflow_run_id"."""
    name = report["name"]
    output_dir.mkdir(parents=True, exist_ok=True)
    figure = None
    if not report.get("sweep"):
        figure = plot_matrices(report["runs"], list(report["rows"]), output_dir / f"{name}_matrices.png")
        report = {**report, "figure": figure.name, "figure_path": report.get("figure_path") or str(figure)}
    text = compare.markdown(report)
    if tracking_uri:
        report = {**report, "mlflow_run_id": log_comparison(report, text, figure, tracking_uri, experiment)}
    json_path, md_path = output_dir / f"{name}.json", output_dir / f"{name}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(text.rstrip() + "\n")
    return {**report, "markdown": text, "json_path": str(json_path), "md_path": str(md_path)}


def plot_matrices(runs: list[dict], recipes: list[str], path: Path) -> Path:
    """The accuracy matrix of each recipe (its first seed's run), one grid."""
    from perennial.cl_metrics import AccuracyMatrix
    from perennial.reports import plot_accuracy_matrix_grid

    first = {}
    for run in sorted(runs, key=lambda r: r["seed"]):
        first.setdefault(compare._name(run), run)
    matrices = {f"{recipe} (seed {first[recipe]['seed']})": AccuracyMatrix(tasks=first[recipe]["tasks"], rows=first[recipe]["accuracy_matrix"],
                                                                         trained=first[recipe].get("trained_by_row"))
                for recipe in recipes if recipe in first}
    return plot_accuracy_matrix_grid(matrices, path)


def log_comparison(report: dict, text: str, figure: Path | None, tracking_uri: str, experiment: str) -> str:
    """One MLflow run holding the comparison: per recipe its means (``<recipe>/<column>``) and cost, the verdicts as
    tags, the table as the run's description, the JSON, markdown and figure as artifacts."""
    from mlflow.tracking import MlflowClient

    from perennial.tracking import Tracker

    tracker = Tracker(tracking_uri, experiment)
    client = MlflowClient(tracking_uri)
    run_id = tracker.find_run({COMPARISON_TAG: report["name"]}) or tracker.start_run(f"compare-{report['name']}",
                                                                                      tags={COMPARISON_TAG: report["name"]})
    client.update_run(run_id, status="RUNNING")
    metrics = {}
    for recipe, row in (report.get("rows") or {}).items():
        for key in ("ap", "bwt", "fwt", "forgetting_max", "learned_zero_shot", "heldout_delta", "log_ppl_ratio"):
            if key in row:  # a multi-task row has no BWT, FWT or forgetting: nothing is logged for them
                metrics[f"{compare.slug(recipe)}/{key}"] = row[key]["mean"]
                metrics[f"{compare.slug(recipe)}/{key}_std"] = row[key]["std"]
        if recipe in (report.get("multitask_gaps") or {}):
            metrics[f"{compare.slug(recipe)}/ap_gap_multitask"] = report["multitask_gaps"][recipe]["gap"]
        metrics.update({f"{compare.slug(recipe)}/{key}": value for key, value in row.get("cost", {}).items()})
    tracker.log_metrics(run_id, metrics)
    tracker.flush()
    client.set_tag(run_id, "recipes_file", report.get("recipes_file", ""))  # a tag: a rerun may name the file by another path
    client.set_tag(run_id, "mlflow.note.content", text)
    for v in report.get("verdicts") or []:
        client.set_tag(run_id, f"verdict.{compare.slug(v['recipe'])}.{v['measure']}", f"{v['verdict']} (margin {v['margin']:.3f})")
    client.log_dict(run_id, report, "comparison.json")
    client.log_text(run_id, text, "comparison.md")
    if figure is not None:
        client.log_artifact(run_id, str(figure))
    client.set_terminated(run_id, "FINISHED")
    return run_id
