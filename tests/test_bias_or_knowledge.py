"""Telling output bias from lost knowledge (issue #37, docs/metrics.md "Bias or knowledge").

Forgetting after narrow fine-tuning is mostly output bias: the model answers in the trained tasks'
format, or with the label it now prefers, while it still ranks the right answer. The corrected
scores take that prior out; what they still lose is lost knowledge.
"""

from __future__ import annotations

import math

import pytest

from models.evaluation import calibrated_choices, contains_match
from perennial.cl_metrics import bias_or_knowledge


def _records(labels: list[str]) -> list[dict]:
    return [{"id": str(i), "prompt": f"q{i}", "response": label, "options": ["yes", "no"]} for i, label in enumerate(labels)]


def test_calibration_recovers_the_choices_a_label_prior_hides_and_not_lost_ones():
    labels = ["yes", "no"] * 10
    records = _records(labels)
    # A model biased towards "yes" by 3 nats that still ranks the truth by 1 nat: every raw answer is "yes".
    biased = [[3.0 + (1.0 if label == "yes" else 0.0), 0.0 + (1.0 if label == "no" else 0.0)] for label in labels]
    raw = [record["options"][0 if block[0] >= block[1] else 1] for record, block in zip(records, biased)]
    assert raw == ["yes"] * 20  # raw accuracy 0.5: the prior decides
    assert calibrated_choices(records, biased) == labels  # corrected accuracy 1.0: it still knows
    # A model that lost the knowledge: its scores do not depend on the truth at all.
    lost = [[3.0, 0.0] for _ in labels]
    assert sum(a == b for a, b in zip(calibrated_choices(records, lost), labels)) == 10  # chance, not recovered


def test_calibration_leaves_an_unbiased_model_as_it_is():
    labels = ["yes", "no", "no", "yes", "no"]
    records = _records(labels)
    blocks = [[math.log(0.8), math.log(0.2)] if label == "yes" else [math.log(0.3), math.log(0.7)] for label in labels]
    assert calibrated_choices(records, blocks) == labels


@pytest.mark.parametrize("prediction, reference, expected", [
    ("The capital of France is Paris.", "Paris", 1.0),  # the answer, in another format
    ("Paris", "Paris", 1.0),
    ("Varnholk", "Paris", 0.0),  # not the answer in any format
    ("Parisian cafes", "Paris", 0.0),  # whole words only
    ("It is New York City", "new york", 1.0),
])
def test_contains_match_is_format_insensitive_but_not_substring_loose(prediction, reference, expected):
    assert contains_match(prediction, reference) == expected


def test_a_drop_splits_into_bias_and_lost_knowledge():
    format_bias = bias_or_knowledge(0.675, 0.0, 0.7, 0.65)  # still answers right, in the trained terse format
    assert format_bias["verdict"] == "bias" and format_bias["bias_drop"] == pytest.approx(0.625)
    lost = bias_or_knowledge(0.675, 0.0, 0.7, 0.0)  # "Varnholk": wrong in any format
    assert lost["verdict"] == "lost knowledge" and lost["knowledge_drop"] == pytest.approx(0.7)
    both = bias_or_knowledge(0.6, 0.0, 0.6, 0.3)
    assert both["verdict"] == "bias and lost knowledge"
    assert bias_or_knowledge(0.5, 0.48, 0.5, 0.5)["verdict"] == "kept"
    assert bias_or_knowledge(0.5, 0.1, None, None)["verdict"] == "unknown"
