"""The `perennial` command line.

    perennial services up|down|status      local SeaweedFS (S3) + MLflow, under .perennial/services
    perennial run CONFIG [key=value ...]   the continual-retrain flow (see configs/demo.yaml)
    perennial compare CONFIG --recipes F   every recipe x seed of F on CONFIG: table, cost, verdicts (MLflow, JSON, markdown)
    perennial ingest CONFIG [key=value ...] validate, deduplicate and version data.datasets (docs/ingestion.md)
    perennial review MODEL                 champion vs challenger: metrics, gates, lineage
    perennial promote MODEL VERSION        make VERSION the champion (--reason, --by)
    perennial rollback MODEL               give `champion` back to `previous-champion`
    perennial unpromote MODEL              withdraw a first champion (no previous-champion to roll back to)
    perennial export MODEL_URI OUT         a plain Hugging Face folder, or one GGUF file with --format gguf
                                           (models:/NAME@ALIAS, models:/NAME/N, s3://)
    perennial status [--limit N]           recent retrains: Prefect state + MLflow stage, status, links
    perennial deploy                       register deployments/prefect.yaml with the Prefect server
    perennial gc CONFIG [--dry-run]        delete what the retention policy lets go, with sizes and reasons
    perennial config [KEY]                 every setting under KEY with its default and what it does
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path

from perennial.cl_metrics import trained_label
from perennial.config import ConfigError, endpoints_config, load_config

SERVICES_ENV = Path(".perennial/services/services.env")


def load_services_env(path: Path = SERVICES_ENV) -> None:
    """Pick up the local services' endpoints and generated credentials unless the caller set their own."""
    if not path.exists():
        return
    # MLflow's user and password go together: a caller who set either (a reviewer's own) keeps theirs, whole.
    pair = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    own_identity = any(key in os.environ for key in pair)
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export ") :].split("=", 1)
            if key in pair and own_identity:
                continue
            os.environ.setdefault(key, value)


def cmd_services(args: argparse.Namespace) -> int:
    from app.services import LocalServices

    if args.s3_port:
        os.environ["PERENNIAL_S3_PORT"] = str(args.s3_port)
    if args.mlflow_port:
        os.environ["PERENNIAL_MLFLOW_PORT"] = str(args.mlflow_port)
    services = LocalServices.from_env(args.root)
    if args.action == "up":
        if args.auth:
            services.auth = True
        if services.auth:
            services.lineages = [_lineage_of(args.config)]
        services.up()
        if services.auth and args.grant_auto_promote:
            services.grant_lineage(*services.lineages[0], auto_promote=True)
        print(f"S3 (SeaweedFS): {services.s3_endpoint}   bucket: {services.bucket}")
        print(f"MLflow:         {services.mlflow_uri}" + ("   (auth app perennial-auth: anonymous requests are refused)" if services.auth else ""))
        print(f"credentials:    source {services.root}/services.env")
        if services.auth:  # where the passwords are, never the passwords
            experiment, model = services.lineages[0]
            retrain = "EDIT on both, MANAGE on the model (auto-promotion)" if args.grant_auto_promote else "EDIT on both"
            print(f"MLflow users:   admin, retrain ({retrain}), reviewer (MANAGE on the model); experiment "
                  f"{experiment!r}, registered model {model!r}")
            print(f"                passwords: {services.root}/mlflow-auth.json (0600); services.env acts as retrain; "
                  f"a reviewer: source {services.root}/reviewer.env")
    elif args.action == "down":
        services.down()
        print("services stopped")
    else:
        report = services.status()
        for name, state in report.items():
            auth = "" if name != "mlflow" else "   auth: on (perennial-auth app)" if state.get("auth") else "   auth: off"
            print(f"{name:10s} {'up' if state['ready'] else 'down':5s} pid={state['pid']} {state['url']}{auth}")
        seaweedfs = report["seaweedfs"]
        print(f"disk       {'ok' if seaweedfs['writable'] else 'FULL':5s} {seaweedfs['disk']}")
        return 0 if all(state["ready"] for state in report.values()) and seaweedfs["writable"] else 3
    return 0


def _lineage_of(config: str | None) -> tuple[str, str]:
    """(experiment, registered model) of CONFIG's tracking section; without one, configs/demo.yaml's where it exists
    (what `make run` trains), else the defaults."""
    from perennial.config import TrackingConfig

    path = config or ("configs/demo.yaml" if Path("configs/demo.yaml").exists() else None)
    tracking = load_config(path, []).tracking if path else TrackingConfig()
    return tracking.experiment, tracking.registered_model


