"""Report and register: accuracy-matrix metrics, plots and a summary table in MLflow; a new registry version."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from models.engine import plugin_state_file
from models.loading import load_model_and_tokenizer
from perennial import registry
from perennial.cl_metrics import AccuracyMatrix, _metric_name, bias_or_knowledge, summarize
from perennial.lineage import LINEAGE_FILE
from perennial.model_files import model_files_prefix, model_files_uri
from perennial.reports import markdown_summary, plot_accuracy_matrix, plot_drift, plot_merge_curves, plot_task_curves
from perennial.tracking import UI_WORKFLOW, runs_table_link

from tasks.cit import CITStep
from tasks.evaluate import StageEval
from tasks.ingest import DataBundle
from tasks.lineage import (CONTINUED_FROM_TAG, MULTITASK_TAG, LINEAGE_BASE_TAG, LINEAGE_URI_TAG, REPLAY_URI_TAG, LineagePlan, extend_lineage,
                           lineage_base)
from tasks.progress import run_logger
from tasks.runtime import RunContext, fetch_dir
from tasks.samples import Samples, sample_answers
from tasks.stage import PLUGIN_DIR


HEATMAP = "report/accuracy_matrix.png"


def report_links(experiment_id: str, run_id: str) -> str:
    """Markdown for the version's description: the accuracy heatmap shown inline, and links to the
    run and its report. Relative to the MLflow UI's own address, so they work however it is reached."""
    run_page = f"#/experiments/{experiment_id}/runs/{run_id}"
    return "\n".join([
        "Report of the retrain:",
        "",
        f"![accuracy matrix](get-artifact?path={HEATMAP}&run_uuid={run_id})",
        "",
        f"[accuracy heatmap]({run_page}/artifactPath/{HEATMAP}?{UI_WORKFLOW}) "
        f"| [all report files]({run_page}/artifactPath/report?{UI_WORKFLOW}) | [run (metrics, stages)]({run_page}?{UI_WORKFLOW}) "
        f"| [all retrains, metrics as columns]({runs_table_link(experiment_id)})",
    ])


class Report(BaseModel):
    tasks: list[str]
    matrix: list[list[float | None]]  # the accuracy matrix: this retrain's, or its lineage's (earlier retrains' rows first)
    metrics: dict[str, float]
    markdown: str
    # Held-out general tasks: name -> {"base": stage-0 score, "final": last-stage score, "delta": final - base}.
    general_tasks: dict[str, dict[str, float]] = {}
    start_row: int = 0  # the matrix row this retrain's training started from (its stage 0)
    row_labels: list[str] = []  # per matrix row: what it scores, and for a lineage the retrain that added it
    trained: list[str | list[str]] = []  # the task each row after row 0 trained (a list: the tasks of a joint stage)
    lineage_uri: str | None = None  # the committed lineage record (perennial/lineage.py) of a retrain
    task_history: str = ""
    # Per task (trained and held out), from the retrain's start to its end: the drop, how much of it is output
    # bias and how much lost knowledge, the verdict, and the most frequent answer (perennial.cl_metrics.bias_or_knowledge).
    bias: dict[str, dict] = {}


