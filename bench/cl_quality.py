"""Continual-learning quality on the standard CL benchmark: every method, several seeds, one table.

    python -m bench.cl_quality [--methods full attn-proj ...] [--seeds 0 1 2] [--workers 2] [--quick]
                               [--set KEY=VALUE ...] [--name cl_quality]

Each (method, seed) is one real run of the `continual-retrain` flow on configs/cl-benchmark.yaml
(a tiny Llama pretrained on WikiText-2, DAP on review text, then dbpedia -> amazon -> agnews
scored by option log-likelihood) with the method's overrides from
configs/cl-benchmark-methods.yaml, against SeaweedFS and MLflow started here on free ports.
The base model and the DAP model have their own fixed seeds (model.seed, dap.seed), so they are
computed once (content-digest caches in S3) and every method and seed starts from the same
weights: the seeds vary continual tuning only (data order, adapter initialisation, replay
sampling). The services keep their data in --state-dir, so a second run of the benchmark reuses
the cached base and DAP models.

Reported per method, mean ± sample std over seeds: AP (final average accuracy), BWT, FWT, the
largest per-task forgetting, and the WikiText-2 test perplexity before CIT and after the last
task. The two published orderings it checks are stated with the numbers, whichever way they go.

A killed or interrupted benchmark resumes: the next invocation with the same --state-dir
collects the runs the last one finished (matched by config digest, see finished_runs) and runs
only the rest; `--no-run` reports what is there without running anything.

`--set` changes every run (for a side experiment such as a higher learning rate for the tuning
methods that learn slowly); `--name` keeps its results apart from the main table.

The methods file also lists diagnostics (blocks-only, head-only, embed-only, attn-proj+head)
that run only when named, as in `make bench`.

`--quick` is a smoke run (two methods, one seed, a few steps, 10 test records per task, empty services): it
checks that the benchmark works, its numbers mean nothing.

Results: bench/results/cl_quality.json (every run's matrix and metrics) and cl_quality.md
(--output-dir moves them; `make bench-quick` uses bench/results/quick/).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path

import yaml

from bench.common import RESULTS_DIR, command, load_note, machine, machine_line, table, write_results

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "configs" / "cl-benchmark.yaml"
METHODS_FILE = ROOT / "configs" / "cl-benchmark-methods.yaml"
DEFAULT_NAME = "cl_quality"
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


# --- one run per (method, seed), in worker processes ----------------------------------------------


def _init_worker(env: dict[str, str], prefect_home: str) -> None:
    # Before prefect is imported: each worker gets its own Prefect home (its own temporary API
    # and sqlite file), so parallel workers never contend for one database.
    os.environ.update(env)
    os.environ["PREFECT_HOME"] = prefect_home + f"-{os.getpid()}"
    import torch

    torch.set_num_threads(1)  # one core per worker: see bench/engine_throughput.py


def run_one(method: str, seed: int, overrides: list[str]) -> dict:
    from flows.continual_retrain import continual_retrain
    from perennial.config import load_config

    # A work dir per worker: local caches are filled by one process at a time.
    work_dir = f"{os.environ['PERENNIAL_BENCH_WORK']}-{os.getpid()}"
    cfg = load_config(str(BASE_CONFIG), [*overrides, f"seed={seed}", f"work_dir={work_dir}"])
    started = time.perf_counter()
    summary = continual_retrain(config=cfg.model_dump(mode="json"))
    return {
        "method": method,
        "seed": seed,
        "overrides": overrides,
        "wall_s": round(time.perf_counter() - started, 1),
        "tasks": summary["tasks"],
        "accuracy_matrix": summary["accuracy_matrix"],
        "metrics": summary["metrics"],
        "mlflow_run_id": summary["mlflow_run_id"],
    }


def run_all(jobs: dict[str, list[str]], seeds: list[int], workers: int, env: dict[str, str], prefect_home: str,
            serial_first: bool = True, skip: set[tuple[str, int]] = frozenset()) -> list[dict]:
    """With serial_first, the first run builds the shared base and DAP models (configs fix model.seed and
    dap.seed) alone and the rest reuse them; services whose caches already hold them need not wait."""
    order = [(method, seed) for seed in seeds for method in jobs if (method, seed) not in skip]
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(env, prefect_home)) as pool:
        results = []
        if serial_first:
            (method, seed), order = order[0], order[1:]
            results.append(_report(pool.submit(run_one, method, seed, jobs[method]).result()))
        futures = [pool.submit(run_one, method, seed, jobs[method]) for method, seed in order]
        results += [_report(future.result()) for future in as_completed(futures)]
    return results


# Where a run kept its data, not what it computed: these differ between invocations of the benchmark.
WHERE_KEYS = ("work_dir", "storage.endpoint_url", "storage.bucket", "tracking.tracking_uri")


def finished_runs(jobs: dict[str, list[str]], seeds: list[int]) -> list[dict]:
    """Runs an earlier (interrupted) invocation finished in these services, matched by config digest.

    Every parent run is tagged with the digest of its config; a (method, seed) matches when the
    benchmark's config for it, with that run's WHERE_KEYS (ports and folders differ per invocation),
    has the same digest. So a killed benchmark resumes where it stopped, and a run made with other
    sizes or code defaults never counts.
    """
    import json

    import mlflow
    from mlflow.tracking import MlflowClient

    from perennial.config import load_config

    base = load_config(str(BASE_CONFIG))
    experiment = MlflowClient().get_experiment_by_name(base.tracking.experiment)
    if experiment is None:
        return []
    found: dict[tuple[str, int], dict] = {}
    for run in mlflow.search_runs([experiment.experiment_id], f"attributes.status = 'FINISHED' and tags.mlflow.runName = '{base.run_name}'",
                                  output_format="list"):
        params, digest = run.data.params, run.data.tags.get("config_digest")
        seed = int(params.get("seed", -1))
        if seed not in seeds or not all(key in params for key in WHERE_KEYS):
            continue
        where = [f"{key}={params[key]}" for key in WHERE_KEYS]
        for method, overrides in jobs.items():
            if (method, seed) in found or load_config(str(BASE_CONFIG), [*overrides, f"seed={seed}", *where]).digest() != digest:
                continue
            matrix = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/report/accuracy_matrix.json"))
            found[method, seed] = {
                "method": method, "seed": seed, "overrides": overrides, "collected": True,
                "wall_s": round((run.info.end_time - run.info.start_time) / 1000, 1),
                "tasks": matrix["tasks"], "accuracy_matrix": matrix["rows"], "metrics": run.data.metrics,
                "mlflow_run_id": run.info.run_id,
            }
    return list(found.values())


def _report(result: dict) -> dict:
    metrics = result["metrics"]
    print(f"[{result['method']} seed {result['seed']}] ap={metrics['ap']:.3f} bwt={metrics['bwt']:+.3f} "
          f"fwt={metrics['fwt']:+.3f} ppl {metrics['general_ppl_base']:.1f} -> {metrics['general_ppl_final']:.1f} "
          f"({result['wall_s']:.0f} s)", flush=True)
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


def aggregate(results: list[dict], methods: list[str], chance: dict[str, float] | None = None) -> dict[str, dict]:
    table_rows = {}
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        row = {key: mean_std([r["metrics"][key] for r in runs]) for key, _ in COLUMNS}
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


def orderings(rows: dict[str, dict]) -> list[str]:
    """The published claims, checked on these numbers (means over seeds; std says how sure)."""
    lines = []
    if {"full", "attn-proj"} <= set(rows):
        full, attn = rows["full"], rows["attn-proj"]
        held = attn["bwt"]["mean"] > full["bwt"]["mean"]
        # A method that learns nothing forgets nothing: the margin only counts beside the learning column.
        beyond_noise = abs(attn["bwt"]["mean"] - full["bwt"]["mean"]) > attn["bwt"]["std"] + full["bwt"]["std"]
        kept_general = attn["log_ppl_ratio"]["mean"] < full["log_ppl_ratio"]["mean"]
        learning = ""
        if "learned" in attn and "learned" in full:
            learning = f"R[i][i] - chance {_fmt(attn['learned'], True)} vs {_fmt(full['learned'], True)}, "
        lines.append(
            f"- Selective attention tuning forgets less than full fine-tuning: BWT {_fmt(attn['bwt'], True)} (attn-proj) vs "
            f"{_fmt(full['bwt'], True)} (full) -> **{'holds' if held else 'does not hold'}** on task forgetting "
            f"({'beyond' if beyond_noise else 'within'} the summed seed std); "
            f"WikiText-2 perplexity x{math.exp(attn['log_ppl_ratio']['mean']):.2f} vs x{math.exp(full['log_ppl_ratio']['mean']):.2f} -> "
            f"**{'holds' if kept_general else 'does not hold'}** on general ability. Target-task learning: {learning}AP "
            f"{_fmt(attn['ap'])} vs {_fmt(full['ap'])}."
        )
    if {"seekr-1%", "replay-10%"} <= set(rows):
        seekr, replay = rows["seekr-1%"], rows["replay-10%"]
        gap = seekr["ap"]["mean"] - replay["ap"]["mean"]
        spread = max(seekr["ap"]["std"], replay["ap"]["std"])
        close = abs(gap) <= max(spread, 0.02) or gap > 0
        lines.append(
            f"- SEEKR at 1% replay comes close to replay at 10%: AP {_fmt(seekr['ap'])} vs {_fmt(replay['ap'])} "
            f"(gap {gap:+.3f}, seed std up to {spread:.3f}); BWT {_fmt(seekr['bwt'], True)} vs {_fmt(replay['bwt'], True)} -> "
            f"**{'holds' if close else 'does not hold'}** at this scale."
        )
    return lines


def markdown(report: dict) -> str:
    rows = report["methods"]
    tasks = report["tasks"]
    extra = report.get("set") or []
    name = report.get("name", DEFAULT_NAME)
    body = [
        "## Continual-learning quality" + (f": {name}" if name != DEFAULT_NAME else "") + (f" with {', '.join(extra)}" if extra else ""),
        "",
        f"Command: `{report['command']}` ({report['wall_minutes']:.0f} min with {report['workers']} workers"
        + (f"; {report['collected_runs']} of {len(report['runs'])} runs were finished by an earlier, interrupted invocation "
           "and collected from its MLflow, their wall times are in the JSON" if report.get("collected_runs") else "")
        + "). "
        f"{report['load']} Machine: {machine_line(report['machine'])}",
        "",
        f"A tiny Llama ({report['model']}) pretrained on WikiText-2, DAP on yelp review text, then "
        f"{' -> '.join(tasks)} as instruction tasks scored by option log-likelihood (chance: {report['chance']}). "
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
    headers = ["method", "seeds", "R[i][i] - chance", *(title for _, title in COLUMNS), "WikiText-2 ppl", *(f"final {task}" for task in tasks)]
    table_rows = []
    for method, row in rows.items():
        ppl = f"{row['ppl_base']['mean']:.0f} -> {row['ppl_base']['mean'] * math.exp(row['log_ppl_ratio']['mean']):.0f}"
        table_rows.append([method, str(row["ap"]["n"]), _fmt(row["learned"], True), *(_fmt(row[key], key in ("bwt", "fwt")) for key, _ in COLUMNS), ppl,
                           *(f"{value:.3f}" for value in row["final_row"])])
    body += [table(headers, table_rows), ""]
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


# --- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Methods and seeds default to configs/cl-benchmark-methods.yaml.")
    compared, diagnostics, default_seeds = load_methods()
    all_methods = {**compared, **diagnostics}
    parser.add_argument("--methods", nargs="+", choices=list(all_methods),
                        help="methods to run (default: every compared one; the diagnostics run only when named)")
    parser.add_argument("--seeds", nargs="+", type=int, help=f"seeds (default: {default_seeds})")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one torch thread each (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 methods, 1 seed, a few steps, 10 test records per task")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the existing JSON in --output-dir")
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".perennial" / "bench" / "cl_quality",
                        help="S3 and MLflow data of the benchmark's own services (kept between runs; --quick starts from an empty one)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides for every run, after the method's own (e.g. cit.optim.lr=0.01)")
    parser.add_argument("--no-run", action="store_true",
                        help="run nothing: report the runs an earlier invocation finished in --state-dir")
    parser.add_argument("--name", default=DEFAULT_NAME, help="results file stem under --output-dir (default cl_quality)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where <name>.json and .md go")
    args = parser.parse_args(argv)

    if args.render:
        import json

        report = json.loads((args.output_dir / f"{args.name}.json").read_text())
        report["name"] = args.name
        methods = list(report["methods"])
        report["methods"] = aggregate(report["runs"], methods, report["chance"])
        report["orderings"] = orderings(report["methods"])
        write_results(args.name, report, markdown(report), args.output_dir)
        print(markdown(report))
        return 0
    if not (ROOT.parent / "shared" / "datasets").exists() and "PERENNIAL_DATASETS" not in os.environ:
        parser.error("the benchmark reads ../shared/datasets (or $PERENNIAL_DATASETS), which is not there")
    methods = args.methods or (QUICK_METHODS if args.quick else list(compared))
    seeds = args.seeds or (default_seeds[:1] if args.quick else default_seeds)
    jobs = {method: all_methods[method] + (QUICK_OVERRIDES if args.quick else []) + args.set for method in methods}

    from perennial.config import load_config
    from perennial.services import LocalServices

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="perennial-clq-") as tmp:
        # A smoke run starts cold: in a kept state dir its runs would be collected, or replayed from S3.
        state = Path(tmp) / "state" if args.quick else args.state_dir / "full"
        warm = state.exists()  # an earlier benchmark run left the base and DAP models in its caches
        services = LocalServices.on_free_ports(state)
        env = services.up()
        env["PERENNIAL_BUCKET"] = "cl-quality"
        try:
            os.environ.update(env)
            from perennial.storage import ObjectStore

            cfg = load_config(str(BASE_CONFIG), args.set)
            ObjectStore(cfg.storage).ensure_bucket()
            results = finished_runs(jobs, seeds) if warm else []
            done = {(r["method"], r["seed"]) for r in results}
            for result in results:
                print(f"[{result['method']} seed {result['seed']}] finished earlier in {state}: collected", flush=True)
            if len(done) < len(jobs) * len(seeds) and not args.no_run:
                results += run_all(jobs, seeds, args.workers, {**env, "PERENNIAL_BENCH_WORK": str(Path(tmp) / "work")},
                                   str(Path(tmp) / "prefect"), serial_first=not warm, skip=done)
            if not results:
                parser.error(f"no finished runs in {state} to report")
        finally:
            services.down()

    tasks = results[0]["tasks"]
    chance = {task: round(1 / len(_labels(cfg, task)), 3) for task in tasks}
    rows = aggregate(results, methods, chance)
    report = {
        "name": args.name,
        "command": command("bench.cl_quality", argv),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine(), "torch_threads": 1},  # per worker (_init_worker)
        "load": load_note(load_before, os.getloadavg()[0]),
        "workers": args.workers,
        "wall_minutes": (time.perf_counter() - started) / 60,
        "quick": args.quick,
        "set": args.set,
        "collected_runs": sum(bool(r.get("collected")) for r in results),
        "seeds": seeds,
        "tasks": tasks,
        "chance": chance,
        "model": _model_line(cfg),
        "budget": _budget_line(cfg, args.quick),
        "methods": rows,
        "orderings": orderings(rows),
        "runs": sorted(results, key=lambda r: (methods.index(r["method"]), r["seed"])),
    }
    json_path, md_path = write_results(args.name, report, markdown(report), args.output_dir)
    print(markdown(report))
    print(f"wrote {json_path} and {md_path}")
    return 0


def _labels(cfg, task: str) -> list:
    import json

    spec = next(d for d in cfg.data.datasets if d.name == task)
    return spec.labels or json.loads(Path(spec.labels_file).read_text())


def _model_line(cfg) -> str:
    tiny = cfg.model.tiny
    return f"vocab {tiny.vocab_size}, hidden {tiny.hidden_size}, {tiny.num_hidden_layers} layers, {tiny.num_attention_heads} heads"


def _budget_line(cfg, quick: bool) -> str:
    optim = cfg.cit.optim
    steps = "a few" if quick else optim.max_steps
    return f"{steps} steps of batch {optim.batch_size} per task at lr {optim.lr:g}, max length {optim.max_length}"


if __name__ == "__main__":
    sys.exit(main())
