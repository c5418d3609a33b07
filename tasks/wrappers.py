"""Thin Prefect task wrappers around the plain functions (retries for transient service errors)."""

from prefect import task

from tasks.base_model import prepare_base_model
from tasks.cit import train_task
from tasks.dap import train_dap
from tasks.evaluate import evaluate_stage
from tasks.ingest import ingest_demo
from tasks.register import register, report
from tasks.runtime import finish_run, start_run

RETRY = {"retries": 2, "retry_delay_seconds": [2, 10]}

start_run_task = task(start_run, name="preflight")
ingest_task = task(ingest_demo, name="ingest", **RETRY)
base_model_task = task(prepare_base_model, name="base-model", **RETRY)
dap_task = task(train_dap, name="dap", **RETRY)
cit_task = task(train_task, name="cit-task", task_run_name="cit-{index}", **RETRY)
evaluate_task = task(evaluate_stage, name="evaluate", task_run_name="evaluate-{stage}", **RETRY)
report_task = task(report, name="report", **RETRY)
register_task = task(register, name="register", **RETRY)
finish_task = task(finish_run, name="finish")
