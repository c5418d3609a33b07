"""The version page in a real browser: MLflow's UI renders a registered version's description in headless
Chromium (Debian's package), and the text a reviewer reads is asserted: the verdict, the sample answers, a
special token shown as written (not swallowed as an HTML tag), and the champion's column (issue #44).

Skipped, saying why, where no Chromium is installed; `.ci/run` installs it.
"""

from __future__ import annotations

import html.parser
import shutil
import subprocess
import uuid

import pytest
from mlflow.tracking import MlflowClient

from perennial import registry
from perennial.cl_metrics import AccuracyMatrix
from perennial.config import GatesConfig
from perennial.reports import markdown_summary
from perennial.tracking import UI_WORKFLOW
from tasks.register import page_summary
from tests.test_registry import CHANCE, TASKS, metrics, retrain_run

CHROMIUM = next((path for path in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if path), None)
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to render the page: `apt-get install chromium chromium-driver` "
                       "(.ci/run installs them where missing)"),
]

# The probe notes' flags (the machine's network is closed: background networking would be refused at every start).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


class _Text(html.parser.HTMLParser):
    """The text of a DOM dump, as a person reads it (scripts and styles left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style") and self._skip > 0
        if tag in ("p", "div", "tr", "li", "h1", "h2", "h3", "br", "table"):
            self.parts.append("\n")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def rendered(url: str, profile, wait_ms: int = 25_000) -> str:
    """The page's text after its scripts ran (the MLflow UI renders the description client-side)."""
    out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={wait_ms}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180)
    parser = _Text()
    parser.feed(out.stdout)
    return "".join(parser.parts)


def register(client: MlflowClient, name: str, values: dict, samples: dict | None = None, summary: str = "run summary") -> dict:
    run = retrain_run(client, name)
    for key, value in {"cit.optim.lr": "0.0003" if samples is None else "0.001", "cit.tuning.method": "attn-proj"}.items():
        client.log_param(run.info.run_id, key, value)
    tags = {"base_model": "SmolLM2-135M-Instruct.Q4_1.gguf", "checkpoint_uri": f"s3://bucket/runs/{run.info.run_id}/final",
            **{f"dataset.{task}": "d" * 16 for task in TASKS}}
    return registry.register_version(client, name, f"{run.info.artifact_uri}/model", values, GatesConfig(), auto_promote=True,
                                     run_id=run.info.run_id, tags=tags, description=summary, samples=samples)


SAMPLES = {
    "probes": [{"group": "capitals (held-out)", "prompt": "What is the capital of France?", "reference": "Paris"},
               {"group": "general", "prompt": "Tell me about the moon.", "reference": None}],
    "columns": [{"label": "base", "model_uri": "s3://b/base", "answers": ["The capital of France is Paris.", "The moon orbits us."]},
                {"label": "champion", "model_uri": "s3://b/v1", "answers": ["Paris", "The moon is a rock."]},
                {"label": "candidate", "model_uri": "s3://b/v2", "answers": ["Varnholk <issue_start>", "norv skel"]}],
    "max_new_tokens": 32, "champion_version": "1",
}


def test_the_version_page_shows_verdict_answers_escaped_tokens_and_the_champion_column(services, tmp_path):
    client = MlflowClient(services.mlflow_uri)
    name = f"page-{uuid.uuid4().hex[:8]}"
    healthy = metrics([0.8, 0.8, 0.8], ppl=19.0, kl=1.0, chance=CHANCE)
    assert register(client, name, healthy)["promoted"]  # v1: champion
    matrix = AccuracyMatrix(tasks=TASKS, rows=[[0.1, 0.1, 0.1], [0.8, 0.3, 0.2]])
    drift = [{"kl_mean": 0.0, "top_gainers": []}, {"kl_mean": 8.2, "top_gainers": [{"token": "<issue_start>", "delta": 0.31}]}]
    summary = page_summary(markdown_summary(matrix, {"ap": 0.5}, drift=drift, drift_labels=["before-cit", "cit-01-arithmetic"]))
    blocked = metrics([0.8, 0.3, 0.2], ppl=25.0, kl=8.2, chance=CHANCE)
    v2 = register(client, name, blocked, samples=SAMPLES, summary=summary)
    assert v2["verdict"] == "BLOCKED" and v2["version"] == 2

    text = rendered(f"{services.mlflow_uri}/#/models/{name}/versions/2?{UI_WORKFLOW}", tmp_path / "profile")
    assert "BLOCKED: " in text and "max_output_drift_kl" in text, text[:3000]
    assert "Varnholk <issue_start>" in text and "The capital of France is Paris." in text  # sample answers, escaped
    assert "'<issue_start>' +0.310" in text  # the drift table's token, not an empty ''
    assert "champion v1" in text and "candidate v2" in text  # the champion's column beside the candidate's
    assert f"perennial promote {name} 2 --reason" in text and "Promote model" in text
    assert "cit.optim.lr" in text and "0.0003" in text and "0.001" in text  # what changed: key: old -> new
