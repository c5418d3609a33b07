"""Sample answers (issue #44): what a version now says, beside the base model and the champion.

A fixed probe set (`registry.samples`): the first test records of every scored task and held-out task,
prompts from the shipped general pool (perennial/general_prompts.py) and the config's own. Each model
answers greedily with the scorer's own rendering and settings (models/evaluation.py: generate, the
chat template, the prompt cut as training cuts it, in the scoring precision), with room for
`registry.samples.max_new_tokens` answer tokens beyond the scorer's window. Answers are cached in S3 by the
model's manifest digest and the probe set's digest, so the base model and the champion are asked once,
not on every retrain.
"""

from __future__ import annotations

import hashlib
import json
import time

from pydantic import BaseModel

from perennial.config import canonical_json
from perennial.general_prompts import BUILTIN
from tasks.ingest import DatasetRef, read_records
from tasks.progress import run_logger
from tasks.runtime import RunContext, fetch_dir, uri_to_prefix

SAMPLES_JSON = "report/samples.json"


class Probe(BaseModel):
    group: str  # "fact_lookup", "capitals (held-out)", "general", "yours"
    prompt: str | list[dict]  # as the scorer feeds it: one user turn, or a conversation's turns
    reference: str | None = None


class Column(BaseModel):
    label: str  # "base", "champion v3", "candidate v4"
    model_uri: str
    answers: list[str]
    cached: bool = False
    seconds: float = 0.0


class Samples(BaseModel):
    probes: list[Probe]
    columns: list[Column]
    max_new_tokens: int
    champion_version: str | None = None  # the champion whose answers the "champion" column holds
    error: str | None = None  # why a column is missing (e.g. the base model's URI is unknown)

    def rows(self) -> list[dict]:
        """One dict per probe: group, prompt (text), reference, and each column's answer by label."""
        return [{"group": probe.group, "prompt": prompt_text(probe.prompt), "reference": probe.reference,
                 **{column.label: column.answers[index] for column in self.columns}} for index, probe in enumerate(self.probes)]


def prompt_text(prompt: str | list[dict]) -> str:
    """A prompt as one line of text: a conversation shows its last user turn after "…"."""
    if isinstance(prompt, str):
        return prompt
    users = [turn["content"] for turn in prompt if turn.get("role") == "user"]
    return ("… " if len(prompt) > 1 else "") + (users[-1] if users else str(prompt[-1].get("content", "")))


def probe_set(run: RunContext, tasks: list[DatasetRef], heldout: list[DatasetRef]) -> list[Probe]:
    """The configured probes, in order: each task's first test records, each held-out task's, the first general
    prompts of the shipped pool, then the config's own prompts."""
    settings = run.config.registry.samples
    probes = []
    for refs, count, suffix in ((tasks, settings.per_task, ""), (heldout, settings.per_heldout_task, " (held-out)")):
        for ref in refs:
            if count:
                for record in read_records(run.store, ref, run.services.cache_dir, split="test")[:count]:
                    prompt = record.get("messages") or record["prompt"]
                    probes.append(Probe(group=f"{ref.name}{suffix}", prompt=prompt, reference=record.get("response")))
    probes += [Probe(group="general", prompt=prompt) for prompt in BUILTIN[: settings.general_prompts]]
    probes += [Probe(group="yours", prompt=prompt) for prompt in settings.prompts]
    return probes


def _settings(run: RunContext) -> dict:
    """What an answer depends on besides the model and the prompt: how it is generated."""
    from models.engine import autocast_dtype, resolve_device

    cfg = run.config
    device = resolve_device(cfg.device)
    # The window: the scorer's (cit.optim.max_length) plus the answer, so a prompt the scorer feeds whole is fed
    # whole and every answer gets all max_new_tokens: one batch, where the scorer's window would split the probes
    # into groups by how many answer tokens each prompt leaves (each group a generate call of its own).
    return {"max_new_tokens": cfg.registry.samples.max_new_tokens,
            "max_length": cfg.cit.optim.max_length + cfg.registry.samples.max_new_tokens,
            "autocast": str(autocast_dtype(cfg.precision, device)), "device": device.type,
            "attn": cfg.model.attn_implementation}


def answer(run: RunContext, model_uri: str, probes: list[Probe], label: str) -> Column:
    """The model's greedy answers to the probes, from the cache when this model (by its manifest digest) already
    answered this probe set with these settings; else generated and cached."""
    store, cfg = run.store, run.config
    logger = run_logger()
    started = time.perf_counter()
    manifest = store.read_manifest(uri_to_prefix(store, model_uri))
    if manifest is None:
        raise FileNotFoundError(f"{model_uri} is not committed (no manifest)")
    settings = _settings(run)
    probe_digest = hashlib.sha256(canonical_json({"prompts": [p.prompt for p in probes], **settings}).encode()).hexdigest()
    key = f"{cfg.storage.prefix}/samples/{manifest['digest'][:24]}-{probe_digest[:16]}.json"
    if store.exists(key):
        answers = store.get_json(key)["answers"]
        seconds = time.perf_counter() - started
        logger.info("sample answers of the %s model from cache, %.1f s", label, seconds)
        return Column(label=label, model_uri=model_uri, answers=answers, cached=True, seconds=seconds)

    import torch

    from models.engine import precision_context, resolve_device
    from models.evaluation import generate
    from models.loading import load_model_and_tokenizer

    device = resolve_device(cfg.device)
    model, tokenizer = load_model_and_tokenizer(fetch_dir(store, model_uri, run.services.cache_dir),
                                                attn_implementation=cfg.model.attn_implementation, device=device)
    model.eval()
    with precision_context(cfg.precision, device):
        answers = generate(model, tokenizer, [probe.prompt for probe in probes], settings["max_new_tokens"],
                           batch_size=cfg.eval.batch_size, max_length=settings["max_length"])
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    store.put_json(key, {"model_uri": model_uri, "manifest_digest": manifest["digest"], "settings": settings,
                         "prompts": [probe.prompt for probe in probes], "answers": answers})
    seconds = time.perf_counter() - started
    logger.info("sample answers of the %s model: %d prompts generated in %.1f s", label, len(probes), seconds)
    return Column(label=label, model_uri=model_uri, answers=answers, seconds=seconds)


def sample_answers(run: RunContext, tasks: list[DatasetRef], heldout: list[DatasetRef],
                   models: list[tuple[str, str | None]], champion_version: str | None = None) -> Samples | None:
    """Each model's answers to the probe set; ``models``: (label, model URI or None when unknown), in column order
    (base, champion, candidate). None when `registry.samples` is off or the probe set is empty. A model that
    cannot answer (its checkpoint gone) leaves its column out and says why in ``error``: sample answers
    inform a review, they never fail a registration."""
    if not run.config.registry.samples.enabled:
        return None
    probes = probe_set(run, tasks, heldout)
    if not probes:
        return None
    columns, errors = [], []
    for label, uri in models:
        if uri is None:
            errors.append(f"{label}: model unknown")
            continue
        try:
            columns.append(answer(run, uri, probes, label))
        except Exception as error:  # noqa: BLE001  (reported on the page, never fatal)
            run_logger().warning("sample answers of the %s model failed: %s: %s", label, type(error).__name__, error)
            errors.append(f"{label}: {type(error).__name__}: {error}")
    return Samples(probes=probes, columns=columns, max_new_tokens=run.config.registry.samples.max_new_tokens,
                   champion_version=champion_version, error="; ".join(errors) or None)


def samples_json(samples: Samples) -> str:
    return json.dumps(samples.model_dump(), indent=2)
