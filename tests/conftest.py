"""Shared fixtures: real SeaweedFS + MLflow on free ports, started once per test session."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

import perennial  # noqa: F401  (applies offline / no-telemetry defaults before other imports)
from perennial.config import StorageConfig
from app.services import LocalServices, running_services
from perennial.storage import ObjectStore


@pytest.fixture
def single_torch_thread():
    """Tiny models train fastest on one thread, and tests then do not fight over the 2 cores.

    Modules opt in with `pytestmark = pytest.mark.usefixtures("single_torch_thread")`.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def services(tmp_path_factory) -> LocalServices:
    """Real SeaweedFS (S3) and MLflow (sqlite + S3 artifacts) for the whole session.

    A session stopped by SIGTERM (`timeout`, a CI limit) unwinds as on Ctrl-C and stops them too.
    """
    with running_services(tmp_path_factory.mktemp("services"), timeout=120) as local:
        yield local


@pytest.fixture
def store(services) -> ObjectStore:
    """A fresh bucket per test, so tests never see each other's objects."""
    cfg = StorageConfig(endpoint_url=services.s3_endpoint, bucket=f"t-{uuid.uuid4().hex[:12]}")
    object_store = ObjectStore(cfg)
    object_store.ensure_bucket()
    return object_store


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test harness (temporary local API + sqlite) per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a plain model folder, converted from its packaged GGUF once per session (~20 s)."""
    from models.gguf import converted_dir

    folder, _ = converted_dir("smollm2-135m-instruct", tmp_path_factory.mktemp("gguf"))
    return folder
