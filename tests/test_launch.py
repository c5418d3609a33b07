"""A stage spec run under a real torchrun subprocess (2 gloo ranks on the CPU) against real SeaweedFS
and MLflow commits what the same spec run in-process commits: plain training under FSDP2 with
LoRA, every CL method (replay, EWC, LwF, SEEKR, O-LoRA, averaging) under DDP, and EWC, LwF,
averaging, SEEKR and merge together under FSDP2.

Every example has the same length and the same number of supervised tokens (digit strings: the
tiny tokenizer splits digits one by one), so every rank supervises the same number of tokens and
the 2-rank run follows the single-process one up to float summation order
(tests/test_distributed.py explains why that matters).
"""

import json
import random

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from models.loading import load_model_and_tokenizer, save_model
from models.tiny import build_tiny_llama, train_tokenizer
from perennial import demo_data
from perennial.config import OptimConfig, TuningConfig
from perennial.ingest import ingest_records
from tasks.ingest import _ref
from tasks.launch import StageLaunchError, run_stage
from tasks.runtime import Services, fetch_dir
from tasks.stage import BUFFER_FILE, PLUGIN_DIR, StageData, StageSpec, latest_checkpoint
from tests.test_pipeline import micro_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("single_torch_thread")]

OPTIM = OptimConfig(lr=3e-3, max_steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1, max_length=32)
LORA = TuningConfig(method="lora", r=4, alpha=8)
FULL = TuningConfig(method="full")


def digit_records(seed: int, count: int = 24) -> list[dict]:
    """Instruction records of 8 prompt digits and 3 response digits: all the same token length."""
    rng = random.Random(seed)
    return [{"prompt": "".join(rng.choice("0123456789") for _ in range(8)),
             "response": "".join(rng.choice("0123456789") for _ in range(3)), "split": "train"} for _ in range(count)]


@pytest.fixture
def stage_inputs(services, store, tmp_path):
    """(services, untrained tiny base model URI, two task datasets, a replay buffer URI holding task 1's records)."""
    cfg = micro_config(services, tmp_path)
    cfg.storage.bucket = store.bucket
    tokenizer = train_tokenizer(demo_data.general_corpus(40, 3), cfg.model.tiny.vocab_size)
    torch.manual_seed(0)
    base = save_model(build_tiny_llama(tokenizer, cfg.model.tiny), tokenizer, tmp_path / "base")
    base_uri = store.upload_dir(base, "perennial/base-models/launch-test")["uri"]
    tasks = [_ref(ingest_records(f"digits-{i}", "instruction", digit_records(i), store, tmp_path / f"ingest-{i}", "perennial",
                                 task=f"digits-{i}")) for i in (1, 2)]
    buffer = tmp_path / "buffer"
    buffer.mkdir()
    (buffer / BUFFER_FILE).write_text("".join(json.dumps({"task": "digits-1", "record": r}) + "\n" for r in digit_records(1)[:8]))
    replay_uri = store.upload_dir(buffer, "perennial/replay-test")["uri"]
    return Services.open(cfg), base_uri, tasks, replay_uri


def spec(services: Services, name: str, input_uri: str, dataset, *, processes: int = 1, strategy: str = "ddp", **fields) -> StageSpec:
    fields.setdefault("optim", OPTIM)
    fields.setdefault("tuning", LORA)
    return StageSpec(
        name=name, stage_root=f"perennial/stages/{name}", work_dir=services.cache_dir.parent / name, input_model_uri=input_uri,
        data=fields.pop("data", StageData(encoding="instruction", datasets=[dataset])), seed=11, config_digest="test",
        device="cpu", precision="fp32", processes=processes, strategy=strategy, **fields,
    )


def committed_state(services: Services, uri: str) -> dict[str, torch.Tensor]:
    model, _ = load_model_and_tokenizer(fetch_dir(services.store, uri, services.cache_dir))
    return model.state_dict()


def training_history(services: Services, uri: str) -> dict:
    return json.loads(services.store.get_bytes(uri.removeprefix(f"s3://{services.store.bucket}/") + "/training.json"))


def assert_same_training(services: Services, launched_uri: str, single_uri: str) -> None:
    launched, single = committed_state(services, launched_uri), committed_state(services, single_uri)
    assert launched.keys() == single.keys()
    for name, expected in single.items():
        torch.testing.assert_close(launched[name], expected, rtol=1e-4, atol=2e-5, msg=name)
    history, reference = training_history(services, launched_uri), training_history(services, single_uri)
    assert history["steps"] == OPTIM.max_steps and history["losses"] == pytest.approx(reference["losses"], rel=1e-4)


