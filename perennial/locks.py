"""One retrain per model lineage at a time: a Prefect global concurrency slot, freed even when its holder dies.

The slot is a lease that the holder renews in the background. A holder killed with `kill -9` stops
renewing, but the slot is only given back when the server revokes the expired lease, and
Prefect 3.8 neither keeps leases across a server restart (unless its filesystem lease storage is
configured) nor revokes them on the ephemeral API that a plain `perennial run` uses. The slot then
stays taken and every later retrain of the lineage waits forever.

So each holder also records itself (host, boot, pid and process start time) in a Prefect variable
next to the limit. A retrain that finds the slot taken by a process of this machine that no longer
exists gives the slot back before it waits. A holder on another machine cannot be checked from here;
its slot comes back when its lease expires on a server that revokes leases (docs/operations.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

LEASE_SECONDS = 600


def lineage_limit_name(registered_model: str) -> str:
    return f"perennial-train-{registered_model}"


def holder_variable_name(registered_model: str) -> str:
    """Prefect variable names allow lowercase letters, digits and underscores; a digest keeps them distinct."""
    slug = re.sub(r"[^a-z0-9]+", "_", registered_model.lower()).strip("_")[:60]
    return f"perennial_train_holder_{slug}_{hashlib.sha256(registered_model.encode()).hexdigest()[:8]}"


def _boot_id() -> str:
    path = Path("/proc/sys/kernel/random/boot_id")
    return path.read_text().strip() if path.exists() else ""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None when it is gone.

    With the pid alone a recycled pid would look alive; pid plus start time names one process.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def this_process() -> dict:
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
            "start": _process_start(os.getpid()), "since": time.time()}


def holder_is_gone(holder: dict) -> bool:
    """True only when the holder certainly no longer runs: same machine, and its process (or boot) is gone."""
    if holder.get("host") != socket.gethostname() or not Path("/proc").exists():
        return False  # another machine: only its lease can tell
    if holder.get("boot_id") != _boot_id():
        return True  # this machine rebooted since
    return _process_start(int(holder["pid"])) != holder.get("start")


def reclaim_dead_holder(client, registered_model: str) -> dict | None:
    """Give back the lineage slot of a holder whose process is gone; returns that holder, or None.

    `client` is a sync Prefect client. The variable is deleted before the slot is released, so of two
    retrains that both find the dead holder, only the one that still read it releases a slot.
    """
    name = lineage_limit_name(registered_model)
    variable = client.read_variable_by_name(holder_variable_name(registered_model))
    if variable is None or not isinstance(variable.value, dict) or not holder_is_gone(variable.value):
        return None
    limit = client.read_global_concurrency_limit_by_name(name)
    client.delete_variable_by_name(variable.name)
    if limit.active_slots > 0:
        held = time.time() - float(variable.value.get("since", time.time()))
        client.release_concurrency_slots(names=[name], slots=1, occupancy_seconds=max(held, 0.0))
        log.warning("lineage %s: gave back the slot of pid %s on %s, which is gone (killed while it held it)",
                    registered_model, variable.value.get("pid"), variable.value.get("host"))
    return variable.value


@contextmanager
def lineage_lock(registered_model: str, timeout_seconds: float | None = None) -> Iterator[None]:
    """Hold the lineage's Prefect global concurrency slot (limit 1) while training.

    Two retrains of the same registered model (say the nightly and a manual one) would otherwise
    train at once and race for the challenger alias; the second waits here until the first leaves
    (or `timeout_seconds` passes: TimeoutError). The limit is created on first use. A slot whose
    holder died on this machine is given back first (reclaim_dead_holder).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    name = lineage_limit_name(registered_model)
    variable = holder_variable_name(registered_model)
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, 1)
        except ObjectAlreadyExists:  # a concurrent retrain created it between read and create
            pass
        reclaim_dead_holder(client, registered_model)
    # strict: a missing limit must fail loudly, not silently let two retrains through. The lease is
    # renewed in the background; a renewal hiccup must not kill hours of training.
    with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True,
                     lease_duration=LEASE_SECONDS, raise_on_lease_renewal_failure=False):
        with get_client(sync_client=True) as client:
            if client.read_variable_by_name(variable) is not None:  # left by a holder whose slot was reclaimed
                client.delete_variable_by_name(variable)
            client.create_variable(VariableCreate(name=variable, value=this_process()))
        try:
            yield
        finally:
            with get_client(sync_client=True) as client:
                if client.read_variable_by_name(variable) is not None:
                    client.delete_variable_by_name(variable)
