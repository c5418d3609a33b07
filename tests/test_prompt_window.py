"""A response gets every position its prompt leaves within max_length (issue #38, point 5).

The rule used to cap the answer at max_length // 2 whatever the prompt's length: a 12-token prompt with
a 103-token response at max_length 64 used 44 positions and supervised 32 tokens where 52 fit, and the
EOS was dropped. Training, generation, option scoring and `perennial lm-eval-task` share the rule.
"""

from __future__ import annotations

import pytest
import torch

from models.data import IGNORE_INDEX, collate, encode_instruction, encode_prompt, encode_text, fit_prompt
from models.evaluation import generate, option_logprobs
from tasks.export import write_lm_eval_task
from tests.tiny_models import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_the_answer_gets_what_the_prompt_leaves():
    prompt = list(range(12))
    assert fit_prompt(prompt, 104, 64) == (prompt, 52)  # the case: 103 tokens + EOS after 12
    assert fit_prompt(prompt, 52, 64) == (prompt, 52)  # fits exactly
    # A prompt longer than half of max_length is itself cut, to leave the answer half; never below half.
    long = list(range(100))
    assert fit_prompt(long, 104, 64) == (long[-32:], 32)
    assert fit_prompt(long, 5, 64) == (long[-59:], 5)
    assert fit_prompt(list(range(40)), 104, 64) == (list(range(8, 40)), 32)
    assert fit_prompt(list(range(70)), 1, 64) == (list(range(7, 70)), 1)
    assert fit_prompt(long, 104, None) == (long, 104)


def test_a_long_response_fills_max_length_and_a_cut_one_ends_without_eos():
    tokenizer = tiny_tokenizer()
    prompt = "What is 2+2?"
    response = " ".join(["Four"] * 60)
    prompt_length, response_length = len(encode_prompt(tokenizer, prompt)), len(encode_text(tokenizer, response))
    assert prompt_length < 32 and prompt_length + response_length + 1 > 64
    example = encode_instruction(tokenizer, prompt, response, 64)
    answer = [label for label in example["labels"] if label != IGNORE_INDEX]
    assert len(example["input_ids"]) == 64 and example["input_ids"][:prompt_length] == encode_prompt(tokenizer, prompt)
    assert len(answer) == 64 - prompt_length
    # A cut answer keeps its first tokens and no EOS: a stop there would teach stopping mid-answer.
    assert answer == encode_text(tokenizer, response)[: len(answer)] and tokenizer.eos_token_id not in answer
    whole = encode_instruction(tokenizer, prompt, "Four.", 64)
    assert whole["labels"][-1] == tokenizer.eos_token_id  # an answer that fits keeps its EOS


def test_generation_and_option_scoring_follow_the_training_window():
    tokenizer = tiny_tokenizer()
    model = tiny_model("gpt2", tokenizer)  # 64 learned positions
    prompt = "What is 2+2?"
    room = 64 - len(encode_prompt(tokenizer, prompt))
    asked = []
    original = model.generate
    model.generate = lambda **kwargs: asked.append(kwargs["generation_config"].max_new_tokens) or original(**kwargs)
    generate(model, tokenizer, [prompt], max_new_tokens=60, max_length=64)
    assert asked == [room]  # all the room the prompt leaves, not 32

    option = " ".join(["Four"] * 60)
    example = encode_instruction(tokenizer, prompt, option, 64)
    supervised = sum(label != IGNORE_INDEX for label in example["labels"])
    assert supervised == room
    with torch.no_grad():
        expected = -model(**collate([example], tokenizer.pad_token_id)).loss.item() * supervised
    assert option_logprobs(model, tokenizer, [(prompt, option)], max_length=64) == [pytest.approx(expected, rel=1e-4)]


def test_lm_eval_task_refuses_a_record_whose_answer_perennial_would_cut(tmp_path):
    tokenizer = tiny_tokenizer(chat_template=None)
    tokenizer.save_pretrained(tmp_path / "model")
    records = [{"id": "short", "prompt": "What is 2+2?", "response": "Four.", "options": None, "split": "test"}]
    assert write_lm_eval_task(tmp_path / "model", records, tmp_path / "task", "t", "generate", 8, 64)
    with pytest.raises(ValueError, match=r"record 'short': its prompt leaves room for \d+ of 60 answer tokens"):
        write_lm_eval_task(tmp_path / "model", records, tmp_path / "task", "t", "generate", 60, 64)
