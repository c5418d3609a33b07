"""Continual-learning quality on the standard CL benchmark: every method, several seeds, one table.

    python -m bench.cl_quality --sweep                       # learning rates first
    python -m bench.cl_quality [--methods full attn-proj ...] [--seeds 0 1 2] [--workers 1] [--quick]
                               [--order agnews dbpedia amazon] [--set KEY=VALUE ...] [--name cl_quality]

Each (method, seed) is one real run of the `continual-retrain` flow on configs/cl-benchmark.yaml
(SmolLM2-135M-Instruct, a short DAP on review text, then dbpedia -> amazon -> agnews scored by
option log-likelihood through the chat template, SST-2 and BoolQA held out) with the method's
overrides from configs/cl-benchmark-methods.yaml, against SeaweedFS and MLflow started here on
free ports. The base model and the DAP model have their own fixed seeds (model.seed, dap.seed),
so they are computed once (content-digest caches in S3) and every method and seed starts from the
same weights: the seeds vary continual tuning only (data order, adapter initialisation, replay
sampling). The services keep their data in --state-dir, so a second run of the benchmark reuses
the cached base and DAP models.

`--sweep` picks the learning rates: each tuning method at each of the file's rates trains the
first task alone on records the benchmark never reads, and is scored on a validation split of
them (never on a test set). Each method then uses its tuning method's rate (set in the file).
`--order` runs another task order (results under their own name).

Reported per method, mean ± sample std over seeds: R[i][i] - R[0][i] (learning over zero-shot)
and R[i][i] - chance, AP (final average accuracy), BWT, FWT, the largest per-task forgetting,
WikiText-2 test perplexity and each held-out task's zero-shot score before CIT and after the last
task, and the cost: trainable parameters, CIT tokens, wall and CPU time, peak RSS (each run is a
fresh worker process). The two published orderings it checks are stated with the numbers,
whichever way they go, and each method's accuracy matrix is plotted in one figure grid.

A killed or interrupted benchmark resumes: the next invocation with the same --state-dir
collects the runs the last one finished (matched by config digest, see finished_runs) and runs
only the rest; a run it left unfinished resumes from its last committed stage (CIT task), under a
run key that follows the run's recipe, and its reported wall and CPU time sum the attempts (run_one).
`--no-run` reports what is there without running anything. Across machines and
sessions, where the state dir is gone (a fresh clone), `--keep-published` resumes from the
published results: the runs <name>.json records with this invocation's recipe count as done (see
published_runs), and the report keeps them beside the new ones, so `--keep-published --seeds 1 2`
adds to a seed-0 table instead of replacing it. `--runs-from FILE` adds the runs of another results
file (another machine's, or a run that was never committed). Without them a benchmark measures
every run it reports on this machine (`make bench`), and says which published runs it leaves out.

`--set` changes every run (for a side experiment); `--name` keeps its results apart from the main
table. The methods file also lists diagnostics (blocks-only, head-only, embed-only,
attn-proj+head) that run only when named.

`--quick` is a smoke run (two methods, one seed, a few steps, 10 test records per task, empty services): it
checks that the benchmark works, its numbers mean nothing.

Results: bench/results/cl_quality.json (every run's matrix, metrics and cost), cl_quality.md and
cl_quality_matrices.png (--output-dir moves them; `make bench-quick` uses bench/results/quick/).
"""

from __future__ import annotations

import argparse
import collections
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from bench.common import RESULTS_DIR, command, load_note, machine, machine_line, table, write_results

if TYPE_CHECKING:
    from perennial.config import TrackingConfig

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "configs" / "cl-benchmark.yaml"
METHODS_FILE = ROOT / "configs" / "cl-benchmark-methods.yaml"
DEFAULT_NAME = "cl_quality"
BUCKET = "cl-quality"  # of the benchmark's own services
QUICK_METHODS = ["full", "attn-proj"]
QUICK_OVERRIDES = [
    "model.pretrain.max_steps=8", "dap.optim.max_steps=2", "cit.optim.max_steps=4", "eval.general_max_docs=8",
    "eval.probe_prompts=4", "eval.max_task_records=10",
]


def load_methods() -> tuple[dict[str, list[str]], dict[str, list[str]], list[int]]:
    """The compared methods, the diagnostic variants (run only when named) and the default seeds."""
    spec = yaml.safe_load(METHODS_FILE.read_text())
    overrides = lambda entries: {name: list(values) for name, values in (entries or {}).items()}  # noqa: E731
    return overrides(spec["methods"]), overrides(spec.get("diagnostics")), list(spec["seeds"])


def run_pairs(methods: list[str], seeds: list[int] | None) -> list[tuple[str, int]]:
    """(method, seed) pairs to run: the given seeds for every method, else the file's seeds for every
    method plus its extra seeds for the methods it names."""
    if seeds is not None:
        return [(method, seed) for seed in seeds for method in methods]
    spec = yaml.safe_load(METHODS_FILE.read_text())
    extra = spec.get("extra_seeds") or {"methods": [], "seeds": []}
    pairs = [(method, seed) for seed in spec["seeds"] for method in methods]
    return pairs + [(method, seed) for seed in extra["seeds"] for method in methods if method in extra["methods"]]


def load_sweep() -> dict:
    """The learning-rate sweep's settings (configs/cl-benchmark-methods.yaml, `sweep`)."""
    return yaml.safe_load(METHODS_FILE.read_text())["sweep"]


def tuning_of(overrides: list[str]) -> str:
    """The tuning method a method's overrides select (the base config's is full fine-tuning)."""
    chosen = [item.split("=", 1)[1] for item in overrides if item.startswith("cit.tuning.method=")]
    return chosen[-1] if chosen else "full"


def sweep_jobs(sweep: dict) -> dict[str, list[str]]:
    """One job per (tuning method, learning rate): first task only, the sweep's step budget."""
    return {
        f"{tuning}@{lr:g}": [f"cit.tuning.method={tuning}", f"cit.optim.lr={lr:g}", f"cit.optim.max_steps={sweep['steps']}"]
        for tuning, rates in sweep["rates"].items()
        for lr in rates
    }


