"""Telling output bias from lost knowledge (issue #37, docs/metrics.md "Bias or knowledge").

Forgetting after narrow fine-tuning is mostly output bias: the model answers in the trained tasks'
format, or with the label it now prefers, while it still ranks the right answer. The corrected
scores take that prior out; what they still lose is lost knowledge.
"""

from __future__ import annotations

import math

import pytest

from models.evaluation import calibrated_choices, with_distractors
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


def test_a_generation_task_ranks_each_answer_against_other_answers_of_the_task_in_a_fixed_order():
    records = [{"id": str(i), "prompt": f"q{i}", "response": f"answer {i % 12}"} for i in range(24)]
    ranked = with_distractors(records)
    assert ranked == with_distractors(records)  # deterministic
    for record, options in zip(records, (r["options"] for r in ranked)):
        assert record["response"] in options and len(options) == len(set(options)) == 8
    assert len({r["options"].index(r["response"]) for r in ranked}) > 3  # the right answer is not always first (ties)


def test_a_tiny_model_that_answers_one_label_is_flagged_and_its_corrected_score_is_reported():
    from models.evaluation import score_task
    from tests.tiny_models import tiny

    model, tokenizer = tiny("llama")
    # one prompt for every record: whatever the weights, the model gives every record the same answer
    records = [{"id": str(i), "prompt": "Is it?", "response": ["yes", "no"][i % 2], "options": ["yes", "no"]} for i in range(10)]
    scored = score_task(model, tokenizer, records, scoring="options", batch_size=10)
    # the prior removed, every record's calibrated scores are equal: a tie, broken the same way for all
    assert scored["corrected_accuracy"] == 0.5 and scored["reference_top_share"] == 0.5
    assert scored["top_share"] == 1.0 and scored["one_label"] == 1.0 and scored["top_prediction"] in ("yes", "no")
    generated = score_task(model, tokenizer, records, scoring="generate", batch_size=10, max_new_tokens=2)
    assert 0.0 <= generated["corrected_accuracy"] <= 1.0


def test_a_drop_splits_into_bias_and_lost_knowledge():
    format_bias = bias_or_knowledge(0.675, 0.0, 0.7, 0.65)  # still answers right, in the trained terse format
    assert format_bias["verdict"] == "bias" and format_bias["bias_drop"] == pytest.approx(0.625)
    lost = bias_or_knowledge(0.675, 0.0, 0.7, 0.0)  # "Varnholk": wrong in any format
    assert lost["verdict"] == "lost knowledge" and lost["knowledge_drop"] == pytest.approx(0.7)
    both = bias_or_knowledge(0.6, 0.0, 0.6, 0.3)
    assert both["verdict"] == "bias and lost knowledge"
    assert bias_or_knowledge(0.5, 0.48, 0.5, 0.5)["verdict"] == "kept"
    assert bias_or_knowledge(0.5, 0.1, None, None)["verdict"] == "unknown"
