"""Garbage collection of one lineage's storage under its retention policy (tasks/gc.py): `perennial gc`,
and the `gc/daily` deployment. A retrain runs the same stage at its end (flows/continual_retrain.py)."""

from __future__ import annotations

from prefect import flow

from perennial.config import Config, load_config
from perennial.locks import lineage_lock
from tasks.wrappers import gc_stage


@flow(name="gc", log_prints=True)
def gc(config_path: str | None = None, overrides: list[str] | None = None, config: dict | None = None,
       dry_run: bool = False) -> dict:
    """Delete what the retention policy lets go (``dry_run``: only list it, with sizes and reasons).

    The sweep holds the lineage lock, so a retrain of the lineage never starts while gc deletes, and
    the checkpoint it continues from cannot go; a dry run deletes nothing and waits for no one."""
    cfg = Config.model_validate(config) if config is not None else load_config(config_path, overrides)
    if dry_run:
        return gc_stage(cfg, dry_run=True).model_dump()
    with lineage_lock(cfg.tracking.registered_model):
        return gc_stage(cfg).model_dump()