def cmd_run(args: argparse.Namespace) -> int:
    load_services_env()
    overrides = [*args.overrides, *([f"lineage.continue_from={args.continue_from}"] if args.continue_from else [])]
    cfg = load_config(args.config, overrides)  # validate before anything starts
    from flows.continual_retrain import continual_retrain

    summary = continual_retrain(config=cfg.model_dump(mode="json"), run_key=args.run_key)
    if summary["continued_version"] is not None:
        print(f"continued {cfg.tracking.registered_model} version {summary['continued_version']}; trained: "
              f"{', '.join(summary['trained']) or 'nothing new'}")
    if args.summary_json:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    print()
    print(accuracy_table(summary))
    print("metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(summary["metrics"].items()) if "/" not in k))
    if "experiment_id" not in summary:
        try:  # the run page's link needs its experiment
            from mlflow.tracking import MlflowClient

            summary = {**summary, "experiment_id": MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"]).info.experiment_id}
        except Exception:  # noqa: BLE001  (the footer then links the registry instead)
            pass
    print(run_footer(summary))
    if args.summary_json:
        print(f"summary:    {args.summary_json}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    load_services_env()
    from perennial.compare import load_spec

    load_config(args.config, args.overrides)  # validate before anything starts
    load_spec(args.recipes)
    if args.threads and args.workers == 1:
        import torch

        torch.set_num_threads(args.threads)
    from flows.compare import compare

    report = compare(args.config, args.recipes, args.overrides, args.seeds, args.only, args.order, args.workers, args.threads,
                     args.name, args.output_dir, args.baseline, args.drop_outputs, command=shlex.join(["perennial", "compare", *args.argv]))
    print()
    print(report["markdown"])
    print(f"wrote {report['json_path']} and {report['md_path']}")
    if report.get("mlflow_run_id"):
        print(f"MLflow:     run compare-{report['name']} ({report['mlflow_run_id']})")
    return 0


def run_footer(summary: dict) -> str:
    """The end of `perennial run`: where the run is, then the version's verdict in the words of the version page
    and `perennial review` (READY / BLOCKED / NEEDS REVIEW, one line per failed gate with its value and
    threshold), the next command and the version page's link (opening MLflow's model registry workflow)."""
    from perennial.tracking import UI_WORKFLOW

    ui = summary["tracking_uri"].rstrip("/")
    lines = []
    if summary.get("experiment_id"):
        lines.append(f"MLflow run: {ui}/#/experiments/{summary['experiment_id']}/runs/{summary['mlflow_run_id']}?{UI_WORKFLOW}")
    else:
        lines.append(f"MLflow UI:  {ui}/#/models?{UI_WORKFLOW} (run {summary['mlflow_run_id']})")
    lines.append(f"S3:         {summary['s3_prefix']}")
    registered = summary.get("registered_model")
    if not registered:
        return "\n".join(lines)
    aliases = ", ".join(registered["aliases"]) or "none"  # read back from the registry
    name, version = registered["name"], registered["version"]
    lines.append(f"registered: {name} version {version} (aliases: {aliases})")
    verdict = registered.get("verdict_lines") or []
    if verdict:
        lines.append(f"verdict:    {verdict[0]}")
        lines += [f"            {line}" for line in verdict[1:]]
    if registered.get("promoted"):
        lines.append(f"            promoted automatically: {name}@champion is version {version}")
    elif registered.get("needs_review"):
        lines.append(f"            waiting for a person: {registered['review_reason']}")
    lines.append(f"next:       perennial review {name}")
    lines.append(f"version:    {ui}/#/models/{name}/versions/{version}?{UI_WORKFLOW}")
    return "\n".join(lines)


def accuracy_table(summary: dict) -> str:
    """The accuracy matrix R[i][j] as text, with each task's chance level and gain, and the held-out tasks.

    A retrain that continued a lineage shows the lineage's matrix, each row labelled with the retrain
    that added it; "—" is a cell never scored (a task that arrived after that row)."""
    tasks, matrix, chance = summary["tasks"], summary["accuracy_matrix"], summary.get("chance", {})
    if not matrix:
        version = summary.get("continued_version")
        return (f"nothing new to train: version {version} has learned every task and record" if version is not None
                else "nothing was trained")
    trained = summary.get("trained_by_row") or tasks[: len(matrix) - 1]  # per row: its task, or a joint stage's tasks (a list)
    labels = summary.get("row_labels") or ["before CIT", *(trained_label(entry) for entry in trained)]
    start = summary.get("start_row", 0)
    width = max(12, *(len(task) for task in tasks))
    label_width = max(len("gain R[i][i] - R[start][i]"), *(len(label) for label in labels))

    def line(label: str, cells: list[str]) -> str:
        return f"  {label:<{label_width}s}" + "".join(f"  {cell:>{width}s}" for cell in cells)

    heading = "score on task j after stage i (row 0: before CIT)" if start == 0 else \
        f"the lineage's: score on task j after stage i (row {start}: where this retrain started)"
    lines = [f"accuracy matrix R[i][j]: {heading}; chance beside it:", line("", tasks)]
    for label, row in zip(labels, matrix):
        lines.append(line(label, ["—" if v is None else f"{v:.3f}" for v in row]))
    lines.append(line("chance", ["?" if chance.get(t) is None else f"{chance[t]:.3f}" for t in tasks]))
    gains = []
    for j, task in enumerate(tasks):  # the gain of each task this retrain trained, from where it started
        rows = [i + 1 for i, entry in enumerate(trained) if task in ([entry] if isinstance(entry, str) else entry) and i + 1 > start]
        before = matrix[start][j]
        gains.append("" if not rows or before is None or matrix[rows[-1]][j] is None else f"{matrix[rows[-1]][j] - before:+.3f}")
    lines.append(line("gain R[i][i] - R[start][i]" if start else "gain R[i][i] - R[0][i]", gains))
    for name, scores in summary.get("general_tasks", {}).items():
        level = "" if chance.get(name) is None else f" (chance {chance[name]:.3f})"
        lines.append(f"held-out general task {name}{level}: {scores['base']:.3f} -> {scores['final']:.3f} ({scores['delta']:+.3f})")
    dropped = {name: entry for name, entry in summary.get("bias", {}).items() if entry["verdict"] != "kept"}
    if dropped:
        lines.append("output bias or lost knowledge (docs/metrics.md): raw score, then with the format or label prior taken out:")
    for name, entry in dropped.items():
        corrected = ("?" if entry["before_corrected"] is None or entry["after_corrected"] is None
                     else f"{entry['before_corrected']:.3f} -> {entry['after_corrected']:.3f}")
        split = "" if entry["bias_drop"] is None else f": {entry['bias_drop']:+.3f} of the {entry['drop']:.3f} drop is bias"
        one = f"; answers {entry['top_prediction']!r} to {entry['top_share']:.0%} of records" if entry.get("one_label") else ""
        lines.append(f"  {name}: {entry['before']:.3f} -> {entry['after']:.3f} raw, {corrected} corrected ({entry['verdict']}{split}){one}")
    return "\n".join(lines)


# --- registry and operations (docs/operations.md) ---------------------------------------------


def _tracking_client(args: argparse.Namespace):
    """MLflow client for --tracking-uri, else MLFLOW_TRACKING_URI (local services' env included)."""
    load_services_env()
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError("no tracking server: pass --tracking-uri or set MLFLOW_TRACKING_URI (e.g. http://127.0.0.1:5000)")
    from mlflow.tracking import MlflowClient

    from perennial.tracking import check_tracking_server

    check_tracking_server(uri)  # a clear error in seconds, not MLflow's minutes of retries and a traceback

    return MlflowClient(tracking_uri=uri), uri


def cmd_review(args: argparse.Namespace) -> int:
    """Exit 1, listing the registered models, when MODEL is not one of them."""
    from mlflow.exceptions import MlflowException

    from perennial import registry

    client, uri = _tracking_client(args)
    try:
        client.get_registered_model(args.model)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        names = [model.name for model in client.search_registered_models(max_results=100)
                 if registry.PROMOTION_LOCK_SUFFIX not in model.name]
        print(f"error: no registered model {args.model!r} at {uri}; registered models: {', '.join(names) or 'none'} "
              f"(all of them, in the MLflow UI: {uri.rstrip('/')}/#/models)", file=sys.stderr)
        return 1
    print(registry.review(client, args.model).rstrip("\n"))
    return 0


def _move_champion(args: argparse.Namespace, action: str, done) -> int:
    """Run registry.<action> (promote, rollback, unpromote) as --by or this user; a RegistryError exits 1.

    With MLflow's basic-auth app on, the action is recorded under the authenticated MLflow user (--by may only
    repeat it), and a user without MANAGE on the model is refused before anything changes (registry.acting_user).

    `done` turns the action's result dict into the line printed on success.
    """
    from perennial import registry

    client, _ = _tracking_client(args)
    options = {"version": args.version} if action == "promote" else {}
    try:
        result = getattr(registry, action)(client, args.model, **options, by=args.by, reason=args.reason)
    except registry.RegistryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.model}: {done(result)}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Promoting a BLOCKED version warns, naming its failed gates with value and threshold; without --reason it
    is refused (exit 1): overriding a gate is a deliberate act, recorded with its reason."""
    from perennial import registry

    client, _ = _tracking_client(args)
    try:
        target = client.get_model_version(args.model, str(args.version))
    except Exception:  # noqa: BLE001  (registry.promote says "no version N")
        target = None
    failures = registry.blocked_gates(target) if target is not None and registry.CHAMPION not in target.aliases else []
    if failures:
        print(f"warning: {args.model} v{args.version} is BLOCKED: promoting it overrides {len(failures)} failed gate(s):",
              file=sys.stderr)
        for result in failures:
            print(f"  - {result.name}: value {registry._fmt(result.value)}, threshold {registry._fmt(result.threshold)}: "
                  f"{result.detail}", file=sys.stderr)

    def done(result: dict) -> str:
        previous = f" (previous-champion: v{result['previous_champion']})" if result["previous_champion"] else ""
        over = f"; overridden gates: {', '.join(r['name'] for r in result['overridden'])}" if result.get("overridden") else ""
        return f"champion is now v{result['champion']}{previous}{over}"

    return _move_champion(args, "promote", done)


def cmd_rollback(args: argparse.Namespace) -> int:
    return _move_champion(args, "rollback", lambda result: f"champion is back to v{result['champion']} (v{result['demoted']} demoted)")


def cmd_unpromote(args: argparse.Namespace) -> int:
    return _move_champion(args, "unpromote", lambda result: f"v{result['unpromoted']} is no longer the champion; no version is")


def cmd_status(args: argparse.Namespace) -> int:
    from app.status import status_report

    client, uri = _tracking_client(args)
    prefect_url = args.prefect_api_url
    if prefect_url is None:
        from prefect.settings import get_current_settings

        prefect_url = get_current_settings().api.url
    report = status_report(client, uri, args.experiment, args.limit, prefect_url)
    if report is None:
        print(f"no experiment {args.experiment!r} at {uri}", file=sys.stderr)
        return 1
    print(report, end="")
    return 0


def ensure_work_pools(prefect_file: Path) -> list[str]:
    """Create the process work pools that prefect_file's deployments name, where missing."""
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    spec = yaml.safe_load(prefect_file.read_text())
    pools = sorted({d["work_pool"]["name"] for d in spec.get("deployments", []) if d.get("work_pool", {}).get("name")})
    with get_client(sync_client=True) as client:
        for pool in pools:
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                try:
                    client.create_work_pool(WorkPoolCreate(
                        name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
                    print(f"created work pool {pool} (process)")
                except ObjectAlreadyExists:  # a worker started meanwhile created it
                    pass
    return pools


def cmd_deploy(args: argparse.Namespace) -> int:
    """Create the process work pool if missing, then `prefect deploy --all` with the project's prefect.yaml.

    Run from the project root: entrypoints in prefect.yaml are relative to it, and Prefect records
    this directory as where workers load the flow code from.
    """
    import subprocess

    import yaml
    from prefect.settings import get_current_settings

    prefect_file = Path(args.prefect_file)
    if not prefect_file.is_file():
        raise ConfigError(f"{prefect_file} does not exist; run `perennial deploy` from the project root")
    for deployment in yaml.safe_load(prefect_file.read_text()).get("deployments", []):
        entry = deployment.get("entrypoint", "").split(":")[0]
        if entry and not Path(entry).is_file():
            raise ConfigError(f"deployment {deployment.get('name')!r}: entrypoint {entry} not found from {Path.cwd()}; run from the project root")
    if not get_current_settings().api.url:
        print("warning: PREFECT_API_URL is not set: deployments go to the local Prefect database; "
              "start `prefect server start` and set PREFECT_API_URL so workers can see them", file=sys.stderr)
    ensure_work_pools(prefect_file)
    command = [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--prefect-file", str(prefect_file)]
    command += [arg for name in args.name for arg in ("--name", name)] if args.name else ["--all"]
    return subprocess.run(command).returncode


def cmd_gc(args: argparse.Namespace) -> int:
    """`perennial gc`: a dry run lists and explains without a lock (it deletes nothing); a sweep runs the gc
    flow, which holds the lineage lock so no retrain of the lineage starts while it deletes."""
    load_services_env()
    cfg = load_config(args.config, args.overrides)  # validate (the retention policy too) before anything runs
    from tasks.gc import GcPlan, collect_garbage, format_plan

    if args.dry_run:
        plan = collect_garbage(cfg, dry_run=True)
    else:
        from flows.gc import gc

        plan = GcPlan.model_validate(gc(config=cfg.model_dump(mode="json")))
    print(format_plan(plan))
    if not args.dry_run:
        _reclaim_local_disk(cfg.storage.endpoint_url)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(plan.model_dump_json(indent=2))
    return 0


def _reclaim_local_disk(endpoint_url: str) -> None:
    """When the lineage's S3 is this folder's own SeaweedFS, compact its volumes so the deleted bytes leave the disk
    too (`LocalServices.reclaim_disk`); another S3 frees its space by itself."""
    from app.services import DiskHeadroom, LocalServices

    services = LocalServices.from_env()
    if endpoint_url.rstrip("/") != services.s3_endpoint or not services.status()["seaweedfs"]["running"]:
        return
    freed = services.reclaim_disk()
    print(f"local SeaweedFS compacted its volumes: {freed / 2**30:.1f} GiB of disk returned "
          f"({DiskHeadroom.of(services.root).describe()})")


def cmd_ingest(args: argparse.Namespace) -> int:
    from perennial.ingest.cli import main_ingest

    load_services_env()
    return main_ingest(args.args)


def cmd_export(args: argparse.Namespace) -> int:
    """Exit 1 with the reason for a bad URI, an unknown model, a taken OUT, unreachable storage, or (GGUF) a
    dtype, architecture or tokenizer it cannot write."""
    from models.gguf import GGUFError
    from perennial.registry import RegistryError
    from perennial.storage import StorageError
    from app.services import ServiceError
    from perennial.tracking import TrackingError
    from tasks.export import export_gguf, export_model

    if args.format == "hf" and args.dtype is not None:
        print("error: --dtype applies to --format gguf; a Hugging Face folder keeps the checkpoint's weights as they are",
              file=sys.stderr)
        return 1
    if args.format == "hf" and args.out_dir.endswith(".gguf"):
        print(f"error: {args.out_dir} names a GGUF file; add --format gguf (without it, OUT is a folder)", file=sys.stderr)
        return 1
    load_services_env()
    # Export needs only endpoints, so outside the repo the environment (services.env) is enough.
    cfg = load_config(args.config) if args.config else endpoints_config()
    try:
        if args.format == "gguf":
            out = export_gguf(cfg, args.model_uri, args.out_dir, args.dtype or "f16")
        else:
            out = export_model(cfg, args.model_uri, args.out_dir)
    except (StorageError, TrackingError) as error:
        print(f"error: {error}\n(S3 {cfg.storage.endpoint_url}, MLflow {cfg.tracking.tracking_uri}: set PERENNIAL_S3_ENDPOINT, "
              "MLFLOW_TRACKING_URI and the AWS_* credentials, e.g. `source .perennial/services/services.env`, "
              "or pass --config)", file=sys.stderr)
        return 1
    except (RegistryError, FileExistsError, FileNotFoundError, GGUFError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.format == "gguf":
        print(f"exported to {out} (GGUF, {args.dtype or 'f16'}); run it with llama.cpp (llama-cli -m {out}), or with Ollama "
              "through a Modelfile (docs/operations.md, \"Serving the champion\")")
    else:
        print(f"exported to {out}; to score it with lm-eval as Perennial does: perennial lm-eval-task {out} DATA.jsonl TASK_DIR")
    return 0


def cmd_lm_eval_task(args: argparse.Namespace) -> int:
    """Exit 1 with the reason for unreadable records, no test records or a prompt lm-eval cannot be given."""
    from tasks.export import write_lm_eval_task

    cfg = load_config(args.config) if args.config else None
    scoring = args.scoring or (cfg.eval.scoring if cfg else "generate")
    max_new_tokens = args.max_new_tokens or (cfg.eval.max_new_tokens if cfg else 12)
    max_length = args.max_length or (cfg.cit.optim.max_length if cfg else 128)
    try:
        records = [json.loads(line) for line in Path(args.records).read_text().splitlines() if line.strip()]
        out = write_lm_eval_task(args.model_dir, records, args.out_dir, args.name, scoring, max_new_tokens, max_length)
    except (OSError, json.JSONDecodeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out / (args.name + '.yaml')}; score with lm-eval's defaults (CPU):\n"
          f"  lm_eval --model hf --model_args pretrained={args.model_dir} --include_path {out} --tasks {args.name} --device cpu")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from perennial.config import describe_keys

    for key, default, description in describe_keys(args.key):
        shown = json.dumps(default, default=str) if not isinstance(default, str) else default
        print(f"{key} = {shown}" + (f"\n    {description}" if description else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perennial",
        description="Continual retraining of language models without forgetting: "
        "ingest -> DAP -> CIT over tasks with replay -> evaluate -> MLflow registry.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="list the config's keys with their defaults and what they do",
                            description="Every setting under KEY (a section such as retention or cit.optim, or one key; "
                            "none: all), its default and its description: what `key=value` overrides and YAML files set.")
    config.add_argument("key", nargs="?", default="", help="a section or key, e.g. retention, cit.tuning.method")
    config.set_defaults(func=cmd_config)

    run = sub.add_parser("run", help="run the continual-retrain flow on a config", description="Run the whole pipeline. "
                         "Overrides are dotted keys, e.g. cit.optim.lr=3e-4 cit.tuning.method=attn-proj.")
    run.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides (YAML-typed values)")
    run.add_argument("--summary-json", help="write run ids, accuracy matrix, metrics, checkpoints and registry version here")
    run.add_argument("--continue-from", metavar="VERSION",
                     help="continue a registered version instead of retraining from the base model: champion, "
                     "models:/NAME/VERSION or models:/NAME@ALIAS (= lineage.continue_from=VERSION; none: from the base model). "
                     "It trains only the tasks and records the version has not learned, with its CL state")
    run.add_argument("--run-key", help="resume or name a run explicitly (default: run_name + config digest). A key names one "
                     "config and one set of dataset versions: another config under it is refused; new data under it trains "
                     "under KEY-data-<digest>. {date} becomes today's date (UTC), or a scheduled run's date in its schedule's timezone")
    run.set_defaults(func=cmd_run)

    compare = sub.add_parser(
        "compare", help="compare continual-learning recipes on one config: every recipe x seed, one table",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every recipe of RECIPES (a name and key=value overrides, as configs/cl-benchmark-methods.yaml)\n"
        "at every seed as a continual-retrain subflow on the same data and base model, then write one table:\n"
        "AP, BWT, FWT, max forgetting, the held-out tasks and general perplexity (mean ± std over seeds), what\n"
        "training added to each task (R[i][i] - R[0][i]), the cost (CIT tokens, CPU time, peak memory, trainable\n"
        "parameters) and which recipe is better than the baseline, or too close to call. A difference counts\n"
        "when it is larger than its margin: the larger of the two rows' summed seed std and the test sets'\n"
        "resolution (0.03 accuracy, 5% perplexity; `resolution:` in RECIPES changes them).",
        epilog="Each run has its own run key (recipe, seed and config digest) and lineage, with the registry off:\n"
        "rerun after an interruption, the comparison resumes each unfinished run from its last committed stage\n"
        "and collects the finished ones without training them again. Results: <output-dir>/<name>.json, .md and\n"
        "_matrices.png, one MLflow run `compare-<name>` in the config's experiment, a Prefect markdown artifact,\n"
        "and the table in the terminal.\n\n"
        "A recipe with cit.multitask=true is the multi-task upper bound (every task trained jointly in one stage,\n"
        "the same total steps): its BWT, FWT and forgetting are not defined (—), and every other row gets its\n"
        "gap to it (AP − multi-task).\n\n"
        "A sweep file (`sweep:` with rates per tuning method) is the learning-rate sweep: each tuning method at\n"
        "each rate trains the first task alone and is scored on a validation split of records the config's\n"
        "tasks never read. Examples:\n"
        "  perennial compare configs/tiny.yaml --recipes configs/tiny-recipes.yaml --seeds 0\n"
        "  perennial compare configs/tiny.yaml --recipes configs/tiny-recipes.yaml --seeds 0 1 2 --workers 2\n"
        "  perennial compare configs/cl-benchmark.yaml --recipes configs/cl-benchmark-sweep.yaml")
    compare.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    compare.add_argument("overrides", nargs="*", help="key=value overrides for every run (after each recipe's own)")
    compare.add_argument("--recipes", required=True, help="recipes (or sweep) YAML: recipes: {NAME: [key=value, ...]}, seeds, ...")
    compare.add_argument("--seeds", nargs="+", type=int, help="seeds of every recipe (default: the file's seeds and extra_seeds)")
    compare.add_argument("--only", nargs="+", metavar="RECIPE", help="run only these recipes (diagnostics run only when named)")
    compare.add_argument("--workers", type=int, default=1, help="runs at a time, in worker processes that share the cores "
                         "(default 1: one run at a time, in this process, on every core)")
    compare.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the cores shared out "
                         "between the workers)")
    compare.add_argument("--order", nargs="+", metavar="TASK", help="another order of the config's tasks")
    compare.add_argument("--baseline", help="the recipe the others are judged against (default: the file's baseline, else its first)")
    compare.add_argument("--name", help="results name (default: the recipes file's stem)")
    compare.add_argument("--output-dir", help="where <name>.json, .md and the figure go (default: .perennial/compare/<name>)")
    compare.add_argument("--drop-outputs", action="store_true", help="delete each finished run's checkpoints and models "
                         "from S3 (the numbers stay in MLflow; a full model's checkpoints are about 0.5 GB a stage)")
    compare.set_defaults(func=cmd_compare)

    ingest = sub.add_parser("ingest", help="validate, version and upload the datasets of a config (no training)",
                            description="Ingest data.datasets of CONFIG: schema checks, quarantine, dedup, "
                            "hash splits, versioned JSONL + manifest in S3. See docs/ingestion.md.")
    ingest.add_argument("args", nargs=argparse.REMAINDER, help="CONFIG [key=value ...] [--only NAME] [--log-mlflow] "
                        "[--distributed process|dask [--address tcp://HOST:8786 | --workers N]] "
                        "(`perennial ingest CONFIG --help` explains each)")
    ingest.set_defaults(func=cmd_ingest)

    export = sub.add_parser("export", help="write a committed checkpoint as a Hugging Face folder (for lm_eval) or a GGUF file",
                            description="Download and verify a checkpoint (a registered version, models:/NAME@ALIAS or "
                            "models:/NAME/VERSION, or the s3://... URI of a stage's model) and write it as a folder "
                            "`lm_eval --model hf --model_args pretrained=FOLDER` reads (--format hf, the default), or as "
                            "one GGUF file for llama.cpp, Ollama and LM Studio (--format gguf): weights in --dtype, the "
                            "tokenizer and chat template in its metadata; it writes the llama (SmolLM2, Llama) and qwen2 "
                            "architectures and refuses others, naming them. Endpoints come from the "
                            "environment (PERENNIAL_S3_ENDPOINT, MLFLOW_TRACKING_URI and the AWS_* credentials, "
                            "as in services.env) unless --config is given.")
    export.add_argument("model_uri", help="e.g. models:/perennial-demo@champion, models:/perennial-demo/3 or "
                        "s3://perennial/perennial/runs/<run>/stages/cit-03-reverse/model")
    export.add_argument("out_dir", metavar="OUT", help="--format hf: an empty or new folder; --format gguf: the new "
                        ".gguf file to write, e.g. perennial-demo.gguf")
    export.add_argument("--format", choices=["hf", "gguf"], default="hf", help="hf: a plain Hugging Face folder (default); "
                        "gguf: one GGUF file")
    export.add_argument("--dtype", choices=["f32", "f16", "bf16"], default=None, help="--format gguf: the weights' type "
                        "(default f16; norms stay f32)")
    export.add_argument("--config", default=None, help="config whose storage and tracking settings to use "
                        "(default: the environment's endpoints)")
    export.set_defaults(func=cmd_export)

    lm_eval_task = sub.add_parser(
        "lm-eval-task", help="write an lm-evaluation-harness task that scores test records as Perennial does",
        description="Render the test records of an ingested data.jsonl with an exported model's tokenizer into an "
        "lm-eval task (NAME.yaml + NAME.jsonl): each context is the exact prompt window Perennial feeds (chat "
        "template, special tokens, cut to the training length), so `lm_eval --model hf` with its defaults (no "
        "--apply_chat_template) scores the model as Perennial's own scorer does. Needs lm-eval for the scoring "
        "itself (installed by make venv: the `eval` extra).")
    lm_eval_task.add_argument("model_dir", help="an exported model folder (perennial export)")
    lm_eval_task.add_argument("records", help="JSONL of canonical instruction records (an ingested data.jsonl); test split only")
    lm_eval_task.add_argument("out_dir", help="folder for NAME.yaml and NAME.jsonl (pass it to lm_eval --include_path)")
    lm_eval_task.add_argument("--name", default="perennial_task", help="lm-eval task name (default perennial_task)")
    lm_eval_task.add_argument("--config", default=None, help="take --scoring, --max-new-tokens and --max-length from this "
                              "config (eval.scoring, eval.max_new_tokens, cit.optim.max_length)")
    lm_eval_task.add_argument("--scoring", choices=["generate", "options"], default=None, help="default generate")
    lm_eval_task.add_argument("--max-new-tokens", type=int, default=None, help="generate: answer budget (default 12)")
    lm_eval_task.add_argument("--max-length", type=int, default=None, help="training length in tokens (default 128)")
    lm_eval_task.set_defaults(func=cmd_lm_eval_task)

    services = sub.add_parser("services", help="start, stop or inspect local SeaweedFS + MLflow",
                              description="up: start SeaweedFS (S3) and MLflow for ROOT, or leave them as they are when "
                              "running; down: stop them; status: say whether each answers, exit 3 when not (or the disk "
                              "is full)")
    services.add_argument("action", choices=["up", "down", "status"], help="up, down or status (options below say which they "
                          "apply to; --root to all three)")
    services.add_argument("--root", default=None, help="state folder (default .perennial/services)")
    services.add_argument("--s3-port", type=int, default=None, help="S3 port (default 8333 or PERENNIAL_S3_PORT)")
    services.add_argument("--mlflow-port", type=int, default=None, help="MLflow port (default 5000 or PERENNIAL_MLFLOW_PORT)")
    services.add_argument("--auth", action="store_true", help="up: MLflow with its basic-auth app, run as the app perennial-auth, "
                          "whose server refuses to set or delete any alias but challenger without MANAGE (also "
                          "PERENNIAL_MLFLOW_AUTH=1). A root keeps auth once it is on; to turn it off, `down` and delete "
                          "ROOT/ports.json's mlflow_auth. Generated passwords for the admin, retrain and reviewer identities in "
                          "ROOT/mlflow-auth.json and ROOT/<identity>.env (0600, never printed); retrain gets EDIT on the "
                          "experiment and registered model of --config, reviewer MANAGE on the model. docs/operations.md, "
                          "\"Running against a team's MLflow\"")
    services.add_argument("--config", default=None, help="up --auth: the config whose tracking.experiment and "
                          "tracking.registered_model the identities are granted on (default configs/demo.yaml)")
    services.add_argument("--grant-auto-promote", action="store_true", help="up --auth: also give the retrain identity "
                          "MANAGE on the registered model, so registry.auto_promote may move champion")
    services.set_defaults(func=cmd_services)

    def tracking_option(command: argparse.ArgumentParser) -> None:
        command.add_argument("--tracking-uri", default=None, help="MLflow tracking server (default: $MLFLOW_TRACKING_URI)")

    review = sub.add_parser("review", help="champion vs challenger of a registered model: metrics, gates, lineage")
    review.add_argument("model", help="registered model name (tracking.registered_model)")
    tracking_option(review)
    review.set_defaults(func=cmd_review)

    promote = sub.add_parser("promote", help="make a version the champion (the old one becomes previous-champion)")
    promote.add_argument("model", help="registered model name")
    promote.add_argument("version", type=int, help="version number to promote")
    promote.add_argument("--reason", default=None, help="why; recorded as the version tag promoted_reason. Required to "
                         "promote a BLOCKED version (it overrides the failed gates, recorded in overridden_gates)")
    promote.add_argument("--by", default=None, help="who; recorded as promoted_by (default: $USER). With MLflow's "
                         "basic-auth app on, always the authenticated MLflow user, which --by cannot change")
    tracking_option(promote)
    promote.set_defaults(func=cmd_promote)

    rollback = sub.add_parser("rollback", help="give alias champion back to previous-champion")
    rollback.add_argument("model", help="registered model name")
    rollback.add_argument("--reason", default="(no reason given)", help="why; recorded on both versions")
    rollback.add_argument("--by", default=None, help="who (default: $USER; with MLflow auth on: the authenticated user)")
    tracking_option(rollback)
    rollback.set_defaults(func=cmd_rollback)

    unpromote = sub.add_parser("unpromote", help="withdraw a champion that has no previous-champion (delete alias champion)")
    unpromote.add_argument("model", help="registered model name")
    unpromote.add_argument("--reason", default="(no reason given)", help="why; recorded as the version tag unpromoted_reason")
    unpromote.add_argument("--by", default=None, help="who (default: $USER; with MLflow auth on: the authenticated user)")
    tracking_option(unpromote)
    unpromote.set_defaults(func=cmd_unpromote)

    status = sub.add_parser("status", help="recent retrains: Prefect flow-run state joined with the MLflow run (stage, status, link, S3 prefix)",
                            description="Recent retrains, newest first: the Prefect flow run (state, name, deployment, start) "
                            "joined with its MLflow parent run (run key, current or last stage, status, MLflow link, S3 prefix), "
                            "then continual-retrain flow runs with no MLflow run in the experiment. Without a reachable "
                            "Prefect API the MLflow side is still shown, with the reason.")
    status.add_argument("--limit", type=int, default=10, help="how many retrains (default 10)")
    status.add_argument("--experiment", default="perennial-demo", help="MLflow experiment (tracking.experiment; default perennial-demo)")
    tracking_option(status)
    status.add_argument("--prefect-api-url", default=None, help="Prefect API, e.g. http://127.0.0.1:4200/api (default: $PREFECT_API_URL)")
    status.set_defaults(func=cmd_status)

    gc = sub.add_parser(
        "gc", help="delete the checkpoints, replay buffers and local files the retention policy lets go",
        description="Reads the registry and the lineage's runs first, then deletes what no kept version, unfinished "
        "run or continuing retrain needs (retention.* in the config; docs/operations.md, \"Storage and retention\"), "
        "under the lineage lock. Every deletion is listed with its size and why it may go. On the project's own "
        "SeaweedFS (`perennial services up`) it then compacts the volumes, so the disk gets the deleted bytes back.")
    gc.add_argument("config", help="YAML config, e.g. configs/demo.yaml: its lineage (tracking.registered_model) and retention policy")
    gc.add_argument("overrides", nargs="*", help="key=value overrides, e.g. retention.keep_last_versions=3")
    gc.add_argument("--dry-run", action="store_true", help="list what would go, with sizes and reasons; delete nothing")
    gc.add_argument("--json", help="also write the plan (every deletion, kept versions, run states) here")
    gc.set_defaults(func=cmd_gc)

    deploy = sub.add_parser("deploy", help="register the Prefect deployments in deployments/prefect.yaml (run from the project root)")
    deploy.add_argument("--prefect-file", default="deployments/prefect.yaml", help="deployment definitions")
    deploy.add_argument("--name", action="append", default=[], help="deploy only this deployment (repeatable; default all)")
    deploy.set_defaults(func=cmd_deploy)
    return parser


OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with `key=value` overrides also after options (`run CONFIG --summary-json F k=v`, as
    `make run ARGS=k=v` writes it): argparse ends a positional list at the first option."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [arg for arg in extra if not (hasattr(args, "overrides") and OVERRIDE.match(arg))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (see `perennial {args.command} --help`)")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]
    from app.services import ServiceError
    from perennial.tracking import TrackingError

    try:
        return args.func(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (TrackingError, ServiceError) as error:  # the message says how to reach, start or fix the server
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
