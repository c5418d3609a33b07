"""Report plots are real PNGs and the markdown summary carries the matrix and metrics."""

from __future__ import annotations

import matplotlib.image

from perennial.cl_metrics import AccuracyMatrix, summarize
from perennial.markdown import PAD
from perennial.reports import markdown_summary, plot_accuracy_matrix, plot_drift, plot_task_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

MATRIX = AccuracyMatrix(
    tasks=["arithmetic", "fact_lookup", "reverse"],
    rows=[[0.05, 0.10, 0.00], [0.90, 0.15, 0.02], [0.70, 0.85, 0.05], [0.60, 0.75, 0.95]],
)
DRIFT = [
    {"kl_mean": 0.0, "favoured_mass": 0.03, "top_gainers": []},
    {"kl_mean": 1.2, "favoured_mass": 0.60, "top_gainers": [{"token": "7", "delta": 0.2}, {"token": "a|b", "delta": 0.1}]},
    {"kl_mean": 0.8, "favoured_mass": 0.30, "top_gainers": [{"token": " the", "delta": 0.05}]},
    {},  # a stage evaluated without drift (StageEval's default) must not break the report
]


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000  # a blank or truncated figure would be far smaller
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100


def test_plots_are_valid_pngs(tmp_path):
    paths = [
        plot_accuracy_matrix(MATRIX, tmp_path / "accuracy_matrix.png"),
        plot_task_curves(MATRIX, tmp_path / "task_curves.png"),
        plot_drift(DRIFT, tmp_path / "nested" / "drift.png"),
    ]
    for path in paths:
        assert path.exists()
        assert_png(path)


def test_plots_tolerate_missing_cells_and_partial_runs(tmp_path):
    partial = AccuracyMatrix(tasks=["a", "b"], rows=[[0.1, None], [0.8, 0.2]])
    assert_png(plot_accuracy_matrix(partial, tmp_path / "m.png"))
    assert_png(plot_task_curves(partial, tmp_path / "c.png"))
    assert_png(plot_drift([{}, {}], tmp_path / "d.png"))


def summary(*args, **kwargs) -> str:
    """markdown_summary without the en spaces that keep the MLflow page's columns apart (perennial/markdown.py)."""
    return markdown_summary(*args, **kwargs).replace(PAD, "")


def test_markdown_summary_has_matrix_metrics_and_drift():
    metrics = summarize(MATRIX, general_ppl_base=20.0, general_ppl_final=23.0)
    text = summary(MATRIX, metrics, drift=DRIFT)
    for task in MATRIX.tasks:
        assert task in text
    # BWT = ((0.60 - 0.90) + (0.75 - 0.85)) / 2 = -0.2
    assert "| bwt | -0.2000 |" in text
    assert "| general_ppl_rel_change | 0.1500 |" in text  # (23 - 20) / 20
    matrix_section = text.split("## Metrics")[0]
    matrix_rows = [line for line in matrix_section.splitlines() if line.startswith(("| before", "| after"))]
    assert len(matrix_rows) == len(MATRIX.rows)
    assert "| after reverse | 0.6000 | 0.7500 | 0.9500 |" in text
    assert "'7' +0.200" in text
    assert "a\\|b" in text  # a pipe inside a token is escaped so the table stays intact


def test_markdown_marks_undefined_metrics():
    single = AccuracyMatrix(tasks=["only"], rows=[[0.1], [0.9]])
    text = summary(single, summarize(single))
    assert "| bwt | n/a |" in text
    assert "Output drift" not in text


def test_markdown_and_curves_show_heldout_general_tasks(tmp_path):
    general = [{"word_count": 0.10}, {"word_count": 0.40}, {"word_count": 0.30}, {"word_count": 0.25}]
    metrics = summarize(MATRIX, general_scores_base=general[0], general_scores_final=general[-1])
    text = summary(MATRIX, metrics, general=general)
    section = text.split("## Held-out general tasks (never trained on)")[1].split("## Metrics")[0]
    # stage 0 vs the last stage, not the best or the middle one: 0.25 - 0.10 = 0.15
    assert "| word_count | 0.1000 | 0.2500 | 0.1500 |" in section
    assert "| general_task_delta | 0.1500 |" in text
    # it stays out of the accuracy-matrix table
    assert "word_count" not in text.split("## Held-out")[0]
    assert "Held-out" not in markdown_summary(MATRIX, summarize(MATRIX), general=[{}, {}, {}, {}])
    assert_png(plot_task_curves(MATRIX, tmp_path / "curves.png", general=general))
