"""Process environment defaults: offline hubs and no telemetry, set before any library reads them."""

import contextlib
import os
from typing import Iterable, Iterator

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    # A loaded 2-core machine can take well over the 20 s default to start Prefect's local API.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "GIT_PYTHON_REFRESH": "quiet",
}


def apply_offline_defaults() -> None:
    """Set offline and no-telemetry variables unless the user already chose a value."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def environ_restored(names: Iterable[str]) -> Iterator[None]:
    """On exit, give each of ``names`` in os.environ back the value it had on entry (or remove it)."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