def bench_config(overrides: list[str], seed: int, variant: dict | None = None, where: list[str] = ()):
    """The validated config of one benchmark run: the base config, a method's overrides, the seed and,
    for a variant, another task order (``{"order": [...]}``) or the learning-rate sweep's data
    (``{"sweep": settings}``: the first task alone, read from records the benchmark never uses, its
    test split a validation split; no held-out tasks)."""
    from perennial.config import load_config

    cfg = load_config(str(BASE_CONFIG), [*overrides, f"seed={seed}", *where])
    if not variant:
        return cfg
    datasets = cfg.data.datasets
    tasks = [d for d in datasets if d.resolved_role == "task"]
    text = [d for d in datasets if d.resolved_role in ("general", "domain")]
    heldout = [d for d in datasets if d.resolved_role == "heldout"]
    if variant.get("order"):
        by_name = {task.name: task for task in tasks}
        unknown = sorted(set(variant["order"]) - set(by_name))
        if unknown or len(variant["order"]) != len(tasks):
            raise ValueError(f"--order must list each task of {BASE_CONFIG.name} once: {sorted(by_name)}")
        tasks = [by_name[name] for name in variant["order"]]
    if variant.get("sweep"):
        sweep = variant["sweep"]
        first = tasks[0]
        sources = [src.model_copy(update={"skip": sweep["skip"], "limit": sweep["records"], "split": "hash"}) for src in first.sources]
        tasks = [first.model_copy(update={"sources": sources, "test_fraction": sweep["validation_fraction"]})]
        heldout = []
    data = cfg.data.model_copy(update={"datasets": [*text, *tasks, *heldout]})
    return type(cfg).model_validate(cfg.model_copy(update={"data": data}).model_dump(mode="json"))


# --- one run per (method, seed), in worker processes ----------------------------------------------


def _init_worker(env: dict[str, str], prefect_home: str, threads: int) -> None:
    # Before prefect is imported: each worker gets its own Prefect home (its own temporary API
    # and sqlite file), so parallel workers never contend for one database.
    os.environ.update(env)
    os.environ["PREFECT_HOME"] = prefect_home + f"-{os.getpid()}"
    import torch

    torch.set_num_threads(threads)  # the cores shared out between workers: see bench/engine_throughput.py


def run_one(method: str, seed: int, overrides: list[str], variant: dict | None = None) -> dict:
    """One (method, seed) run of the flow in this fresh worker process, with what it cost."""
    import resource

    from app.services import sigterm_as_interrupt
    from flows.continual_retrain import continual_retrain

    # A work dir per worker: local caches are filled by one process at a time.
    work_dir = f"{os.environ['PERENNIAL_BENCH_WORK']}-{os.getpid()}"
    cfg = bench_config(overrides, seed, variant, [f"work_dir={work_dir}"])
    # The run key follows what the run computes, not where (ports and folders change per invocation):
    # a run a killed benchmark left unfinished resumes from its last committed stage in the next
    # invocation on the same --state-dir, instead of starting over under a new key.
    run_key = f"{cfg.run_name}-{recipe_digest(overrides, seed, variant)[:16]}"
    started = time.perf_counter()

    def usage() -> dict:
        rusage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "wall_s": round(time.perf_counter() - started, 1),
            "cpu_s": round(rusage.ru_utime + rusage.ru_stime, 1),
            "peak_rss_mib": round(rusage.ru_maxrss / 1024),  # Linux reports KiB; the process ran this run alone
        }

    try:
        with sigterm_as_interrupt():
            summary = continual_retrain(config=cfg.model_dump(mode="json"), run_key=run_key)
    except BaseException:
        _log_attempt(cfg.tracking, run_key, usage())
        raise
    cost = {**with_earlier_attempts(summary["mlflow_run_id"], usage()), "cit_tokens": _cit_tokens(summary["mlflow_run_id"])}
    precision, machine_info = run_precision(cfg), machine()  # this worker's: a table may collect runs of several machines
    _log_cost(summary["mlflow_run_id"], cost, precision, machine_info)
    # The numbers are in MLflow; the run's models and checkpoints (0.5 GB per stage for a full model) are
    # not needed again, and 30 runs of them would fill the disk: drop them and this worker's local copies.
    from perennial.storage import ObjectStore

    ObjectStore(cfg.storage).delete_prefix(summary["s3_prefix"].split("/", 3)[3])
    shutil.rmtree(work_dir, ignore_errors=True)
    return {
        "method": method,
        "seed": seed,
        "overrides": overrides,
        **({"variant": variant} if variant else {}),
        "recipe_digest": recipe_digest(overrides, seed, variant),
        "precision": precision,
        "machine": machine_info,
        **cost,
        "tasks": summary["tasks"],
        "accuracy_matrix": summary["accuracy_matrix"],
        "metrics": summary["metrics"],
        "general_tasks": summary["general_tasks"],
        "mlflow_run_id": summary["mlflow_run_id"],
    }


COST_KEYS = ("wall_s", "cpu_s", "peak_rss_mib", "cit_tokens", "attempts")
COUNT_KEYS = ("peak_rss_mib", "cit_tokens", "attempts")
ATTEMPT_KEYS = ("wall_s", "cpu_s", "peak_rss_mib")  # what an interrupted attempt records (bench/attempt_<key>)


def _log_attempt(tracking: TrackingConfig, run_key: str, cost: dict) -> None:
    """Record an interrupted attempt's cost on its parent run, for the attempt that finishes the run.

    Never raises: the caller is about to re-raise the interrupt. Nothing is recorded when the attempt
    stopped before its parent run existed (it then computed nothing a resume reuses either).
    """
    from perennial.tracking import Tracker
    from tasks.runtime import find_parent_run

    try:
        tracker = Tracker(tracking.tracking_uri, tracking.experiment)
        run_id = find_parent_run(tracker, tracking.registered_model, run_key)  # as the flow's preflight does
        if run_id is None:
            return
        attempt = len(tracker.client.get_metric_history(run_id, "bench/attempt_wall_s"))
        for key in ATTEMPT_KEYS:
            tracker.client.log_metric(run_id, f"bench/attempt_{key}", cost[key], step=attempt)
    except Exception as error:  # noqa: BLE001 - see above
        print(f"could not record the interrupted attempt's cost of {run_key}: {error}", flush=True)


def with_earlier_attempts(parent_run_id: str, cost: dict) -> dict:
    """The run's cost over every attempt at it: this one's plus the interrupted ones `_log_attempt`
    recorded (wall and CPU seconds summed, peak RSS the largest), and how many attempts there were."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    earlier = {key: [m.value for m in client.get_metric_history(parent_run_id, f"bench/attempt_{key}")] for key in ATTEMPT_KEYS}
    return {
        "wall_s": round(cost["wall_s"] + sum(earlier["wall_s"]), 1),
        "cpu_s": round(cost["cpu_s"] + sum(earlier["cpu_s"]), 1),
        "peak_rss_mib": round(max([cost["peak_rss_mib"], *earlier["peak_rss_mib"]])),  # MiB, a count like run_one's
        "attempts": 1 + len(earlier["wall_s"]),
    }


def _cit_tokens(parent_run_id: str) -> int:
    """Tokens trained over the CIT stages: the sum of their child runs' train/tokens."""
    import mlflow

    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return int(sum(run.data.metrics.get("train/tokens", 0) for run in children if run.info.run_name.startswith("cit-")))


