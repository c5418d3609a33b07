"""Self-synthesized rehearsal (issue #37, tasks/ssr.py): the starting model's own answers to general prompts
are generated once per model, cached in S3, and replayed with every task, and they change what is trained."""

from __future__ import annotations

import json
import uuid

import pytest
from mlflow.tracking import MlflowClient

from flows.continual_retrain import continual_retrain
from models.cl.replay import make_loss_fn
from models.data import encode_record
from models.evaluation import generate
from models.loading import load_model_and_tokenizer
from perennial.config import ConfigError, build_config
from perennial.storage import ObjectStore
from perennial.general_prompts import load_prompts
from tasks.ssr import SSR_TASK
from tests.test_pipeline import micro_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_torch_thread")]


def test_prompt_pools_are_a_shipped_one_or_a_users_file(tmp_path):
    from perennial.demo_data import CAPITALS

    builtin, facts, places = load_prompts("builtin"), load_prompts("facts"), load_prompts("places")
    assert len(builtin) >= 60 and len(facts) >= 40 and len(places) >= 20
    assert not set(builtin) & set(facts) and not set(places) & set(builtin + facts)

    def held_out_words(prompt: str, words: tuple[str, ...]) -> list[str]:
        text = " " + " ".join(prompt.lower().replace("?", " ").replace(".", " ").split()) + " "
        return [word for word in words if f" {word} " in text]

    # the demo's held-out task stays out: no prompt asks for a capital or names a country or capital it asks about;
    # builtin and facts name no city either (places asks where real things are, so it does)
    held_out = ("capital", "capitals", *(place.lower() for pair in CAPITALS.items() for place in pair))
    for prompt in builtin + facts + places:
        assert not held_out_words(prompt, held_out), prompt
    for prompt in builtin + facts:
        assert not held_out_words(prompt, ("city", "cities")), prompt
    assert held_out_words("Which city is the capital of the Czech Republic?", held_out) == ["capital", "the czech republic"]
    assert load_prompts(["facts", "places", "facts"]) == facts + places  # a list joins pools in order, once each
    (tmp_path / "mine.txt").write_text("How are you?\n\nWhat is rain?\n")
    assert load_prompts(str(tmp_path / "mine.txt")) == ["How are you?", "What is rain?"]
    (tmp_path / "mine.jsonl").write_text('{"prompt": "Hi?"}\n{"text": "no prompt"}\n')
    with pytest.raises(ConfigError, match=r"mine\.jsonl must hold one JSON object with a `prompt` string a line"):
        load_prompts(str(tmp_path / "mine.jsonl"))
    with pytest.raises(ConfigError, match="is not a file"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="cit.ssr replays .* set cit.replay.enabled=true"):
        build_config({}, ["cit.ssr.enabled=true", "cit.replay.enabled=false"])


def test_ssr_replays_the_starting_models_own_answers_generated_once_per_model(services, prefect_harness, tmp_path):
    bucket = f"ssr-{uuid.uuid4().hex[:8]}"

    def config(name: str, *overrides: str):
        cfg = micro_config(services, tmp_path / name, run_name=name).model_dump(mode="json")
        cfg["storage"]["bucket"] = bucket
        cfg["tracking"].update(experiment=f"ssr-{bucket}", registered_model=f"ssr-{bucket}")
        cfg["data"]["demo"]["tasks"] = ["arithmetic", "reverse"]
        # a rate and length at which plain tuning moves the tiny model's answers to general prompts clearly
        return build_config(cfg, ["registry.enabled=false", "cit.optim.lr=0.01", "cit.optim.max_steps=24", *overrides])

    plain = continual_retrain(config=config("plain").model_dump(mode="json"))
    ssr_cfg = config("ssr", "cit.ssr.enabled=true", "cit.ssr.samples=6", "cit.ssr.max_new_tokens=6")
    with_ssr = continual_retrain(config=ssr_cfg.model_dump(mode="json"))

    store = ObjectStore(ssr_cfg.storage)
    (pairs_manifest,) = [i.key for i in store.list("perennial/ssr/") if i.key.endswith("MANIFEST.json")]
    pairs = [json.loads(line) for line in store.get_bytes(pairs_manifest.replace("MANIFEST.json", "pairs.jsonl")).decode().splitlines()]
    assert 0 < len(pairs) <= 6 and all(pair["task"] == SSR_TASK for pair in pairs)
    # the answers are the starting model's own greedy answers (the DAP model both runs start from)
    start = with_ssr["checkpoints"]["start"]
    assert start == plain["checkpoints"]["start"]
    local = tmp_path / "start"
    store.download_dir(start.removeprefix(f"s3://{bucket}/"), local)
    model, tokenizer = load_model_and_tokenizer(local)
    answers = generate(model, tokenizer, [pair["prompt"] for pair in pairs], max_new_tokens=6, max_length=64)
    assert [pair["response"] for pair in pairs] == [answer.strip() for answer in answers]

    # replayed with every task: the first task trains on them too, the second on them and task 1's samples
    client = MlflowClient(services.mlflow_uri)
    stages = {run.data.tags["mlflow.runName"]: run for run in client.search_runs(
        [client.get_experiment_by_name(ssr_cfg.tracking.experiment).experiment_id],
        f"tags.`mlflow.parentRunId` = '{with_ssr['mlflow_run_id']}'")}
    assert int(stages["cit-01-arithmetic"].data.params["replay_records"]) == len(pairs)
    assert int(stages["cit-02-reverse"].data.params["replay_records"]) == len(pairs) + 12
    # and they change what they should: the trained model has rehearsed the starting model's own answers, so
    # its loss on them is below that of the model trained without them (mean token loss, nats)
    loss = {}
    for name, summary in (("plain", plain), ("ssr", with_ssr)):
        final = tmp_path / name / "final"
        store.download_dir(summary["checkpoints"]["cit-02-reverse"].removeprefix(f"s3://{bucket}/"), final)
        trained, _ = load_model_and_tokenizer(final)
        losses = make_loss_fn(trained, lambda r: encode_record(tokenizer, r, 64), tokenizer.pad_token_id)(pairs)
        loss[name] = sum(losses) / len(losses)
    assert loss["ssr"] < 0.8 * loss["plain"], loss

    # generated once per model: a second retrain from the same model reuses the cached pairs
    again = continual_retrain(config=config("again", "cit.ssr.enabled=true", "cit.ssr.samples=6",
                                            "cit.ssr.max_new_tokens=6", "cit.optim.lr=0.02").model_dump(mode="json"))
    assert again["checkpoints"]["start"] == start
    assert [i.key for i in store.list("perennial/ssr/") if i.key.endswith("MANIFEST.json")] == [pairs_manifest]
