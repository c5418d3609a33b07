"""lm-evaluation-harness, run with its defaults on an exported model, scores what Perennial's own scorer scores.

The harness encodes contexts with add_special_tokens=False and applies no chat template by default;
`perennial lm-eval-task` writes each record's exact prompt window as text, special tokens included.
Checked per record (the answer or the chosen option), not only the mean, on both prompt shapes that
doubled the BOS before (issue #17): a template that emits its own BOS, and none (BOS + default template).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from models.evaluation import choose_options, score_task
from models.loading import load_model_and_tokenizer, save_model
from models.tiny import build_tiny_llama, train_tokenizer
from perennial import demo_data
from app.cli import main
from perennial.config import TinyModelConfig

pytestmark = pytest.mark.usefixtures("single_torch_thread")

LLAMA_STYLE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"


def _model(tmp_path, chat_template: str | None):
    torch.manual_seed(0)
    tokenizer = train_tokenizer(demo_data.general_corpus(200, 1), 300)
    if chat_template:
        tokenizer.chat_template = chat_template
    model = build_tiny_llama(tokenizer, TinyModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=2, num_key_value_heads=2))
    return save_model(model, tokenizer, tmp_path / "model")


def _lm_eval(model_dir, task_dir, name):
    import lm_eval
    from lm_eval.tasks import TaskManager

    result = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir}", tasks=[name], device="cpu",
                                     task_manager=TaskManager(include_path=str(task_dir)), log_samples=True)
    samples = sorted(result["samples"][name], key=lambda sample: sample["doc_id"])
    return result["results"][name], samples


@pytest.mark.parametrize("template", [None, LLAMA_STYLE], ids=["default-template", "template-emits-bos"])
def test_lm_eval_generation_scores_as_perennial_does(tmp_path, template):
    model_dir = _model(tmp_path, template)
    task = demo_data.demo_tasks(1)["arithmetic"]
    records = demo_data.task_records(task, 4, 12, 1)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert main(["lm-eval-task", str(model_dir), str(data), str(tmp_path / "task"), "--name", "gen_task",
                 "--max-new-tokens", "4", "--max-length", "64"]) == 0
    written = yaml.safe_load((tmp_path / "task" / "gen_task.yaml").read_text())
    # absolute: lm_eval may run in any directory
    assert written["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "task" / "gen_task.jsonl").resolve())

    model, tokenizer = load_model_and_tokenizer(model_dir)
    test = [record for record in records if record["split"] == "test"]
    ours = score_task(model, tokenizer, test, "generate", batch_size=4, max_new_tokens=4, max_length=64)
    theirs, samples = _lm_eval(model_dir, tmp_path / "task", "gen_task")
    assert len(samples) == len(test) == 12  # the train records of data.jsonl are left out
    assert any(prediction.strip() for prediction in ours["predictions"])  # something to compare, not all empty
    assert [sample["filtered_resps"][0].strip() for sample in samples] == [p.strip() for p in ours["predictions"]]
    assert theirs["exact_match,none"] == pytest.approx(ours["accuracy"])


def test_lm_eval_option_scoring_chooses_as_perennial_does(tmp_path):
    model_dir = _model(tmp_path, LLAMA_STYLE)
    options = ["red", "blue", "green", "yellow"]
    records = [{"id": str(i), "task": "colour", "prompt": f"What colour is the {creature}?", "response": options[i % 4],
                "options": options, "split": "test"} for i, creature in enumerate(demo_data.CREATURES[:12])]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert main(["lm-eval-task", str(model_dir), str(data), str(tmp_path / "task"), "--name", "mc_task",
                 "--scoring", "options", "--max-length", "64"]) == 0

    model, tokenizer = load_model_and_tokenizer(model_dir)
    chosen = choose_options(model, tokenizer, records, batch_size=4, max_length=64)
    theirs, samples = _lm_eval(model_dir, tmp_path / "task", "mc_task")
    picked = [max(range(len(options)), key=lambda i, s=sample: s["filtered_resps"][i][0]) for sample in samples]
    assert [options[i] for i in picked] == chosen
    assert theirs["acc,none"] == pytest.approx(sum(c == r["response"] for c, r in zip(chosen, records)) / len(records))


def test_lm_eval_scores_conversations_as_perennial_does(tmp_path):
    """A conversation's context is its whole rendered prompt window: system message, earlier turns and all (issue #38)."""
    model_dir = _model(tmp_path, None)  # the default template renders the turns
    records = [{"id": str(i), "task": "chat", "prompt": f"And the {creature}?", "response": "It walks.", "options": None,
                "split": "test", "messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "What does the river do?"},
                                              {"role": "assistant", "content": "It flows."},
                                              {"role": "user", "content": f"And the {creature}?"}]}
               for i, creature in enumerate(demo_data.CREATURES[:6])]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert main(["lm-eval-task", str(model_dir), str(data), str(tmp_path / "task"), "--name", "chat_task",
                 "--max-new-tokens", "6", "--max-length", "128"]) == 0
    contexts = [json.loads(line)["context"] for line in (tmp_path / "task" / "chat_task.jsonl").read_text().splitlines()]
    assert all("Be brief." in context and "It flows." in context for context in contexts)

    model, tokenizer = load_model_and_tokenizer(model_dir)
    ours = score_task(model, tokenizer, records, "generate", batch_size=4, max_new_tokens=6, max_length=128)
    theirs, samples = _lm_eval(model_dir, tmp_path / "task", "chat_task")
    assert [sample["filtered_resps"][0].strip() for sample in samples] == [p.strip() for p in ours["predictions"]]
    assert theirs["exact_match,none"] == pytest.approx(ours["accuracy"])


def test_records_without_test_split_or_options_are_refused(tmp_path, capsys):
    model_dir = _model(tmp_path, None)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "p", "response": "r", "options": None, "split": "train"}) + "\n")
    assert main(["lm-eval-task", str(model_dir), str(data), str(tmp_path / "task")]) == 1
    assert "no test records" in capsys.readouterr().err
    data.write_text(json.dumps({"id": "a", "prompt": "p", "response": "r", "options": None, "split": "test"}) + "\n")
    assert main(["lm-eval-task", str(model_dir), str(data), str(tmp_path / "task"), "--scoring", "options"]) == 1
    assert "has no options" in capsys.readouterr().err
