"""The `perennial` command line.

    perennial services up|down|status      local SeaweedFS (S3) + MLflow, under .perennial/services
    perennial run CONFIG [key=value ...]   the continual-retrain flow (see configs/demo.yaml)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from perennial.config import ConfigError, load_config

SERVICES_ENV = Path(".perennial/services/services.env")


def load_services_env(path: Path = SERVICES_ENV) -> None:
    """Pick up the local services' endpoints and generated credentials unless the caller set their own."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export ") :].split("=", 1)
            os.environ.setdefault(key, value)


def _apply_service_endpoints(overrides: list[str]) -> list[str]:
    """Point storage/tracking at the local services unless the config or an override says otherwise."""
    extra = []
    keys = {item.split("=", 1)[0] for item in overrides}
    if "PERENNIAL_S3_ENDPOINT" in os.environ and "storage.endpoint_url" not in keys:
        extra.append(f"storage.endpoint_url={os.environ['PERENNIAL_S3_ENDPOINT']}")
    if "PERENNIAL_BUCKET" in os.environ and "storage.bucket" not in keys:
        extra.append(f"storage.bucket={os.environ['PERENNIAL_BUCKET']}")
    if "MLFLOW_TRACKING_URI" in os.environ and "tracking.tracking_uri" not in keys:
        extra.append(f"tracking.tracking_uri={os.environ['MLFLOW_TRACKING_URI']}")
    return extra + overrides


def cmd_services(args: argparse.Namespace) -> int:
    from perennial.services import LocalServices

    if args.s3_port:
        os.environ["PERENNIAL_S3_PORT"] = str(args.s3_port)
    if args.mlflow_port:
        os.environ["PERENNIAL_MLFLOW_PORT"] = str(args.mlflow_port)
    services = LocalServices.from_env(args.root)
    if args.action == "up":
        services.up()
        print(f"S3 (SeaweedFS): {services.s3_endpoint}   bucket: {services.bucket}")
        print(f"MLflow:         {services.mlflow_uri}")
        print(f"credentials:    source {services.root}/services.env")
    elif args.action == "down":
        services.down()
        print("services stopped")
    else:
        report = services.status()
        for name, state in report.items():
            print(f"{name:10s} {'up' if state['ready'] else 'down':5s} pid={state['pid']} {state['url']}")
        return 0 if all(state["ready"] for state in report.values()) else 3
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    load_services_env()
    overrides = _apply_service_endpoints(args.overrides)
    cfg = load_config(args.config, overrides)  # validate before anything starts
    from flows.continual_retrain import continual_retrain

    summary = continual_retrain(config=cfg.model_dump(mode="json"), run_key=args.run_key)
    if args.summary_json:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    print()
    print("accuracy matrix (rows: before CIT, after each task):")
    print("  " + "  ".join(f"{t:>12s}" for t in summary["tasks"]))
    for row in summary["accuracy_matrix"]:
        print("  " + "  ".join(f"{v:12.3f}" for v in row))
    print("metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(summary["metrics"].items()) if "/" not in k))
    print(f"MLflow UI:  open {summary['tracking_uri']} (run {summary['mlflow_run_id']})")
    print(f"S3:         {summary['s3_prefix']}")
    registered = summary.get("registered_model")
    if registered:
        print(f"registered: {registered['name']} version {registered['version']} (alias {registered['alias']})")
    if args.summary_json:
        print(f"summary:    {args.summary_json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perennial",
        description="Continual retraining of language models without forgetting: "
        "ingest -> DAP -> CIT over tasks with replay -> evaluate -> MLflow registry.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the continual-retrain flow on a config", description="Run the whole pipeline. "
                         "Overrides are dotted keys, e.g. cit.optim.lr=3e-4 cit.tuning.method=attn-proj.")
    run.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides (YAML-typed values)")
    run.add_argument("--summary-json", help="write run ids, accuracy matrix, metrics, checkpoints and registry version here")
    run.add_argument("--run-key", help="resume or name a run explicitly (default: run_name + config digest)")
    run.set_defaults(func=cmd_run)

    services = sub.add_parser("services", help="start, stop or inspect local SeaweedFS + MLflow")
    services.add_argument("action", choices=["up", "down", "status"])
    services.add_argument("--root", default=None, help="state folder (default .perennial/services)")
    services.add_argument("--s3-port", type=int, default=None, help="S3 port (default 8333 or PERENNIAL_S3_PORT)")
    services.add_argument("--mlflow-port", type=int, default=None, help="MLflow port (default 5000 or PERENNIAL_MLFLOW_PORT)")
    services.set_defaults(func=cmd_services)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
