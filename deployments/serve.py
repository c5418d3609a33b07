"""The no-worker path: this process registers a scheduled deployment and runs its flow runs itself.

    python -m deployments.serve                          # nightly at 02:00 UTC on configs/demo.yaml
    python -m deployments.serve --cron "30 1 * * *" --timezone Europe/London --config configs/demo.yaml run_name=nightly

Needs a Prefect API (PREFECT_API_URL, `prefect server start`) but no work pool and no worker; stop
it with Ctrl-C. For the worker-based setup use deployments/prefect.yaml (`make deploy`, `make worker`).

Each run gets the run key `nightly-{date}`, as the `nightly` deployment of prefect.yaml does: `{date}`
becomes the flow run's scheduled day in the schedule's timezone, so every night trains on that
night's data, and a rerun of the same night resumes instead of training again (with new data it
trains that under a key derived from the night's). Without a per-night key every night would share
one key; with the UTC date, a local-time schedule would give two nights one key around a DST change.
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
    parser.add_argument("--cron", default="0 2 * * *", help="cron schedule, in --timezone (default 02:00 every day)")
    parser.add_argument("--timezone", default="UTC", type=_zone,
                        help="IANA timezone of the cron and of {date} in the run key, e.g. America/Los_Angeles (default UTC)")
    parser.add_argument("--config", default="configs/demo.yaml", help="config_path parameter of each run")
    parser.add_argument(
        "--run-key",
        default=NIGHTLY_RUN_KEY,
        help=f"run key of each run; {{date}} becomes the scheduled day in --timezone (default {NIGHTLY_RUN_KEY!r}: one retrain per night)",
    )
    parser.add_argument("--continue-from", default="champion",
                        help="lineage.continue_from of each run (default champion: each night continues the champion and "
                        "trains only what it has not learned; none: retrain the whole task sequence from the base model)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides passed to each run")
    return parser.parse_args(argv)


def _zone(name: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(f"{name!r} is not an IANA timezone name (e.g. UTC, Europe/London, America/Los_Angeles)") from None
    return name


def run_parameters(args: argparse.Namespace) -> dict:
    """The parameters every served flow run gets."""
    overrides = [f"lineage.continue_from={args.continue_from}", *args.overrides]  # a later override wins
    return {"config_path": args.config, "overrides": overrides, "run_key": args.run_key}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from perennial.config import load_config

    load_config(args.config, run_parameters(args)["overrides"])  # reject a bad config now, not at 02:00
    from flows.continual_retrain import continual_retrain

    from prefect.schedules import Cron

    continual_retrain.serve(name=args.name, schedule=Cron(args.cron, timezone=args.timezone), parameters=run_parameters(args),
                            tags=["perennial", "served"])


if __name__ == "__main__":
    main()
