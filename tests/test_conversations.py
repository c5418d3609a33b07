"""Multi-turn chats keep their whole conversation, from ingestion to training, replay and scoring (issue #38, point 3)."""

from __future__ import annotations

import json

import pytest
import torch

from models.cl.replay import ReplayBuffer
from models.data import IGNORE_INDEX, collate, encode_prompt, encode_record
from models.evaluation import option_logprobs, score_task
from perennial.config import IngestDatasetConfig, OptimConfig, TuningConfig
from perennial.ingest.records import Rejected, Shaper, canonical_line, record_id
from tasks.stage import StageData, StageSpec, encode_stage_data
from tests.tiny_models import NO_SYSTEM, tiny, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CHAT = [
    {"role": "system", "content": "Answer in French"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "Quatre."},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "Douze."},
]


def ingested(messages=CHAT, **spec) -> dict:
    shaper = Shaper(IngestDatasetConfig(name="chats", shape="chat", sources=[{"uri": "unused"}], **spec), None, "chats")
    return shaper({"messages": messages})


def supervised(tokenizer, example: dict) -> str:
    return tokenizer.decode([label for label in example["labels"] if label != IGNORE_INDEX])


def test_ingestion_keeps_every_turn_before_the_response():
    record = ingested()
    assert record["messages"] == CHAT[:4]  # the system message and the earlier assistant turn too
    assert (record["prompt"], record["response"]) == ("And times 3?", "Douze.")
    rid = record_id(record)
    assert canonical_line(rid, record, "train") == json.dumps({"id": rid, **record, "split": "train"}, ensure_ascii=False) + "\n"
    other_system = ingested([{"role": "system", "content": "Answer in German"}] + CHAT[1:])
    assert record_id(other_system) != rid  # the conversation is part of what the record is
    plain = ingested([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert "messages" not in plain and record_id(plain) == record_id({"prompt": "Hi", "response": "Hello", "options": None})
    with pytest.raises(Rejected, match="role 'tool'"):
        ingested(CHAT[:2] + [{"role": "tool", "content": "4"}] + CHAT[2:])


def test_an_over_long_conversation_loses_whole_earlier_exchanges_at_ingestion():
    long = "word " * 16  # 79 characters: each turn fits max_chars=100, the conversation does not
    messages = [CHAT[0], {"role": "user", "content": long}, CHAT[2], CHAT[3], CHAT[4]]
    with pytest.raises(Rejected, match="assembled prompt has"):
        ingested(messages, max_chars=100)
    record = ingested(messages, max_chars=100, over_long="truncate")
    assert record["messages"] == [CHAT[0], CHAT[3]]


@pytest.mark.parametrize("template", ["chatml", "default"])
def test_the_conversation_is_rendered_whole_through_the_chat_template(template):
    tokenizer = tiny_tokenizer() if template == "chatml" else tiny_tokenizer(chat_template=None)
    example = encode_record(tokenizer, ingested(), max_length=256, supervise="last")
    prompt_ids = encode_prompt(tokenizer, CHAT[:4])
    assert example["input_ids"] == prompt_ids + tokenizer.encode("Douze.", add_special_tokens=False) + [tokenizer.eos_token_id]
    text = tokenizer.decode(prompt_ids)
    for message in CHAT[:4]:
        assert message["content"] in text
    if template == "chatml":
        assert prompt_ids == tokenizer.apply_chat_template(CHAT[:4], add_generation_prompt=True, return_dict=False)
        assert "<|im_start|>system\nAnswer in French<|im_end|>" in text


def test_supervision_covers_the_last_answer_or_every_assistant_turn():
    tokenizer = tiny_tokenizer()
    record = ingested()
    assert supervised(tokenizer, encode_record(tokenizer, record, 256, "last")) == "Douze.<|im_end|>"
    assert supervised(tokenizer, encode_record(tokenizer, record, 256, "all")) == "Quatre.<|im_end|>Douze.<|im_end|>"
    single = {"prompt": "What is 2+2?", "response": "Four.", "options": None}
    assert encode_record(tokenizer, single, 256, "all") == encode_record(tokenizer, single, 256, "last")


def test_max_length_counts_the_whole_conversation_and_drops_earlier_turns_first():
    tokenizer = tiny_tokenizer()
    record = ingested()
    whole = encode_record(tokenizer, record, 256, "all")
    without_first_exchange = encode_prompt(tokenizer, [CHAT[0], CHAT[3]])
    answer = tokenizer.encode("Douze.", add_special_tokens=False) + [tokenizer.eos_token_id]
    fits = len(without_first_exchange) + len(answer)
    assert fits < len(whole["input_ids"])
    cut = encode_record(tokenizer, record, fits, "all")
    assert cut["input_ids"] == without_first_exchange + answer  # system message kept, the first exchange gone, the answer whole
    assert supervised(tokenizer, cut) == "Douze.<|im_end|>"


def test_a_template_that_refuses_or_drops_the_system_message_is_refused_clearly():
    with pytest.raises(ValueError, match=r"refuses a conversation with roles \['system'.*System role not supported"):
        encode_record(tiny_tokenizer(NO_SYSTEM), ingested(), 256)
    drops_system = "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="leaves out the system turn 'Answer in French'"):
        encode_record(tiny_tokenizer(drops_system), ingested(), 256)


def test_scoring_feeds_the_conversation_training_saw():
    model, tokenizer = tiny("qwen2")
    record = {**ingested(), "id": "chat", "options": ["Douze.", "Quatre."], "split": "test"}
    fed = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].tolist()), with_kwargs=True)
    try:
        score_task(model, tokenizer, [record], "generate", max_new_tokens=2, max_length=256)
    finally:
        handle.remove()
    assert fed[0] == [encode_prompt(tokenizer, CHAT[:4])]  # the prefill is the whole conversation
    for option in record["options"]:
        example = encode_record(tokenizer, {**record, "response": option}, 256, "last")
        count = sum(label != IGNORE_INDEX for label in example["labels"])
        with torch.no_grad():
            expected = -model(**collate([example], tokenizer.pad_token_id)).loss.item() * count
        (score,) = option_logprobs(model, tokenizer, [(record["messages"], option)], max_length=256)
        assert score == pytest.approx(expected, rel=1e-4)


def test_replay_trains_conversations_as_the_task_did(tmp_path):
    tokenizer = tiny_tokenizer()
    records = [{**ingested(), "id": "a"}, {"id": "b", "task": "chats", "prompt": "Hi", "response": "Hello", "options": None}]
    buffer = ReplayBuffer()
    buffer.add_task("chats", records, budget=2, strategy="uniform", seed=0)
    buffer.to_jsonl(tmp_path / "buffer.jsonl")
    replayed = ReplayBuffer.from_jsonl(tmp_path / "buffer.jsonl").records()
    spec = StageSpec(name="s", stage_root="r", work_dir=tmp_path, input_model_uri="u", seed=0, config_digest="d",
                     data=StageData(encoding="instruction", replay_mixing="only", supervise="all"),
                     optim=OptimConfig(max_length=256), tuning=TuningConfig())
    examples, _ = encode_stage_data(spec, tokenizer, [], replayed)
    expected = [encode_record(tokenizer, record, 256, "all") for record in records]
    assert sorted(map(str, examples)) == sorted(map(str, expected))
    assert replayed[0]["messages"] == CHAT[:4]
    assert any(supervised(tokenizer, e).startswith("Quatre.") for e in examples)
