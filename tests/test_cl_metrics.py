"""Continual-learning metrics against matrices worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import pytest

from perennial.cl_metrics import AccuracyMatrix, forgetting, general_ability_delta, summarize

# Three tasks a, b, c. Row 0 = before continual tuning, row i = after training task i.
R3 = AccuracyMatrix(
    tasks=["a", "b", "c"],
    rows=[
        [0.10, 0.20, 0.30],
        [0.80, 0.25, 0.35],
        [0.60, 0.90, 0.40],
        [0.50, 0.70, 0.95],
    ],
)

# Four tasks; task t1 keeps improving after it is trained (0.6 -> 0.7) and t2 too (0.8 -> 0.9),
# so forgetting (measured from the best earlier score) differs from -BWT (measured from the diagonal).
R4 = AccuracyMatrix(
    tasks=["t1", "t2", "t3", "t4"],
    rows=[
        [0.0, 0.1, 0.2, 0.0],
        [0.6, 0.2, 0.2, 0.1],
        [0.7, 0.8, 0.3, 0.1],
        [0.5, 0.9, 0.6, 0.2],
        [0.4, 0.6, 0.5, 1.0],
    ],
)


def test_three_task_matrix():
    m = summarize(R3)
    # AP_3 = (0.50 + 0.70 + 0.95) / 3 = 2.15 / 3
    assert m["ap"] == pytest.approx(0.716667, abs=1e-6)
    # AP_1 = 0.80, AP_2 = (0.60 + 0.90) / 2 = 0.75; AIP = (0.80 + 0.75 + 0.716667) / 3 = 0.755556
    assert m["aip"] == pytest.approx(0.755556, abs=1e-6)
    # BWT = ((0.50 - 0.80) + (0.70 - 0.90)) / 2 = (-0.30 - 0.20) / 2
    assert m["bwt"] == pytest.approx(-0.25)
    # FWT = ((R1[b] - R0[b]) + (R2[c] - R0[c])) / 2 = ((0.25 - 0.20) + (0.40 - 0.30)) / 2
    assert m["fwt"] == pytest.approx(0.075)
    # forgetting a = max(0.80, 0.60) - 0.50 = 0.30; b = max(0.90) - 0.70 = 0.20
    assert m["forgetting/a"] == pytest.approx(0.30)
    assert m["forgetting/b"] == pytest.approx(0.20)
    assert "forgetting/c" not in m  # the last task cannot have been forgotten yet
    assert m["forgetting_mean"] == pytest.approx(0.25)
    assert m["forgetting_max"] == pytest.approx(0.30)


def test_four_task_matrix():
    m = summarize(R4)
    # AP_4 = (0.4 + 0.6 + 0.5 + 1.0) / 4 = 2.5 / 4
    assert m["ap"] == pytest.approx(0.625)
    # AP_1 = 0.6, AP_2 = 0.75, AP_3 = 2.0 / 3 = 0.666667, AP_4 = 0.625; sum 2.641667; / 4
    assert m["aip"] == pytest.approx(0.660417, abs=1e-6)
    # BWT = ((0.4 - 0.6) + (0.6 - 0.8) + (0.5 - 0.6)) / 3 = -0.5 / 3
    assert m["bwt"] == pytest.approx(-0.166667, abs=1e-6)
    # FWT = ((0.2 - 0.1) + (0.3 - 0.2) + (0.2 - 0.0)) / 3 = 0.4 / 3
    assert m["fwt"] == pytest.approx(0.133333, abs=1e-6)
    # t1: max(0.6, 0.7, 0.5) - 0.4 = 0.3; t2: max(0.8, 0.9) - 0.6 = 0.3; t3: max(0.6) - 0.5 = 0.1
    assert forgetting(R4) == pytest.approx({"t1": 0.3, "t2": 0.3, "t3": 0.1})
    # mean = 0.7 / 3 = 0.233333, larger than -BWT = 0.166667 because the peaks were off the diagonal
    assert m["forgetting_mean"] == pytest.approx(0.233333, abs=1e-6)
    assert m["forgetting_max"] == pytest.approx(0.3)


def test_single_task_has_no_transfer_and_no_division_by_zero():
    m = summarize(AccuracyMatrix(tasks=["only"], rows=[[0.2], [0.9]]))
    assert m["ap"] == pytest.approx(0.9)
    assert m["aip"] == pytest.approx(0.9)
    assert m["bwt"] is None
    assert m["fwt"] is None
    assert m["forgetting_mean"] is None
    assert m["forgetting_max"] is None


def test_before_any_training_only_row_zero():
    m = summarize(AccuracyMatrix(tasks=["a", "b"], rows=[[0.1, 0.2]]))
    assert m["ap"] is None and m["aip"] is None and m["bwt"] is None


def test_partial_matrix_uses_last_stage():
    # Rows 0..2 of R3: stage t = 2. AP_2 = (0.60 + 0.90) / 2 = 0.75; BWT = (0.60 - 0.80) / 1 = -0.2;
    # FWT = (0.25 - 0.20) / 1 = 0.05
    m = summarize(AccuracyMatrix(tasks=R3.tasks, rows=R3.rows[:3]))
    assert m["ap"] == pytest.approx(0.75)
    assert m["bwt"] == pytest.approx(-0.2)
    assert m["fwt"] == pytest.approx(0.05)


def test_missing_cells_are_left_out_of_the_averages():
    rows = [list(row) for row in R3.rows]
    rows[3][0] = None  # final score on task a unknown
    m = summarize(AccuracyMatrix(tasks=R3.tasks, rows=rows))
    # AP_3 = (0.70 + 0.95) / 2; BWT only from task b: 0.70 - 0.90
    assert m["ap"] == pytest.approx(0.825)
    assert m["bwt"] == pytest.approx(-0.2)
    assert m["forgetting/a"] is None
    assert m["forgetting_mean"] == pytest.approx(0.2)


def test_general_ability_deltas():
    m = summarize(R3, general_ppl_base=10.0, general_ppl_final=12.5, general_scores_base={"qa": 0.5, "x": 0.1}, general_scores_final={"qa": 0.4})
    assert m["general_ppl_delta"] == pytest.approx(2.5)
    assert m["general_ppl_rel_change"] == pytest.approx(0.25)  # 2.5 / 10
    assert m["general/qa_delta"] == pytest.approx(-0.1)
    assert "general/x_delta" not in m
    assert general_ability_delta({"a": 1.0}, {"a": 0.25}) == {"a": -0.75}
    assert "general_ppl_delta" not in summarize(R3)


def test_metric_names_are_mlflow_safe():
    m = summarize(AccuracyMatrix(tasks=["qa:v1", "b"], rows=[[0, 0], [1, 0], [0.5, 1]]))
    assert m["forgetting/qa_v1"] == pytest.approx(0.5)


def test_rejects_malformed_matrices():
    with pytest.raises(ValueError):
        AccuracyMatrix(tasks=["a", "b"], rows=[[0.1]])
    with pytest.raises(ValueError):
        AccuracyMatrix(tasks=["a"], rows=[[0.1], [0.2], [0.3]])


def test_general_task_delta_is_the_mean_of_per_task_deltas():
    base = {"word_count": 0.10, "uppercase": 0.50, "only_base": 0.9}
    final = {"word_count": 0.35, "uppercase": 0.20, "only_final": 0.1}
    m = summarize(R3, general_scores_base=base, general_scores_final=final)
    # per task: word_count 0.35 - 0.10 = +0.25, uppercase 0.20 - 0.50 = -0.30; the others are unpaired
    assert m["general/word_count_delta"] == pytest.approx(0.25)
    assert m["general/uppercase_delta"] == pytest.approx(-0.30)
    assert not any("only_" in key for key in m)
    # means over the two paired tasks only: base (0.10 + 0.50) / 2, final (0.35 + 0.20) / 2
    assert m["general_task_base"] == pytest.approx(0.30)
    assert m["general_task_final"] == pytest.approx(0.275)
    assert m["general_task_delta"] == pytest.approx(-0.025)  # (0.25 - 0.30) / 2
    # held-out tasks are not columns of R: the matrix metrics are those of R3 alone
    assert {k: m[k] for k in ("ap", "bwt", "fwt")} == pytest.approx({k: summarize(R3)[k] for k in ("ap", "bwt", "fwt")})
    without = summarize(R3, general_scores_base={}, general_scores_final={})
    assert not any(key.startswith("general_task") for key in without)
