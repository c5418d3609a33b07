"""The real continual_retrain flow against real SeaweedFS, MLflow and a Prefect test harness."""

import json

import pytest
from mlflow.tracking import MlflowClient

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flows.continual_retrain import continual_retrain
from models.data import encode_prompt
from models.evaluation import generate
from tasks.export import export_model
from perennial.config import StorageConfig, build_config
from perennial.storage import ObjectStore

pytestmark = pytest.mark.integration

MICRO = {
    "run_name": "micro",
    # fp32 as configs/tiny.yaml: resume and multi-process tests compare runs in different processes bit for bit
    "precision": "fp32",
    "data": {"demo": {"tasks": ["arithmetic", "fact_lookup", "reverse"], "heldout_tasks": ["word_count"],
                      "train_per_task": 48, "eval_per_task": 8,
                      "general_docs": 120, "domain_docs": 60, "general_eval_docs": 8}},
    "model": {"tiny": {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "num_key_value_heads": 2},
              "pretrain": {"max_steps": 12, "batch_size": 8, "warmup_steps": 2, "max_length": 64}},
    "dap": {"optim": {"max_steps": 6, "batch_size": 8, "warmup_steps": 1, "max_length": 64}},
    "cit": {"optim": {"max_steps": 8, "batch_size": 8, "warmup_steps": 1, "max_length": 64, "checkpoint_every": 4},
            "replay": {"budget": 0.25}},
    "eval": {"max_new_tokens": 4, "batch_size": 8, "probe_prompts": 4, "general_max_docs": 8},
}


def micro_config(services, tmp_path, **extra):
    data = json.loads(json.dumps(MICRO))
    data.update(
        storage={"endpoint_url": services.s3_endpoint, "bucket": "pipeline-test"},
        tracking={"tracking_uri": services.mlflow_uri, "experiment": "pipeline-test", "registered_model": "micro-model"},
        work_dir=str(tmp_path / "work"),
        **extra,
    )
    return build_config(data)


BUCKET = "pipeline-end-to-end"  # test_continual_retrain_end_to_end's own