def report(run: RunContext, data: DataBundle, evaluations: list[StageEval], plan: LineagePlan | None = None,
           steps: list[CITStep] = ()) -> Report:
    """The accuracy matrix, CL metrics, plots and summary of a retrain (with ``plan`` and its CIT
    ``steps``: of its whole lineage, whose record is committed beside the run's outputs), or of an
    evaluation (the run's tasks, one row per evaluation). Logged to the parent MLflow run."""
    record, start_row, lineage_uri = None, 0, None
    if plan is None:
        tasks = [task.name for task in data.tasks]
        matrix = AccuracyMatrix(tasks=tasks, rows=[[evaluation.scores[name] for name in tasks] for evaluation in evaluations])
    else:
        record, start_row = extend_lineage(run, plan, evaluations, list(steps))
        matrix = record.matrix()
    base, final = evaluations[0], evaluations[-1]
    if record is not None:
        start, start_corrected = record.rows[start_row].scores, record.rows[start_row].corrected
    else:
        start, start_corrected = base.scores, {name: d.get("corrected_accuracy") for name, d in base.details.items()}
    bias = bias_table(start, start_corrected, base, final)
    metrics = summarize(
        matrix,
        general_ppl_base=base.general_ppl,
        general_ppl_final=final.general_ppl,
        general_scores_base=base.general_scores,
        general_scores_final=final.general_scores,
    )
    general = [evaluation.general_scores for evaluation in evaluations]
    general_tasks = {
        name: {"base": base.general_scores[name], "final": final.general_scores[name], "delta": final.general_scores[name] - base.general_scores[name]}
        for name in base.general_scores
        if name in final.general_scores
    }
    metrics.update({f"bias/{name}_{key}": entry[key] for name, entry in bias.items() for key in ("knowledge_drop", "bias_drop")
                    if entry[key] is not None})
    metrics.update({f"one_label/{name}": entry["one_label"] for name, entry in bias.items()})
    drift = [evaluation.drift for evaluation in evaluations]
    markdown = markdown_summary(matrix, metrics, drift=drift, general=general, bias=bias,
                                row_labels=record.row_labels() if record else None,
                                drift_labels=[evaluation.stage for evaluation in evaluations])

    tracker = run.tracker
    tracker.log_metrics(run.parent_run_id, {k: v for k, v in metrics.items() if v is not None}, step=len(evaluations) - 1)
    out = run.work_dir / "report"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    plot_accuracy_matrix(matrix, out / "accuracy_matrix.png", row_labels=record.row_labels() if record else None)
    plot_task_curves(matrix, out / "task_curves.png", general=general if record is None or plan.start is None else None)
    plot_drift(drift, out / "drift.png", labels=[evaluation.stage for evaluation in evaluations],
               threshold=run.config.registry.gates.max_output_drift_kl)
    (out / "summary.md").write_text(markdown)
    (out / "accuracy_matrix.json").write_text(json.dumps({
        "tasks": matrix.tasks, "rows": matrix.rows, "trained": matrix.trained,
        "row_labels": record.row_labels() if record else matrix.stage_labels()}))
    curves = merge_curves(run, list(steps))
    if curves:
        plot_merge_curves(curves, out / "merge_curves.png")
        (out / "merge_curves.json").write_text(json.dumps(curves))
        chosen = {f"merge/{task}_coefficient": next(p["coefficient"] for p in points if p.get("chosen"))
                  for task, points in curves.items()}
        metrics.update(chosen)
        tracker.log_metrics(run.parent_run_id, chosen, step=len(evaluations) - 1)
    if general_tasks:
        (out / "general_tasks.json").write_text(json.dumps({"tasks": list(general_tasks), "rows": general, "summary": general_tasks}))
    if record is not None:
        (out / LINEAGE_FILE).write_text(record.model_dump_json(indent=2))
        lineage_dir = run.work_dir / "lineage"
        shutil.rmtree(lineage_dir, ignore_errors=True)
        lineage_dir.mkdir(parents=True)
        shutil.copy(out / LINEAGE_FILE, lineage_dir / LINEAGE_FILE)
        lineage_uri = run.store.upload_dir(lineage_dir, f"{run.prefix}/lineage", meta={"rows": len(record.rows)})["uri"]
    for path in sorted(out.iterdir()):
        tracker.log_artifact(run.parent_run_id, path, "report")
    tracker.flush(attempts=5)
    return Report(
        tasks=matrix.tasks, matrix=matrix.rows, metrics={k: v for k, v in metrics.items() if v is not None}, markdown=markdown,
        general_tasks=general_tasks, start_row=start_row, lineage_uri=lineage_uri, bias=bias,
        row_labels=record.row_labels() if record else matrix.stage_labels(), trained=matrix.trained or matrix.tasks[: matrix.stage],
        task_history=record.history_text() if record else "",
    )


