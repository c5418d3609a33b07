"""Model registry workflow: quality gates, champion / challenger aliases, promotion and rollback.

Every retrain registers a new version of the lineage's registered model with alias `challenger`.
Its metrics are stored as version tags (`metric.<name>`) next to its lineage tags (datasets,
base model, config digest, checkpoint), so gates, review and rollback need no run lookups and keep
working after runs are deleted.

Gates compare the challenger with the version holding alias `champion`, and with the run's own
stage 0 (the base model before continual tuning) when there is no champion or it was scored on other
evaluation data. A version whose gates all pass is READY, else BLOCKED: the verdict opens the
version description, the parent run's description and `perennial review`. When every gate passes
and `registry.auto_promote` is on the challenger is promoted at once; otherwise it is tagged
`needs-review=true` with the failed gates, and a person decides with `perennial review` /
`perennial promote` / `perennial rollback`.

Aliases after a promotion: `champion` -> the new version, `previous-champion` -> the one it
replaced. A rollback moves `champion` back to `previous-champion`. Promotions and rollbacks of one
model take turns (`promotion_lock`), so each starts from the champion the one before it left.

Registration can be rerun (a Prefect retry, a rerun after a crash): the version of the run is
found again and whatever a first run would have done and has not (tags, description, aliases, the
promotion decision) is done; the result is read back from the registry.

MLflow only (no torch), so the CLI stays quick.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import random
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from perennial import markdown as md
from perennial.config import LOCATION_KEYS, GatesConfig
from perennial.locks import holder_is_gone, this_process

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"

METRIC_TAG = "metric."  # prefix of the version tags that hold metric values
DATASET_TAG = "dataset."  # prefix of the lineage tags that hold dataset digests
GATES_TAG = "gate_results"  # JSON list of GateResult, as evaluated at registration
GATES_AGAINST_TAG = "gates_against"  # the champion version the gates compared with ("none")
NEEDS_REVIEW_TAG = "needs-review"
FAILED_GATES_TAG = "failed_gates"
REVIEW_REASON_TAG = "needs_review_reason"  # why it was not promoted automatically
PREVIOUS_VERSION_TAG = "previous_champion_version"  # lets rollback walk back more than one step
# The latest decision on a version in one line (needs review and why, promoted by whom, superseded,
# rolled back, withdrawn). The MLflow UI lists a version's tags in code-point order in a box a few
# rows high: a capitalised key sorts before every lowercase one, so this is the first row.
DECISION_TAG = "Decision"
RUN_NOTE_TAG = "mlflow.note.content"  # a run's description in MLflow
# On a retrain's parent run, once its version is registered (tasks/register.py), for `perennial status`:
# NAME/VERSION, and the verdict's first line (READY / BLOCKED / NEEDS REVIEW and why).
REGISTERED_VERSION_TAG = "perennial.registered_version"
VERDICT_TAG = "perennial.verdict"

# Shown first in review; every other metric follows alphabetically.
HEADLINE_METRICS = ["final_mean", "ap", "aip", "bwt", "fwt", "forgetting_mean", "forgetting_max",
                    "general_ppl_final", "general_ppl_rel_change", "general_task_delta", "drift_kl_mean"]
LINEAGE_TAGS = ["base_model", "config_digest", "checkpoint_uri", "checkpoint_manifest", "tuning_method",
                "cl_methods", "git_sha", "run_key", "continued_from", "trained_tasks", "task_history"]
EVAL_SET_TAG = "eval_set."  # prefix of the tags naming the dataset version each scored task's test records came from
DECISION_TAGS = [DECISION_TAG, "promoted_by", "promoted_reason", "promoted_at", "overridden_gates", NEEDS_REVIEW_TAG, FAILED_GATES_TAG, REVIEW_REASON_TAG,
                 PREVIOUS_VERSION_TAG,
                 "superseded_by", "rolled_back_by", "rolled_back_reason", "rolled_back_at", "restored_from"]


class RegistryError(RuntimeError):
    """A registry action that cannot be done as asked; the message says why."""


@dataclass
class GateResult:
    name: str
    passed: bool | None  # None: not configured, or nothing it could check; shown as "—", never as a pass
    value: float | None
    threshold: float | None
    detail: str


def whoami() -> str:
    """Who acts, when --by is not given: $USER, else the login name."""
    try:
        return os.environ.get("USER") or getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


# --- who may change the champion (MLflow's basic-auth app) --------------------------------------------

# The MLflow permission that changing `champion` (promote, rollback, unpromote, auto-promotion) takes, on the
# registered model. EDIT is what a retrain needs to register versions; it does not let Perennial move `champion`.
CHAMPION_PERMISSION = "MANAGE"


class PermissionDenied(RegistryError):
    """The authenticated MLflow user lacks CHAMPION_PERMISSION on the registered model; nothing was changed."""

    def __init__(self, message: str, user: str = "", held: str = ""):
        super().__init__(message)
        self.user, self.held = user, held


def _registry_uri(client: MlflowClient) -> str:
    return getattr(client, "_registry_uri", None) or client._tracking_client.tracking_uri


def authorized_user(client: MlflowClient, name: str, action: str) -> str | None:
    """With MLflow's basic-auth app on: the username the request is authenticated as, once it is known to hold
    CHAMPION_PERMISSION on registered model ``name`` (admins hold every permission). None when the server has no
    auth app (anyone may act; decisions name $USER or --by).

    Asked before anything changes. Raises PermissionDenied naming the permission, the model and what the user
    holds; perennial.tracking.MlflowAuthError for missing or wrong credentials (one error, never retried).
    """
    from perennial.tracking import authenticated_user, resource_permission

    uri = _registry_uri(client)
    identity = authenticated_user(uri)
    if identity is None:
        return None
    user, is_admin = identity
    if is_admin:
        return user
    held = resource_permission(uri, user, "registered_model", name)
    if held != CHAMPION_PERMISSION:
        raise PermissionDenied(
            f"{action} refused: MLflow user {user!r} lacks {CHAMPION_PERMISSION} permission on registered model {name!r} "
            f"(holds {held}); changing which version is champion takes {CHAMPION_PERMISSION}. Nothing was changed: no "
            f"alias moved, no tag was written. A reviewer (MANAGE on {name!r}) can do it, or an admin grants it "
            f"(docs/operations.md, \"Running against a team's MLflow\")", user=user, held=held)
    return user


def acting_user(client: MlflowClient, name: str, action: str, by: str | None) -> str:
    """Who a decision on ``name`` is recorded under: with MLflow's auth app on, the authenticated user, checked to
    hold CHAMPION_PERMISSION (`authorized_user`; ``by`` may only repeat that name); without it ``by``, else $USER.

    Raises PermissionDenied, MlflowAuthError, or RegistryError when ``by`` names someone else under authentication.
    """
    user = authorized_user(client, name, action)
    if user is None:
        return by or whoami()
    if by is not None and by != user:
        raise RegistryError(f"{action} refused: --by {by!r}, but MLflow authenticates this request as {user!r}; with "
                            f"authentication on, a decision names the authenticated user. Drop --by, or act with "
                            f"{by!r}'s own credentials")
    return user


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- metrics ----------------------------------------------------------------------------------


def candidate_metrics(
    tasks: list[str],
    matrix: list[list[float | None]],
    metrics: dict[str, float | None],
    drift_kl_mean: float | None = None,
    chance: dict[str, float | None] | None = None,
    start_row: int = 0,
) -> dict[str, float]:
    """The flat metrics a version is judged by: the run's summary metrics, the final row per task
    (`final/<task>`), its mean (`final_mean`), the retrain's start row per task (`stage0/<task>`: row
    ``start_row``, the model before this retrain's continual tuning; row 0 unless it continued a
    lineage), each task's chance level where known (`chance/<task>`) and the final output-bias drift
    (`drift_kl_mean`, nats). Scores are accuracies in [0, 1]."""
    result = {key: float(value) for key, value in metrics.items() if value is not None}
    final = dict(zip(tasks, matrix[-1])) if matrix else {}
    scores = [score for score in final.values() if score is not None]
    result.update({f"final/{task}": float(score) for task, score in final.items() if score is not None})
    result.update({f"stage0/{task}": float(score) for task, score in zip(tasks, matrix[start_row] if matrix else []) if score is not None})
    result.update({f"chance/{task}": float(level) for task, level in (chance or {}).items() if level is not None})
    if scores:
        result["final_mean"] = sum(scores) / len(scores)
    if drift_kl_mean is not None:
        result["drift_kl_mean"] = float(drift_kl_mean)
    return result


def metrics_from_tags(tags: dict[str, str]) -> dict[str, float]:
    return {key[len(METRIC_TAG):]: float(value) for key, value in tags.items() if key.startswith(METRIC_TAG)}


def _per_task(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """`<prefix>/<task>` metrics by task: prefix "final", "stage0" or "chance"."""
    return {key[len(prefix) + 1:]: value for key, value in metrics.items() if key.startswith(prefix + "/")}


# --- gates ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judged:
    """What every gate reads: the thresholds, the challenger's and the champion's metrics (None: no
    champion) and the evaluation sets whose digests differ from the champion's."""

    gates: GatesConfig
    challenger: dict
    champion: dict | None
    changed: set[str] | frozenset[str]


