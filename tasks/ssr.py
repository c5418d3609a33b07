"""Self-synthesized rehearsal (SSR): the model keeps its own general behaviour by rehearsing its own answers.

Huang et al., ACL 2024, "Mitigating Catastrophic Forgetting in Large Language Models with
Self-Synthesized Rehearsal". Before continual tuning, the model the retrain starts from (the base
model after DAP, or the champion a lineage continues) answers general instruction prompts
(`cit.ssr.prompts`: the pool Perennial ships, perennial/general_prompts.py, or the user's own). The
pairs join the replay buffer as a task of their own, SSR_TASK, and are replayed with every CIT
stage, so narrow tasks do not teach the model to answer everything in their format, and none of
the model's original training data is needed. The paper also synthesises the instructions by
in-context learning and refines the answers with the latest model; here the instructions come from
the pool and the answers from the starting model, its own greedy outputs.

The generations are cached on a content digest (the model's manifest digest, the prompts, the
generation settings) under `<storage.prefix>/ssr/<digest>` in S3, committed like a checkpoint, so a
rerun or another retrain from the same model does not generate them again.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil

from models.engine import resolve_device
from models.evaluation import generate
from models.loading import load_model_and_tokenizer
from perennial.config import canonical_json
from perennial.general_prompts import load_prompts
from perennial.ingest.records import record_id
from perennial.storage import join_key
from tasks.runtime import RunContext, committed_uri, fetch_dir, uri_to_prefix
from tasks.stage import BUFFER_FILE, read_replay_buffer

SSR_TASK = "self-synthesized"
PAIRS_FILE = "pairs.jsonl"


def synthesize(run: RunContext, model_uri: str, replay_uri: str | None) -> str:
    """Answer `cit.ssr.samples` general prompts with the model at ``model_uri`` and put the pairs into the
    replay buffer at ``replay_uri`` (None: a new one) as task SSR_TASK; returns the committed buffer's URI.

    Pairs whose answer is empty are left out. Raises ConfigError for an unusable prompt pool.
    """
    cfg = run.config
    ssr = cfg.cit.ssr
    pool = load_prompts(ssr.prompts)
    prompts = random.Random(f"ssr/{cfg.seed}").sample(pool, min(ssr.samples, len(pool)))
    model_digest = run.store.read_manifest(uri_to_prefix(run.store, model_uri))["digest"]
    settings = {"model": model_digest, "prompts": prompts, "max_new_tokens": ssr.max_new_tokens,
                "max_length": cfg.cit.optim.max_length}
    key = hashlib.sha256(canonical_json(settings).encode()).hexdigest()[:24]
    pairs_prefix = join_key(cfg.storage.prefix, "ssr", key)
    pairs_uri = committed_uri(run.store, pairs_prefix)
    if pairs_uri is None:
        local = run.work_dir / "ssr" / key
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        model, tokenizer = load_model_and_tokenizer(fetch_dir(run.store, model_uri, run.services.cache_dir),
                                                    attn_implementation=cfg.model.attn_implementation,
                                                    device=resolve_device(cfg.device))
        answers = generate(model, tokenizer, prompts, max_new_tokens=ssr.max_new_tokens, batch_size=cfg.eval.batch_size,
                           max_length=cfg.cit.optim.max_length)
        with open(local / PAIRS_FILE, "w") as handle:
            for prompt, answer in zip(prompts, answers):
                if answer.strip():
                    record = {"task": SSR_TASK, "prompt": prompt, "response": answer.strip(), "options": None, "split": "train"}
                    handle.write(json.dumps({"id": record_id(record), **record}) + "\n")
        pairs_uri = run.store.upload_dir(local, pairs_prefix, meta={"model": model_digest, "prompts": len(prompts)})["uri"]
    pairs = [json.loads(line) for line in (fetch_dir(run.store, pairs_uri, run.services.cache_dir) / PAIRS_FILE).read_text().splitlines()]

    buffer = read_replay_buffer(run.services, replay_uri)
    buffer.add_task(SSR_TASK, pairs, budget=max(len(pairs), 1), strategy="uniform", seed=cfg.seed)  # all of them
    local = run.work_dir / "replay" / "ssr"
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    buffer.to_jsonl(local / BUFFER_FILE)
    uri = run.store.upload_dir(local, f"{run.prefix}/replay/ssr", meta={"tasks": buffer.task_names(), "ssr_pairs": pairs_uri})["uri"]
    run.tracker.set_tags(run.parent_run_id, {"ssr_pairs": pairs_uri, "ssr_pairs_count": str(len(pairs))})
    print(f"self-synthesized rehearsal: {len(pairs)} of {len(prompts)} general prompts answered by the starting model, "
          f"replayed with every task ({pairs_uri})")
    return uri
