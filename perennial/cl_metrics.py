"""Continual-learning metrics over the accuracy matrix (pure Python; formulas in docs/metrics.md).

R has rows 0..T and one column per task: row 0 scores the model before continual tuning, row i
the model after training stage i, and R[i][j] is the score on task j at that point. In a single
retrain stage i trains task i. In a lineage that keeps learning across retrains (lineage.continue_from)
a task may be trained again on its new records, so the matrix records which task each row trained
(``trained``) and the formulas read "the row that trained task j" as the latest such row up to t
(l_j) and its first such row (f_j). Metrics are computed for the last stage present (t = number of
rows - 1), so a partial matrix gives the metrics "so far". A missing cell (None: a task a row was
never scored on) is left out of every average and the denominator shrinks with it; a metric with
no defined term is None rather than a misleading 0.

A joint (multi-task) run (cit.multitask) trains every task in one stage: its row 1 names all of them
(``trained`` = [[a, b, c]]). Then AP is the mean final score, and BWT, FWT and forgetting have no
term (no task was trained before another), so they are None: not 0, which would claim "no forgetting".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping


@dataclass
class AccuracyMatrix:
    tasks: list[str]
    rows: list[list[float | None]]
    # The task trained at rows 1.. (each a name in `tasks`, or a list of names: the tasks a joint stage trained
    # together, cit.multitask); None: row i trains task i (one retrain).
    trained: list[str | list[str]] | None = None

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("an accuracy matrix needs at least one task")
        if not self.rows:
            raise ValueError("an accuracy matrix needs at least row 0 (the model before continual tuning)")
        if self.trained is None:
            if len(self.rows) > len(self.tasks) + 1:
                raise ValueError(f"{len(self.rows)} rows for {len(self.tasks)} tasks: expected at most T+1 = {len(self.tasks) + 1}")
        else:
            unknown = sorted({name for entry in self.trained for name in _names(entry)} - set(self.tasks))
            if unknown or len(self.trained) < len(self.rows) - 1:
                raise ValueError(f"trained names {len(self.trained)} stages for {len(self.rows) - 1} rows after row 0"
                                 + (f"; tasks not among the columns: {unknown}" if unknown else ""))
        for index, row in enumerate(self.rows):
            if len(row) != len(self.tasks):
                raise ValueError(f"row {index} has {len(row)} scores for {len(self.tasks)} tasks")

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def stage(self) -> int:
        """The last stage present: T for a complete matrix."""
        return len(self.rows) - 1

    def r(self, i: int, j: int) -> float | None:
        """R[i][j] with the paper's indexing: stage i in 0..T, task j in 1..T."""
        if not 1 <= j <= self.num_tasks:
            raise IndexError(f"task index {j} is outside 1..{self.num_tasks}")
        return self.rows[i][j - 1]

    def trained_at(self, j: int, t: int | None = None) -> list[int]:
        """The rows 1..t (default the last) that trained task j, in order."""
        t = self.stage if t is None else t
        names = self.trained if self.trained is not None else self.tasks
        return [i for i in range(1, t + 1) if self.tasks[j - 1] in _names(names[i - 1])]

    @property
    def joint(self) -> bool:
        """Whether a row trained several tasks together (a multi-task run): BWT, FWT and forgetting are then undefined."""
        return any(not isinstance(entry, str) for entry in self.trained or [])

    def stage_labels(self) -> list[str]:
        names = self.trained if self.trained is not None else self.tasks
        return ["before"] + [trained_label(entry) for entry in names[: self.stage]]


def _names(entry: str | list[str]) -> list[str]:
    """The tasks one row trained: its one task, or every task of a joint stage."""
    return [entry] if isinstance(entry, str) else list(entry)


def trained_label(entry: str | list[str]) -> str:
    """A row's label: "after arithmetic", or "after joint: a + b + c" for a stage that trained them together."""
    return f"after {entry}" if isinstance(entry, str) else "after joint: " + " + ".join(entry)


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def average_performance(matrix: AccuracyMatrix, t: int | None = None) -> float | None:
    """AP_t = mean over the tasks trained by row t of R[t][j]: the mean score on the tasks seen so far."""
    t = matrix.stage if t is None else t
    if t < 1:
        return None
    return _mean([matrix.r(t, j) for j in range(1, matrix.num_tasks + 1) if matrix.trained_at(j, t)])


def average_incremental_performance(matrix: AccuracyMatrix) -> float | None:
    """AIP = mean over k=1..t of AP_k: rewards being good at every stage, not only the last."""
    return _mean([average_performance(matrix, k) for k in range(1, matrix.stage + 1)])


def backward_transfer(matrix: AccuracyMatrix) -> float | None:
    """BWT = mean over tasks j last trained at a row l_j < t of (R[t][j] - R[l_j][j]); negative means
    forgetting. None when no task was trained before the last row (t < 2 in one retrain)."""
    t = matrix.stage
    terms = []
    for j in range(1, matrix.num_tasks + 1):
        rows = matrix.trained_at(j, t)
        if rows and rows[-1] < t:
            terms.append(_diff(matrix.r(t, j), matrix.r(rows[-1], j)))
    return _mean(terms)