Gate = Callable[[float, Judged], GateResult]
GATES: dict[str, Gate] = {}  # name (a GatesConfig field) -> check, in the order the results list them
# The threshold a gate applies, where it is not simply its own GatesConfig field.
THRESHOLDS: dict[str, Callable[[Judged], float | None]] = {}


def gate(name: str, threshold: Callable[[Judged], float | None] | None = None) -> Callable[[Gate], Gate]:
    """Register a gate: a function (threshold, judged) -> GateResult, run only when its threshold is set.

    Adding a gate is one such function and one GatesConfig field of the same name (None: off)."""
    def register(check: Gate) -> Gate:
        GATES[name] = check
        if threshold is not None:
            THRESHOLDS[name] = threshold
        return check
    return register


def evaluate_gates(
    gates: GatesConfig,
    challenger_metrics: dict,
    champion_metrics: dict | None,
    changed_eval_sets: set[str] | frozenset[str] = frozenset(),
) -> list[GateResult]:
    """Judge a challenger; one result per gate of GATES, in its order.

    Relative gates (per-task drop, general perplexity ratio) compare with the champion when there
    is one, on the evaluation sets both were scored on, and otherwise with the run's own stage 0
    (the base model before continual tuning; the perplexity ratio then has its own threshold,
    max_general_ppl_ratio_vs_base): `changed_eval_sets` names the datasets whose digests
    differ (tasks, or "general"); those are compared with stage 0 and named. The held-out
    general-task gate always compares with stage 0. An unconfigured gate has passed=None (shown
    "—"); so has the chance gate when no task has a known chance level, and `min_bwt` for a joint
    (cit.multitask) run, whose backward transfer is not defined. Any other configured gate whose
    metric is missing fails: a gate that cannot be checked must not wave a model through.
    """
    judged = Judged(gates, challenger_metrics, champion_metrics, changed_eval_sets)
    results = []
    for name, check in GATES.items():
        threshold = THRESHOLDS[name](judged) if name in THRESHOLDS else getattr(gates, name)
        results.append(GateResult(name, None, None, None, "not configured") if threshold is None else check(threshold, judged))
    return results


def _absolute(name: str, key: str, higher_is_better: bool, label: str) -> Gate:
    """A gate on one metric of the challenger against a fixed threshold."""
    def check(threshold: float, judged: Judged) -> GateResult:
        value = judged.challenger.get(key)
        if value is None:
            return GateResult(name, False, None, threshold, f"{label} ({key}) is missing: cannot check")
        passed = value >= threshold if higher_is_better else value <= threshold
        relation = ">=" if higher_is_better else "<="
        return GateResult(name, passed, value, threshold, f"{label} {value:.4f} (must be {relation} {threshold:g})")
    return check


gate("min_target_score")(_absolute("min_target_score", "final_mean", True, "mean final-row task score"))


@gate("min_bwt")
def _min_bwt(threshold: float, judged: Judged) -> GateResult:
    """Backward transfer's floor. A joint (multi-task) run trained no task before another, so it has no BWT to
    check: not checked ("—"), rather than failed as missing or passed as if it were 0; max_task_drop still
    checks each task against its reference."""
    if judged.challenger.get("bwt") is None and judged.challenger.get("multitask"):
        return GateResult("min_bwt", None, None, threshold, "backward transfer is not defined for a joint (multi-task) run: "
                          "every task trained in one stage, none before another")
    return _absolute("min_bwt", "bwt", True, "backward transfer")(threshold, judged)


@gate("max_task_drop")
def _max_task_drop(threshold: float, judged: Judged) -> GateResult:
    """Per-task drop: against the champion's final score where it was scored on the same data, else
    against stage 0, so a first version (or a changed evaluation set) is still checked."""
    final = _per_task(judged.challenger, "final")
    champion_final = _per_task(judged.champion or {}, "final")
    stage0 = _per_task(judged.challenger, "stage0")
    references = {}
    for task in final:
        if task in champion_final and task not in judged.changed:
            references[task] = (champion_final[task], "champion")
        elif task in stage0:
            references[task] = (stage0[task], "stage 0")
    changed = sorted(task for task in final if task in champion_final and task in judged.changed)
    note = f"; evaluation set changed since the champion, compared with stage 0: {', '.join(changed)}" if changed else ""
    if champion_final.keys() - final.keys():
        note += f"; champion tasks the challenger was not scored on: {', '.join(sorted(champion_final.keys() - final.keys()))}"
    if not references:
        return GateResult("max_task_drop", False, None, threshold, f"no task has a final and a reference score: cannot check{note}")
    drops = {task: reference - final[task] for task, (reference, _) in references.items()}
    worst = max(drops, key=drops.get)
    (reference, source), value = references[worst], drops[worst]
    return GateResult("max_task_drop", value <= threshold, value, threshold,
                      f"worst drop: {worst} {reference:.4f} ({source}) -> {final[worst]:.4f} "
                      f"(drop {value:+.4f}, must be <= {threshold:g}){note}")


@gate("min_chance_margin")
def _min_chance_margin(threshold: float, judged: Judged) -> GateResult:
    """Every task above its chance level by a margin: a score at chance is not a learned task, however
    the other gates look. Tasks of unknown chance (free generation) cannot be checked this way."""
    final = _per_task(judged.challenger, "final")
    chance = _per_task(judged.challenger, "chance")
    known = {task: final[task] - chance[task] for task in final if task in chance}
    unknown = sorted(final.keys() - chance.keys())
    note = f"; chance unknown, not checked: {', '.join(unknown)}" if unknown else ""
    if not known:
        return GateResult("min_chance_margin", None, None, threshold, f"no task has a known chance level{note}")
    below = sorted(task for task, margin in known.items() if margin < threshold)
    worst = min(known, key=known.get)
    shown = below or [worst]
    scores = ", ".join(f"{task} {final[task]:.4f} vs chance {chance[task]:.4f} ({known[task]:+.4f})" for task in shown)
    return GateResult("min_chance_margin", not below, known[worst], threshold,
                      f"{'below chance + ' + format(threshold, 'g') + ': ' if below else 'closest to chance: '}{scores}{note}")


def _ppl_reference(judged: Judged) -> tuple[float | None, str, float | None]:
    """General perplexity's reference, where it comes from, and the threshold that applies: the champion's
    on the same held-out general text, else stage 0's, each with its own threshold (fine-tuning moves a
    model further from its base than from a champion trained the same way)."""
    theirs = (judged.champion or {}).get("general_ppl_final")
    if judged.champion is not None and theirs and "general" not in judged.changed:
        return theirs, "champion", judged.gates.max_general_ppl_ratio
    source = "stage 0" + ("; general evaluation set changed since the champion" if judged.champion is not None else "")
    return judged.challenger.get("general_ppl_base"), source, judged.gates.max_general_ppl_ratio_vs_base


