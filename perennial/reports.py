"""Report artefacts for a run: accuracy-matrix heatmap, per-task curves (with held-out general tasks), drift plot, markdown summary."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on headless workers and never opens a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from perennial import markdown as md  # noqa: E402
from perennial.cl_metrics import AccuracyMatrix  # noqa: E402


def _as_array(matrix: AccuracyMatrix) -> np.ndarray:
    """Rows x tasks, with NaN for missing cells so matplotlib leaves them blank."""
    return np.array([[np.nan if v is None else v for v in row] for row in matrix.rows], dtype=float)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_accuracy_matrix(matrix: AccuracyMatrix, path: str | Path, row_labels: list[str] | None = None) -> Path:
    """Heatmap of R (stages down, tasks across), each cell annotated with its score; ``row_labels``
    replace the stage labels (a lineage's name the retrain that added each row)."""
    fig, ax = plt.subplots(figsize=(1.2 * matrix.num_tasks + 3, 0.6 * len(matrix.rows) + 2))
    image = _draw_accuracy_matrix(ax, matrix, "Accuracy matrix R[i][j]", row_labels)
    fig.colorbar(image, ax=ax, label="score")
    return _save(fig, path)


def plot_accuracy_matrix_grid(matrices: dict[str, AccuracyMatrix], path: str | Path, columns: int = 4) -> Path:
    """One accuracy-matrix heatmap per name (e.g. per CL method), on one shared 0..1 colour scale."""
    if not matrices:
        raise ValueError("plot_accuracy_matrix_grid needs at least one matrix")
    columns = min(columns, len(matrices))
    rows = math.ceil(len(matrices) / columns)
    first = next(iter(matrices.values()))
    # Constrained layout keeps each panel's tick labels and title clear of its neighbours'.
    fig, axes = plt.subplots(rows, columns, squeeze=False, layout="constrained",
                             figsize=(columns * (1.1 * first.num_tasks + 2.2), rows * (0.55 * len(first.rows) + 1.8)))
    for index, (ax, (name, matrix)) in enumerate(zip(axes.flat, matrices.items())):
        image = _draw_accuracy_matrix(ax, matrix, name)
        if index % columns and matrix.stage_labels() == first.stage_labels():
            ax.set_ylabel("")  # the row labels are the first column's: say them once
            ax.tick_params(labelleft=False)
    for ax in list(axes.flat)[len(matrices):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, label="score", shrink=0.6)
    return _save(fig, path)


def _draw_accuracy_matrix(ax, matrix: AccuracyMatrix, title: str, row_labels: list[str] | None = None):
    values = _as_array(matrix)
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(matrix.num_tasks), matrix.tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix.rows)), row_labels or matrix.stage_labels())
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("model after stage")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if not math.isnan(value):
                # Dark text on the bright end of viridis, light text elsewhere.
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="black" if value > 0.6 else "white")
    ax.set_title(title)
    return image


