"""`perennial export` against real SeaweedFS + MLflow: registry URIs, no config, no cache in the cwd.

The checkpoint is a tiny model committed to S3 the way a stage commits one (upload_dir + manifest)
and registered with its checkpoint_uri tag, so no training is needed.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from models.loading import save_model
from models.tiny import train_tokenizer
from perennial import demo_data
from app.cli import main
from tests.tiny_models import tiny_model


@pytest.fixture
def registered(services, store, tmp_path):
    """A committed checkpoint (with Perennial-only files) registered as v1, alias champion."""
    tokenizer = train_tokenizer(demo_data.general_corpus(200, 0), vocab_size=300)
    model = tiny_model("llama", vocab_size=len(tokenizer), attn_implementation=None, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048)
    folder = save_model(model, tokenizer, tmp_path / "checkpoint")
    (folder / "training.json").write_text("{}")
    store.upload_dir(folder, "runs/r1/stages/cit-01/model")
    uri = store.uri("runs/r1/stages/cit-01/model")
    client = MlflowClient(services.mlflow_uri)
    name = f"export-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    version = client.create_model_version(name, uri, tags={"checkpoint_uri": uri})
    client.set_registered_model_alias(name, "champion", version.version)
    return {"name": name, "uri": uri, "state": model.state_dict()}


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """An empty working directory outside the repo (no configs/, no services.env)."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def assert_exported(folder: Path, state: dict) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.state_dict().keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert not (folder / "training.json").exists() and not (folder / "MANIFEST.json").exists()


def test_export_accepts_models_alias_version_and_s3_uris(registered, elsewhere, capsys):
    for i, uri in enumerate([f"models:/{registered['name']}@champion", f"models:/{registered['name']}/1", registered["uri"]]):
        out = elsewhere.parent / f"out-{i}"
        assert main(["export", uri, str(out)]) == 0, capsys.readouterr().err
        assert_exported(out, registered["state"])
    assert f"exported to {out}" in capsys.readouterr().out


def test_export_outside_the_repo_takes_endpoints_from_the_environment(registered, elsewhere, monkeypatch, capsys):
    # The services fixture exported what services.env holds; the bucket named in the URI is read
    # even when PERENNIAL_BUCKET names another.
    monkeypatch.setenv("PERENNIAL_BUCKET", "another-bucket")
    assert not (elsewhere / "configs").exists()
    assert main(["export", f"models:/{registered['name']}@champion", "exported"]) == 0, capsys.readouterr().err
    assert_exported(elsewhere / "exported", registered["state"])


def test_export_writes_no_cache_into_the_current_directory(registered, elsewhere, capsys):
    out = elsewhere.parent / "out"
    assert main(["export", registered["uri"], str(out)]) == 0, capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []  # no .perennial/work/cache
    assert sorted(path.name for path in out.parent.iterdir()) == ["checkpoint", "elsewhere", "out"]  # temp folder gone


def test_export_into_a_non_empty_folder_is_refused_before_any_download(registered, elsewhere, capsys):
    out = elsewhere / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", registered["uri"], str(out)]) == 1
    err = capsys.readouterr().err
    assert "taken exists and is not an empty folder; choose an empty or new folder" in err and "Traceback" not in err
    assert [path.name for path in out.iterdir()] == ["keep.txt"]


def test_export_of_unknown_or_malformed_uris_says_what_to_pass(registered, elsewhere, capsys):
    assert main(["export", f"models:/{registered['name']}@nosuchalias", "out"]) == 1
    assert f"{registered['name']} has no alias 'nosuchalias'" in capsys.readouterr().err
    assert main(["export", "./some/folder", "out"]) == 1
    assert "pass models:/NAME@ALIAS, models:/NAME/VERSION or s3://BUCKET/PREFIX" in capsys.readouterr().err
    assert main(["export", registered["uri"] + "-missing", "out"]) == 1
    assert "is not committed" in capsys.readouterr().err
    assert not (elsewhere / "out").exists()