def merge_curves(run: RunContext, steps: list[CITStep]) -> dict[str, list[dict]]:
    """The merge plugin's curve of every task this retrain trained (models/cl/merge.py), read from the
    plugin state in the last stage's checkpoint; empty without the merge method."""
    methods = [method.name for method in run.config.cit.methods]
    if "merge" not in methods or not steps:
        return {}
    state = fetch_dir(run.store, steps[-1].model_uri, run.services.cache_dir) / PLUGIN_DIR / plugin_state_file(methods.index("merge"), "merge")
    curves = json.loads(state.read_text()).get("curves", {})
    return {step.stage: curves[step.stage] for step in steps if step.stage in curves}


def bias_table(start: dict, start_corrected: dict, base: StageEval, final: StageEval) -> dict[str, dict]:
    """Per task scored at the end (trained, then held out): its start and final accuracy, raw and corrected,
    the split of its drop into output bias and lost knowledge (bias_or_knowledge), whether it answers one
    label to most records, and its most frequent answer. ``start``: the trained tasks' scores where the
    retrain started (a lineage's start row); the held-out tasks start at ``base`` (this retrain's stage 0)."""
    table = {}
    sources = [(final.scores, final.details, start, start_corrected),
               (final.general_scores, final.general_details, base.general_scores,
                {name: d.get("corrected_accuracy") for name, d in base.general_details.items()})]
    for scores, details, before, before_corrected in sources:
        for name, after in scores.items():
            if before.get(name) is None:
                continue
            detail = details.get(name, {})
            split = bias_or_knowledge(before[name], after, before_corrected.get(name), detail.get("corrected_accuracy"))
            table[name] = {"before": before[name], "after": after, "before_corrected": before_corrected.get(name),
                           "after_corrected": detail.get("corrected_accuracy"), **split,
                           "one_label": detail.get("one_label", 0.0), "top_share": detail.get("top_share"),
                           "top_prediction": final.top_predictions.get(name)}
    return table


# Version tags: `base_model` names the model a lineage started from; `base_model_uri` is its committed copy in S3
# (the parent run's tag of the same name, set by tasks/base_model.py); `base_model_source` how it was given.
BASE_MODEL_TAG, BASE_MODEL_URI_TAG, BASE_MODEL_SOURCE_TAG = "base_model", "base_model_uri", "base_model_source"


def base_model_name(cfg) -> str:
    """What the lineage's base model is, in words, for every `model.source`: a hub id (at its revision), a
    folder (its absolute path), a GGUF file (the file, the package that ships it, and its sha256), or the tiny
    model built here (its shape)."""
    model = cfg.model
    if model.source == "hub":
        return model.name_or_path + (f"@{model.revision}" if model.revision else "")
    if model.source == "local":
        return str(Path(model.name_or_path).expanduser().resolve())
    if model.source == "gguf":
        from models.gguf import PACKAGED, file_sha256, resolve_gguf

        path = resolve_gguf(model.gguf_file)
        packaged = PACKAGED.get(str(model.gguf_file).lower())
        origin = f"{packaged.distribution}=={packaged.version}" if packaged else str(path)
        return f"{path.name} (GGUF, {origin}, sha256 {file_sha256(path)[:12]})"
    return f"tiny-llama({model.tiny.hidden_size}x{model.tiny.num_hidden_layers})"


def page_summary(markdown: str) -> str:
    """The run's summary for the version page: without its metric table and held-out section, which the page
    shows once, near the verdict."""
    head, *sections = ("\n" + markdown).split("\n## ")
    kept = ["## " + section for section in sections if not section.startswith(("Metrics", "Held-out general tasks"))]
    return "\n".join(([head.strip(), ""] if head.strip() else []) + kept).strip() + "\n"


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Served answers stop after this many new tokens unless a request's max_tokens says otherwise (at most
# half the model's positions, so a default request never runs past them).
SERVE_MAX_TOKENS = 256
CHAT_TASK, COMPLETIONS_TASK = "llm/v1/chat", "llm/v1/completions"


