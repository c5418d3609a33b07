"""The lineage slot of a retrain killed while it held it is given back; a live holder's never is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from perennial.locks import holder_variable_name, lineage_limit_name, lineage_lock

pytestmark = pytest.mark.integration

HOLD = ("import sys, time\n"
        "from perennial.locks import lineage_lock\n"
        "with lineage_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n")


def _hold_in_a_process(model: str) -> subprocess.Popen:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, model], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    line = proc.stdout.readline()
    assert line.strip() == "held", line + proc.stdout.read()
    return proc


def test_slot_of_a_killed_holder_is_given_back_and_a_live_holder_keeps_it(prefect_harness):
    from prefect.client.orchestration import get_client

    model = "lock-test.model"
    live = _hold_in_a_process(model)
    try:
        with pytest.raises(TimeoutError):  # alive on this machine: never reclaimed, the retrain waits
            with lineage_lock(model, timeout_seconds=3):
                pytest.fail("two retrains held the lineage at once")
    finally:
        os.killpg(live.pid, signal.SIGKILL)  # kill -9 while it holds the slot
        live.wait()

    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(lineage_limit_name(model)).active_slots == 1  # still taken
    started = time.monotonic()
    with lineage_lock(model, timeout_seconds=30):
        assert time.monotonic() - started < 15  # given back at once, not after the 600 s lease
        with get_client(sync_client=True) as client:
            holder = client.read_variable_by_name(holder_variable_name(model)).value
            assert holder["pid"] == os.getpid()
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(lineage_limit_name(model)).active_slots == 0
        assert client.read_variable_by_name(holder_variable_name(model)) is None