def test_continual_retrain_end_to_end(services, prefect_harness, tmp_path):
    # eval.max_task_records (the smoke runs' cap) scores 5 of the 8 test records of each task. Its own bucket: the
    # session's services are shared, and a base model another test made in pipeline-test would be a cache hit here.
    cfg = build_config(micro_config(services, tmp_path).model_dump(mode="json"), ["eval.max_task_records=5", f"storage.bucket={BUCKET}"])
    summary = continual_retrain(config=cfg.model_dump(mode="json"))

    # accuracy matrix: row 0 (before CIT) plus one row per task, one column per task
    assert summary["tasks"] == ["arithmetic", "fact_lookup", "reverse"]
    assert len(summary["accuracy_matrix"]) == 4 and all(len(row) == 3 for row in summary["accuracy_matrix"])
    for key in ("ap", "bwt", "fwt"):
        assert key in summary["metrics"]
    # the held-out general task is scored but is no column of R, and its delta is final - stage 0
    assert "word_count" not in summary["tasks"]
    heldout = summary["general_tasks"]["word_count"]
    assert heldout["delta"] == pytest.approx(heldout["final"] - heldout["base"])
    assert summary["metrics"]["general_task_delta"] == pytest.approx(heldout["delta"])
    assert summary["metrics"]["general/word_count_delta"] == pytest.approx(heldout["delta"])

    # every checkpoint is committed in S3 and its digests verify on download
    store = ObjectStore(StorageConfig(endpoint_url=services.s3_endpoint, bucket=BUCKET))
    assert set(summary["checkpoints"]) == {"start", "cit-01-arithmetic", "cit-02-fact_lookup", "cit-03-reverse"}
    for name, uri in summary["checkpoints"].items():
        prefix = uri.removeprefix(f"s3://{BUCKET}/")
        manifest = store.download_dir(prefix, tmp_path / "verify" / name)
        assert "model.safetensors" in manifest["files"] and "tokenizer.json" in manifest["files"]
    mid_stage = [i.key for i in store.list(f"perennial/runs/micro-model/{summary['run_key']}/") if "/checkpoints/step-00000004/MANIFEST.json" in i.key]
    assert len(mid_stage) == 3  # one mid-stage checkpoint per CIT task (checkpoint_every=4 of 8 steps)
    datasets = {i.key.split("/")[2] for i in store.list("perennial/datasets/") if i.key.endswith("MANIFEST.json")}
    assert {"general", "domain", "arithmetic", "fact_lookup", "reverse", "word_count"} <= datasets
    stage_evals = [store.get_json(i.key) for i in store.list(f"perennial/runs/micro-model/{cfg.run_name}-") if "/eval/stage-" in i.key]
    assert len(stage_evals) == 4
    for stage_eval in stage_evals:
        scored = {name: details["n"] for name, details in {**stage_eval["details"], **stage_eval["general_details"]}.items()}
        assert scored == {"arithmetic": 5, "fact_lookup": 5, "reverse": 5, "word_count": 5}

    # MLflow: a parent run with nested stage runs, metrics with steps, a registered version
    client = MlflowClient(services.mlflow_uri)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    history = client.get_metric_history(parent.info.run_id, "eval/arithmetic")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]
    general_history = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "eval_general/word_count")}
    assert sorted(general_history) == [0, 1, 2, 3]
    assert (general_history[0], general_history[3]) == pytest.approx((heldout["base"], heldout["final"]))
    assert "eval/word_count" not in parent.data.metrics
    assert parent.data.metrics["general_task_delta"] == pytest.approx(heldout["delta"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = {run.data.tags["mlflow.runName"] for run in children}
    assert {"pretrain-base", "dap", "cit-01-arithmetic", "cit-02-fact_lookup", "cit-03-reverse"} <= names
    cit_run = next(run for run in children if run.data.tags["mlflow.runName"] == "cit-02-fact_lookup")
    assert client.get_metric_history(cit_run.info.run_id, "train/loss")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/accuracy_matrix.png" in artifacts
    registered = summary["registered_model"]
    version = client.get_model_version_by_alias("micro-model", "challenger")
    assert int(version.version) == registered["version"]
    assert version.tags["config_digest"] == cfg.digest()
    assert float(version.tags["metric.general_task_delta"]) == pytest.approx(heldout["delta"])
    assert "dataset.word_count" in version.tags

    # lineage fields name the real thing: the version's base_model a name, the parent run's base_model_uri its S3 copy
    assert version.tags["base_model"] == "tiny-llama(32x2)" and version.tags["base_model_source"] == "tiny"
    assert version.tags["base_model_uri"] == parent.data.tags["base_model_uri"] and "base_model" not in parent.data.tags
    assert version.tags["base_model_uri"].startswith(f"s3://{BUCKET}/perennial/base-models/tiny-")

    # sample answers (issue #44): base and candidate side by side on the page, in the report, for review
    samples = json.loads(open(client.download_artifacts(parent.info.run_id, "report/samples.json", str(tmp_path))).read())
    assert [column["label"] for column in samples["columns"]] == ["base", "candidate"]
    groups = [probe["group"] for probe in samples["probes"]]
    assert groups == ["arithmetic"] * 2 + ["fact_lookup"] * 2 + ["reverse"] * 2 + ["word_count (held-out)"] * 2 + ["general"] * 2
    assert all(len(column["answers"]) == 10 and not column["cached"] for column in samples["columns"])
    assert "**What the model says**" in version.description and f"candidate v{version.version}" in version.description
    assert "report/samples.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    from perennial import registry

    review = registry.review(client, "micro-model")
    assert "Sample answers (greedy, at most 32 new tokens" in review and "  [word_count (held-out)] " in review
    assert f"    candidate v{version.version}  " in review and "    base  " in review
    # the verdict and the version on the parent run, for `perennial status`
    assert parent.data.tags["perennial.registered_version"] == f"micro-model/{version.version}"
    assert parent.data.tags["perennial.verdict"].split(":")[0] in ("READY", "BLOCKED")

    # the Prefect run: the markdown artifact written after registration, with the verdict and the version; the flow
    # run tagged with its run key and registered model; task logs with training progress
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # task logs reach the API in batches
    flow_run_id = UUID(parent.data.tags["prefect.flow_run_id"])
    with get_client(sync_client=True) as prefect:
        artifacts = [artifact for artifact in prefect.read_artifacts() if artifact.type == "markdown"]
        markdown = [artifact.data for artifact in artifacts]
        flow_run = prefect.read_flow_run(flow_run_id)
        logs = "\n".join(entry.message for entry in prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))
    verdict = parent.data.tags["perennial.verdict"]
    assert any(parent.info.run_id in text and f"**micro-model version {version.version}: {verdict}**" in text
               and "| word_count" in text and "What the model says" in text for text in markdown)
    key = f"retrain-{summary['run_key']}".lower().replace("_", "-").replace(".", "-")
    latest = max((artifact for artifact in artifacts if artifact.key == key), key=lambda artifact: artifact.created)
    assert latest.data.startswith(f"**micro-model version {version.version}: {verdict}**")  # the key's last version: after registration
    assert {f"run-key:{summary['run_key']}", "model:micro-model"} <= set(flow_run.tags)
    assert "cit-02-fact_lookup: step 8/8, loss " in logs and "dap: trained to step 6/6" in logs, logs[-3000:]
    assert "base model prepared" in logs and "sample answers of the base model: 10 prompts generated" in logs
    assert f"micro-model version {version.version}: {verdict}" in logs

    # export: a plain transformers folder that generates what in-pipeline evaluation generates
    exported = export_model(cfg, summary["checkpoints"]["cit-03-reverse"], tmp_path / "exported")
    assert not (exported / "perennial_plugins").exists()
    plain = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    prompts = ["What is 30 + 4?", "Reverse the words: cat dog"]
    ours = generate(plain, tokenizer, prompts, max_new_tokens=4)
    for prompt, expected in zip(prompts, ours):
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        out = plain.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == expected.strip()

    # a rerun of the same config finds every stage committed and returns the same results
    again = continual_retrain(config=cfg.model_dump(mode="json"))
    assert again["accuracy_matrix"] == summary["accuracy_matrix"]
    assert again["general_tasks"] == summary["general_tasks"]
    assert again["checkpoints"] == summary["checkpoints"]
    # its logs say what came from the caches, sample answers included (by model manifest digest)
    APILogWorker.drain_all(timeout=30)  # task logs reach the API in batches
    with get_client(sync_client=True) as prefect:
        rerun = UUID(client.get_run(summary["mlflow_run_id"]).data.tags["prefect.flow_run_id"])
        logs = "\n".join(entry.message for entry in prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[rerun]))))
    assert "cit-01-arithmetic: committed output reused (cache hit)" in logs and "base model from cache" in logs, logs[-3000:]
    assert "evaluate-before-cit from cache" in logs and "sample answers of the candidate model from cache" in logs
