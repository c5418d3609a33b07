"""A stage with distributed.nproc_per_node=2 runs under a real torchrun subprocess (2 gloo ranks on
the CPU, FSDP, LoRA) against real SeaweedFS and MLflow, and commits what the same stage trained
in-process commits.

The examples are packed blocks of one length, so every rank supervises the same number of
tokens and the sharded run follows the single-process one up to float summation order
(tests/test_distributed.py explains why that matters).
"""

import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from models.data import pack_texts
from models.loading import load_model_and_tokenizer, save_model
from models.tiny import build_tiny_llama, train_tokenizer
from perennial import demo_data
from perennial.config import OptimConfig, TuningConfig
from tasks.launch import StageLaunchError
from tasks.runtime import RunContext, fetch_dir, open_store, start_run
from tasks.training import latest_checkpoint, run_stage
from tests.test_pipeline import micro_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("single_torch_thread")]

OPTIM = OptimConfig(lr=3e-3, max_steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1)
TUNING = TuningConfig(method="lora", r=4, alpha=8)
TEXTS = demo_data.general_corpus(40, 3)


def packed(tokenizer):
    return [{"input_ids": block} for block in pack_texts(tokenizer, TEXTS, 32)]


@pytest.fixture
def launched_run(services, store, tmp_path):
    cfg = micro_config(services, tmp_path, distributed={"nproc_per_node": 2, "strategy": "fsdp"})
    cfg.storage.bucket = store.bucket
    tokenizer = train_tokenizer(TEXTS, cfg.model.tiny.vocab_size)
    torch.manual_seed(0)
    base = save_model(build_tiny_llama(tokenizer, cfg.model.tiny), tokenizer, tmp_path / "base")
    base_uri = store.upload_dir(base, "perennial/base-models/launch-test")["uri"]
    return start_run(cfg), base_uri


def load_committed(run: RunContext, uri: str, tmp_path):
    model, _ = load_model_and_tokenizer(fetch_dir(open_store(run.config), uri, tmp_path / "fetched"))
    return model.state_dict()


def test_two_process_stage_commits_what_the_in_process_stage_commits(launched_run, services, tmp_path, capfd):
    run, base_uri = launched_run
    client = MlflowClient(services.mlflow_uri)
    child = client.create_run(run.experiment_id, run_name="launched").info.run_id

    launched_uri = run_stage(run, "launched", base_uri, packed, OPTIM, TUNING, mlflow_run_id=child)
    streamed = capfd.readouterr().out  # the ranks' output, passed on line by line
    assert "launched: rank 0/2, fsdp on cpu" in streamed and "launched: rank 1/2, fsdp on cpu" in streamed

    store = open_store(run.config)
    assert launched_uri == store.uri(f"{run.stage_prefix('launched')}/model")
    assert store.read_manifest(f"{run.stage_prefix('launched')}/model") is not None
    # Rank 0 committed the mid-stage checkpoint, gathered: whole LoRA tensors, nothing frozen.
    checkpoint = latest_checkpoint(store, f"{run.stage_prefix('launched')}/checkpoints")
    assert checkpoint is not None and checkpoint.endswith("step-00000002")
    files = store.download_dir(checkpoint, tmp_path / "checkpoint")["files"]
    assert {"trainable.safetensors", "optimizer.safetensors", "state.json"} <= set(files)
    assert all("lora_" in name for name in load_file(tmp_path / "checkpoint" / "trainable.safetensors"))

    in_process = RunContext(config=run.config.model_copy(update={"distributed": run.config.distributed.model_copy(
        update={"nproc_per_node": 1})}), run_key=run.run_key, parent_run_id=run.parent_run_id)
    single_uri = run_stage(in_process, "in-process", base_uri, packed, OPTIM, TUNING)

    launched, single = load_committed(run, launched_uri, tmp_path), load_committed(run, single_uri, tmp_path)
    assert launched.keys() == single.keys()  # LoRA merged away on export in both
    for name, expected in single.items():
        torch.testing.assert_close(launched[name], expected, rtol=1e-4, atol=2e-5, msg=name)
    history = json.loads(store.get_bytes(f"{run.stage_prefix('launched')}/model/training.json"))
    reference = json.loads(store.get_bytes(f"{run.stage_prefix('in-process')}/model/training.json"))
    assert history["steps"] == OPTIM.max_steps and history["losses"] == pytest.approx(reference["losses"], rel=1e-4)

    # Rank 0 logged every step to the stage's MLflow run; the task's side added the final metrics.
    losses = client.get_metric_history(child, "train/loss")
    assert sorted(metric.step for metric in losses) == [1, 2, 3, 4]
    assert [m.value for m in sorted(losses, key=lambda m: m.step)] == pytest.approx(history["losses"])
    assert client.get_run(child).data.tags["checkpoint_uri"] == launched_uri

    # A rerun finds the committed output and launches nothing.
    capfd.readouterr()
    assert run_stage(run, "launched", base_uri, packed, OPTIM, TUNING) == launched_uri
    assert "rank 0/2" not in capfd.readouterr().out


def test_failed_ranks_fail_the_stage_with_their_output_and_commit_nothing(launched_run):
    run, base_uri = launched_run

    def beyond_the_vocabulary(tokenizer):  # a data bug that only the ranks' forward pass meets
        return [{"input_ids": [len(tokenizer) + 50] * 16} for _ in range(8)]

    with pytest.raises(StageLaunchError) as failed:
        run_stage(run, "broken", base_uri, beyond_the_vocabulary, OPTIM, TUNING)
    headline, _, rest = str(failed.value).partition("\n")
    # The root cause leads, taken from a rank's traceback (not only torchrun's "ChildFailedError").
    assert headline.startswith("broken: training under torchrun (2 processes, fsdp) failed with exit code 1: [rank")
    assert headline.endswith("IndexError: index out of range in self")
    assert "Nothing was committed" in rest and "Traceback" in rest  # then the last output lines
    store = open_store(run.config)
    assert store.read_manifest(f"{run.stage_prefix('broken')}/model") is None
