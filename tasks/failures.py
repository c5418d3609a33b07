"""Errors a rerun repeats: the same config and the same data fail the same way.

Prefect does not retry a task that raised one of them (tasks/wrappers.py), and gc counts a run that failed
with one as ended for good, so it may delete what only that run would have resumed from (tasks/gc.py reads
the class name from the run's `perennial.error` tag).
"""

from models.engine import NonFiniteLossError
from models.loading import ModelLoadError
from perennial.config import ConfigError
from perennial.ingest import IngestError
from perennial.registry import PermissionDenied
from perennial.tracking import MlflowAuthError
from tasks.lineage import LineageError

NOT_RETRIED = (ConfigError, IngestError, LineageError, ModelLoadError, NonFiniteLossError, MlflowAuthError, PermissionDenied)
FAILED_FOR_GOOD = tuple(error.__name__ for error in NOT_RETRIED)