def serving_task(tokenizer) -> str:
    """MLflow's LLM inference task for a version: `llm/v1/chat` when its tokenizer has a chat template
    (the scoring server renders `messages` with it), else `llm/v1/completions` (`completion_prompt_template`)."""
    return CHAT_TASK if tokenizer.chat_template else COMPLETIONS_TASK


def completion_prompt_template(tokenizer) -> str:
    """Perennial's default template (models/data.py: DEFAULT_CHAT_TEMPLATE) around one user turn, as
    an MLflow prompt template: a completions request's ``prompt`` becomes the prompt this model was
    trained and scored on (`encode_prompt` of a template-less tokenizer), not raw text it never saw."""
    from models.data import DEFAULT_CHAT_TEMPLATE

    slot = "\x00prompt\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": slot}], chat_template=DEFAULT_CHAT_TEMPLATE,
                                         tokenize=False, add_generation_prompt=True)
    before, after = text.split(slot)
    escape = lambda part: part.replace("{", "{{").replace("}", "}}")  # noqa: E731  (str.format's literal braces)
    return f"{escape(before)}{{prompt}}{escape(after)}"


def serving_generation_config(model, tokenizer):
    """Greedy decoding exactly as Perennial scores (models/evaluation.py: generate), whatever sampling
    or penalties the checkpoint's own generation_config holds: the served answer is the scored one."""
    from transformers import GenerationConfig

    from models.families import max_positions

    positions = max_positions(model)
    return GenerationConfig(
        max_new_tokens=min(SERVE_MAX_TOKENS, positions // 2) if positions else SERVE_MAX_TOKENS, do_sample=False, num_beams=1,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )


def save_mlflow_model(checkpoint: Path, out: Path, card: str, name: str | None = None) -> Path:
    """The checkpoint as an MLflow transformers-flavor folder (MLmodel, model/, components/tokenizer/)
    that `mlflow models serve -m models:/NAME@ALIAS` serves as an OpenAI-style endpoint, and that
    `mlflow.transformers.load_model` and `mlflow.pyfunc.load_model` load; the S3 checkpoint stays the
    source of truth (the version's checkpoint_uri tag).

    Logged with MLflow's LLM inference task (`serving_task`): `llm/v1/chat` takes ``messages``,
    renders them with the tokenizer's own chat template and answers in the chat-completion shape;
    a tokenizer without a template gets `llm/v1/completions`, whose ``prompt`` is wrapped in
    Perennial's default template (`completion_prompt_template`). Decoding is greedy with Perennial's
    settings (`serving_generation_config`) and the rendered prompt is tokenized without added
    special tokens (the template writes them), so a served answer is token for token
    `models.evaluation.generate`'s for a prompt that fits the model's positions. ``max_tokens``
    bounds the answer (default: `SERVE_MAX_TOKENS`). ``name`` (register: ``models:/NAME``) is the
    `model` field of every response; not a hub repo id, so MLflow looks nothing up under it
    (default: the checkpoint's local path).

    Built from the already downloaded checkpoint: nothing comes from the hub, and Perennial's own
    files (plugins, training state) are left out because only the model and tokenizer are saved.
    """
    # Imported here: the flavor is needed once per retrain, not at every flow's start-up.
    import mlflow
    import mlflow.transformers
    import torch
    import transformers
    from huggingface_hub import ModelCard

    model, tokenizer = load_model_and_tokenizer(checkpoint)
    model.generation_config = serving_generation_config(model, tokenizer)
    if name:
        model.name_or_path = name  # MLflow records it as the source model's name, the `model` of each response
    task = serving_task(tokenizer)
    mlflow.transformers.save_model(
        {"model": model, "tokenizer": tokenizer},
        out,
        task=task,
        prompt_template=completion_prompt_template(tokenizer) if task == COMPLETIONS_TASK else None,
        # Passed to the pipeline on every request, before the request's own fields: the template (or
        # the prompt template) writes the special tokens, so tokenizing adds none (no second BOS).
        model_config={"add_special_tokens": False, "max_new_tokens": model.generation_config.max_new_tokens},
        # A card of our own: MLflow would otherwise look the model up on the hub (offline here).
        model_card=ModelCard(card),
        # Stated, not inferred: inference loads the model again in a subprocess, for the same answer.
        pip_requirements=[f"mlflow=={mlflow.__version__}", f"transformers=={transformers.__version__}",
                          f"torch=={torch.__version__.split('+')[0]}"],
    )
    return out


def register(run: RunContext, model_uri: str, data: DataBundle, summary: Report, plan: LineagePlan | None = None,
             last_step: CITStep | None = None) -> dict:
    """Store the final model as an MLflow model (transformers flavor, save_mlflow_model): by default beside the
    checkpoint in the lineage's S3, its weights the checkpoint's own pieces (registry.model_files, perennial/
    model_files.py), else logged to the run in MLflow's artifact store. Register it as
    a new version with alias `challenger` and links to the run's report (report_links), and
    judge it with the quality gates (perennial/registry.py): promoted when all pass and
    registry.auto_promote is on, else tagged needs-review. The verdict (READY / BLOCKED and why)
    then opens the version's description and the parent run's (registry.register_version).

    A rerun (Prefect retry, or the retrain rerun after a crash) completes an interrupted
    registration instead of skipping it (registry.register_version); the result is what the
    registry holds, read back. Raises registry.RegistryError when another promotion holds the
    registry's promotion lock past its timeout.
    """
    cfg = run.config
    store, tracker = run.store, run.tracker
    client: MlflowClient = tracker.client
    name = cfg.tracking.registered_model
    parent = client.get_run(run.parent_run_id)
    if cfg.registry.model_files == "checkpoint":  # weights by content beside the checkpoint (perennial/model_files.py)
        files_prefix = model_files_prefix(cfg.storage.prefix, name, run.parent_run_id)
        source = model_files_uri(store.bucket, files_prefix)
    else:
        source = f"{parent.info.artifact_uri}/model"
    # The version is created after its files are committed: if it exists, they are there.
    if registry.version_of_run(client, name, run.parent_run_id) is None:
        local = fetch_dir(store, model_uri, run.services.cache_dir)
        cfg.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="mlflow-model-", dir=cfg.work_dir) as scratch:
            folder = save_mlflow_model(local, Path(scratch) / "model", summary.markdown, name=f"models:/{name}")
            if cfg.registry.model_files == "checkpoint":
                store.upload_dir(folder, files_prefix, meta={"registered_model": name, "checkpoint_uri": model_uri})
            else:
                client.log_artifacts(run.parent_run_id, str(folder), "model")
    tags = {
        "git_sha": _git_sha(),
        "config_digest": cfg.digest(),
        BASE_MODEL_TAG: base_model_name(cfg),
        BASE_MODEL_SOURCE_TAG: cfg.model.source,
        "tuning_method": cfg.cit.tuning.method,
        "cl_methods": ",".join(["replay"] * cfg.cit.replay.enabled + [m.name for m in cfg.cit.methods]) or "none",
        "checkpoint_uri": model_uri,
        "checkpoint_manifest": f"{model_uri}/MANIFEST.json",
        "run_key": run.run_key,
        **({MULTITASK_TAG: "true"} if cfg.cit.multitask else {}),
        **{f"dataset.{ref.name}": ref.digest for ref in data.all()},
    }
    # Where each scored task's test records came from, so the gates compare with the champion only on the same ones.
    tags.update({f"{registry.EVAL_SET_TAG}{ref.name}": ref.digest for ref in (plan.score if plan is not None else data.tasks)})
    if summary.lineage_uri:  # what a later retrain reads to continue this version (tasks/lineage.py)
        tags.update({
            LINEAGE_URI_TAG: summary.lineage_uri, LINEAGE_BASE_TAG: lineage_base(cfg), "task_history": summary.task_history,
            CONTINUED_FROM_TAG: str(plan.start.version) if plan and plan.start else "none",
            "trained_tasks": ",".join(task.name for task in plan.train) if plan else "",
        })
        if last_step is not None and last_step.replay_uri:
            tags[REPLAY_URI_TAG] = last_step.replay_uri
    # evaluate_stage logs drift/kl_mean at step = stage index; the run keeps the last stage's value.
    scored = plan.score if plan is not None else data.tasks
    metrics = registry.candidate_metrics(summary.tasks, summary.matrix, summary.metrics, parent.data.metrics.get("drift/kl_mean"),
                                         chance={ref.name: ref.chance for ref in scored}, start_row=summary.start_row)
    for task, scores in summary.general_tasks.items():  # each held-out task's two ends, beside its delta
        metrics[f"general/{_metric_name(task)}_base"] = scores["base"]
        metrics[f"general/{_metric_name(task)}_final"] = scores["final"]
    base_uri = parent.data.tags.get(BASE_MODEL_URI_TAG)
    if base_uri is None and plan is not None and plan.start is not None:  # a continued lineage ran no base-model stage
        base_uri = _version_tag(client, name, plan.start.version, BASE_MODEL_URI_TAG)
    if base_uri:
        tags[BASE_MODEL_URI_TAG] = base_uri
    champion = _judged_against(client, name, run.parent_run_id)
    samples = _samples(run, list(scored), data.heldout, base_uri, champion, model_uri)
    result = registry.register_version(
        client,
        name,
        source,
        metrics,
        cfg.registry.gates,
        auto_promote=cfg.registry.auto_promote,
        run_id=run.parent_run_id,
        tags=tags,
        description=page_summary(summary.markdown),
        by=f"auto-promote ({registry.whoami()})",
        samples=samples.model_dump() if samples else None,
        links=report_links(run.experiment_id, run.parent_run_id),
    )
    if samples is not None:
        _log_samples(run, samples, result["version"])
    # For `perennial status` and Prefect: which version this retrain registered, and its verdict.
    tracker.set_tags(run.parent_run_id, {registry.REGISTERED_VERSION_TAG: f"{name}/{result['version']}",
                                         registry.VERDICT_TAG: result["verdict_lines"][0]})
    run_logger().info("registered %s version %s: %s", name, result["version"], "\n".join(result["verdict_lines"]))
    return result


def _version_tag(client: MlflowClient, name: str, version, key: str) -> str | None:
    try:
        return client.get_model_version(name, str(version)).tags.get(key)
    except Exception:  # noqa: BLE001  (a version deleted since: the tag is only informative)
        return None


def _judged_against(client: MlflowClient, name: str, run_id: str):
    """The champion this retrain's version is (or will be) judged against: the one its gates recorded when the
    version exists (a rerun), else the current champion; None when there is none."""
    held = registry.version_of_run(client, name, run_id)
    against = held.tags.get(registry.GATES_AGAINST_TAG) if held is not None else None
    if against is None:
        return registry.alias_version(client, name, registry.CHAMPION)
    return None if against == "none" else registry._version_or_none(client, name, against)


def _samples(run: RunContext, tasks, heldout, base_uri: str | None, champion, model_uri: str) -> Samples | None:
    """Sample answers of the base model, the champion (when there is one) and the candidate; None when off, or
    when the probe set cannot be read (a warning says why: sample answers never fail a registration)."""
    models = [("base", base_uri)]
    if champion is not None:
        models.append(("champion", champion.tags.get("checkpoint_uri")))
    models.append(("candidate", model_uri))
    try:
        return sample_answers(run, tasks, heldout, models, champion_version=str(champion.version) if champion is not None else None)
    except Exception as error:  # noqa: BLE001
        run_logger().warning("no sample answers: %s: %s", type(error).__name__, error)
        return None


def _log_samples(run: RunContext, samples: Samples, version: int) -> None:
    """report/samples.json (what review reads) and report/samples.md (the same table as the version page)."""
    out = run.work_dir / "report-samples"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "samples.json").write_text(samples.model_dump_json(indent=2))
    (out / "samples.md").write_text("\n".join(registry.samples_markdown(samples.model_dump(), version, width=400)) + "\n")
    for path in sorted(out.iterdir()):
        run.tracker.log_artifact(run.parent_run_id, path, "report")