def _log_cost(parent_run_id: str, cost: dict, precision: str, machine_info: dict) -> None:
    """On the parent run, so an interrupted benchmark's finished runs keep their cost, precision and
    machine (finished_runs)."""
    import json

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key, value in cost.items():
        client.log_metric(parent_run_id, f"bench/{key}", value)
    client.set_tag(parent_run_id, "bench.precision", precision)
    client.set_tag(parent_run_id, "bench.machine", json.dumps(machine_info))


def run_all(jobs: dict[str, list[str]], pairs: list[tuple[str, int]], workers: int, threads: int, env: dict[str, str],
            prefect_home: str, serial_first: bool = True, skip: set[tuple[str, int]] = frozenset(),
            variant: dict | None = None) -> list[dict]:
    """With serial_first, the first run builds the shared base and DAP models (configs fix model.seed and
    dap.seed) alone and the rest reuse them; services whose caches already hold them need not wait.
    Each run gets a fresh worker process (max_tasks_per_child=1), so its peak RSS is its own."""
    order = [pair for pair in pairs if pair not in skip]
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(env, prefect_home, threads), max_tasks_per_child=1) as pool:
        results = []
        try:
            if serial_first and order:
                (method, seed), order = order[0], order[1:]
                results.append(_report(pool.submit(run_one, method, seed, jobs[method], variant).result()))
            futures = [pool.submit(run_one, method, seed, jobs[method], variant) for method, seed in order]
            results += [_report(future.result()) for future in as_completed(futures)]
        except KeyboardInterrupt:
            # Leaving the pool would wait for every queued run. Interrupt the running ones instead: run_one
            # takes SIGTERM as Ctrl-C, so each flow marks its runs failed while the services are still up.
            pool.shutdown(wait=False, cancel_futures=True)
            workers_left = multiprocessing.active_children()
            for worker in workers_left:
                worker.terminate()
            for worker in workers_left:
                worker.join(timeout=60)
                if worker.is_alive():
                    worker.kill()
            raise
    return results


# Where a run kept its data, not what it computed: these differ between invocations of the benchmark.
WHERE_KEYS = ("work_dir", "storage.endpoint_url", "storage.bucket", "tracking.tracking_uri")


def finished_runs(jobs: dict[str, list[str]], pairs: list[tuple[str, int]], variant: dict | None = None) -> list[dict]:
    """Runs an earlier (interrupted) invocation finished in these services, matched by config digest.

    Every parent run is tagged with the digest of its config; a (method, seed) matches when the
    benchmark's config for it, with that run's WHERE_KEYS (ports and folders differ per invocation),
    has the same digest. So a killed benchmark resumes where it stopped, and a run made with other
    sizes or code defaults never counts.
    """
    import json

    import mlflow
    from mlflow.tracking import MlflowClient

    base = bench_config([], 0)
    experiment = MlflowClient().get_experiment_by_name(base.tracking.experiment)
    if experiment is None:
        return []
    found: dict[tuple[str, int], dict] = {}
    for run in mlflow.search_runs([experiment.experiment_id], f"attributes.status = 'FINISHED' and tags.mlflow.runName = '{base.run_name}'",
                                  output_format="list"):
        params, digest = run.data.params, run.data.tags.get("config_digest")
        seed = int(params.get("seed", -1))
        if not all(key in params for key in WHERE_KEYS):
            continue
        where = [f"{key}={params[key]}" for key in WHERE_KEYS]
        for method, overrides in jobs.items():
            if (method, seed) not in pairs or (method, seed) in found or bench_config(overrides, seed, variant, where).digest() != digest:
                continue
            matrix = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/report/accuracy_matrix.json"))
            try:
                general = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/report/general_tasks.json"))["summary"]
            except Exception:  # noqa: BLE001 - a run without held-out tasks (the sweep) has no such file
                general = {}
            metrics, tags = run.data.metrics, run.data.tags
            found[method, seed] = {
                "method": method, "seed": seed, "overrides": overrides, "collected": True,
                **({"variant": variant} if variant else {}),
                "recipe_digest": recipe_digest(overrides, seed, variant),
                # What _log_cost recorded; a run from before that resolves here, where its state dir is.
                "precision": tags.get("bench.precision") or run_precision(bench_config(overrides, seed, variant, where)),
                "machine": json.loads(tags["bench.machine"]) if "bench.machine" in tags else machine(),
                "wall_s": metrics.get("bench/wall_s", round((run.info.end_time - run.info.start_time) / 1000, 1)),
                # MLflow keeps every metric as a float: the counts come back as ints, as run_one returned them.
                **{key: int(value) if key in COUNT_KEYS else value
                   for key in COST_KEYS if key != "wall_s" and (value := metrics.get(f"bench/{key}")) is not None},
                "tasks": matrix["tasks"], "accuracy_matrix": matrix["rows"],
                "metrics": {key: value for key, value in metrics.items() if not key.startswith("bench/")},
                "general_tasks": general, "mlflow_run_id": run.info.run_id,
            }
    return list(found.values())


def recipe_digest(overrides: list[str], seed: int, variant: dict | None) -> str:
    """What a (method, seed) run computes, wherever it ran: the outputs digest of its config (perennial/config.py,
    without the service and scratch locations), with the benchmark's bucket. Dataset paths are relative, so a
    fresh clone beside the same ../shared computes the same digest."""
    return bench_config(overrides, seed, variant, [f"storage.bucket={BUCKET}"]).outputs_digest()


def published_runs(paths: list[Path], recipes: dict[str, list[str]], variant: dict | None, model: str, budget: str,
                   precision: str, say: bool = True) -> list[dict]:
    """The runs that results files (<name>.json of earlier invocations) record with this invocation's recipe.

    A file counts when its model line, budget line and variant (task order, sweep) are this
    invocation's. A run in it counts when its method is one of ``recipes`` with the same overrides,
    its `recipe_digest` is this invocation's (every config key: data, DAP, evaluation sizes; runs
    recorded before the digest are matched on the rest alone), and it trained in ``precision``
    (`run_precision` here: a bf16 machine's runs never join an fp32 machine's). A change of code
    alone is not seen. The first file's run of a (method, seed) wins; each run is marked collected.
    A missing file gives nothing; ``say`` prints why a file's or a run's results are not used.
    """
    import json

    found: dict[tuple[str, int], dict] = {}
    for path in paths:
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        if (report.get("model"), report.get("budget"), report.get("variant")) != (model, budget, variant):
            if say:
                print(f"{path}: another model, budget or task order than this invocation's, its runs are not used", flush=True)
            continue
        refused: collections.Counter = collections.Counter()
        for run in report["runs"]:
            method, seed = run["method"], run["seed"]
            if recipes.get(method) != run["overrides"]:
                continue
            if "recipe_digest" in run and run["recipe_digest"] != recipe_digest(recipes[method], seed, variant):
                refused["another config (its digest differs)"] += 1
            elif run.get("precision") != precision:
                refused[f"trained in {run['precision']}, not {precision} as here" if run.get("precision") else "precision not recorded"] += 1
            else:
                found.setdefault((method, seed), {**run, "collected": True})
        if say and refused:
            print(f"{path}: runs of this recipe not used: " + "; ".join(f"{count} {why}" for why, count in refused.items()), flush=True)
    return list(found.values())


