"""The no-worker path: this process registers a scheduled deployment and runs its flow runs itself.

    python -m deployments.serve                          # nightly at 02:00 on configs/demo.yaml
    python -m deployments.serve --cron "30 1 * * *" --config configs/demo.yaml run_name=nightly

Needs a Prefect API (PREFECT_API_URL, `prefect server start`) but no work pool and no worker; stop
it with Ctrl-C. For the worker-based setup use deployments/prefect.yaml (`make deploy`, `make worker`).
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="nightly-served", help="deployment name (default nightly-served)")
    parser.add_argument("--cron", default="0 2 * * *", help="cron schedule (default 02:00 every day)")
    parser.add_argument("--config", default="configs/demo.yaml", help="config_path parameter of each run")
    parser.add_argument("overrides", nargs="*", help="key=value overrides passed to each run")
    args = parser.parse_args(argv)

    from perennial.config import load_config

    load_config(args.config, args.overrides)  # reject a bad config now, not at 02:00
    from flows.continual_retrain import continual_retrain

    continual_retrain.serve(
        name=args.name,
        cron=args.cron,
        parameters={"config_path": args.config, "overrides": args.overrides},
        tags=["perennial", "served"],
    )


if __name__ == "__main__":
    main()