def test_two_process_fsdp_stage_commits_what_the_in_process_stage_commits(stage_inputs, services, tmp_path, capfd):
    ctx, base_uri, (task, _), _ = stage_inputs
    client = MlflowClient(services.mlflow_uri)
    child = client.create_run(ctx.tracker.experiment_id(), run_name="launched").info.run_id

    launched = spec(ctx, "launched", base_uri, task, processes=2, strategy="fsdp", mlflow_run_id=child)
    launched_uri = run_stage(launched, ctx)
    streamed = capfd.readouterr().out  # the ranks' output, passed on line by line
    assert "launched: rank 0/2, fsdp on cpu" in streamed and "launched: rank 1/2, fsdp on cpu" in streamed
    assert launched_uri == ctx.store.uri(launched.output_prefix)
    # Rank 0 committed the mid-stage checkpoint, gathered: whole LoRA tensors, nothing frozen.
    checkpoint = latest_checkpoint(ctx.store, launched.checkpoints_prefix)
    assert checkpoint is not None and checkpoint.endswith("step-00000002")
    files = ctx.store.download_dir(checkpoint, tmp_path / "checkpoint")["files"]
    assert {"trainable.safetensors", "optimizer.safetensors", "state.json"} <= set(files)
    assert all("lora_" in name for name in load_file(tmp_path / "checkpoint" / "trainable.safetensors"))

    single_uri = run_stage(spec(ctx, "in-process", base_uri, task), ctx)
    assert_same_training(ctx, launched_uri, single_uri)

    # Rank 0 logged every step and the final metrics to the stage's MLflow run.
    losses = client.get_metric_history(child, "train/loss")
    assert sorted(metric.step for metric in losses) == [1, 2, 3, 4]
    assert [m.value for m in sorted(losses, key=lambda m: m.step)] == pytest.approx(training_history(ctx, launched_uri)["losses"])
    assert client.get_run(child).data.tags["checkpoint_uri"] == launched_uri

    # A rerun finds the committed output and launches nothing.
    capfd.readouterr()
    assert run_stage(launched, ctx) == launched_uri
    assert "rank 0/2" not in capfd.readouterr().out


def test_failed_ranks_fail_the_stage_with_their_output_and_commit_nothing(stage_inputs):
    ctx, base_uri, (task, _), _ = stage_inputs
    nothing_trainable = TuningConfig(method="regex", trainable_regex=["no-such-parameter"])  # only the ranks find out
    broken = spec(ctx, "broken", base_uri, task, processes=2, strategy="fsdp", tuning=nothing_trainable)
    with pytest.raises(StageLaunchError) as failed:
        run_stage(broken, ctx)
    headline, _, rest = str(failed.value).partition("\n")
    # The root cause leads, taken from a rank's traceback (not only torchrun's "ChildFailedError").
    assert headline.startswith("broken: training under torchrun (2 processes, fsdp) failed with exit code 1: [rank")
    assert "ValueError: tuning.method='regex' matched no parameters" in headline
    assert "Nothing was committed" in rest and "Traceback" in rest  # then the last output lines
    assert ctx.store.read_manifest(broken.output_prefix) is None


