"""The no-worker path: this process registers a scheduled deployment and runs its flow runs itself.

    python -m deployments.serve                          # nightly at 02:00 on configs/demo.yaml
    python -m deployments.serve --cron "30 1 * * *" --config configs/demo.yaml run_name=nightly

Needs a Prefect API (PREFECT_API_URL, `prefect server start`) but no work pool and no worker; stop
it with Ctrl-C. For the worker-based setup use deployments/prefect.yaml (`make deploy`, `make worker`).

Each run gets the run key `nightly-{date}`, as the `nightly` deployment of prefect.yaml does: `{date}`
becomes the flow run's scheduled day, so every night trains on that night's data, and a rerun of
the same night resumes instead of training again. Without a per-night key every night would share
one key and return the first night's model.
"""

from __future__ import annotations

import argparse

# The nightly deployment of deployments/prefect.yaml passes the same key (tests/test_schedule.py checks).
NIGHTLY_RUN_KEY = "nightly-{date}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.serve",
        description=__doc__.split("\n\n")[0],
        epilog="Each flow run gets parameters config_path, overrides and run_key.",
    )
    parser.add_argument("--name", default="nightly-served", help="deployment name (default nightly-served)")
    parser.add_argument("--cron", default="0 2 * * *", help="cron schedule, UTC (default 02:00 every day)")
    parser.add_argument("--config", default="configs/demo.yaml", help="config_path parameter of each run")
    parser.add_argument(
        "--run-key",
        default=NIGHTLY_RUN_KEY,
        help=f"run key of each run; {{date}} becomes the scheduled day (default {NIGHTLY_RUN_KEY!r}: one retrain per night)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides passed to each run")
    return parser.parse_args(argv)


def run_parameters(args: argparse.Namespace) -> dict:
    """The parameters every served flow run gets."""
    return {"config_path": args.config, "overrides": args.overrides, "run_key": args.run_key}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from perennial.config import load_config

    load_config(args.config, args.overrides)  # reject a bad config now, not at 02:00
    from flows.continual_retrain import continual_retrain

    continual_retrain.serve(name=args.name, cron=args.cron, parameters=run_parameters(args), tags=["perennial", "served"])


if __name__ == "__main__":
    main()