def plot_task_curves(matrix: AccuracyMatrix, path: str | Path, general: list[dict[str, float]] | None = None) -> Path:
    """One line per task: its score after every stage, with a marker where that task was trained.

    `general` (one dict per stage) adds the held-out general tasks as dashed lines."""
    values = _as_array(matrix)
    stages = np.arange(len(matrix.rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, task in enumerate(matrix.tasks):
        (line,) = ax.plot(stages, values[:, j], marker="o", label=task)
        trained = matrix.trained_at(j + 1)
        ax.scatter(trained, [values[i, j] for i in trained], s=120, facecolors="none", edgecolors=line.get_color())
    for name in _general_names(general):
        ax.plot(stages, [_number(row.get(name)) for row in general], marker="s", linestyle="--", label=f"{name} (held-out)")
    ax.set_xticks(stages, matrix.stage_labels(), rotation=30, ha="right")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("score")
    ax.set_title("Per-task score across stages (circle: just trained)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_merge_curves(curves: dict[str, list[dict]], path: str | Path) -> Path:
    """Per task merged with its starting model (models/cl/merge.py): the new-task and kept validation
    scores by merge coefficient c, with the chosen c circled."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (task, points) in zip(axes[0], curves.items()):
        cs = [point["coefficient"] for point in points]
        for key, label in (("task", "new task (held-out training records)"), ("kept", "kept (replay examples)")):
            values = [_number(point.get(key)) for point in points]
            if not all(math.isnan(value) for value in values):
                ax.plot(cs, values, marker="o", label=label)
        chosen = next(point for point in points if point.get("chosen"))
        ax.axvline(chosen["coefficient"], color="gray", linestyle="--", label=f"chosen c = {chosen['coefficient']:g}")
        ax.set_xlabel("c: start + c * (end - start)")
        ax.set_ylabel("token accuracy")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return _save(fig, path)


def plot_drift(drift_by_stage: list[dict], path: str | Path, labels: list[str] | None = None, threshold: float | None = None) -> Path:
    """KL(stage 0 || stage) of the next-token distributions on the probe prompts, one point per evaluated stage
    named by ``labels`` (default "stage i"), with the gate's ceiling (registry.gates.max_output_drift_kl) drawn
    at ``threshold``: the final stage's point is what the gate judges (`drift_figure`)."""
    return _save(drift_figure(drift_by_stage, labels, threshold), path)


def drift_figure(drift_by_stage: list[dict], labels: list[str] | None = None, threshold: float | None = None):
    """`plot_drift`'s figure: one panel (the toy's favoured-token mass meant nothing for a real model)."""
    stages = np.arange(len(drift_by_stage))
    kl = [_number(d.get("kl_mean")) for d in drift_by_stage]
    names = [labels[i] if labels and i < len(labels) else f"stage {i}" for i in stages]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(stages) + 2), 3.8))
    ax.plot(stages, kl, marker="o", label="KL(stage 0 ‖ this stage)")
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", linestyle="--", label=f"gate max_output_drift_kl = {threshold:g}")
    ax.set_title("Output drift on probe prompts (nats)")
    ax.set_xticks(stages, names, rotation=20, ha="right")
    ax.set_xlabel("model after stage")
    ax.set_ylabel("mean KL (nats)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _number(value) -> float:
    return np.nan if value is None else float(value)


def _general_names(general: list[dict[str, float]] | None) -> list[str]:
    return list(dict.fromkeys(name for row in general or [] for name in row))


JOINT_NOTE = ("Joint (multi-task) training, cit.multitask: one stage trained every task together, for the steps the sequence "
              "would spend. AP is the mean final score; BWT, FWT and forgetting are not defined (no task was trained before "
              "another), so they are absent (n/a), not 0.")


def markdown_summary(matrix: AccuracyMatrix, metrics: dict, drift: list[dict] | None = None, general: list[dict[str, float]] | None = None,
                     row_labels: list[str] | None = None, drift_labels: list[str] | None = None, bias: dict[str, dict] | None = None) -> str:
    """The accuracy matrix, held-out general tasks (stage 0 vs final, from `general`: one dict of
    scores per stage), the metrics and (optionally) drift per stage as markdown tables. ``row_labels``
    replace the matrix's stage labels (a lineage's name the retrain that added each row);
    ``drift_labels`` name the drift entries (default: the matrix's stages)."""
    rows = [[md.cell(label), *(_fmt(v) for v in row)] for label, row in zip(row_labels or matrix.stage_labels(), matrix.rows)]
    lines = ["## Accuracy matrix", "", *md.table(["stage", *map(md.cell, matrix.tasks)], rows, ["l", *"r" * matrix.num_tasks])]
    if matrix.joint:
        lines += ["", JOINT_NOTE]
    names = _general_names(general)
    if names:
        rows = []
        for name in names:
            base, final = general[0].get(name), general[-1].get(name)
            delta = None if base is None or final is None else final - base
            rows.append([md.cell(name), _fmt(base), _fmt(final), _fmt(delta)])
        lines += ["", "## Held-out general tasks (never trained on)", "", *md.table(["task", "before", "final", "delta"], rows, list("lrrr"))]
    if bias:
        rows = []
        for name, entry in bias.items():
            one = f" (answers it to {entry['top_share']:.0%} of records)" if entry.get("one_label") else ""
            answer = md.cell(repr(str(entry.get("top_prediction") or "")), 40)  # quoted, so an empty answer shows as ''
            rows.append([md.cell(name), f"{_fmt(entry['before'])} / {_fmt(entry['before_corrected'])}",
                         f"{_fmt(entry['after'])} / {_fmt(entry['after_corrected'])}", _fmt(entry['drop']), _fmt(entry['bias_drop']),
                         _fmt(entry['knowledge_drop']), entry['verdict'], f"{answer}{one}"])
        lines += ["", "## Output bias or lost knowledge (docs/metrics.md)", "",
                  *md.table(["task", "before (raw / corrected)", "after (raw / corrected)", "drop", "of it bias", "of it knowledge",
                             "verdict", "most frequent answer"], rows, list("lrrrrrll"))]
    lines += ["", "## Metrics", "", *md.table(["metric", "value"], [[md.cell(name), _fmt(value)] for name, value in metrics.items()], list("lr"))]
    if drift:
        labels = drift_labels or matrix.stage_labels()
        rows = []
        for index, entry in enumerate(drift):
            label = labels[index] if index < len(labels) else f"stage {index}"
            # repr() shows whitespace tokens; md.cell keeps "<issue_start>" from being taken for an HTML tag and
            # a "|" from ending the cell.
            gainers = ", ".join(md.cell(f"{g['token']!r} {g['delta']:+.3f}") for g in entry.get("top_gainers", [])[:5])
            rows.append([md.cell(label), _fmt(entry.get("kl_mean")), gainers])
        lines += ["", "## Output drift (probe prompts vs. stage 0)", "",
                  *md.table(["stage", "KL mean (nats)", "tokens gaining most probability"], rows, list("lrl"))]
    return "\n".join(lines) + "\n"