@gate("max_general_ppl_ratio", threshold=lambda judged: _ppl_reference(judged)[2])
def _max_general_ppl_ratio(threshold: float, judged: Judged) -> GateResult:
    mine = judged.challenger.get("general_ppl_final")
    reference, source, _ = _ppl_reference(judged)
    if mine is None or not reference:
        return GateResult("max_general_ppl_ratio", False, None, threshold,
                          f"general_ppl_final or the {source} perplexity is missing: cannot check")
    value = mine / reference
    return GateResult("max_general_ppl_ratio", value <= threshold, value, threshold,
                      f"general perplexity {reference:,.3f} ({source}) -> {mine:,.3f} (x{value:,.2f}, must be <= x{threshold:g})")


@gate("max_general_task_drop")
def _max_general_task_drop(threshold: float, judged: Judged) -> GateResult:
    """Held-out general tasks against the same run's stage 0 (the model before continual tuning), so the
    gate needs no champion and is not affected by a changed evaluation set. A run that scores no held-out
    task leaves it unchecked ("—", like the chance gate without a known chance): held-out tasks are a
    choice of the config, not a metric the run lost."""
    deltas = {key[len("general/"):-len("_delta")]: value for key, value in judged.challenger.items()
              if key.startswith("general/") and key.endswith("_delta") and value is not None}
    if not deltas:
        return GateResult("max_general_task_drop", None, None, threshold,
                          "the run scores no held-out general task: add one (a dataset with role: heldout, or "
                          "data.demo.heldout_tasks) for this gate to check what the model knew before")
    worst = min(deltas, key=deltas.get)
    value = -deltas[worst]
    return GateResult("max_general_task_drop", value <= threshold, value, threshold,
                      f"worst held-out general task vs stage 0: {worst} {deltas[worst]:+.4f} (drop must be <= {threshold:g})")


gate("max_output_drift_kl")(_absolute("max_output_drift_kl", "drift_kl_mean", False, "output drift KL(base‖final)"))


def failed(results: list[GateResult]) -> list[str]:
    """Names of the gates that failed (not those shown "—")."""
    return [result.name for result in results if result.passed is False]


READY, BLOCKED, NEEDS_REVIEW = "READY", "BLOCKED", "NEEDS REVIEW"


def verdict(results: list[GateResult], against: str, now: str | None = None) -> list[str]:
    """The verdict, the same words in the terminal, on the version page, in `perennial review` and in Prefect:
    BLOCKED (a gate failed), NEEDS REVIEW (every checked gate passed, but against a champion that is no longer
    the champion: ``now`` in words, e.g. "champion v3") or READY, first; then one line per failed gate saying
    why, with its value and threshold. ``against`` in words (e.g. "champion v3")."""
    failures = [r for r in results if r.passed is False]
    unchecked = [r.name for r in results if r.passed is None]
    rest = f"; not checked (—): {', '.join(unchecked)}" if unchecked else ""
    if failures:
        return [f"{BLOCKED}: {len(failures)} of {len(results)} gates fail against {against}: "
                f"{', '.join(r.name for r in failures)}{rest}", *(f"- {r.name}: {r.detail}" for r in failures)]
    passed = len(results) - len(unchecked)
    if now is not None and now != against:
        return [f"{NEEDS_REVIEW}: all {passed} checked gates pass against {against}, but the champion has changed since "
                f"(now: {now}): judge it against that before promoting{rest}"]
    return [f"{READY}: all {passed} checked gates pass against {against}{rest}"]


def verdict_word(lines: list[str]) -> str:
    """READY, BLOCKED or NEEDS REVIEW: the first word(s) of `verdict`'s first line."""
    return lines[0].split(":", 1)[0]


# --- versions and aliases ---------------------------------------------------------------------


def alias_version(client: MlflowClient, name: str, alias: str):
    """The version holding an alias, or None."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


# Version numbers are strings over REST but ints from a local store: compare them as str().


def _version_or_none(client: MlflowClient, name: str, version: int | str):
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        return None


def _get_version(client: MlflowClient, name: str, version: int | str):
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"{name} has no version {version}") from None


def _changed_eval_sets(challenger_tags: dict[str, str], champion_tags: dict[str, str]) -> set[str]:
    """Tasks and datasets whose evaluation data differs between two versions (a missing tag is not a
    difference): per task the dataset version its test records came from (`eval_set.<task>`), where
    both versions record it (a dataset holding several tasks, or a lineage's earlier tasks, changes
    version without changing them), else the dataset's digest (`dataset.<name>`; "general" too)."""
    changed = set()
    for key, digest in challenger_tags.items():
        if key.startswith(EVAL_SET_TAG) and key in champion_tags and champion_tags[key] != digest:
            changed.add(key[len(EVAL_SET_TAG):])
        if key.startswith(DATASET_TAG) and key in champion_tags and champion_tags[key] != digest:
            name = key[len(DATASET_TAG):]
            if f"{EVAL_SET_TAG}{name}" not in challenger_tags or f"{EVAL_SET_TAG}{name}" not in champion_tags:
                changed.add(name)
    return changed


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _result_word(passed: bool | None) -> str:
    return "—" if passed is None else "PASS" if passed else "FAIL"


def stored_gates(tag: str) -> list[GateResult]:
    """Gate results from tag gate_results. Versions registered before unconfigured gates had
    passed=None stored them as passes with detail "not configured"; they read back as "—"."""
    results = [GateResult(**result) for result in json.loads(tag)]
    for result in results:
        if result.detail == "not configured":
            result.passed = None
    return results


def task_rows(metrics: dict[str, float]) -> list[list[str]]:
    """Per task: name, chance ("—" when unknown), stage-0 score, final score, change stage 0 -> final."""
    final, stage0, chance = (_per_task(metrics, prefix) for prefix in ("final", "stage0", "chance"))
    rows = []
    for task in sorted(final.keys() | stage0.keys()):
        before, after = stage0.get(task), final.get(task)
        change = "—" if before is None or after is None else f"{after - before:+.4f}"
        rows.append([task, _fmt(chance.get(task)), _fmt(before), _fmt(after), change])
    return rows


TASK_HEADER = ["task", "chance", "stage 0", "final", "change"]


# --- what the version page and review show --------------------------------------------------------

PAGE_LIMIT = 5000  # characters: MLflow's limit on a model version's description
SAMPLES_BUDGET = 1500  # characters of the page for the sample answers (the rest are in report/samples.md)
# The MLflow UI's own "Promote model" button copies a version into another registered model; it moves no alias.
PROMOTE_BUTTON = ("MLflow's own *Promote model* button copies this version into another registered model: it does "
                  "not make it the champion.")


def heldout_rows(metrics: dict[str, float], results: list[GateResult]) -> list[list[str]]:
    """General ability, shown beside the verdict: each held-out task (stage 0, final, change), general perplexity
    and output drift, each with its gate's result and threshold."""
    gates = {result.name: result for result in results}

    def gate(name: str, relation: str) -> str:
        result = gates.get(name)
        if result is None or result.threshold is None:
            return "—"
        return f"{_result_word(result.passed)} ({relation}{result.threshold:g})"

    rows = []
    for key in sorted(k for k in metrics if k.startswith("general/") and k.endswith("_delta")):
        task = key[len("general/"):-len("_delta")]
        rows.append([f"{task} (held-out task)", _fmt(metrics.get(f"general/{task}_base")), _fmt(metrics.get(f"general/{task}_final")),
                     f"{metrics[key]:+.4f}", gate("max_general_task_drop", "drop ≤ ")])
    base, final = metrics.get("general_ppl_base"), metrics.get("general_ppl_final")
    if final is not None:
        ratio = f"×{final / base:.2f}" if base else "—"
        rows.append(["general perplexity", _fmt(base), _fmt(final), ratio, gate("max_general_ppl_ratio", "ratio ≤ ×")])
    if metrics.get("drift_kl_mean") is not None:
        rows.append(["output drift KL(stage 0 ‖ final), nats", "0", _fmt(metrics["drift_kl_mean"]), "—",
                     gate("max_output_drift_kl", "≤ ")])
    return rows