def _report(result: dict) -> dict:
    metrics = result["metrics"]
    # BWT and FWT are undefined with one task (the sweep), so absent from the metrics
    shown = " ".join(f"{key}={metrics[key]:+.3f}" for key in ("ap", "bwt", "fwt") if key in metrics)
    print(f"[{result['method']} seed {result['seed']}] {shown} ppl {metrics['general_ppl_base']:.1f} -> "
          f"{metrics['general_ppl_final']:.1f} ({result['wall_s']:.0f} s)", flush=True)
    return result


# --- aggregation and the report --------------------------------------------------------------------

# Below this mean margin over chance the task columns are noise, and the report says so.
LEARNED_ENOUGH = 0.05
COLUMNS = [("ap", "AP"), ("bwt", "BWT"), ("fwt", "FWT"), ("forgetting_max", "max forgetting")]


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def learned_over_chance(run: dict, chance: dict[str, float]) -> float:
    """Mean over tasks of R[i][i] - chance: how well a task is learned right after training on it."""
    matrix = run["accuracy_matrix"]  # row 0 is before CIT, so task i was just trained in row i + 1
    return statistics.fmean(matrix[i + 1][i] - chance[task] for i, task in enumerate(run["tasks"]))


def learned_over_zero_shot(run: dict) -> float:
    """Mean over tasks of R[i][i] - R[0][i]: what training on a task added to the base model's zero-shot score."""
    matrix = run["accuracy_matrix"]
    return statistics.fmean(matrix[i + 1][i] - matrix[0][i] for i in range(len(run["tasks"])))


def aggregate(results: list[dict], methods: list[str], chance: dict[str, float] | None = None) -> dict[str, dict]:
    table_rows = {}
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        row = {key: mean_std([r["metrics"][key] for r in runs]) for key, _ in COLUMNS}
        row["learned_zero_shot"] = mean_std([learned_over_zero_shot(r) for r in runs])
        general_names = [name for name in runs[0].get("general_tasks") or {} if all(name in (r.get("general_tasks") or {}) for r in runs)]
        row["general_tasks"] = {
            name: {stage: mean_std([r["general_tasks"][name][stage] for r in runs]) for stage in ("base", "final", "delta")}
            for name in general_names
        }
        row["cost"] = {key: statistics.fmean(r[key] for r in runs) for key in COST_KEYS if all(key in r for r in runs)}
        # Perplexity moves over orders of magnitude when a method forgets: average it in log space.
        row["log_ppl_ratio"] = mean_std([math.log(r["metrics"]["general_ppl_final"] / r["metrics"]["general_ppl_base"]) for r in runs])
        row["ppl_base"] = mean_std([r["metrics"]["general_ppl_base"] for r in runs])
        row["ppl_final"] = mean_std([r["metrics"]["general_ppl_final"] for r in runs])
        if chance:
            row["learned"] = mean_std([learned_over_chance(r, chance) for r in runs])
        row["final_row"] = [statistics.fmean(r["accuracy_matrix"][-1][j] for r in runs) for j in range(len(runs[0]["tasks"]))]
        table_rows[method] = row
    return table_rows