def forward_transfer(matrix: AccuracyMatrix) -> float | None:
    """FWT = mean over tasks j first trained at a row f_j >= 2 of (R[f_j - 1][j] - R[0][j]): the zero-shot
    gain on a task from the tasks trained before it."""
    terms = []
    for j in range(1, matrix.num_tasks + 1):
        rows = matrix.trained_at(j)
        if rows and rows[0] >= 2:
            terms.append(_diff(matrix.r(rows[0] - 1, j), matrix.r(0, j)))
    return _mean(terms)


def forgetting(matrix: AccuracyMatrix) -> dict[str, float | None]:
    """Per task j last trained at a row l_j < t: max_{i in [l_j, t-1]} R[i][j] - R[t][j], the drop from the best
    score since it was (last) learned."""
    t = matrix.stage
    result: dict[str, float | None] = {}
    for j in range(1, matrix.num_tasks + 1):
        rows = matrix.trained_at(j, t)
        if not rows or rows[-1] >= t:
            continue
        earlier = [matrix.r(i, j) for i in range(rows[-1], t) if matrix.r(i, j) is not None]
        result[matrix.tasks[j - 1]] = _diff(max(earlier), matrix.r(t, j)) if earlier else None
    return result


def general_ability_delta(base: Mapping[str, float], current: Mapping[str, float]) -> dict[str, float]:
    """current - base for every held-out general score present in both (positive = better for accuracies)."""
    return {name: current[name] - base[name] for name in base if name in current}


# MLflow accepts only these characters in metric names; anything else in a task name becomes "_".
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def _metric_name(name: str) -> str:
    return _UNSAFE.sub("_", name)


def summarize(
    matrix: AccuracyMatrix,
    general_ppl_base: float | None = None,
    general_ppl_final: float | None = None,
    general_scores_base: Mapping[str, float] | None = None,
    general_scores_final: Mapping[str, float] | None = None,
) -> dict[str, float | None]:
    """Flat metric names for MLflow. Undefined metrics (e.g. BWT with one task) are None; drop them before logging."""
    per_task = forgetting(matrix)
    known = [value for value in per_task.values() if value is not None]
    metrics: dict[str, float | None] = {
        "ap": average_performance(matrix),
        "aip": average_incremental_performance(matrix),
        "bwt": backward_transfer(matrix),
        "fwt": forward_transfer(matrix),
        "forgetting_mean": _mean(known),
        "forgetting_max": max(known) if known else None,
    }
    if matrix.joint:  # says why BWT, FWT and forgetting are absent (registry.py's min_bwt gate reads it)
        metrics["multitask"] = 1.0
    metrics.update({f"forgetting/{_metric_name(task)}": value for task, value in per_task.items()})
    if general_ppl_base is not None and general_ppl_final is not None:
        metrics["general_ppl_base"] = general_ppl_base
        metrics["general_ppl_final"] = general_ppl_final
        metrics["general_ppl_delta"] = general_ppl_final - general_ppl_base
        metrics["general_ppl_rel_change"] = (general_ppl_final - general_ppl_base) / general_ppl_base if general_ppl_base else None
    if general_scores_base and general_scores_final:
        deltas = general_ability_delta(general_scores_base, general_scores_final)
        for name, delta in deltas.items():
            metrics[f"general/{_metric_name(name)}_delta"] = delta
        if deltas:
            # Means over the same tasks (those scored at both ends), so delta = final - base exactly.
            metrics["general_task_base"] = _mean([general_scores_base[name] for name in deltas])
            metrics["general_task_final"] = _mean([general_scores_final[name] for name in deltas])
            metrics["general_task_delta"] = _mean(list(deltas.values()))
    return metrics


# A drop (accuracy in [0, 1]) this small is within the demo's test resolution (1/40): not called a loss.
BIAS_TOLERANCE = 0.05


def bias_or_knowledge(before: float, after: float, before_corrected: float | None, after_corrected: float | None) -> dict:
    """How much of a task's drop is output bias and how much lost knowledge (docs/metrics.md).

    ``before`` / ``after``: the accuracy at the retrain's start and end; ``*_corrected``: the same
    predictions scored with the format or label prior taken out (models.evaluation.score_task's
    corrected_accuracy). The raw drop D = before - after splits into the knowledge drop
    K = before_corrected - after_corrected (what the model no longer knows, whatever its format) and
    the bias part B = D - K (what it still knows but answers in the trained tasks' format or label).
    `verdict`: "kept" (D within BIAS_TOLERANCE), "bias" (K within it), "lost knowledge" (B within it),
    "bias and lost knowledge" otherwise, or "unknown" without corrected scores.
    """
    drop = before - after
    if before_corrected is None or after_corrected is None:
        return {"drop": drop, "knowledge_drop": None, "bias_drop": None, "verdict": "kept" if drop <= BIAS_TOLERANCE else "unknown"}
    knowledge = before_corrected - after_corrected
    bias = drop - knowledge
    if drop <= BIAS_TOLERANCE:
        verdict = "kept"
    elif knowledge <= BIAS_TOLERANCE:
        verdict = "bias"
    elif bias <= BIAS_TOLERANCE:
        verdict = "lost knowledge"
    else:
        verdict = "bias and lost knowledge"
    return {"drop": drop, "knowledge_drop": knowledge, "bias_drop": bias, "verdict": verdict}
