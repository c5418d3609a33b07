"""Report artefacts for a run: accuracy-matrix heatmap, per-task curves (with held-out general tasks), drift plot, markdown summary."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on headless workers and never opens a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

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


def plot_drift(drift_by_stage: list[dict], path: str | Path) -> Path:
    """KL(base || current) and favoured-token (default: digit) mass on the probe prompts, per stage."""
    stages = np.arange(len(drift_by_stage))
    kl = [_number(d.get("kl_mean")) for d in drift_by_stage]
    mass = [_number(d.get("favoured_mass")) for d in drift_by_stage]
    fig, (ax_kl, ax_mass) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_kl.plot(stages, kl, marker="o")
    ax_kl.set_title("KL(base || current) on probe prompts")
    ax_mass.plot(stages, mass, marker="o", color="tab:orange", label="current")
    base_mass = next((d["favoured_mass_base"] for d in drift_by_stage if d.get("favoured_mass_base") is not None), None)
    if base_mass is not None:
        ax_mass.axhline(base_mass, color="gray", linestyle="--", label="base model")
        ax_mass.legend(fontsize="small")
    ax_mass.set_title("favoured-token (digit) mass on probe prompts")
    for ax in (ax_kl, ax_mass):
        ax.set_xlabel("stage")
        ax.set_xticks(stages)
        ax.grid(alpha=0.3)
    return _save(fig, path)


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


def markdown_summary(matrix: AccuracyMatrix, metrics: dict, drift: list[dict] | None = None, general: list[dict[str, float]] | None = None,
                     row_labels: list[str] | None = None, drift_labels: list[str] | None = None, bias: dict[str, dict] | None = None) -> str:
    """The accuracy matrix, held-out general tasks (stage 0 vs final, from `general`: one dict of
    scores per stage), the metrics and (optionally) drift per stage as markdown tables. ``row_labels``
    replace the matrix's stage labels (a lineage's name the retrain that added each row);
    ``drift_labels`` name the drift entries (default: the matrix's stages)."""
    lines = ["## Accuracy matrix", "", "| stage | " + " | ".join(matrix.tasks) + " |", "|---" * (matrix.num_tasks + 1) + "|"]
    for label, row in zip(row_labels or matrix.stage_labels(), matrix.rows):
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in row) + " |")
    names = _general_names(general)
    if names:
        lines += ["", "## Held-out general tasks (never trained on)", "", "| task | before | final | delta |", "|---|---|---|---|"]
        for name in names:
            base, final = general[0].get(name), general[-1].get(name)
            delta = None if base is None or final is None else final - base
            lines.append(f"| {name} | {_fmt(base)} | {_fmt(final)} | {_fmt(delta)} |")
    if bias:
        lines += ["", "## Output bias or lost knowledge (docs/metrics.md)", "",
                  "| task | before (raw / corrected) | after (raw / corrected) | drop | of it bias | of it knowledge | verdict | most frequent answer |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, entry in bias.items():
            one = f" (answers it to {entry['top_share']:.0%} of records)" if entry.get("one_label") else ""
            answer = str(entry.get("top_prediction") or "")[:40].replace("|", "\\|")
            lines.append(f"| {name} | {_fmt(entry['before'])} / {_fmt(entry['before_corrected'])} | {_fmt(entry['after'])} / "
                         f"{_fmt(entry['after_corrected'])} | {_fmt(entry['drop'])} | {_fmt(entry['bias_drop'])} | "
                         f"{_fmt(entry['knowledge_drop'])} | {entry['verdict']} | `{answer}`{one} |")
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in metrics.items()]
    if drift:
        lines += ["", "## Output drift (probe prompts vs. stage 0)", "", "| stage | KL mean | favoured mass | top gainers |", "|---|---|---|---|"]
        labels = drift_labels or matrix.stage_labels()
        for index, entry in enumerate(drift):
            label = labels[index] if index < len(labels) else f"stage {index}"
            # repr() shows whitespace tokens; a literal "|" would end the table cell.
            gainers = ", ".join(f"{g['token']!r} {g['delta']:+.3f}".replace("|", "\\|") for g in entry.get("top_gainers", [])[:5])
            lines.append(f"| {label} | {_fmt(entry.get('kl_mean'))} | {_fmt(entry.get('favoured_mass'))} | {gainers} |")
    return "\n".join(lines) + "\n"
