"""Every shipped config follows the endpoints the services were started on (issue #22).

A config without a `storage` / `tracking` section silently talks to 127.0.0.1:8333 and :5000 with
this run's credentials, whatever ports `perennial services up` chose.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from perennial.config import ENDPOINT_ENV, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _recipes_file(path: Path) -> bool:
    """A recipes or sweep file of `perennial compare`: lists of overrides applied on top of a config, not one."""
    data = yaml.safe_load(path.read_text()) or {}
    return bool({"methods", "recipes", "sweep"} & set(data)) and "storage" not in data


NOT_CONFIGS = {path.name for path in CONFIGS if _recipes_file(path)}


def test_the_configs_folder_is_what_this_test_knows():
    assert len(CONFIGS) >= 4
    assert {"cl-benchmark-methods.yaml", "cl-benchmark-sweep.yaml", "tiny-recipes.yaml"} <= NOT_CONFIGS


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name not in NOT_CONFIGS], ids=lambda p: p.name)
def test_every_shipped_config_follows_the_service_endpoints(path, monkeypatch):
    wanted = {"PERENNIAL_S3_ENDPOINT": "http://127.0.0.1:18555", "PERENNIAL_BUCKET": "elsewhere-bucket",
              "MLFLOW_TRACKING_URI": "http://127.0.0.1:15999"}  # fmt: skip
    assert set(wanted) == set(ENDPOINT_ENV)
    for variable, value in wanted.items():
        monkeypatch.setenv(variable, value)
    cfg = load_config(path)
    for variable, (section, key) in ENDPOINT_ENV.items():
        assert getattr(getattr(cfg, section), key) == wanted[variable], f"{path.name}: {section}.{key} ignores ${variable}"