def _fmt(stat: dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    mean = f"{stat['mean']:{sign}.3f}"
    return mean if stat["n"] < 2 else f"{mean} ± {stat['std']:.3f}"  # one seed has no spread to show


# Each task has 100 test records, so an accuracy near 0.7 has a binomial std of about 0.05: a difference in
# an accuracy-based measure below this is within what another draw of the test records would move.
ACCURACY_RESOLUTION = 0.03
# WikiText-2 perplexity ratios (log scale) within about 5% of each other are called even.
PPL_LOG_RESOLUTION = 0.05


def _seeds(row: dict) -> str:
    """How many seeds a row's means are over: a 1-seed row beside a 3-seed one has no spread of its own."""
    n = row["ap"]["n"]
    return f"{n} seed{'s' if n != 1 else ''}"


def verdict(advantage: float, noise: float) -> str:
    """How a published claim came out: `advantage` is the measured difference signed so that > 0 agrees with it.

    "holds" past +noise, "does not hold" past -noise, "too close to call" in between, so one seed's 0.002
    difference is not reported as a result. `noise` is the larger of the summed seed std and the resolution.
    """
    if advantage > noise:
        return "holds"
    if advantage < -noise:
        return "does not hold"
    return "too close to call"


def orderings(rows: dict[str, dict]) -> list[str]:
    """The published claims, checked on these numbers (means over seeds; std and test-set resolution say how sure)."""
    lines = []
    # The seed paper's two selective tunings: attention q/k/v/o, or MLP gate and up with down frozen.
    for method, claim in (("attn-proj", "Selective attention tuning"), ("mlp-gate-up", "Tuning only MLP gate and up (down frozen)")):
        if {"full", method} <= set(rows):
            lines.append(_selective_line(rows["full"], rows[method], method, claim))
    if {"seekr-1%", "replay-10%"} <= set(rows):
        seekr, replay = rows["seekr-1%"], rows["replay-10%"]
        gap = seekr["ap"]["mean"] - replay["ap"]["mean"]
        # "Comes close" is one-sided: SEEKR ahead, or behind by no more than the noise: the larger seed std of
        # the two rows, or the test sets' resolution where that is larger (always, at one seed).
        margin = max(seekr["ap"]["std"], replay["ap"]["std"], ACCURACY_RESOLUTION)
        close = gap >= -margin
        lines.append(
            f"- SEEKR at 1% replay comes close to replay at 10%: AP {_fmt(seekr['ap'])} ({_seeds(seekr)}) vs "
            f"{_fmt(replay['ap'])} ({_seeds(replay)}) "
            f"(gap {gap:+.3f}, margin {margin:.3f}: the larger of the seed std and the test sets' resolution); BWT {_fmt(seekr['bwt'], True)} vs {_fmt(replay['bwt'], True)} -> "
            f"**{'holds' if close else 'does not hold'}** at this scale."
        )
    return lines


def _selective_line(full: dict, selective: dict, method: str, claim: str) -> str:
    """One selective tuning (a table row) against full fine-tuning: task forgetting and general ability, each with
    its verdict, and the target-task learning beside them (a method that learns nothing forgets nothing)."""
    bwt_noise = max(ACCURACY_RESOLUTION, selective["bwt"]["std"] + full["bwt"]["std"])
    forgetting = verdict(selective["bwt"]["mean"] - full["bwt"]["mean"], bwt_noise)
    ppl_noise = max(PPL_LOG_RESOLUTION, selective["log_ppl_ratio"]["std"] + full["log_ppl_ratio"]["std"])
    general = verdict(full["log_ppl_ratio"]["mean"] - selective["log_ppl_ratio"]["mean"], ppl_noise)
    learning = ""
    held_out = ""
    names = sorted(set(selective.get("general_tasks", {})) & set(full.get("general_tasks", {})))
    if names:
        # The seed paper's held-out measure: the general tasks' accuracy change, never trained on.
        def mean_delta(row: dict) -> float:
            return statistics.fmean(row["general_tasks"][name]["delta"]["mean"] for name in names)

        # The same margin rule as BWT's: the seed spread of the two rows where there is one, else the resolution.
        held_noise = max(ACCURACY_RESOLUTION, statistics.fmean(
            selective["general_tasks"][name]["delta"]["std"] + full["general_tasks"][name]["delta"]["std"] for name in names))
        held_out = (f"; held-out tasks ({', '.join(names)}) mean change {mean_delta(selective):+.3f} vs {mean_delta(full):+.3f} -> "
                    f"**{verdict(mean_delta(selective) - mean_delta(full), held_noise)}**")
    if "learned" in selective and "learned" in full:
        learning = f"R[i][i] - chance {_fmt(selective['learned'], True)} vs {_fmt(full['learned'], True)}, "
    return (
        f"- {claim} forgets less than full fine-tuning: BWT {_fmt(selective['bwt'], True)} ({method}, {_seeds(selective)}) vs "
        f"{_fmt(full['bwt'], True)} (full, {_seeds(full)}) -> **{forgetting}** on task forgetting (margin {bwt_noise:.3f}); "
        f"WikiText-2 perplexity x{math.exp(selective['log_ppl_ratio']['mean']):.2f} vs x{math.exp(full['log_ppl_ratio']['mean']):.2f} -> "
        f"**{general}** on general ability{held_out}. Target-task learning: "
        f"R[i][i] - R[0][i] {_fmt(selective['learned_zero_shot'], True)} vs {_fmt(full['learned_zero_shot'], True)}, {learning}AP "
        f"{_fmt(selective['ap'])} vs {_fmt(full['ap'])}. Margins: the larger of the summed seed std and the test sets' "
        f"resolution ({ACCURACY_RESOLUTION} accuracy, {math.exp(PPL_LOG_RESOLUTION) - 1:.0%} perplexity)."
    )


def markdown(report: dict) -> str:
    rows = report["methods"]
    tasks = report["tasks"]
    extra = report.get("set") or []
    name = report.get("name", DEFAULT_NAME)
    body = [
        "## Continual-learning quality" + (f": {name}" if name != DEFAULT_NAME else "") + (f" with {', '.join(extra)}" if extra else ""),
        "",
        f"Command: `{report['command']}`"
        + (f" (every run from scratch: `{report['rerun_command']}`)" if report.get("rerun_command") not in (None, report["command"]) else "")
        + f" ({report['wall_minutes']:.0f} min with {report['workers']} workers"
        + (f"; {report['collected_runs']} of {len(report['runs'])} runs were finished by earlier invocations "
           "and collected from their MLflow or results, their wall times are in the cost table" if report.get("collected_runs") else "")
        + (f"; the runs' summed wall time is {report['runs_wall_minutes'] / 60:.1f} h" if report.get("runs_wall_minutes") else "")
        + _resumed(report["runs"])
        + "). "
        + ("At this report (the runs' own load was not recorded): " if report.get("collected_runs") == len(report["runs"]) else "")
        + f"{report['load']} {_machines_line(report)}",
        "",
        f"Base model: {report['model']}{_precisions(report['runs'])}; a short DAP on yelp review text, then {' -> '.join(tasks)} as instruction tasks "
        f"scored by option log-likelihood through the chat template (chance: {report['chance']}). Held-out general "
        "ability, never trained: WikiText-2 perplexity and the held-out tasks' zero-shot scores, before CIT -> after "
        "the last task (change). R[i][i] - R[0][i]: what training on a task added to its zero-shot score, the mean over "
        f"tasks; the accuracy matrix of each method is plotted in `bench/results/{report.get('figure', name + '_matrices.png')}`. "
        f"Every method has the same budget ({report['budget']}); seeds {report['seeds']} (the seeds column counts the runs "
        "behind each row); mean ± sample std over seeds. "
        "AP = mean of the last row of R; BWT and FWT as in docs/metrics.md; max forgetting = the largest drop of a task "
        "from its best earlier score; perplexity is WikiText-2 test, before CIT -> after the last task "
        "(geometric mean over seeds).",
        "",
    ]
    _, known_diagnostics, _ = load_methods()
    diagnostics = [f"{method} = `{' '.join(known_diagnostics[method])}`" for method in rows if method in known_diagnostics]
    if diagnostics:
        body += ["Diagnostics, not methods (configs/cl-benchmark-methods.yaml): " + "; ".join(diagnostics) + ".", ""]
    general_names = sorted({name for row in rows.values() for name in row.get("general_tasks", {})})
    headers = ["method", "seeds", "R[i][i] - R[0][i]", "R[i][i] - chance", *(title for _, title in COLUMNS), "WikiText-2 ppl",
               *(f"{name} (held out)" for name in general_names), *(f"final {task}" for task in tasks)]
    table_rows = []
    for method, row in rows.items():
        ppl = f"{row['ppl_base']['mean']:.1f} -> {row['ppl_base']['mean'] * math.exp(row['log_ppl_ratio']['mean']):.1f}"
        general = [_general_cell(row.get("general_tasks", {}).get(name)) for name in general_names]
        learned_zero_shot = _fmt(row["learned_zero_shot"], True) if "learned_zero_shot" in row else "n/a"
        table_rows.append([method, str(row["ap"]["n"]), learned_zero_shot, _fmt(row["learned"], True),
                           *(_fmt(row[key], key in ("bwt", "fwt")) for key, _ in COLUMNS), ppl, *general,
                           *(f"{value:.3f}" for value in row["final_row"])])
    body += [table(headers, table_rows), ""]
    costs = {method: row["cost"] for method, row in rows.items() if row.get("cost")}
    if costs:
        body += [
            "Cost per run (mean over seeds): the CIT learning rate (each tuning method's sweep pick), trainable parameters of the CIT tuning, tokens trained over the CIT stages, "
            "wall and CPU time of the whole run (DAP and base model from the cache, evaluation included), and the run's "
            "peak resident memory (each run in a fresh process). Wall times are with the other work of the machine "
            "at the time; CPU time is the steadier measure.",
            "",
            table(["method", "CIT lr", "trainable params", "CIT tokens", "wall (min)", "CPU (min)", "peak RSS (GiB)", "AP per CPU-hour"],
                  [[method, _rate(report.get("learning_rates", {}).get(method)), _count(report.get("trainable_params", {}).get(method)), _count(cost.get("cit_tokens")),
                    _minutes(cost.get("wall_s")), _minutes(cost.get("cpu_s")),
                    "n/a" if cost.get("peak_rss_mib") is None else f"{cost['peak_rss_mib'] / 1024:.2f}",
                    "n/a" if not cost.get("cpu_s") else f"{rows[method]['ap']['mean'] / (cost['cpu_s'] / 3600):.2f}"]
                   for method, cost in costs.items()]),
            "",
        ]
    best = max(row["learned"]["mean"] for row in rows.values())
    if best < LEARNED_ENOUGH:
        body += [
            f"**Caveat: no method in this table learns the tasks at this budget** (R[i][i] - chance is at most {best:+.3f}, "
            "the accuracy right after training on a task against guessing). AP, BWT and FWT then differ between "
            "methods by about their seed spread, so this table cannot say which method forgets the tasks less; the "
            "perplexity column, which moves by orders of magnitude, can.",
            "",
        ]
    unlearned = [method for method, row in rows.items() if row["learned"]["mean"] < LEARNED_ENOUGH]
    if unlearned and best >= LEARNED_ENOUGH:
        body += [
            f"**{', '.join(unlearned)}: right after training on a task, within +{LEARNED_ENOUGH} of chance** at this budget and "
            "learning rate. Their small BWT and perplexity change mean they learned little, not that they kept what they "
            "learned; compare methods on forgetting only among those that learn.",
            "",
        ]
    if report["orderings"]:
        body += ["Published orderings, checked:", "", *report["orderings"], ""]
    if report.get("quick"):
        body.insert(2, "**Smoke run (`--quick`): a few steps only; these numbers say nothing about the methods.**\n")
    return "\n".join(body) + "\n"


def _general_cell(stat: dict | None) -> str:
    if stat is None:
        return "n/a"
    return f"{stat['base']['mean']:.2f} -> {stat['final']['mean']:.2f} ({stat['delta']['mean']:+.2f})"


def _rate(value) -> str:
    return "n/a" if value is None else f"{value:.0e}"


def _count(value) -> str:
    if value is None:
        return "n/a"
    return f"{value / 1e6:.1f}M" if value >= 1e6 else f"{value / 1e3:.0f}k"


def _minutes(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f}"


# --- the learning-rate sweep ------------------------------------------------------------------------


def sweep_table(results: list[dict], sweep: dict) -> dict:
    """Validation accuracy (R[1][0]: the first task's held-out records after training on them) per
    tuning method and rate, and the chosen rate: the best, the lower one on a tie."""
    table_rows, chosen = {}, {}
    for tuning, rates in sweep["rates"].items():
        scores = {}
        for lr in rates:
            runs = [r for r in results if r["method"] == f"{tuning}@{lr:g}"]
            if runs:
                scores[f"{lr:g}"] = {
                    "validation": statistics.fmean(r["accuracy_matrix"][1][0] for r in runs),
                    "zero_shot": statistics.fmean(r["accuracy_matrix"][0][0] for r in runs),
                }
        if scores:
            table_rows[tuning] = scores
            chosen[tuning] = max(sorted(scores, key=float), key=lambda lr: scores[lr]["validation"])
    return {"scores": table_rows, "chosen": chosen}


def sweep_markdown(report: dict) -> str:
    sweep, result = report["sweep"], report["sweep_result"]
    rates = sorted({lr for scores in result["scores"].values() for lr in scores}, key=float)
    rows = [[tuning, f"{next(iter(scores.values()))['zero_shot']:.3f}",
             *(f"**{scores[lr]['validation']:.3f}**" if lr == result["chosen"][tuning] else
               (f"{scores[lr]['validation']:.3f}" if lr in scores else "") for lr in rates)]
            for tuning, scores in result["scores"].items()]
    return "\n".join([
        "### Learning-rate sweep",
        "",
        f"Command: `{report['command']}` ({_runs_line(report)}). {report['load']} {_machines_line(report)} "
        f"Precision {_precisions(report['runs']).strip(' ()')}.",
        "",
        f"Each tuning method at each rate trains the first task ({report['tasks'][0]}) alone for {sweep['steps']} steps on "
        f"records {sweep['skip']}..{sweep['skip'] + sweep['records']} of its file, which the benchmark never reads, and is "
        f"scored on the {sweep['validation_fraction']:.0%} of them split off by hash: the benchmark's test records are never "
        "seen. Validation accuracy after training (zero-shot before it); the chosen rate in bold. A CL method uses its "
        "tuning method's rate (on the first task alone replay, EWC and SEEKR have nothing to keep yet). The validation "
        f"split holds about {sweep['records'] * sweep['validation_fraction']:.0f} records, so a difference of 0.01 is about "
        "one record: rates within 0.02 of each other are a tie within noise.",
        "",
        table(["tuning", "zero-shot", *(f"lr {lr}" for lr in rates)], rows),
        "",
        *_edge_notes(result),
    ]) + "\n"


def _machines_line(report: dict) -> str:
    """The machines the runs trained on (each run records its own; older ones only the report's), and
    their torch threads."""
    machines = [run.get("machine") or report["machine"] for run in report["runs"]]
    lines = [machine_line({key: value for key, value in info.items() if key != "torch_threads"}) for info in machines]
    threads = "/".join(str(n) for n in sorted({info.get("torch_threads") for info in machines} - {None}))
    threads = f" Torch threads per run: {threads}." if threads else ""
    if len(set(lines)) == 1:
        return f"Machine: {lines[0]}{threads}"
    counted = collections.Counter(lines).items()
    return "Machines: " + "; ".join(f"{count} run{'s' if count > 1 else ''} on {line}" for line, count in counted) + threads


def _precisions(runs: list[dict]) -> str:
    counts = collections.Counter(run.get("precision", "not recorded") for run in runs)
    return " (" + ", ".join(f"{name} in {count} of {len(runs)} runs" for name, count in counts.items()) + ")"


def _resumed(runs: list[dict]) -> str:
    """"; N resumed after an interruption ...": the runs whose cost sums attempts (run_one), or ""."""
    resumed = [f"{run['method']} seed {run['seed']} ({run['attempts']})" for run in runs if run.get("attempts", 1) > 1]
    return (f"; {len(resumed)} resumed after an interruption, their wall and CPU time summed over the attempts: "
            + ", ".join(resumed)) if resumed else ""


def _runs_line(report: dict) -> str:
    """How long the runs took: an invocation's wall time leaves out the runs it collected from earlier ones."""
    walls = [run["wall_s"] for run in report["runs"] if run.get("wall_s")]
    line = f"{len(report['runs'])} runs, median {statistics.median(walls) / 60:.1f} min each" if walls else f"{len(report['runs'])} runs"
    line += _resumed(report["runs"])
    if report.get("collected_runs"):
        line += (f"; this invocation {report['wall_minutes']:.0f} min, {report['collected_runs']} runs collected from earlier "
                 "invocations (their wall times, in the JSON, include time paused or under other load)")
    return line


def _edge_notes(result: dict) -> list[str]:
    """Say where a chosen rate is the highest or lowest tried: the best rate may then lie outside the grid."""
    notes = []
    for tuning, scores in result["scores"].items():
        tried = sorted(scores, key=float)
        if len(tried) > 1 and result["chosen"][tuning] in (tried[0], tried[-1]):
            side = "highest" if result["chosen"][tuning] == tried[-1] else "lowest"
            notes.append(f"- {tuning}: the chosen rate {result['chosen'][tuning]} is the {side} one tried, so the best may lie beyond it.")
    return [*notes, ""] if notes else []


# --- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # allow_abbrev off: _rerun_argv drops options by their full names
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False,
                                     epilog="Methods, seeds and the sweep's rates come from configs/cl-benchmark-methods.yaml.")
    compared, diagnostics, default_seeds = load_methods()
    all_methods = {**compared, **diagnostics}
    parser.add_argument("--methods", nargs="+", choices=list(all_methods),
                        help="methods to run (default: every compared one; the diagnostics run only when named)")
    parser.add_argument("--seeds", nargs="+", type=int,
                        help=f"seeds of every method (default: {default_seeds}, plus the file's extra_seeds for the methods it names)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs in parallel, the cores shared out between them (default 1: one run on every core)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: the cores shared out between workers). On a machine "
                        "other work also uses, 1 avoids OpenMP threads waiting on each other while the OS runs someone else")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 methods, 1 seed, a few steps, 10 test records per task")
    parser.add_argument("--sweep", action="store_true",
                        help="the learning-rate sweep: each tuning method at each of its rates on the first task alone, "
                        "scored on records the benchmark never uses (results: <name>_sweep)")
    parser.add_argument("--order", nargs="+", metavar="TASK", help="another task order, e.g. agnews dbpedia amazon")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md (and figure) from the existing JSON in --output-dir")
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".perennial" / "bench" / "cl_quality",
                        help="S3 and MLflow data of the benchmark's own services, in a folder per results name (kept between "
                        "runs; --quick starts from an empty one)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides for every run, after the method's own (e.g. cit.optim.lr=0.01)")
    parser.add_argument("--no-run", action="store_true",
                        help="run nothing: report the runs an earlier invocation finished in --state-dir (and, with "
                        "--keep-published or --runs-from, the published ones)")
    parser.add_argument("--keep-published", action="store_true",
                        help="count the runs <name>.json already records with this recipe as done and keep them in the "
                        "report beside the new ones (resumes across machines and sessions; default: report only this "
                        "invocation's runs)")
    parser.add_argument("--runs-from", nargs="+", type=Path, default=[], metavar="FILE",
                        help="results JSONs of other invocations (another machine's, an uncommitted run) whose runs with "
                        "this invocation's recipe count as done and are kept in the report, as with --keep-published")
    parser.add_argument("--name", default=None,
                        help="results file stem under --output-dir (default cl_quality, cl_quality_sweep or cl_quality_order-...)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where <name>.json, .md and the figure go")
    args = parser.parse_args(argv)
    sweep = load_sweep()
    variant = {"sweep": sweep} if args.sweep else ({"order": args.order} if args.order else None)
    name = args.name or (f"{DEFAULT_NAME}_sweep" if args.sweep else f"{DEFAULT_NAME}_order-{'-'.join(args.order)}" if args.order else DEFAULT_NAME)

    if args.render:
        import json

        report = json.loads((args.output_dir / f"{name}.json").read_text())
        report["name"] = name
        write_report(report, args.output_dir)
        return 0
    if not (ROOT.parent / "shared" / "datasets").exists() and "PERENNIAL_DATASETS" not in os.environ:
        parser.error("the benchmark reads ../shared/datasets (or $PERENNIAL_DATASETS), which is not there")
    if args.sweep:
        if args.methods or args.order:
            parser.error("--sweep runs every tuning method of the sweep's rates on the first task; drop --methods / --order")
        recipes = sweep_jobs(sweep)
        methods = list(recipes)
        pairs = run_pairs(methods, args.seeds or default_seeds[:1])
    else:
        recipes = all_methods
        methods = args.methods or (QUICK_METHODS if args.quick else list(compared))
        pairs = run_pairs(methods, args.seeds or (default_seeds[:1] if args.quick else None))
    seeds = sorted({seed for _, seed in pairs})
    recipes = {method: overrides + (QUICK_OVERRIDES if args.quick else []) + args.set for method, overrides in recipes.items()}
    jobs = {method: recipes[method] for method in methods}
    cfg = bench_config(args.set, seeds[0], variant)  # refuses a bad --order before any service starts
    published_file = args.output_dir / f"{name}.json"
    sources = [*([published_file] if args.keep_published else []), *args.runs_from]
    match_on = (variant, _model_line(cfg), _budget_line(cfg, args.quick), run_precision(cfg))  # what published_runs compares
    missing = [str(path) for path in args.runs_from if not path.exists()]
    if missing:
        parser.error(f"--runs-from: no such file: {', '.join(missing)}")
    published = published_runs(sources, recipes, *match_on)
    if not args.keep_published and not args.quick:
        left_out = sorted({(r["method"], r["seed"]) for r in published_runs([published_file], recipes, *match_on, say=False)}
                          - set(pairs) - {(r["method"], r["seed"]) for r in published})
        if left_out:
            print(f"{published_file} holds {len(left_out)} runs of this recipe that this report leaves out "
                  f"({', '.join(f'{method} seed {seed}' for method, seed in left_out)}); --keep-published keeps them", flush=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)

    from app.services import running_services

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="perennial-clq-") as tmp:
        # A smoke run starts cold: in a kept state dir its runs would be collected, or replayed from S3.
        # One state per results name: the sweep, the main table and the second order can run side by side.
        state = Path(tmp) / "state" if args.quick else args.state_dir / name
        warm = state.exists()  # an earlier benchmark run left the base and DAP models in its caches
        with running_services(state, bucket=BUCKET) as services:
            results = finished_runs(jobs, pairs, variant) if warm else []
            done = {(r["method"], r["seed"]) for r in results}
            for result in results:
                print(f"[{result['method']} seed {result['seed']}] finished earlier in {state}: collected", flush=True)
            results += [run for run in published if (run["method"], run["seed"]) not in done]
            done = {(r["method"], r["seed"]) for r in results}
            if not set(pairs) <= done and not args.no_run:
                env = {**services.client_env(), "PERENNIAL_BENCH_WORK": str(Path(tmp) / "work")}
                results += run_all(jobs, pairs, args.workers, threads, env, str(Path(tmp) / "prefect"),
                                   serial_first=not warm, skip=done, variant=variant)
            if not results:
                parser.error(f"no finished runs in {state} or the published results to report")
    # The table's methods: those asked for and those of the published runs it keeps, in the methods file's order.
    methods = [method for method in recipes if method in methods or any(r["method"] == method for r in results)]

    # The command that makes every run of the table from scratch, where one does: the table may keep
    # published runs beyond those asked for.
    table_pairs = {(r["method"], r["seed"]) for r in results}
    no_resume = ("--no-run", "--keep-published", "--runs-from")
    rerun_command = (command("bench.cl_quality", _rerun_argv(argv, no_resume)) if table_pairs == set(pairs)
                     else command("bench.cl_quality", _rerun_argv(argv, (*no_resume, "--methods", "--seeds")))
                     if not args.sweep and table_pairs == set(run_pairs(list(compared), None)) else None)
    tasks = results[0]["tasks"]
    chance = {task: round(1 / len(_labels(cfg, task)), 3) for task in tasks}
    report = {
        "name": name,
        "command": command("bench.cl_quality", argv),
        "rerun_command": rerun_command,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine(), "torch_threads": threads},  # per worker
        "load": load_note(load_before, os.getloadavg()[0]),
        "workers": args.workers,
        "wall_minutes": (time.perf_counter() - started) / 60,
        "quick": args.quick,
        "set": args.set,
        "variant": variant,
        "collected_runs": sum(bool(r.get("collected")) for r in results),
        "seeds": sorted({r["seed"] for r in results}),  # the seeds behind the table, not the ones asked for
        "runs_wall_minutes": sum(r.get("wall_s", 0.0) for r in results) / 60,
        "tasks": tasks,
        "chance": chance,
        "model": _model_line(cfg),
        "budget": _budget_line(cfg, args.quick),
        "method_order": methods,
        "trainable_params": trainable_params({method: recipes[method] for method in methods}, args.set),
        "learning_rates": {method: bench_config([*recipes[method], *args.set], 0).cit.optim.lr for method in methods},
        "runs": sorted(results, key=lambda r: (methods.index(r["method"]), r["seed"])),
    }
    write_report(report, args.output_dir)
    return 0