HELDOUT_HEADER = ["general ability", "stage 0", "final", "change", "gate"]


def changes(client: MlflowClient, champion, tags: dict[str, str], metrics: dict[str, float], run_id: str | None) -> dict:
    """What changed since ``champion`` (a model version): the config keys that differ between the two retrains'
    recorded configs (their parent runs' params; where services and scratch files are is left out), the datasets
    and evaluation sets that are new or have another version (tags dataset.* and eval_set.*), and per task
    (trained and held out) the champion's and the candidate's final score. JSON-ready."""
    config, note = [], None
    try:
        old = client.get_run(champion.run_id).data.params if champion.run_id else None
        new = client.get_run(run_id).data.params if run_id else None
    except MlflowException as error:
        old = new = None
        note = f"a run's recorded config is unreadable ({error.error_code})"
    if old is not None and new is not None:
        skip = set(LOCATION_KEYS)
        config = [[key, old.get(key), new.get(key)] for key in sorted(old.keys() | new.keys())
                  if key not in skip and old.get(key) != new.get(key)]
    elif note is None:
        note = "a version has no retrain run: configs not compared"
    keys = sorted({key for key in (*champion.tags, *tags) if key.startswith((DATASET_TAG, EVAL_SET_TAG))})
    datasets = [[key, champion.tags.get(key), tags.get(key)] for key in keys if champion.tags.get(key) != tags.get(key)]
    theirs = metrics_from_tags(champion.tags)
    scores = []
    for prefix, suffix, label in (("final/", "", ""), ("general/", "_final", " (held-out)")):
        names = {key[len(prefix):len(key) - len(suffix)] for m in (theirs, metrics) for key in m
                 if key.startswith(prefix) and key.endswith(suffix) and (suffix or "/" not in key[len(prefix):])}
        for task in sorted(names):
            a, b = theirs.get(f"{prefix}{task}{suffix}"), metrics.get(f"{prefix}{task}{suffix}")
            scores.append([f"{task}{label}", a, b, None if a is None or b is None else b - a])
    return {"champion": str(champion.version), "config": config, "datasets": datasets, "scores": scores, "note": note}


def _short(value: str | None, width: int = 40) -> str:
    if value is None:
        return "(none)"
    return value if len(value) <= width else value[: width - 1] + "…"


def changes_lines(change: dict) -> list[str]:
    """`changes` as text lines (review): config `key: old -> new`, datasets, then the per-task table."""
    lines = [f"What changed since champion v{change['champion']}"]
    if change.get("note"):
        lines.append(f"  config: {change['note']}")
    lines += ([f"  config {key}: {_short(old)} -> {_short(new)}" for key, old, new in change["config"]]
              or ["  config: no key differs"])
    lines += ([f"  {key}: {_short(old, 16)} -> {_short(new, 16)}{' (new)' if old is None else ''}" for key, old, new in change["datasets"]]
              or ["  datasets: the same versions"])
    rows = [[task, _fmt(a), _fmt(b), "—" if d is None else f"{d:+.4f}"] for task, a, b, d in change["scores"]]
    if rows:
        lines += _table(["task", f"champion v{change['champion']}", "candidate", "change"], rows)
    return lines


def changes_markdown(change: dict, candidate: str, chance: dict[str, float], stage0: dict[str, float]) -> list[str]:
    """`changes` on the version page: config and datasets as `key: old -> new` lines, then one table of every
    task: chance, stage 0, champion, candidate, change."""
    lines = [f"**What changed since champion v{change['champion']}**", ""]
    if change.get("note"):
        lines.append(f"- config: {md.text(change['note'])}")
    lines += ([f"- `{key}`: {md.cell(old, 40)} → {md.cell(new, 40)}" for key, old, new in change["config"]] or ["- config: no key differs"])
    lines += ([f"- `{key}`: {md.cell(_short(old, 16))} → {md.cell(_short(new, 16))}" for key, old, new in change["datasets"]]
              or ["- datasets: the same versions"])
    rows = [[md.cell(task), _fmt(chance.get(task)), _fmt(stage0.get(task)), _fmt(a), _fmt(b), "—" if d is None else f"{d:+.4f}"]
            for task, a, b, d in change["scores"]]
    return [*lines, "", *md.table(["task", "chance", "stage 0", f"champion v{change['champion']}", candidate, "change"], rows,
                                  ["l", "r", "r", "r", "r", "r"])]


def sample_columns(samples: dict, version: int | str | None = None) -> list[str]:
    """The answer columns' headers: base, champion vN, candidate vM."""
    names = []
    for column in samples.get("columns", []):
        label = column["label"]
        if label == "champion" and samples.get("champion_version"):
            label = f"champion v{samples['champion_version']}"
        elif label == "candidate" and version is not None:
            label = f"candidate v{version}"
        names.append(label)
    return names


def samples_markdown(samples: dict, version: int | str | None = None, width: int = 48, budget: int | None = None) -> list[str]:
    """Sample answers as a table: prompt (with its task), reference, then each model's greedy answer, all escaped.
    Within ``budget`` characters (the version page's share), rows are kept one per task first, then the rest, and
    the table says how many more report/samples.md holds."""
    names = sample_columns(samples, version)
    rows = []
    for index, probe in enumerate(samples["probes"]):
        prompt = f"{md.cell(probe['group'])}: {md.cell(_prompt_text(probe['prompt']), width)}"
        rows.append([prompt, md.cell(probe.get("reference"), 24),
                     *(md.cell(column["answers"][index], width) for column in samples["columns"])])
    head = [f"**What the model says** (greedy, at most {samples.get('max_new_tokens', '?')} new tokens, with the scorer's "
            f"rendering)", ""]
    if samples.get("error"):
        head += [f"Not shown: {md.text(samples['error'])}", ""]
    kept = list(range(len(rows)))
    if budget is not None:
        groups = [probe["group"] for probe in samples["probes"]]
        firsts = [i for i, group in enumerate(groups) if group not in groups[:i]]
        kept, size = [], sum(len(line) + 1 for line in [*head, *md.table(["prompt", "reference", *names], [])]) + 80
        for i in firsts + [i for i in range(len(rows)) if i not in firsts]:
            cost = len(md.table(["x"], [rows[i]])[-1]) + 1
            if size + cost <= budget:
                kept.append(i)
                size += cost
        kept.sort()
    table = md.table(["prompt", "reference", *names], [rows[i] for i in kept])
    more = len(rows) - len(kept)
    tail = [f"{more} more in the run's report/samples.md"] if more else []
    return [*head, *table, *(["", *tail] if tail else [])]


def samples_lines(samples: dict, version: int | str | None = None) -> list[str]:
    """Sample answers for a terminal: per prompt, its reference and one line per model."""
    names = sample_columns(samples, version)
    width = max([len(name) for name in names] + [9])
    lines = [f"Sample answers (greedy, at most {samples.get('max_new_tokens', '?')} new tokens, as scored)"]
    if samples.get("error"):
        lines.append(f"  not shown: {samples['error']}")
    for index, probe in enumerate(samples["probes"]):
        reference = f"   (reference: {probe['reference']!r})" if probe.get("reference") is not None else ""
        lines.append(f"  [{probe['group']}] {_prompt_text(probe['prompt'])!r}{reference}")
        lines += [f"    {name:<{width}s}  {' '.join(column['answers'][index].split())!r}" for name, column in zip(names, samples["columns"])]
    return lines


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [turn.get("content", "") for turn in prompt if turn.get("role") == "user"]
    return ("… " if len(prompt) > 1 else "") + (users[-1] if users else "")


def promote_hint(name: str, version: int | str | None, blocked: bool) -> list[str]:
    """How to promote: the command (with --reason required over failed gates), and what MLflow's button does instead."""
    number = version if version is not None else "VERSION"
    why = " (BLOCKED: overriding failed gates requires `--reason`, recorded with the promotion)" if blocked else ""
    return [f"**To promote:** `perennial promote {name} {number} --reason '...'`{why}; `perennial review {name}` compares it "
            f"with the champion. {PROMOTE_BUTTON}"]


