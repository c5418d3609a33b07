"""Compare continual-learning recipes on one config: each recipe x seed is a continual-retrain subflow (its own
run key, so a rerun resumes and never trains a finished run again), then one report (perennial/compare.py).

With ``workers`` > 1 the runs after the first go to a process pool, each process with its share of the cores
as torch threads; the first run goes alone, so it builds the base and DAP models every run then shares.
"""

from __future__ import annotations

import os
import time

from prefect import flow

from flows.continual_retrain import continual_retrain
from tasks.compare import worker_pool
from tasks.wrappers import compare_plan_stage, compare_report_stage, recipe_run_stage


@flow(name="compare-recipes", log_prints=True)
def compare(config_path: str | None, recipes_file: str, overrides: list[str] | None = None, seeds: list[int] | None = None,
            only: list[str] | None = None, order: list[str] | None = None, workers: int = 1, threads: int | None = None,
            name: str | None = None, output_dir: str | None = None, baseline: str | None = None, drop_outputs: bool = False,
            command: str = "", extra: dict | None = None) -> dict:
    started, load_before = time.time(), os.getloadavg()[0]
    plan = compare_plan_stage(config_path, recipes_file, overrides or [], seeds, only, order, workers, threads, name, output_dir,
                              baseline, drop_outputs, command)
    first, rest = plan.jobs[:1], plan.jobs[1:]
    results = [recipe_run_stage(job, continual_retrain) for job in first]
    if plan.workers > 1 and rest:
        with worker_pool(plan.workers, plan.threads) as runner:
            futures = [runner.submit(recipe_run_stage, {"job": job, "retrain": continual_retrain}) for job in rest]
            results += [future.result() for future in futures]
    else:
        results += [recipe_run_stage(job, continual_retrain) for job in rest]
    return compare_report_stage(plan, results, started, load_before, extra)