def _rerun_argv(argv: list[str], drop: tuple[str, ...]) -> list[str]:
    """argv without the options in ``drop`` and their values."""
    kept, skipping = [], False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg.split("=", 1)[0] in drop
        if not skipping:
            kept.append(arg)
    return kept


def write_report(report: dict, output_dir: Path) -> None:
    """Aggregate the runs and write <name>.json, .md and (for the method table) the accuracy-matrix grid."""
    name, results = report["name"], report["runs"]
    if (report.get("variant") or {}).get("sweep"):
        report["sweep"] = report["variant"]["sweep"]
        report["sweep_result"] = sweep_table(results, report["sweep"])
        text = sweep_markdown(report)
    else:
        methods = report.get("method_order") or list(dict.fromkeys(r["method"] for r in results))
        report["methods"] = aggregate(results, methods, report["chance"])
        report["orderings"] = orderings(report["methods"])
        figure = output_dir / f"{name}_matrices.png"
        plot_matrices(results, methods, figure)
        report["figure"] = figure.name
        text = markdown(report)
    json_path, md_path = write_results(name, report, text, output_dir)
    print(text)
    print(f"wrote {json_path} and {md_path}")


def plot_matrices(results: list[dict], methods: list[str], path: Path) -> Path:
    """The accuracy matrix of each method (its first seed's run), one grid."""
    from perennial.cl_metrics import AccuracyMatrix
    from perennial.reports import plot_accuracy_matrix_grid

    first = {}
    for run in sorted(results, key=lambda r: r["seed"]):
        first.setdefault(run["method"], run)
    matrices = {f"{method} (seed {first[method]['seed']})": AccuracyMatrix(tasks=first[method]["tasks"], rows=first[method]["accuracy_matrix"])
                for method in methods if method in first}
    return plot_accuracy_matrix_grid(matrices, path)