def describe(metrics: dict[str, float], results: list[GateResult], against: str, extra: str = "", *, name: str | None = None,
             version: int | str | None = None, change: dict | None = None, samples: dict | None = None, links: str = "") -> str:
    """Version and parent-run description (markdown), what a reviewer decides from, in this order: the verdict
    (READY / BLOCKED and why, each failed gate with its value and threshold), the held-out tasks and general
    ability, how to promote, the sample answers (base, champion, candidate), what changed since the champion
    (config, datasets, every task's score: chance, stage 0, champion, candidate, change), the gates, the headline
    metrics (once), ``links`` to the report, then ``extra`` (the run's summary). Kept within MLflow's 5000
    characters: a section that does not fit is left out with a line saying where it is."""
    lines = verdict(results, against)
    # (priority, title, lines) in page order; the most important sections are kept first when space is short.
    sections = [(0, "verdict", [f"**{lines[0]}**", *lines[1:]])]
    general = heldout_rows(metrics, results)
    if general:
        sections.append((1, "general ability", md.table(HELDOUT_HEADER, general, ["l", "r", "r", "r", "l"])))
    if name:
        sections.append((2, "how to promote", promote_hint(name, version, bool(failed(results)))))
    if samples and samples.get("probes"):
        sections.append((4, "sample answers", samples_markdown(samples, version, budget=SAMPLES_BUDGET)))
    candidate = f"candidate v{version}" if version is not None else "candidate"
    chance, stage0 = _per_task(metrics, "chance"), _per_task(metrics, "stage0")
    if change is not None:
        sections.append((3, "what changed since the champion", changes_markdown(change, candidate, chance, stage0)))
    else:
        rows = [[md.cell(task), _fmt(chance.get(task)), _fmt(stage0.get(task)), _fmt(final), "—" if stage0.get(task) is None
                 else f"{final - stage0[task]:+.4f}"] for task, final in sorted(_per_task(metrics, "final").items())]
        sections.append((3, "tasks", ["**Tasks** (no champion to compare with: change from stage 0)", "",
                                      *md.table(["task", "chance", "stage 0", candidate, "change"], rows, ["l", "r", "r", "r", "r"])]))
    # Compact: a failed gate's detail is in the verdict above, every detail in `perennial review`.
    sections.append((3, "gates", [f"**Gates** (against {against}; details: `perennial review {name or 'NAME'}`)", "",
                                  *md.table(["gate", "result", "value", "threshold"],
                                            [[r.name, _result_word(r.passed), _fmt(r.value), _fmt(r.threshold)] for r in results],
                                            ["l", "l", "r", "r"])]))
    headline = [key for key in HEADLINE_METRICS if key in metrics]
    if headline:
        sections.append((7, "metrics", ["**Metrics**", "", *md.table(["metric", "value"], [[key, f"{metrics[key]:.4f}"] for key in headline],
                                                                      ["l", "r"])]))
    if links:
        sections.append((3, "report links", [links]))
    if extra:
        sections.append((8, "the run's summary", [extra]))
    blocks = {title: "\n".join(section) for _, title, section in sections}
    chosen, size = set(), 0
    for _, title, _ in sorted(sections, key=lambda entry: entry[0]):
        if not chosen or size + 2 + len(blocks[title]) <= PAGE_LIMIT - 250:
            chosen.add(title)
            size += 2 + len(blocks[title])
    text = "\n\n".join(blocks[title] for _, title, _ in sections if title in chosen)
    left_out = [title for _, title, _ in sections if title not in chosen]
    if left_out:
        text += "\n\n" + md.text(f"Not shown here (MLflow keeps {PAGE_LIMIT} characters): {', '.join(left_out)}; "
                                   "the run's report folder has everything.")
    return text[:PAGE_LIMIT]


def _metric_order(*metric_dicts: dict) -> list[str]:
    """Headline metrics first, then the rest alphabetically; stage-0 scores and chance levels are
    left to the task table."""
    keys = {key for key in set().union(*metric_dicts) if not key.startswith(("stage0/", "chance/"))}
    return [key for key in HEADLINE_METRICS if key in keys] + sorted(keys - set(HEADLINE_METRICS))


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="Perennial continual-retraining lineage")
        except MlflowException:  # created by a concurrent register between the two calls
            client.get_registered_model(name)


