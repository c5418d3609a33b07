"""Evaluation after every stage: one row of the accuracy matrix, held-out general tasks, general perplexity, output-bias drift."""

from __future__ import annotations

import json

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from models.engine import precision_context, resolve_device, set_seed
from models.evaluation import next_token_distributions, output_drift, perplexity, score_task
from models.loading import load_model_and_tokenizer
from tasks.ingest import DataBundle, DatasetRef, read_records
from tasks.runtime import RunContext, fetch_dir


class StageEval(BaseModel):
    stage_index: int  # 0 = before continual tuning
    stage: str
    scores: dict[str, float]
    details: dict[str, dict[str, float]] = {}
    # Held-out general tasks (never trained on): kept apart from `scores`, which are the accuracy-matrix row.
    general_scores: dict[str, float] = {}
    general_details: dict[str, dict[str, float]] = {}
    general_ppl: float
    drift: dict = {}
    # Per task (trained and held out): the most frequent normalised prediction (models.evaluation.score_task).
    top_predictions: dict[str, str] = {}


def probe_prompts(general_test: list[dict], count: int) -> list[str]:
    """Held-out general text cut to its first words: prompts no task trains on."""
    return [" ".join(record["text"].split()[:8]) for record in general_test[:count]]


def evaluate_stage(run: RunContext, model_uri: str, data: DataBundle, stage_index: int, stage: str,
                   tasks: list[DatasetRef] | None = None) -> StageEval:
    """Score the model after stage ``stage_index`` of this retrain (0: before continual tuning) on
    ``tasks`` (default the run's task sequence; a continued lineage's: its earlier tasks too), the
    held-out tasks, general perplexity and output drift against stage 0. Cached per stage in S3."""
    cfg = run.config
    store = run.store
    result_key = f"{run.prefix}/eval/stage-{stage_index:02d}.json"
    if store.exists(result_key):
        return StageEval.model_validate(store.get_json(result_key))

    set_seed(cfg.seed)
    cache = run.services.cache_dir
    model, tokenizer = load_model_and_tokenizer(
        fetch_dir(store, model_uri, cache), attn_implementation=cfg.model.attn_implementation, device=resolve_device(cfg.device)
    )
    model.eval()

    # Prompts are cut to the CIT training length, so evaluation feeds what training fed (models/data.py:fit_prompt).
    top_predictions: dict[str, str] = {}

    def score_all(refs):
        scores, details = {}, {}
        for ref in refs:
            records = read_records(store, ref, cache, split="test")[: cfg.eval.max_task_records]
            scored = score_task(
                model, tokenizer, records, scoring=cfg.eval.scoring, batch_size=cfg.eval.batch_size,
                max_new_tokens=cfg.eval.max_new_tokens, max_length=cfg.cit.optim.max_length,
            )
            scores[ref.name] = scored["accuracy"]
            details[ref.name] = {k: v for k, v in scored.items() if isinstance(v, (int, float))}
            top_predictions[ref.name] = scored["top_prediction"]
        return scores, details

    # Scoring in the training precision (bf16 autocast where `precision: auto` trains in it) halves its
    # time on such a CPU; perplexity and the drift distributions stay fp32, they are cheap and compared
    # across stages to small fractions.
    with precision_context(cfg.precision, resolve_device(cfg.device)):
        scores, details = score_all(data.tasks if tasks is None else tasks)
        general_scores, general_details = score_all(data.heldout)

    general_test = read_records(store, data.general, cache, split="test")
    texts = [record["text"] for record in general_test[: cfg.eval.general_max_docs]]
    ppl = perplexity(model, tokenizer, texts, block_size=cfg.cit.optim.max_length, batch_size=cfg.eval.batch_size)

    # Drift is measured against the model before continual tuning (stage 0), on fixed probe prompts.
    prompts = probe_prompts(general_test, cfg.eval.probe_prompts)
    current = next_token_distributions(model, tokenizer, prompts, max_length=cfg.cit.optim.max_length)
    base_key = f"{run.prefix}/eval/probe-base.safetensors"
    local_base = run.work_dir / "probe-base.safetensors"
    if stage_index == 0:
        save_file({"probs": current.contiguous()}, local_base)
        store.put_file(local_base, base_key)
    elif not local_base.exists():
        store.get_file(base_key, local_base)
    base = load_file(local_base)["probs"]
    drift = output_drift(base, current, tokenizer)

    evaluation = StageEval(
        stage_index=stage_index, stage=stage, scores=scores, details=details,
        general_scores=general_scores, general_details=general_details, general_ppl=ppl, drift=drift,
        top_predictions=top_predictions,
    )
    tracker = run.tracker
    metrics = {f"eval/{name}": score for name, score in scores.items()}
    metrics.update({f"eval_general/{name}": score for name, score in general_scores.items()})
    metrics.update({f"eval_corrected/{name}": detail["corrected_accuracy"] for name, detail in {**details, **general_details}.items()})
    metrics["eval/general_ppl"] = ppl
    metrics.update({f"drift/{k}": v for k, v in drift.items() if isinstance(v, (int, float))})
    tracker.log_metrics(run.parent_run_id, metrics, step=stage_index)
    tracker.flush(attempts=5)
    store.put_json(result_key, json.loads(evaluation.model_dump_json()))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return evaluation
