"""Base and DAP models are keyed by what they depend on, so retrains that differ only in CIT share them."""

import pytest

from perennial.config import build_config
from tasks.base_model import base_model_key
from tasks.dap import dap_key
from tasks.ingest import DataBundle, DatasetRef
from tasks.runtime import RunContext
from tests.test_pipeline import micro_config

pytestmark = pytest.mark.integration


def _bundle() -> DataBundle:
    ref = lambda name: DatasetRef(name=name, kind="text", digest=f"{name}-digest", uri=f"s3://x/{name}", data_file="d.jsonl")  # noqa: E731
    return DataBundle(general=ref("general"), domain=ref("domain"), tasks=[])


def test_dap_and_base_keys_follow_their_inputs_only(services, store, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights")
    data = _bundle()

    def keys(*overrides):
        base_cfg = micro_config(services, tmp_path).model_dump(mode="json")
        cfg = build_config(base_cfg, [f"storage.bucket={store.bucket}", *overrides])
        run = RunContext(config=cfg, run_key="k", parent_run_id="p")
        uri = store.upload_dir(model_dir, "base/model")["uri"]
        return base_model_key(run, data.general), dap_key(run, uri, data)

    base, dap = keys()
    assert keys("cit.tuning.method=lora") == (base, dap)  # another CIT method: both reused
    assert keys("seed=1")[1] != dap and keys("seed=1")[0] != base  # the run seed drives both by default
    assert keys("seed=1", "model.seed=0", "dap.seed=0") == (base, dap)  # fixed: shared across run seeds
    assert keys("dap.general_mix_fraction=0.5")[1] != dap  # a DAP setting changes DAP only
    assert keys("dap.general_mix_fraction=0.5")[0] == base