def trainable_params(jobs: dict[str, list[str]], extra: list[str]) -> dict[str, int]:
    """Trainable parameters of each method's CIT tuning on the base model (one model build per tuning config)."""
    from models.gguf import converted_dir
    from models.loading import load_model_and_tokenizer
    from models.tuning import apply_tuning, count_parameters

    model_cfg = bench_config([], 0).model
    counts, by_tuning = {}, {}
    for method, overrides in jobs.items():
        tuning = bench_config([*overrides, *extra], 0).cit.tuning
        key = tuning.model_dump_json()
        if key not in by_tuning:
            try:
                if model_cfg.source != "gguf":
                    raise ValueError(f"counted for model.source gguf only, not {model_cfg.source!r}")
                folder, _ = converted_dir(model_cfg.gguf_file, ROOT / ".perennial" / "cache" / "gguf")
                by_tuning[key] = count_parameters(apply_tuning(load_model_and_tokenizer(folder)[0], tuning))[0]
            except Exception as error:  # noqa: BLE001 - a count is a column of the report, not a reason to lose the runs
                print(f"trainable parameters of {method}: not counted ({error})", flush=True)
                by_tuning[key] = None
        counts[method] = by_tuning[key]
    return counts


def _labels(cfg, task: str) -> list:
    import json

    spec = next(d for d in cfg.data.datasets if d.name == task)
    return spec.labels or json.loads(Path(spec.labels_file).read_text())