def version_of_run(client: MlflowClient, name: str, run_id: str):
    """The version registered from a run (the newest, if several), or None."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def registered(client: MlflowClient, name: str, version: int | str) -> dict:
    """What the registry holds for a version, read back: name, version, alias (`challenger` or None),
    aliases, source, gates (list of dicts), promoted (it holds `champion`), needs_review, review_reason.

    Raises RegistryError when there is no such version.
    """
    held = _get_version(client, name, version)
    aliases = sorted(held.aliases)
    lines = version_verdict(client, name, held)
    return {
        "name": name,
        "version": int(held.version),
        "alias": CHALLENGER if CHALLENGER in aliases else None,
        "aliases": aliases,
        "source": held.source,
        "gates": json.loads(held.tags.get(GATES_TAG, "[]")),
        "promoted": CHAMPION in aliases,
        "needs_review": held.tags.get(NEEDS_REVIEW_TAG) == "true",
        "review_reason": held.tags.get(REVIEW_REASON_TAG),
        "verdict": verdict_word(lines),  # READY, BLOCKED or NEEDS REVIEW
        "verdict_lines": lines,  # the verdict, then one line per failed gate (value and threshold)
    }


def version_verdict(client: MlflowClient, name: str, version) -> list[str]:
    """A version's verdict lines (`verdict`) from its stored gate results, against the champion it was judged
    against; NEEDS REVIEW when the gates passed and another version is the champion now (not itself)."""
    results = stored_gates(version.tags.get(GATES_TAG, "[]"))
    against = version.tags.get(GATES_AGAINST_TAG, "none")
    current = alias_version(client, name, CHAMPION)
    holder = "none" if current is None else str(current.version)
    now = None if holder in (against, str(version.version)) else _against(holder)
    return verdict(results, _against(against), now)


def _against(version: str) -> str:
    """A gates_against value ("none" or a version number) in words."""
    return "no champion" if version == "none" else f"champion v{version}"


def _review_tags(reason: str, failures: list[str] | None = None) -> dict[str, str]:
    tags = {NEEDS_REVIEW_TAG: "true", REVIEW_REASON_TAG: reason, DECISION_TAG: f"needs review: {reason}"}
    if failures:
        tags[FAILED_GATES_TAG] = ",".join(failures)
    return tags


def register_version(
    client: MlflowClient,
    name: str,
    source: str,
    metrics: dict[str, float],
    gates: GatesConfig,
    auto_promote: bool = False,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    description: str = "",
    by: str = "auto-promote",
    samples: dict | None = None,
    links: str = "",
) -> dict:
    """Register a version with alias `challenger`, judge it against the champion, promote or flag it.

    Its description (`describe`) opens with the verdict, then ``samples`` (tasks/samples.py: the base
    model's, the champion's and this version's answers), what changed since the champion it was judged
    against (`changes`), ``links`` to the run's report and ``description`` (the run's summary).

    Safe to rerun for the same run_id (a retry, or a rerun after a crash between any two steps): the
    run's version is found again and only what is missing is done: tags and description it lacks,
    alias `challenger` (unless a newer version holds it), and the decision. The gates are judged
    once, when the version is created, against the champion of that moment; auto-promotion then
    happens only if that is still the champion (under `promotion_lock`). If a promotion or rollback
    moved it meanwhile, the version stays challenger, tagged needs-review with the reason.

    Returns `registered(...)`: what the registry holds afterwards, read back.
    Raises RegistryError when another promotion holds the lock past its timeout; MlflowException
    from the server.
    """
    ensure_registered_model(client, name)
    version = version_of_run(client, name, run_id) if run_id else None
    held = dict(version.tags) if version is not None else {}
    if GATES_TAG in held:  # judged when the version was created: a rerun keeps that judgement
        results = stored_gates(held[GATES_TAG])
        against = held.get(GATES_AGAINST_TAG, "none")
        champion = None if against == "none" else _version_or_none(client, name, against)
    else:
        champion = alias_version(client, name, CHAMPION)
        champion_metrics = metrics_from_tags(champion.tags) if champion is not None else None
        changed = _changed_eval_sets(tags or {}, champion.tags) if champion is not None else set()
        results = evaluate_gates(gates, metrics, champion_metrics, changed)
        against = str(champion.version) if champion is not None else "none"
    change = changes(client, champion, tags or {}, metrics, run_id) if champion is not None else None
    tags = {
        **(tags or {}),
        **{f"{METRIC_TAG}{key}": repr(float(value)) for key, value in metrics.items()},
        GATES_TAG: json.dumps([asdict(result) for result in results]),
        GATES_AGAINST_TAG: against,
    }
    failures = failed(results)
    if failures:
        review = _review_tags(f"failed gates: {', '.join(failures)}", failures)
    elif not auto_promote:
        review = _review_tags("registry.auto_promote is off: a person decides")
    else:
        review = {}
    page = lambda number: describe(metrics, results, _against(against), description, name=name, version=number,  # noqa: E731
                                   change=change, samples=samples, links=links)
    if version is None:
        # A decision known before the version exists goes in with it (each MLflow call is a round trip). The
        # description names the version's number (the promote command), known once it exists.
        tags.update(review)
        version = client.create_model_version(name, source, run_id=run_id, tags=tags)
    else:
        for key, value in tags.items():
            if key not in held:
                client.set_model_version_tag(name, version.version, key, value)
    text = page(version.version)
    if not version.description:
        client.update_model_version(name, version.version, description=text)
    if run_id:  # the run's description (MLflow shows this tag as it) opens with the same verdict
        client.set_tag(run_id, RUN_NOTE_TAG, text)
    number = str(version.version)
    held = {**tags, **held}
    challenger = alias_version(client, name, CHALLENGER)
    if challenger is None or int(challenger.version) < int(number):  # a rerun of an older retrain leaves a newer one's alias
        client.set_registered_model_alias(name, CHALLENGER, number)
    if NEEDS_REVIEW_TAG not in held and "promoted_at" not in held:  # not decided yet
        if review:
            for key, value in review.items():
                client.set_model_version_tag(name, number, key, value)
        else:
            _auto_promote(client, name, number, against, by, sum(result.passed is True for result in results))
    return registered(client, name, number)


def _auto_promote(client: MlflowClient, name: str, version: str, against: str, by: str, gate_count: int) -> None:
    """Promote a version whose `gate_count` checked gates all passed, if the champion is still
    `against` (the version the gates compared with, or "none"); else tag it needs-review with the reason.

    With MLflow's auth app on, the authenticated user must hold CHAMPION_PERMISSION on the model (the retrain
    identity holds EDIT unless an admin granted it more): without it the version is tagged needs-review, naming the
    user and the permission, and waits for a reviewer; with it the promotion records that user.

    Raises RegistryError when another promotion holds the lock past its timeout.
    """
    try:
        user = authorized_user(client, name, "auto-promotion")
    except PermissionDenied as error:
        reason = (f"auto-promotion refused: registry.auto_promote is on, but MLflow user {error.user!r} lacks "
                  f"{CHAMPION_PERMISSION} permission on registered model {name!r} (holds {error.held}); a reviewer decides")
        for key, value in _review_tags(reason).items():
            client.set_model_version_tag(name, version, key, value)
        return
    if user is not None:
        by = f"auto-promote ({user})"
    with promotion_lock(client, name, by):
        current = alias_version(client, name, CHAMPION)
        holder = str(current.version) if current is not None else "none"
        if holder == version:  # the alias moved, then the run was interrupted before promoted_at
            client.set_model_version_tag(name, version, "promoted_at", _now())
        elif holder != against:  # promoting would silently replace a champion nobody judged it against
            reason = (f"auto-promotion refused: the gates compared with {_against(against)}, but the champion is now "
                      f"{_against(holder)} (promoted or rolled back since); judge it against that one before promoting")
            for key, value in _review_tags(reason).items():
                client.set_model_version_tag(name, version, key, value)
        else:
            tags = {"promoted_by": by, "promoted_reason": f"auto-promotion: all {gate_count} checked gates passed against {_against(against)}"}
            _promote(client, name, version, tags, current)


def _promote(client: MlflowClient, name: str, version: str, tags: dict[str, str], current) -> None:
    """`champion` -> version and `previous-champion` -> current (the champion read under the
    promotion lock), with the promotion record `tags` on the version.

    promoted_at is written last, so a version that has it has held `champion`: a rerun of its
    retrain never promotes it again, even after it was superseded or rolled back.
    """
    over = f" over failed gates {tags['overridden_gates'].replace(',', ', ')}" if tags.get("overridden_gates") else ""
    tags = {**tags, DECISION_TAG: f"champion: promoted by {tags['promoted_by']}{over}: {tags['promoted_reason']}"}
    if current is not None:
        tags = {**tags, PREVIOUS_VERSION_TAG: str(current.version)}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current.version)
        for key, value in {"superseded_by": str(version), DECISION_TAG: f"superseded by v{version} (previous-champion)"}.items():
            client.set_model_version_tag(name, current.version, key, value)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promoted_at", _now())


NO_REASON = "(no reason given)"


def blocked_gates(version) -> list[GateResult]:
    """The gates a version failed at registration (its stored gate results)."""
    return [result for result in stored_gates(version.tags.get(GATES_TAG, "[]")) if result.passed is False]


def promote(client: MlflowClient, name: str, version: int | str, by: str | None = None, reason: str | None = None) -> dict:
    """Make `version` the champion, recording who, why and when; the replaced champion keeps alias
    `previous-champion`. Concurrent promotions take turns (`promotion_lock`), so each one's previous
    champion is the one promoted before it and none is lost.

    Promoting a BLOCKED version overrides its failed gates: that takes a ``reason`` (recorded, with the
    overridden gates in tag `overridden_gates` and in the Decision). Without one it is refused.

    ``by`` is who decides (default $USER); with MLflow's auth app on it is the authenticated user, who must hold
    CHAMPION_PERMISSION on the model, checked before anything changes (`acting_user`).

    Raises RegistryError: no such version, it is already the champion, it is BLOCKED and no reason is given,
    or another promotion holds the lock past its timeout; PermissionDenied: the authenticated user lacks
    CHAMPION_PERMISSION (nothing changed).
    """
    by = acting_user(client, name, "promote", by)
    target = _get_version(client, name, version)
    if CHAMPION in target.aliases:
        raise RegistryError(f"{name} version {target.version} is already the champion")
    failures = blocked_gates(target)
    given = bool(reason and reason.strip() and reason != NO_REASON)
    if failures and not given:
        raise RegistryError(
            f"{name} v{target.version} is BLOCKED: {len(failures)} gate(s) failed: "
            + "; ".join(f"{r.name} {_fmt(r.value)} (threshold {_fmt(r.threshold)})" for r in failures)
            + f". Promoting it overrides them: say why with --reason '...' (recorded with the promotion), e.g. "
            f"`perennial promote {name} {target.version} --reason 'the eval set was relabelled'`")
    tags = {"promoted_by": by, "promoted_reason": reason if given else NO_REASON}
    if failures:
        tags["overridden_gates"] = ",".join(r.name for r in failures)
    if target.tags.get(NEEDS_REVIEW_TAG) == "true":
        tags[NEEDS_REVIEW_TAG] = "false"  # reviewed; failed_gates stays as the record of what was overridden
    with promotion_lock(client, name, by):
        current = alias_version(client, name, CHAMPION)
        if current is not None and current.version == target.version:
            raise RegistryError(f"{name} version {target.version} is already the champion")
        _promote(client, name, target.version, tags, current)
    return {"name": name, "champion": int(target.version), "previous_champion": int(current.version) if current else None,
            "overridden": [asdict(r) for r in failures]}


def rollback(client: MlflowClient, name: str, by: str | None, reason: str) -> dict:
    """Give `champion` back to `previous-champion`; the demoted version is tagged with who and why.
    Who: as `promote` (with MLflow's auth app on, the authenticated user, checked first).

    Raises RegistryError: there is no previous-champion, or another promotion holds the lock past
    its timeout; PermissionDenied as `promote`.
    """
    by = acting_user(client, name, "rollback", by)
    with promotion_lock(client, name, by):
        previous = alias_version(client, name, PREVIOUS)
        current = alias_version(client, name, CHAMPION)
        if previous is None:
            withdraw = (f"; to withdraw champion v{current.version} and leave no champion, run "
                        f"`perennial unpromote {name} --reason '...'`" if current is not None else "")
            raise RegistryError(f"{name} has no {PREVIOUS} alias: nothing to roll back to{withdraw}")
        when = _now()
        if current is not None:
            for key, value in {"rolled_back_by": by, "rolled_back_reason": reason, "rolled_back_at": when,
                               DECISION_TAG: f"rolled back by {by}: {reason}"}.items():
                client.set_model_version_tag(name, current.version, key, value)
        client.set_registered_model_alias(name, CHAMPION, previous.version)
        # who and why are on the demoted version; the restored one's own promotion record stays
        restored = {DECISION_TAG: f"champion again: rollback by {by}"}
        if current is not None:
            restored["restored_from"] = str(current.version)
        for key, value in restored.items():
            client.set_model_version_tag(name, previous.version, key, value)
        # The demoted version must not become the rollback target (a second rollback would re-promote
        # it); step back to whatever the restored champion itself replaced, if anything.
        older = previous.tags.get(PREVIOUS_VERSION_TAG)
        if older and current is not None and older != str(current.version):
            client.set_registered_model_alias(name, PREVIOUS, older)
        else:
            client.delete_registered_model_alias(name, PREVIOUS)
    return {"name": name, "champion": int(previous.version), "demoted": int(current.version) if current else None}


def unpromote(client: MlflowClient, name: str, by: str | None, reason: str) -> dict:
    """Withdraw a champion that has no predecessor (a first champion, which rollback cannot replace):
    alias `champion` is deleted and the version is tagged with who, why and when.

    Who: as `promote` (with MLflow's auth app on, the authenticated user, checked first).

    Raises RegistryError: there is no champion, there is a previous-champion (rollback restores it
    instead), or another promotion holds the lock past its timeout; PermissionDenied as `promote`.
    """
    by = acting_user(client, name, "unpromote", by)
    with promotion_lock(client, name, by):
        current = alias_version(client, name, CHAMPION)
        if current is None:
            raise RegistryError(f"{name} has no champion: nothing to unpromote")
        if alias_version(client, name, PREVIOUS) is not None:
            raise RegistryError(f"{name} has a {PREVIOUS}: run `perennial rollback {name}` to give it the champion alias back")
        for key, value in {"unpromoted_by": by, "unpromoted_reason": reason, "unpromoted_at": _now(),
                           DECISION_TAG: f"champion withdrawn by {by}: {reason}"}.items():
            client.set_model_version_tag(name, current.version, key, value)
        client.delete_registered_model_alias(name, CHAMPION)
    return {"name": name, "unpromoted": int(current.version)}


# --- one promotion per model at a time ----------------------------------------------------------

PROMOTION_LOCK_SUFFIX = ".promotion-lock"
LOCK_STALE_SECONDS = 600  # far beyond a promotion's few calls: only a crashed holder's lock gets this old


def promotion_lock_name(registered_model: str) -> str:
    return f"{registered_model}{PROMOTION_LOCK_SUFFIX}"


@contextmanager
def promotion_lock(client: MlflowClient, name: str, by: str, timeout_seconds: float = 120.0) -> Iterator[None]:
    """Hold the model's promotion lock while `champion` / `previous-champion` move.

    The lock is a registered model `<name>.promotion-lock` that exists while it is held. MLflow
    stores a registered model name once (a unique key in its database), so of concurrent promoters
    exactly one creates it; the others wait until the holder deletes it. It lives on the tracking
    server that every promoter already uses, so `perennial promote` needs no Prefect API and still
    takes turns with a retrain's auto-promotion.

    A lock whose holder died is set aside by renaming it to `<lock>.stale-<token>` (a rename, like a
    create, succeeds once, so two waiters cannot both break it), which stays as the record: at once
    when the holder was a process of this machine that no longer exists (its host, boot, pid and
    process start time are on the lock, as on the lineage lock: perennial.locks.holder_is_gone), and
    LOCK_STALE_SECONDS after it was taken when the holder ran elsewhere. A waiter says who holds it.

    Raises RegistryError, naming the holder, when the lock is still held after timeout_seconds.
    """
    lock = promotion_lock_name(name)
    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout_seconds
    told = 0.0  # when the waiter last said who holds the lock
    holder_tags = {key: str(value) for key, value in this_process().items()}
    while True:
        try:
            client.create_registered_model(lock, tags={"token": token, "holder": by, **holder_tags},
                                           description=f"Perennial: a promotion of {name} by {by} is in progress")
            break
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
        except MlflowException:  # released between the two calls
            continue
        if held.tags.get("token") == token:  # our create went through; its reply was lost and the client retried
            break
        age = time.time() - held.creation_timestamp / 1000
        holder = _lock_holder(held.tags, age)
        dead = "pid" in held.tags and holder_is_gone(held.tags)
        if dead or age > LOCK_STALE_SECONDS:
            try:
                client.rename_registered_model(lock, f"{lock}.stale-{held.tags.get('token', 'unknown')}")
                log.warning("%s: set aside the promotion lock of %s, %s", name, holder,
                            "whose process is gone" if dead else f"older than {LOCK_STALE_SECONDS} s")
            except MlflowException:  # another waiter set it aside first
                pass
            continue
        if time.monotonic() > deadline:
            raise RegistryError(f"{name}: another promotion or rollback ({holder}) still holds registered model {lock}; "
                                f"retry later. If no promotion is running, delete that registered model, or wait: it is "
                                f"set aside {LOCK_STALE_SECONDS} s after it was taken")
        if time.monotonic() - told > 30:
            log.warning("%s: waiting for the promotion lock, held by %s", name, holder)
            told = time.monotonic()
        time.sleep(random.uniform(0.2, 1.0))  # jitter, so waiters do not retry in lockstep
    try:
        yield
    finally:
        # Delete only our own lock: had ours been set aside as stale, this one is another promoter's.
        try:
            ours = client.get_registered_model(lock).tags.get("token") == token
        except MlflowException:  # ours was set aside and nobody holds it now
            ours = False
        if ours:
            client.delete_registered_model(lock)


def _lock_holder(tags: dict[str, str], age: float) -> str:
    """Who holds a promotion lock, in words: 'by NAME, pid P on HOST, since TIME (N s ago)'."""
    process = f", pid {tags['pid']} on {tags.get('host', '?')}" if "pid" in tags else ""
    since = f", since {datetime.fromtimestamp(float(tags['since']), timezone.utc):%Y-%m-%d %H:%M:%S} UTC" if "since" in tags else ""
    return f"by {tags.get('holder', 'unknown')}{process}{since} ({age:.0f} s ago)"


def resolve_version(client: MlflowClient, uri: str):
    """The registry version `models:/NAME@ALIAS` or `models:/NAME/VERSION` names. Raises RegistryError
    when the model has no such alias or version."""
    ref = uri[len("models:/"):]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = alias_version(client, name, alias)
        if version is None:
            raise RegistryError(f"{name} has no alias {alias!r}")
        return version
    name, _, number = ref.partition("/")
    return _get_version(client, name, number)


def resolve_checkpoint_uri(client: MlflowClient, uri: str) -> str:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> the version's S3 checkpoint; other URIs unchanged."""
    if not uri.startswith("models:/"):
        return uri
    version = resolve_version(client, uri)
    checkpoint = version.tags.get("checkpoint_uri")
    if not checkpoint:
        raise RegistryError(f"{uri} (version {version.version}) has no checkpoint_uri tag")
    return checkpoint


# --- review -----------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    fmt = lambda cells: "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)).rstrip()  # noqa: E731
    return [fmt(header), fmt(["-" * width for width in widths]), *(fmt(row) for row in rows)]


def run_json(client: MlflowClient, run_id: str | None, path: str):
    """A JSON artifact of a run (e.g. report/samples.json), or None when the run or the file is not there."""
    if not run_id:
        return None
    import tempfile

    quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # a one-file download needs no progress bar on stderr
    try:
        with tempfile.TemporaryDirectory() as scratch:
            return json.loads(open(client.download_artifacts(run_id, path, scratch)).read())
    except (MlflowException, OSError, ValueError):
        return None
    finally:
        if quiet is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = quiet


def _lineage_matrix(client: MlflowClient, version) -> list[str]:
    """A version that continued its lineage: the lineage's accuracy matrix (its retrain's report), each row
    labelled with the retrain that added it; nothing for other versions or when the report is unreadable."""
    if version.tags.get("continued_from", "none") == "none" or not version.run_id:
        return []
    matrix = run_json(client, version.run_id, "report/accuracy_matrix.json")
    if matrix is None:
        return []
    labels = matrix.get("row_labels") or [f"row {index}" for index in range(len(matrix["rows"]))]
    rows = [[label, *("—" if score is None else f"{score:.3f}" for score in row)] for label, row in zip(labels, matrix["rows"])]
    return [f"Accuracy matrix of the lineage (challenger v{version.version} continued v{version.tags['continued_from']}; "
            "each row names the retrain that added it; — = not scored then)", *_table(["stage", *matrix["tasks"]], rows), ""]


SAMPLES_ARTIFACT = "report/samples.json"  # tasks/samples.py, logged by tasks/register.py
DECIDED = ("champion", "superseded", "rolled back", "champion again", "champion withdrawn")


def _headline(name: str, challenger, champion, results: list[GateResult], against: str, against_words: str) -> list[str]:
    """Review's first lines: the challenger's state. Undecided: its verdict (READY / BLOCKED / NEEDS REVIEW and
    why). Decided since (promoted, rolled back, superseded, withdrawn): the decision, then the verdict it had
    at registration."""
    decision = challenger.tags.get(DECISION_TAG, "")
    holder = "none" if champion is None else str(champion.version)
    is_champion = holder == str(challenger.version)
    now = None if is_champion or against in ("unknown", holder) else _against(holder)
    lines = verdict(results, against_words, now)
    if is_champion:
        how = decision.split(": ", 1)[1] if decision.startswith("champion: ") else decision or "promoted"
        head = f"{name} challenger v{challenger.version} is the champion: {how}"
    elif decision.startswith(DECIDED) and challenger.tags.get(NEEDS_REVIEW_TAG) != "true":
        head = f"{name} challenger v{challenger.version}: {decision}"
    else:
        return [f"{name} challenger v{challenger.version}: " + "\n  ".join(lines)]
    return [head, "  at registration: " + lines[0], *(f"    {line}" for line in lines[1:])]


def review(client: MlflowClient, name: str) -> str:
    """The challenger's verdict (READY / BLOCKED and why) first, its task scores beside chance and
    their change from stage 0, then champion and challenger side by side: metrics, the
    challenger's gates, data lineage, decisions."""
    champion = alias_version(client, name, CHAMPION)
    challenger = alias_version(client, name, CHALLENGER)
    previous = alias_version(client, name, PREVIOUS)
    shown = [(label, version) for label, version in (("champion", champion), ("challenger", challenger)) if version is not None]
    if not shown:
        return f"{name}: no champion and no challenger yet (register a retrain first)"
    lines = []
    if challenger is not None:
        against = challenger.tags.get(GATES_AGAINST_TAG, "unknown")
        against_words = "an unknown champion" if against == "unknown" else _against(against)
        results = stored_gates(challenger.tags.get(GATES_TAG, "[]"))
        lines += [*_headline(name, challenger, champion, results, against, against_words), ""]
    lines.append(f"Registered model {name}")
    lines.append("  " + "   ".join(f"{label}: v{version.version}" for label, version in shown)
                 + (f"   previous-champion: v{previous.version}" if previous is not None else ""))
    if champion is None:
        lines.append("  no champion yet: the challenger was judged against its own stage 0 (the base model)")
    elif challenger is not None and challenger.version == champion.version:
        lines.append("  the challenger has already been promoted: nothing awaits review")
    lines.append("")
    if challenger is not None:
        mine = metrics_from_tags(challenger.tags)
        general = heldout_rows(mine, results)
        if general:
            lines += [f"General ability of challenger v{challenger.version}", *_table(HELDOUT_HEADER, general), ""]
        samples = run_json(client, challenger.run_id, SAMPLES_ARTIFACT)
        if samples and samples.get("probes"):
            lines += [*samples_lines(samples, challenger.version), ""]
        if champion is not None and champion.version != challenger.version:
            lines += [*changes_lines(changes(client, champion, challenger.tags, mine, challenger.run_id)), ""]
        rows = task_rows(mine)
        if rows:
            lines += [f"Tasks of challenger v{challenger.version} (stage 0 = before continual tuning; chance — = unknown)",
                      *_table(TASK_HEADER, rows), ""]
        lines += _lineage_matrix(client, challenger)

    header = ["metric", *(f"{label} v{version.version}" for label, version in shown)]
    per_version = [metrics_from_tags(version.tags) for _, version in shown]
    rows = []
    for key in _metric_order(*per_version):
        row = [key, *(_fmt(metrics.get(key)) for metrics in per_version)]
        rows.append(row)
    if len(shown) == 2:
        header.append("change")
        for row, key in zip(rows, _metric_order(*per_version)):
            a, b = per_version[0].get(key), per_version[1].get(key)
            row.append("—" if a is None or b is None else f"{b - a:+.4f}")
    lines += ["Metrics", *_table(header, rows or [["(no metric tags)"] + [""] * (len(header) - 1)]), ""]

    if challenger is not None:
        lines.append(f"Gates of challenger v{challenger.version} (evaluated at registration against {against_words})")
        if champion is not None and against not in ("none", "unknown", str(champion.version)):
            lines.append(f"  note: the champion is now v{champion.version}; gates were not re-evaluated against it")
        gate_rows = [[_result_word(r.passed), r.name, _fmt(r.value), _fmt(r.threshold), r.detail] for r in results]
        lines += [*_table(["result", "gate", "value", "threshold", "detail"], gate_rows or [["—", "(no gate results)", "", "", ""]]), ""]

    lineage_header = ["lineage", *(f"{label} v{version.version}" for label, version in shown)]
    keys = LINEAGE_TAGS + sorted({key for _, version in shown for key in version.tags if key.startswith(DATASET_TAG)})
    lineage_rows = [[key, *(version.tags.get(key, "-") for _, version in shown)] for key in keys]
    lineage_rows.append(["run_id", *((version.run_id or "-") for _, version in shown)])
    lineage_rows.append(["source", *(version.source for _, version in shown)])
    lines += ["Lineage", *_table(lineage_header, lineage_rows), ""]

    decision_rows = [[key, *(version.tags.get(key, "-") for _, version in shown)] for key in DECISION_TAGS]
    decision_rows = [row for row in decision_rows if any(cell != "-" for cell in row[1:])]
    if decision_rows:
        lines += ["Decisions", *_table(["tag", *(f"{label} v{version.version}" for label, version in shown)], decision_rows), ""]

    if challenger is not None and (champion is None or challenger.version != champion.version):
        over = "   (BLOCKED: --reason is required; the failed gates are recorded as overridden)" if failed(results) else ""
        lines.append(f"promote:  perennial promote {name} {challenger.version} --reason '...'{over}")
    if previous is not None:
        lines.append(f"rollback: perennial rollback {name} --reason '...'   (champion -> v{previous.version})")
    return "\n".join(lines).rstrip() + "\n"