# Full tuning where a method anchors or averages the weights a task changes; O-LoRA needs LoRA.
METHODS = {
    "replay": ([], LORA),
    "ewc": ([{"name": "ewc", "strength": 1000.0, "fisher_samples": 8}], FULL),
    "lwf": ([{"name": "lwf", "weight": 1.0}], FULL),
    "averaging": ([{"name": "averaging", "alpha": 0.5}], FULL),
    "seekr": ([{"name": "seekr", "samples_per_task": 8, "layer_budget": 1, "head_budget": 2, "replay_batch_size": 2}], FULL),
    "olora": ([{"name": "olora", "lambda_orth": 1.0, "lambda_l2": 0.01}], LORA),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_cl_method_under_two_ddp_ranks_matches_one_process(stage_inputs, method):
    """Task 1 in-process, then task 2 from its output and plugin state: 2 DDP ranks vs one process."""
    ctx, base_uri, (task1, task2), replay_uri = stage_inputs
    methods, tuning = METHODS[method]
    first_uri = run_stage(spec(ctx, f"{method}-task1", base_uri, task1, methods=methods, tuning=tuning), ctx)
    data = StageData(encoding="instruction", datasets=[task2], replay_uri=replay_uri if method == "replay" else None)
    second = dict(data=data, methods=methods, tuning=tuning, task_index=1, plugin_state_uri=first_uri if methods else None)
    launched_uri = run_stage(spec(ctx, f"{method}-task2-ddp", first_uri, task2, processes=2, **second), ctx)
    single_uri = run_stage(spec(ctx, f"{method}-task2", first_uri, task2, **second), ctx)
    assert_same_training(ctx, launched_uri, single_uri)
    # The method acted: without it task 2 trains to other weights (far beyond the tolerance above).
    plain = dict(second, methods=[], plugin_state_uri=None, data=StageData(encoding="instruction", datasets=[task2]))
    plain_uri = run_stage(spec(ctx, f"{method}-task2-plain", first_uri, task2, **plain), ctx)
    single, without = committed_state(ctx, single_uri), committed_state(ctx, plain_uri)
    assert max((single[name] - without[name]).abs().max().item() for name in single) > 1e-3


def test_cl_methods_under_two_fsdp_ranks_commit_what_one_process_commits(stage_inputs):
    """Issue #48, through the stage itself: the per-weight methods and SEEKR together under FSDP2 (the model sharded
    before their hooks, task 1's state read whole and cut to shards, gathered again for the commit) commit the
    weights and the plugin state one process commits. Each method alone, with its control: tests/test_cl_fsdp.py."""
    ctx, base_uri, (task1, task2), _ = stage_inputs
    methods = [METHODS[method][0][0] for method in ("ewc", "lwf", "averaging", "seekr")]
    methods.append({"name": "merge", "coefficients": [0.5]})
    first_uri = run_stage(spec(ctx, "fsdp-methods-task1", base_uri, task1, methods=methods, tuning=FULL), ctx)
    second = dict(methods=methods, tuning=FULL, task_index=1, plugin_state_uri=first_uri)
    launched_uri = run_stage(spec(ctx, "fsdp-methods-task2-fsdp", first_uri, task2, processes=2, strategy="fsdp", **second), ctx)
    single_uri = run_stage(spec(ctx, "fsdp-methods-task2", first_uri, task2, **second), ctx)
    assert_same_training(ctx, launched_uri, single_uri)
    launched, single = (fetch_dir(ctx.store, uri, ctx.cache_dir) / PLUGIN_DIR for uri in (launched_uri, single_uri))
    assert sorted(p.name for p in launched.iterdir()) == sorted(p.name for p in single.iterdir())
    for file in single.glob("*.safetensors"):
        fsdp_tensors, tensors = load_file(launched / file.name), load_file(file)
        assert fsdp_tensors.keys() == tensors.keys(), file.name
        for key, value in tensors.items():
            assert fsdp_tensors[key].shape == value.shape, (file.name, key)  # whole, not a rank's shard
            if value.numel():  # not "_empty", a plugin without tensors
                torch.testing.assert_close(fsdp_tensors[key], value, rtol=1e-4, atol=1e-4 * float(value.abs().max()), msg=key)
    for file in single.glob("*.json"):  # SEEKR's samples name the stage that stored them
        launched_meta = (launched / file.name).read_text().replace("fsdp-methods-task2-fsdp", "fsdp-methods-task2")
        assert json.loads(launched_meta) == json.loads(file.read_text()), file.name


def test_a_lora_stage_commits_its_adapter_with_its_base_beside_the_merged_model(stage_inputs, tmp_path):
    from peft import PeftModel

    ctx, base_uri, (task, _), _ = stage_inputs
    uri = run_stage(spec(ctx, "adapter", base_uri, task), ctx)
    folder = fetch_dir(ctx.store, uri, ctx.cache_dir)
    base = json.loads((folder / "adapter" / "base.json").read_text())
    assert base == {"base_model_uri": base_uri, "base_manifest_digest": ctx.store.read_manifest(
        base_uri.removeprefix(f"s3://{ctx.store.bucket}/"))["digest"]}
    adapter_bytes = sum(f.stat().st_size for f in (folder / "adapter").iterdir())
    assert adapter_bytes < (folder / "model.safetensors").stat().st_size / 4  # the adapter alone is small

    # The adapter on its base rebuilds the merged model the stage committed.
    base_model, _ = load_model_and_tokenizer(fetch_dir(ctx.store, base_uri, ctx.cache_dir))
    rebuilt = PeftModel.from_pretrained(base_model, str(folder / "adapter")).merge_and_unload().state_dict()
    merged = committed_state(ctx, uri)
    for name, tensor in merged.items():
        torch.testing.assert_close(rebuilt[name], tensor, rtol=0, atol=1e-6, msg=name)
    full_uri = run_stage(spec(ctx, "full", base_uri, task, tuning=FULL), ctx)
    assert not (fetch_dir(ctx.store, full_uri, ctx.cache_dir) / "adapter").exists()  # only adapter methods have one