def _model_line(cfg) -> str:
    if cfg.model.source == "gguf":
        return f"{cfg.model.gguf_file} (GGUF, converted once by models/gguf.py), precision {cfg.precision}"
    if cfg.model.source == "tiny":
        tiny = cfg.model.tiny
        return f"tiny Llama: vocab {tiny.vocab_size}, hidden {tiny.hidden_size}, {tiny.num_hidden_layers} layers, {tiny.num_attention_heads} heads"
    return f"{cfg.model.source} {getattr(cfg.model, 'name_or_path', '')}"


def run_precision(cfg) -> str:
    """What the config's precision trains in on this machine: ``auto`` is bf16 autocast only on CPUs with
    native bf16 (models/engine.py). Runs in bf16 and in fp32 differ, so each run records it and a table
    never mixes published runs of the other (published_runs)."""
    import torch

    from models.engine import autocast_dtype, resolve_device

    return "bf16 autocast" if autocast_dtype(cfg.precision, resolve_device(cfg.device)) == torch.bfloat16 else "fp32"


def _budget_line(cfg, quick: bool) -> str:
    optim = cfg.cit.optim
    steps = "a few" if quick else optim.max_steps
    # The rate is each method's own (the CIT lr column of the cost table), so it is not part of the shared budget.
    return f"{steps} steps of batch {optim.batch_size} per task, max length {optim.max_length}"


if __name__ == "__main__":
    sys.exit(main())
